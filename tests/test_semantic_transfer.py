"""semantic_transfer (SECA): relevance weights from task keys, the per-sample weighted distillation, the
closed-set rule, prototype refinement and the cosine classifier, on hand-made tensors; then the method on
the tiny model (terms, gradients, the task-id hook, resume) and a real run."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import forward, routed_forward, SMALL_MODEL, png, record, task_batch, write_recipe
from lvlm_cl.methods.base import Task
from lvlm_cl.methods.lwf import LwF, distillation
from lvlm_cl.methods.routing import TaskKeyRouter
from lvlm_cl.methods.semantic_transfer import (AnswerPrototypes, SemanticTransfer, first_answers, is_closed_set,
                                               nearest_similarity, prototype_loss, refine_prototypes,
                                               relevance_weights)
from lvlm_cl.state_io import load_state, save_state

COLOUR_Q, WARMTH_Q = "What color is the image?", "Is this color warm or cold? Answer in one word."


# Relevance weights, by hand

def test_relevance_weights_equal_the_softmax_mass_on_earlier_tasks():
    old = torch.tensor([[0.9, 0.2], [0.1, 0.4]])
    current = torch.tensor([0.5, 0.8])
    T = 0.5
    for b in range(2):
        e = [math.exp(old[b, 0] / T), math.exp(old[b, 1] / T), math.exp(current[b] / T)]
        expected = (e[0] + e[1]) / sum(e)
        assert relevance_weights(old, current, T)[b].item() == pytest.approx(expected, rel=1e-5)
    assert relevance_weights(torch.zeros(3, 0), torch.ones(3), T).tolist() == [0.0, 0.0, 0.0]


def _router_with_keys(keys: list[torch.Tensor], known: int) -> TaskKeyRouter:
    router = TaskKeyRouter(known, keys[0].shape[-1], keys_per_task=1)
    with torch.no_grad():
        for t, k in enumerate(keys):
            router.slots[t].keys.copy_(k.unsqueeze(0))
            router.key_ready[t] = True
    router.known.fill_(known)
    return router


def test_weights_from_keys_and_queries():
    """Keys of two finished tasks along e0 and e1; the task in training has seen one query, along e2."""
    e = torch.eye(4)
    m = SemanticTransfer(relevance_temperature=0.05)
    m.router = _router_with_keys([e[0], e[1]], known=3)
    m.router._seen = {b"current": e[2]}
    q = torch.stack([e[0],                                 # identical to task 0's key
                     e[2],                                 # the current task's own instruction
                     3 * e[3],                             # unrelated to every task
                     e[0] + e[2]])                         # half old, half new
    w = m.weights(q, task_index=2)
    assert w[0].item() == pytest.approx(1.0, abs=1e-8)
    assert w[1].item() == pytest.approx(0.0, abs=1e-8)
    # Orthogonal to everything: every task at cos 0, so each earlier task takes a third.
    assert w[2].item() == pytest.approx(2 / 3, rel=1e-6)
    c = 1 / math.sqrt(2)
    expected = (math.exp(c / 0.05) + math.exp(0)) / (2 * math.exp(c / 0.05) + math.exp(0))
    assert w[3].item() == pytest.approx(expected, rel=1e-6)


def test_an_unfitted_earlier_task_does_not_count_and_an_empty_bank_is_far():
    e = torch.eye(3)
    router = _router_with_keys([e[0], e[1]], known=3)
    router.key_ready[1] = False                       # similarity -2: practically no mass
    m = SemanticTransfer(relevance_temperature=0.1)
    m.router = router
    w = m.weights(torch.stack([e[1]]), task_index=2)   # bank empty: current at -1; task 0 at 0
    expected = (math.exp(0) + math.exp(-20)) / (math.exp(0) + math.exp(-20) + math.exp(-10))
    assert w.item() == pytest.approx(expected, rel=1e-6)
    assert nearest_similarity(torch.ones(2, 3), None).tolist() == [-1.0, -1.0]


# Weighted distillation

def _logits(seed: int, shape=(2, 5, 7)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_distillation_weights_of_one_are_plain_lwf_and_scale_per_sample():
    student, teacher = _logits(0), _logits(1)
    mask = torch.tensor([[False, True, True, False], [False, False, True, True]])
    ones = distillation(student, teacher, mask, 2.0, torch.ones(2))
    assert ones.item() == pytest.approx(distillation(student, teacher, mask, 2.0).item(), rel=1e-6)
    only0 = distillation(student, teacher, mask, 2.0, torch.tensor([1.0, 0.0]))
    only1 = distillation(student, teacher, mask, 2.0, torch.tensor([0.0, 1.0]))
    # By hand: sample 0's two positions' KL over the four positions of the batch, times T^2.
    lp_s, lp_t = F.log_softmax(student / 2, -1), F.log_softmax(teacher / 2, -1)
    kl = (lp_t.exp() * (lp_t - lp_s)).sum(-1)          # (B, L)
    assert only0.item() == pytest.approx(float(kl[0, 1] + kl[0, 2]) / 4 * 4, rel=1e-5)
    assert only1.item() == pytest.approx(float(kl[1, 2] + kl[1, 3]) / 4 * 4, rel=1e-5)
    mixed = distillation(student, teacher, mask, 2.0, torch.tensor([0.3, 0.7]))
    assert mixed.item() == pytest.approx(0.3 * only0.item() + 0.7 * only1.item(), rel=1e-5)
    assert distillation(student, teacher, mask, 2.0, torch.zeros(2)).item() == 0.0


# SE-VPR pieces

def test_refinement_mixes_prototypes_by_text_relations():
    P = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # Orthogonal answers at a low temperature: the relation is the identity, nothing moves.
    assert torch.allclose(refine_prototypes(P, torch.eye(3), 0.01, 0.5), P, atol=1e-6)
    # Identical answers: uniform relation, every prototype moves half-way to the mean.
    same = refine_prototypes(P, torch.ones(3, 4), 0.1, 0.5)
    assert torch.allclose(same, 0.5 * P + 0.5 * P.mean(0, keepdim=True), atol=1e-6)
    # By hand: text cosines [[1, .6, 0], [.6, 1, .8], [0, .8, 1]] at temperature 0.5, weight 0.25.
    text = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 1.0, 0.0]])
    cos = [[1, 0.6, 0], [0.6, 1, 0.8], [0, 0.8, 1]]
    out = refine_prototypes(P, text, 0.5, 0.25)
    for i in range(3):
        e = [math.exp(c / 0.5) for c in cos[i]]
        mixed = sum(e[j] / sum(e) * P[j] for j in range(3))
        assert torch.allclose(out[i], 0.75 * P[i] + 0.25 * mixed, atol=1e-5)


def test_prototype_loss_is_the_cosine_classifier_cross_entropy():
    P = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    h = torch.tensor([[3.0, 0.0], [1.0, 1.0]], requires_grad=True)
    loss = prototype_loss(h, torch.tensor([0, 1]), P, 0.5)
    c = 1 / math.sqrt(2)
    first = -math.log(math.exp(2) / (math.exp(2) + math.exp(0)))
    second = -math.log(math.exp(c / 0.5) / (2 * math.exp(c / 0.5)))
    assert loss.tolist() == pytest.approx([first, second], rel=1e-5)
    loss.sum().backward()
    # h0 sits on its prototype: only turning towards the other one changes the loss (upwards); h1 is halfway
    # and is pushed towards its own prototype (+y) and away from the other (-x).
    assert abs(h.grad[0, 0].item()) < 1e-6 and h.grad[0, 1].item() > 0
    assert h.grad[1, 0].item() > 0 and h.grad[1, 1].item() < 0


def test_first_answers_and_the_closed_set_rule():
    labels = torch.tensor([[-100, -100, 5, 6, -100, 7], [-100, -100, -100, -100, -100, -100], [3, 4, 2, -100, -100, -100]])
    assert first_answers(labels) == [(2, (5, 6)), (None, ()), (0, (3, 4, 2))]
    rec = lambda a: record("x", None, "q?", a)                      # noqa: E731
    assert is_closed_set([rec("a"), rec("b")] * 2, 32)
    assert not is_closed_set([rec("a")] * 8, 32)                   # one answer: nothing to classify
    assert not is_closed_set([rec(str(i)) for i in range(8)], 32)  # every record its own answer: open text
    assert not is_closed_set([rec(str(i % 5)) for i in range(20)], 4)


def test_answer_prototypes_running_mean_and_merge():
    a = AnswerPrototypes()
    cls = a.add((5, 2), torch.ones(3))
    a.update(cls, torch.tensor([[2.0, 0.0], [0.0, 3.0]]), momentum=0.9)
    assert torch.allclose(a.protos[cls], torch.tensor([0.5, 0.5]))
    a.update(cls, torch.tensor([[0.0, 1.0]]), momentum=0.9)
    assert torch.allclose(a.protos[cls], torch.tensor([0.45, 0.55])) and a.counts[cls] == 3
    b = AnswerPrototypes.from_state(a.state())
    assert b.answers == [(5, 2)] and torch.equal(b.protos[0], a.protos[0])
    assert torch.equal(a.merged_over_processes().protos[0], a.protos[0])     # one process: unchanged


# The method on the tiny model

TASK0 = Task(0, "colour", "exact_match", [], [])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("sem")
    return {c: str(png(d / f"{c}.png", c)) for c in ("red", "green", "blue", "yellow")}


def _tasks(images):
    colour = [record(f"c{i}", images[c], COLOUR_Q, c, "colour") for i, c in enumerate(list(images) * 2)]
    warmth = [record(f"w{i}", images[c], WARMTH_Q, "warm" if c in ("red", "yellow") else "cold", "warmth")
              for i, c in enumerate(list(images) * 2)]
    return [Task(0, "colour", "exact_match", colour, colour), Task(1, "warmth", "exact_match", warmth, warmth)]


def _batch(processor, records, ids):
    return task_batch(processor, records, ids, max_length=256)


@pytest.fixture
def setup(tiny_small, images):
    model, processor = copy.deepcopy(tiny_small[0]).train(), tiny_small[1]
    return model, processor, _tasks(images)


def _nudge(model, scale=0.05):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lm_head" in n or "layers.1.mlp" in n:
                p.add_(scale * torch.randn(p.shape, generator=g))


def _finish_first_task(m, model, processor, stream):
    """Task 0 through its hooks: two training batches (its keys and prototypes), then its end."""
    m.setup(model, stream)
    m.before_task(stream[0], model, stream[0].train_records)
    for _ in range(2):
        batch = _batch(processor, stream[0].train_records, [0] * 8)
        m.loss(model, batch, forward(model, batch), stream[0])
    m.after_task(stream[0], model, stream[0].train_records)
    m.before_task(stream[1], model, stream[1].train_records)


def test_first_task_has_prototypes_but_no_distillation(setup):
    model, processor, stream = setup
    m = SemanticTransfer()
    m.setup(model, stream)
    m.before_task(stream[0], model, stream[0].train_records)
    batch = _batch(processor, stream[0].train_records, [0] * 8)
    # The task-id hook lets the model run on a batch that carries cl_task_ids.
    out = forward(model, batch)
    assert m.loss(model, batch, out, stream[0]) is None          # prototypes are made from this batch
    assert m.current is not None and len(m.current.ready()) == 4 and m.last_weights is None
    out = forward(model, batch)
    term = m.loss(model, batch, out, stream[0])
    assert term is not None and term.item() > 0
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(term, list(params.values()), allow_unused=True)
    touched = {n for (n, _), g in zip(params.items(), grads) if g is not None and g.abs().sum() > 0}
    assert any("language_model" in n for n in touched)
    assert not any("lm_head" in n for n in touched)     # the term acts on the states, before the head


def test_prototype_term_pulls_states_to_their_answers(setup):
    """Prototypes from a first pass, then the model moved: gradient steps on the term alone (prototypes
    nearly fixed) bring the states back to their answers' prototypes."""
    model, processor, stream = setup
    m = SemanticTransfer(alpha=0.0, proto_momentum=0.999)
    m.setup(model, stream)
    m.before_task(stream[0], model, stream[0].train_records)
    batch = _batch(processor, stream[0].train_records, [0] * 8)
    m.loss(model, batch, forward(model, batch), stream[0])
    _nudge(model, 0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    values = []
    for _ in range(4):
        term = m.loss(model, batch, forward(model, batch), stream[0])
        values.append(term.item())
        opt.zero_grad()
        term.backward()
        opt.step()
    assert all(later < earlier for earlier, later in zip(values, values[1:])), values


def test_distillation_term_is_zero_at_the_snapshot_and_scales_per_sample(setup, monkeypatch):
    model, processor, stream = setup
    m = SemanticTransfer(proto_weight=0.0, alpha=0.7, temperature=1.5)
    _finish_first_task(m, model, processor, stream)
    batch = _batch(processor, stream[1].train_records[:2], [1, 1])
    model.eval()
    assert abs(m.loss(model, batch, forward(model, batch), stream[1]).item()) < 1e-6
    _nudge(model)
    outputs = forward(model, batch)

    def term(w):
        monkeypatch.setattr(m, "weights", lambda q, t: torch.tensor(w))
        return m.loss(model, batch, outputs, stream[1]).item()

    lwf = LwF(alpha=0.7, temperature=1.5)
    lwf.load_state_dict(m.teacher.state_dict())
    assert term([1.0, 1.0]) == pytest.approx(lwf.loss(model, batch, outputs, stream[1]).item(), rel=1e-5)
    a, b = term([1.0, 0.0]), term([0.0, 1.0])
    assert a > 0 and b > 0
    assert term([0.25, 0.5]) == pytest.approx(0.25 * a + 0.5 * b, rel=1e-5)


def test_relevance_on_real_instructions(setup):
    """After the colour task, a replayed colour instruction is related to it and the warmth instructions less;
    with one instruction per task both weights follow from the one cosine c between the two queries."""
    model, processor, stream = setup
    T = 0.02
    m = SemanticTransfer(proto_weight=0.0, relevance_temperature=T)
    _finish_first_task(m, model, processor, stream)
    assert bool(m.router.key_ready[0]) and not bool(m.router.key_ready[1])
    batch = _batch(processor, stream[1].train_records[:3] + stream[0].train_records[:1], [1, 1, 1, 0])
    term = m.loss(model, batch, forward(model, batch), stream[1])
    w = m.last_weights
    assert term is not None and bool(((w > 0) & (w < 1)).all())
    tokens = m.encoder.instruction_tokens(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                          m.encoder.image_token_id)
    q = m.encoder.encode(tokens, "cpu")
    c = F.cosine_similarity(q[0], q[3], dim=0).item()
    assert c < 1
    # Warmth: old task at c, its own task at 1. Colour (replayed): old task at 1 (its only key), current at c.
    assert w[:3].tolist() == pytest.approx([1 / (1 + math.exp((1 - c) / T))] * 3, rel=1e-4)
    assert w[3].item() == pytest.approx(1 / (1 + math.exp((c - 1) / T)), rel=1e-4)
    assert m.relevance["warmth"][1] == 3                    # statistics over the task's own samples only


def test_replayed_samples_use_their_task_prototypes(setup):
    model, processor, stream = setup
    m = SemanticTransfer(alpha=0.0)
    _finish_first_task(m, model, processor, stream)
    old = m.answer_sets[0]
    assert len(old.answers) == 4 and all(p is not None for p in old.protos)
    frozen = [p.clone() for p in old.protos]
    batch = _batch(processor, stream[0].train_records[:4], [0, 0, 0, 0])     # only replayed samples
    term = m.loss(model, batch, forward(model, batch), stream[1])
    assert term is not None and term.item() > 0
    assert all(torch.equal(a, b) for a, b in zip(frozen, old.protos))         # old prototypes do not move
    assert m.current is not None and m.current.answers == []                 # nothing of the current task


def test_state_round_trip_gives_the_same_terms(setup, tmp_path):
    model, processor, stream = setup
    m = SemanticTransfer(alpha=0.5)
    _finish_first_task(m, model, processor, stream)
    batch = _batch(processor, stream[1].train_records[:4] + stream[0].train_records[:2], [1, 1, 1, 1, 0, 0])
    m.loss(model, batch, forward(model, batch), stream[1])                        # current prototypes exist now
    _nudge(model)
    save_state(tmp_path, "methods", {"semantic_transfer": m.state_dict()})         # as the checkpoint does
    state = load_state(tmp_path, "methods")["semantic_transfer"]
    resumed = SemanticTransfer(alpha=0.5)
    resumed.setup(model, stream)
    resumed.before_task(stream[1], model, stream[1].train_records)             # as a resume inside a task
    resumed.load_state_dict(state)
    outputs = forward(model, batch)
    a = m.loss(model, batch, outputs, stream[1]).item()
    b = resumed.loss(model, batch, outputs, stream[1]).item()
    assert a > 0 and a == pytest.approx(b, rel=1e-6)
    assert torch.equal(resumed.last_weights, m.last_weights)


@pytest.mark.parametrize("settings, key", [
    ({"alpha": -1}, "alpha"), ({"temperature": 0}, "temperature"), ({"relevance_temperature": -0.1}, "relevance"),
    ({"proto_weight": float("nan")}, "proto_weight"), ({"proto_momentum": 1.0}, "proto_momentum"),
    ({"refine_weight": 1.5}, "refine_weight"), ({"relation_temperature": "0.1"}, "relation_temperature"),
    ({"max_answers": 1}, "max_answers"), ({"keys_per_task": 0}, "keys_per_task"), ({"key_mode": "learned"}, "key_mode"),
    ({"proto_temperature": True}, "proto_temperature"),
])
def test_invalid_settings_name_the_setting(settings, key):
    with pytest.raises(ValueError, match=key):
        SemanticTransfer(**settings)


# A real run

@pytest.mark.slow
def test_real_run_with_replay_saves_keys_prototypes_and_teacher(tmp_path, colour_tasks):
    from lvlm_cl.config import load_recipe
    from lvlm_cl.train import run

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, out, steps_per_task=6, batch_size=8)
    methods = ("methods=[{name: replay, memory_per_task: 4, memory_fraction: null, replay_ratio: 0.3}, "
               "{name: semantic_transfer, relevance_temperature: 0.05}]")
    _, _, state = run(load_recipe(recipe, [*SMALL_MODEL, methods, "trainer.eval_max_samples=4",
                                           "eval_before_training=false"]), progress=False)
    assert len(state.rows) == 2
    saved = load_state(out / "checkpoints" / "task-01-warmth", "methods")["semantic_transfer"]
    assert saved["closed"] == {0: True, 1: True}
    assert [len(saved["answers"][t]["answers"]) for t in (0, 1)] == [4, 2]
    assert all(p is not None for t in (0, 1) for p in saved["answers"][t]["protos"])
    assert saved["router"]["key_ready"].tolist() == [True, True] and saved["teacher"]["task"] == "warmth"
    total, count = saved["relevance"]["warmth"]
    assert count > 0 and 0 < total / count < 1 and "colour" not in saved["relevance"]
