"""dual_modality: the separation term (hand-computed values, gradients into the current task's prompt and
vision adapter only, off when it should be), adapters on the vision tower only, one route for both the
adapter and the prompt, and a run that reports routing accuracy."""

import copy
import json
import math

import pytest
import torch

from conftest import forward, routed_forward, SMALL_MODEL, colour_stream, prompt_batch, task_batch, write_colour_tasks, write_recipe
from lvlm_cl.config import load_recipe
from lvlm_cl.methods.dual_modality import DualModality, separation_loss
from lvlm_cl.data.dataset import TASK_IDS
from lvlm_cl.models.continual import held, is_continual
from lvlm_cl.methods.routing import routers
from lvlm_cl.models.continual import generate as routed_generate
from lvlm_cl.models import parts, trainable_state_dict
from lvlm_cl.train import run


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)      # adapters' initialisation draws from the global generator


@pytest.fixture(scope="module")
def tiny(tiny_left):
    return tiny_left


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    return colour_stream(tmp_path_factory.mktemp("dual"))


_batch = task_batch


def _method_at(model, processor, stream, task_index, **kwargs):
    """The method set up on a frozen copy of ``model`` and taken through the tasks before ``task_index``
    (before_task, a key step, after_task, as in a run), then into ``task_index``'s before_task (if there is
    such a task)."""
    model = copy.deepcopy(model).requires_grad_(False).train()
    method = DualModality(r=2, length=3, **kwargs)
    method.setup(model, stream)
    for task in stream[:task_index]:
        method.before_task(task, model, task.train_records)
        method.loss(model, _batch(processor, task.train_records[:4], [task.index] * 4), None, task)
        method.after_task(task, model, task.train_records)
    if task_index < len(stream):
        method.before_task(stream[task_index], model, stream[task_index].train_records)
    return method, model


def test_separation_loss_is_the_hand_computed_cross_entropy():
    features = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    prompts = torch.tensor([[[1.0, 0.0], [1.0, 0.0]],        # task 0: mean (1, 0)
                            [[0.0, 2.0], [0.0, 0.0]]])       # task 1: mean (0, 1)
    # cos = identity; / 0.5 -> logits [[2, 0], [0, 2]]
    own = separation_loss(features, prompts, torch.tensor([0, 1]), temperature=0.5)
    assert own.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    swapped = separation_loss(features, prompts, torch.tensor([0, 0]), temperature=0.5)
    assert swapped.item() == pytest.approx((math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))) / 2, rel=1e-6)
    # Only directions count (cosine): scaling a feature or a prompt changes nothing.
    assert separation_loss(5 * features, 3 * prompts, torch.tensor([0, 1]), 0.5).item() == pytest.approx(own.item())


def test_adapters_are_on_the_vision_tower_only_and_only_the_current_task_trains(tiny, stream):
    method, model = _method_at(*tiny, stream, 1)
    adapted = {n for n, _ in model.named_parameters() if ".cl_dual_modality_" in n}
    assert adapted and all("vision_tower" in n for n in adapted)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in adapted if ".cl_dual_modality_01." in n} | {
        n for n, _ in model.named_parameters() if n.endswith("continual.dual_modality.slots.1.prompt")}
    saved = trainable_state_dict(model)     # every task's adapter and prompt is saved, frozen or not
    assert any(".cl_dual_modality_00." in n for n in saved) and any("slots.0.prompt" in n for n in saved)
    assert routers(model) == [method.pool]  # evaluation finds the router and reports its accuracy


def test_language_true_extends_each_tasks_adapter_to_the_language_model(tiny, stream):
    method, model = _method_at(*tiny, stream, 1, language=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and ".cl_dual_modality_01." in n}
    assert any("vision_tower" in n for n in trainable) and any("language_model" in n for n in trainable)
    assert not any(".cl_dual_modality_00." in n for n, p in model.named_parameters() if p.requires_grad)
    # The language model's adapter follows each sample's route too: task 1's adapter changes only its samples.
    batch = _batch(tiny[1], stream[1].train_records[:2] + stream[0].train_records[:2], [1, 1, 0, 0])
    with torch.no_grad():
        before = forward(model, batch).logits
        for n, p in model.named_parameters():
            if "language_model" in n and ".lora_B.cl_dual_modality_01." in n:
                p.add_(0.5)
        after = forward(model, batch).logits
    assert not torch.allclose(before[:2], after[:2], atol=1e-3) and torch.allclose(before[2:], after[2:], atol=1e-6)


def test_no_term_on_the_first_task_or_at_zero_weight(tiny, stream):
    method, model = _method_at(*tiny, stream, 0)
    batch = _batch(tiny[1], stream[0].train_records[:4], [0] * 4)
    assert method.loss(model, batch, forward(model, batch), stream[0]) is None     # one known task: nothing to push from
    method, model = _method_at(*tiny, stream, 1, contrast_weight=0.0)
    batch = _batch(tiny[1], stream[1].train_records[:4], [1] * 4)
    assert method.loss(model, batch, forward(model, batch), stream[1]) is None


def test_the_term_on_the_model_and_where_its_gradient_goes(tiny, stream):
    method, model = _method_at(*tiny, stream, 1, contrast_weight=0.5, temperature=0.2)
    pool = method.pool
    # With ``init: previous`` the new prompt is a copy of the old one: both tasks score the same, CE = log 2.
    batch = _batch(tiny[1], stream[1].train_records[:4], [1] * 4)
    forward(model, batch)
    assert method.separation_term(batch, stream[1]).item() == pytest.approx(0.5 * math.log(2), rel=1e-5)

    with torch.no_grad():
        pool.slots[1].prompt.add_(torch.randn_like(pool.slots[1].prompt))
    seen = []
    handle = parts(model)["projector"].register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    batch = _batch(tiny[1], stream[1].train_records[:2] + stream[0].train_records[:2], [1, 1, 0, 0])  # 2 replayed
    forward(model, batch)
    handle.remove()
    term = method.separation_term(batch, stream[1])
    # By hand: each sample has one image; its feature is the mean of its image tokens.
    feats = seen[0].mean(1)
    protos = torch.stack([pool.slots[0].prompt.mean(0), pool.slots[1].prompt.mean(0)])
    logits = torch.nn.functional.cosine_similarity(feats[:, None], protos[None], dim=-1) / 0.2
    expected = 0.5 * torch.nn.functional.cross_entropy(logits, torch.tensor([1, 1, 0, 0]))
    assert term.item() == pytest.approx(expected.item(), rel=1e-5)

    # The gradient reaches the new task's prompt and vision adapter, and nothing else.
    model.zero_grad()
    term.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.endswith("slots.1.prompt") for n in grads)
    assert any(".lora_B.cl_dual_modality_01." in n for n in grads)
    assert all(n.endswith("slots.1.prompt") or ".cl_dual_modality_01." in n for n in grads), sorted(grads)
    # The activations kept for the term are used once: a second call without a forward adds nothing.
    assert method.separation_term(batch, stream[1]) is None


def test_one_route_picks_both_the_vision_adapter_and_the_prompt(tiny, stream):
    method, model = _method_at(*tiny, stream, 2)                  # both tasks trained, their keys fitted
    model.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():       # every task's part far from its start, so a wrong route shows
        for n, p in model.named_parameters():
            if is_continual(n) and (n.endswith(".prompt") or "lora_B" in n):
                p.copy_(torch.randn(p.shape, generator=g))
    records = stream[0].test_records[:2] + stream[1].test_records[:2]
    prompts = prompt_batch(tiny[1], records)
    truth = torch.tensor([0, 0, 1, 1])
    images = []
    handle = parts(model)["projector"].register_forward_hook(lambda m, a, out: images.append(out))
    with torch.no_grad():
        routed = routed_forward(model, prompts).logits
        with held(model, task_ids=truth, input_ids=prompts["input_ids"]):
            forced = model(**prompts).logits
        with held(model, task_ids=1 - truth, input_ids=prompts["input_ids"]):
            wrong = model(**prompts).logits
    handle.remove()
    assert method.pool.selected is None                     # released after each call
    assert torch.allclose(routed, forced, atol=1e-5)
    assert not torch.allclose(routed, wrong, atol=1e-3)
    # The image features follow the route: each sample's images went through its own task's adapter.
    assert torch.allclose(images[0], images[1], atol=1e-5) and not torch.allclose(images[0], images[2], atol=1e-3)
    steps = []
    handle = model.register_forward_pre_hook(lambda m, a: steps.append(method.pool.selected.tolist()))
    with torch.no_grad():
        generated = routed_generate(model, **prompts, max_new_tokens=3, do_sample=False,
                                    pad_token_id=tiny[1].tokenizer.pad_token_id)
    handle.remove()
    assert steps == [[0, 0, 1, 1]] * 3                      # routed by itself, the same choice at every step
    assert method.pool.selected is None
    assert generated.shape[0] == 4


@pytest.mark.parametrize("bad, match", [({"r": 0}, "'r'"), ({"length": 1.5}, "length"), ({"alpha": -1}, "alpha"),
                                        ({"contrast_weight": -0.1}, "contrast_weight"),
                                        ({"contrast_weight": float("nan")}, "contrast_weight"),
                                        ({"temperature": 0}, "temperature"), ({"init": "zeros"}, "init"), ({"language": 1}, "language"),
                                        ({"key_mode": "random"}, "key_mode"), ({"keys_per_task": 0}, "keys_per_task")])
def test_settings_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        DualModality(**bad)


def test_refuses_the_recipe_lora(tiny, stream):
    from lvlm_cl.config import LoraSettings, ModelConfig
    from lvlm_cl.models import apply_training_setup

    model = apply_training_setup(copy.deepcopy(tiny[0]), ModelConfig(lora=LoraSettings(r=2)))
    with pytest.raises(ValueError, match="remove model.lora"):
        DualModality().setup(model, stream)


@pytest.mark.slow
def test_a_run_trains_only_the_method_and_reports_routing_accuracy(tmp_path):
    files = write_colour_tasks(tmp_path / "data", n_train=16, n_test=8)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", files, out, steps_per_task=3)
    frozen = ["model.freeze_vision_tower=true", "model.freeze_projector=true", "model.freeze_language_model=true"]
    run(load_recipe(recipe, [*SMALL_MODEL, *frozen, "methods=[{name: dual_modality, r: 2, length: 2}]"]),
        progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["routing_accuracy"] == {"colour": {"colour": 100.0}, "warmth": {"colour": 100.0, "warmth": 100.0}}
    trainable = metrics["trainable_parameters"]
    assert trainable["colour"] == trainable["warmth"] > 0      # one adapter and one prompt per task, same size
