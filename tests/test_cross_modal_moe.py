"""cross_modal_moe: the alignment and relation terms on hand-made tensors, the adapter's mixture (cross-modal
gates, zero start, per-task experts), anchors and the relation term in the hooks, generation without task
labels, resume state, settings, and a real run with replay."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL_MODEL, colour_stream, prompt_batch, task_batch, write_colour_tasks, write_recipe, forward, routed_forward
from lvlm_cl.config import load_recipe
from lvlm_cl.data.encoding import encode_record
from lvlm_cl.models.continual import generate as routed_generate
from lvlm_cl.methods.cross_modal_moe import CrossModalMoE, alignment_loss, cosine_matrix, relation_loss
from lvlm_cl.models import parts, trainable_state_dict
from lvlm_cl.train import run
from lvlm_cl.state_io import load_state


@pytest.fixture(scope="module")
def tiny(tiny_left):
    return tiny_left


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    return colour_stream(tmp_path_factory.mktemp("moe"))


_batch = task_batch


_prompts = prompt_batch


def _randomise(group, seed=0):
    """Give a group's experts and router values far from their zero start, so its effect shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (group.up, group.route_image, group.route_text, group.route_bias):
            p.copy_(torch.randn(p.shape, generator=g))


# The alignment term

def test_alignment_loss_hand_value_and_aligned_below_shuffled():
    e = torch.eye(2)
    # Two orthonormal pairs at temperature 1: each row's logits are (1, 0), so each direction is log(1 + e^-1).
    assert float(alignment_loss(e, e, temperature=1.0)) == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(6, 16, generator=g)
    image = text + 0.1 * torch.randn(6, 16, generator=g)
    aligned = alignment_loss(image, text, temperature=0.1)
    shuffled = alignment_loss(image[torch.tensor([1, 2, 3, 4, 5, 0])], text, temperature=0.1)
    assert float(aligned) < 0.05 < float(shuffled) - 1.0


def test_alignment_gradient_pulls_each_image_towards_its_own_text():
    g = torch.Generator().manual_seed(1)
    text = torch.randn(5, 8, generator=g)
    image = torch.randn(5, 8, generator=g).requires_grad_(True)
    loss = alignment_loss(image, text, temperature=0.5)
    loss.backward()
    before = F.cosine_similarity(image.detach(), text, dim=-1)
    stepped = image.detach() - 0.05 * image.grad
    after = F.cosine_similarity(stepped, text, dim=-1)
    assert bool((after > before).all())                       # every pair moves closer
    assert float(alignment_loss(stepped, text, temperature=0.5)) < float(loss)


def test_alignment_with_one_shared_instruction_is_log_n_and_asks_nothing_of_the_images():
    """Samples with the same instruction are positives of each other: with identical texts every image is
    equally right for every text, image-to-text is log N whatever the images, and it has no gradient."""
    g = torch.Generator().manual_seed(2)
    image = torch.randn(4, 8, generator=g).requires_grad_(True)
    text = torch.randn(1, 8, generator=g).expand(4, 8)
    same = torch.ones(4, 4, dtype=torch.bool)
    logits = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T / 0.1
    i2t = -(F.log_softmax(logits, dim=-1) / 4).sum(-1).mean()
    assert float(i2t) == pytest.approx(math.log(4), abs=1e-5)
    (grad,) = torch.autograd.grad(i2t, image)
    assert float(grad.abs().max()) < 1e-5
    assert torch.isfinite(alignment_loss(image, text, same))


# The relation term

def test_relation_loss_is_zero_for_unchanged_rotated_or_rescaled_representations():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 8, generator=g)
    ref = cosine_matrix(x)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))     # an orthogonal matrix
    assert float(relation_loss(x, ref)) == 0.0
    assert float(relation_loss(x @ q, ref)) < 1e-10
    assert float(relation_loss(x * torch.rand(6, 1, generator=g).add(0.5), ref)) < 1e-10


def test_relation_loss_measures_a_change_of_structure():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 8, generator=g)
    ref = cosine_matrix(x)
    flipped = x.clone()
    flipped[0] = -flipped[0]          # every similarity to sample 0 changes sign
    # Row 0 and column 0 change by 2 S[0, j] each: 2 * sum_j (2 S0j)^2 over the 5 * 4 off-diagonal entries.
    expected = 2 * float(((2 * ref[0, 1:]) ** 2).sum()) / 20
    assert float(relation_loss(flipped, ref)) == pytest.approx(expected, rel=1e-5)
    assert float(relation_loss(x + torch.randn(5, 8, generator=g), ref)) > 1e-3


# The adapter

def test_gates_are_cross_modal_sigmoids_of_image_and_instruction(tiny, stream):
    model = copy.deepcopy(tiny[0])
    method = CrossModalMoE(experts_per_task=2, bottleneck=3)
    method.setup(model, stream)
    method.before_task(stream[0], model, [])
    adapter = method.adapter
    group = adapter.groups[0]
    _randomise(group)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 1, group.down.shape[1], generator=g)
    q1, q2 = torch.randn(2, 1, group.route_text.shape[0], generator=g)
    with torch.no_grad():
        out = adapter(x, q1)
        # By hand: sum_e sigmoid(w_e . x/|x| + v_e . q/|q| + b_e) * up_e^T gelu(down_e^T x)
        want = torch.zeros(group.up.shape[-1])
        for e in range(2):
            gate = torch.sigmoid(F.normalize(x[0, 0], dim=0) @ group.route_image[:, e]
                                 + F.normalize(q1[0], dim=0) @ group.route_text[:, e] + group.route_bias[e])
            want += gate * (F.gelu(x[0, 0] @ group.down[e]) @ group.up[e])
        assert torch.allclose(out[0, 0], want, atol=1e-5)
        assert not torch.allclose(adapter(x, q2), out, atol=1e-4)             # the instruction routes
        group.route_text.zero_()
        assert torch.allclose(adapter(x, q1), adapter(x, q2))                 # ...through its router columns only


def test_adapter_starts_as_the_base_and_a_new_task_changes_nothing(tiny, stream):
    model = copy.deepcopy(tiny[0]).eval()
    base = copy.deepcopy(tiny[0]).eval()
    processor = tiny[1]
    batch = _prompts(processor, stream[0].test_records + stream[1].test_records)
    method = CrossModalMoE()
    method.setup(model, stream)
    method.before_task(stream[0], model, [])
    with torch.no_grad():
        assert torch.allclose(forward(model, batch).logits, forward(base, batch).logits, atol=1e-6)
        _randomise(method.adapter.groups[0])                 # as if task 0 had trained its experts
        after_first = forward(model, batch).logits
        assert not torch.allclose(after_first, forward(base, batch).logits, atol=1e-3)
        method.before_task(stream[1], model, [])             # task 1's experts join, at zero
        assert torch.allclose(forward(model, batch).logits, after_first, atol=1e-6)


def test_only_the_current_tasks_experts_and_the_heads_train(tiny, stream):
    model = copy.deepcopy(tiny[0]).train()
    model.requires_grad_(False)
    processor = tiny[1]
    method = CrossModalMoE(relation_weight=0.0)
    method.setup(model, stream)
    method.before_task(stream[0], model, [])
    method.before_task(stream[1], model, [])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".groups.1." in n or "_head." in n for n in trainable)
    batch = _batch(processor, stream[1].train_records[:4], [1] * 4)
    out = forward(model, batch)
    (out.loss + method.loss(model, batch, out, stream[1])).backward()
    group0, group1 = method.adapter.groups
    assert group0.up.grad is None and group0.down.grad is None
    assert group1.up.grad.abs().sum() > 0 and method.adapter.text_head.weight.grad.abs().sum() > 0
    saved = trainable_state_dict(model)
    assert any("continual.cross_modal_moe.groups.0.up" in n for n in saved)   # frozen, but part of the stage
    assert any(n.endswith("continual.cross_modal_moe.known") for n in saved)


# Anchors and the relation term in the hooks

def test_relation_term_starts_after_the_first_task_and_grows_when_the_images_drift(tiny, stream):
    model = copy.deepcopy(tiny[0]).train()
    processor = tiny[1]
    method = CrossModalMoE(align_weight=0.0, anchors_per_task=3)
    method.setup(model, stream)
    method.before_task(stream[0], model, [])
    # Two replayed samples of another task first: anchors are the task's own samples only.
    batch = _batch(processor, stream[1].train_records[:2] + stream[0].train_records[:4], [1, 1, 0, 0, 0, 0])
    out = forward(model, batch)
    assert method.loss(model, batch, out, stream[0]) is None                 # no term before a task has ended
    assert len(method.pending) == 3
    want = [encode_record(processor, r, 512) for r in stream[0].train_records[:3]]
    image = model.config.image_token_id
    for anchor, enc in zip(method.pending, want):
        instruction = enc.input_ids[(enc.input_ids != image) & (enc.labels == -100)]
        assert torch.equal(anchor["tokens"], instruction[:len(anchor["tokens"])])
        assert anchor["pixel_values"].shape[0] == 1 and anchor["task"] == 0
    _randomise(method.adapter.groups[0])
    method.after_task(stream[0], model, [])
    assert len(method.anchors) == 3 and method.reference.shape == (3, 3) and method.pending == []

    method.before_task(stream[1], model, [])
    batch = _batch(processor, stream[1].train_records[:4], [1] * 4)
    term = method.loss(model, batch, forward(model, batch), stream[1])
    assert term is not None and float(term) < 1e-10                            # nothing changed yet
    with torch.no_grad():                                                        # the image pathway drifts
        for p in parts(model)["vision_tower"].parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.zero_grad()
    term = method.loss(model, batch, forward(model, batch), stream[1])
    assert float(term) > 1e-4
    term.backward()
    group0, group1 = method.adapter.groups
    assert group0.up.grad is None                                               # earlier experts stay frozen
    assert group1.up.grad.abs().sum() > 0                                       # the new ones can restore it
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in parts(model)["vision_tower"].parameters())


def test_a_new_tasks_reference_keeps_the_earlier_block(tiny, stream):
    model = copy.deepcopy(tiny[0]).train()
    processor = tiny[1]
    method = CrossModalMoE(anchors_per_task=2)
    method.setup(model, stream)
    for task in stream:
        method.before_task(task, model, [])
        batch = _batch(processor, task.train_records[:4], [task.index] * 4)
        method.loss(model, batch, forward(model, batch), task)
        if task.index == 0:
            method.after_task(task, model, [])
            first = method.reference.clone()
            with torch.no_grad():
                for p in parts(model)["projector"].parameters():
                    p.add_(0.5 * torch.randn_like(p))
    method.after_task(stream[1], model, [])
    assert method.reference.shape == (4, 4)
    assert torch.equal(method.reference[:2, :2], first)                        # as recorded when task 0 ended
    with torch.no_grad():
        now = cosine_matrix(method.represent(model.eval(), method.anchors))
    assert torch.allclose(method.reference[2:], now[2:].cpu(), atol=1e-5)       # task 1's rows: now
    assert not torch.allclose(now[:2, :2].cpu(), first, atol=1e-3)


# Inference

def test_generation_routes_by_itself_like_training(tiny, stream):
    """The instruction feature is the same with the answer in the batch (training) and without it
    (generation): the adapted image features agree; batched generation equals one-by-one."""
    model = copy.deepcopy(tiny[0]).eval()
    processor = tiny[1]
    method = CrossModalMoE()
    method.setup(model, stream)
    for task in stream:
        method.before_task(task, model, [])
        _randomise(method.adapter.groups[task.index], seed=task.index)
    records = stream[0].test_records[:2] + stream[1].test_records[:2]
    with torch.no_grad():
        # The projector's output (with the adapter's mixture) for the same images, as training and as inference
        # route them (read by a hook on the projector: the models' output fields for it differ across
        # transformers releases).
        images = []
        handle = parts(model)["projector"].register_forward_hook(lambda m, a, out: images.append(out))
        forward(model, _batch(processor, records, [0, 0, 1, 1]))
        routed_forward(model, _prompts(processor, records))
        handle.remove()
        trained, prompted = images
        assert trained.shape[0] == len(records) and torch.allclose(trained, prompted, atol=1e-5)
        tok = processor.tokenizer
        gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        batched = routed_generate(model, **_prompts(processor, records), **gen)
        new = batched[:, -4:]
        assert not bool(torch.isin(new, torch.tensor([tok.pad_token_id, tok.eos_token_id])).any())  # 4 real tokens
        for i, r in enumerate(records):
            assert torch.equal(routed_generate(model, **_prompts(processor, [r]), **gen)[0, -4:], batched[i, -4:])


# Resume and settings

def test_state_round_trips(tiny, stream):
    model = copy.deepcopy(tiny[0]).train()
    method = CrossModalMoE(anchors_per_task=2)
    method.setup(model, stream)
    method.before_task(stream[0], model, [])
    batch = _batch(tiny[1], stream[0].train_records[:2], [0, 0])
    method.loss(model, batch, forward(model, batch), stream[0])
    mid = method.state_dict()                        # a step checkpoint inside the task: pending anchors
    method.after_task(stream[0], model, [])
    other = CrossModalMoE(anchors_per_task=2)
    other.load_state_dict(method.state_dict())
    assert torch.equal(other.reference, method.reference) and len(other.anchors) == 2
    other.load_state_dict(mid)
    assert other.reference is None and len(other.pending) == 2


@pytest.mark.parametrize("bad, match", [({"experts_per_task": 0}, "experts_per_task"), ({"bottleneck": 1.5}, "bottleneck"),
                                        ({"align_weight": -1}, "align_weight"), ({"relation_weight": "x"}, "relation_weight"),
                                        ({"temperature": 0}, "temperature"), ({"anchors_per_task": 1}, "anchors_per_task"),
                                        ({"align_dim": True}, "align_dim"), ({"seed": 0.5}, "seed")])
def test_settings_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        CrossModalMoE(**bad)


@pytest.mark.slow
def test_a_run_with_replay_keeps_anchors_of_every_task(tmp_path):
    files = write_colour_tasks(tmp_path / "data", n_train=16, n_test=8)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", files, out, steps_per_task=3)
    run(load_recipe(recipe, [*SMALL_MODEL, "methods=[{name: cross_modal_moe, anchors_per_task: 4}, "
                                           "{name: replay, memory_per_task: 4}]"]), progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_completed"] == 2
    state = load_state(out / "checkpoints" / "task-01-warmth", "methods")["cross_modal_moe"]
    assert [a["task"] for a in state["anchors"]] == [0] * 4 + [1] * 4
    assert state["reference"].shape == (8, 8) and state["pending"] == []
