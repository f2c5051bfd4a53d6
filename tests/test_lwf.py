"""LwF: the teacher snapshot and swap, the masked distillation term, resume, settings, and a real run."""

import copy

import pytest
import torch

from conftest import forward, routed_forward, SMALL_MODEL, png, record, write_recipe
from lvlm_cl.data.encoding import collate_train, encode_record
from lvlm_cl.methods.base import Task
from lvlm_cl.methods.lwf import LwF
from lvlm_cl.state_io import load_state, save_state

TASK0 = Task(index=0, name="colour", metric="exact_match", train_records=[], test_records=[])
TASK1 = Task(index=1, name="warmth", metric="exact_match", train_records=[], test_records=[])


@pytest.fixture(scope="module")
def tiny(tiny_small):
    return tiny_small


@pytest.fixture
def model(tiny):
    m = copy.deepcopy(tiny[0])
    m.train()
    return m


@pytest.fixture(scope="module")
def batch(tiny, tmp_path_factory):
    processor = tiny[1]
    d = tmp_path_factory.mktemp("lwf")
    recs = [record("a", str(png(d / "a.png", "red")), "What color is the image?", "red"),
            record("b", str(png(d / "b.png", "blue")), "Is this color warm or cold? Answer in one word.", "cold")]
    return collate_train([encode_record(processor, r, 256) for r in recs], processor.tokenizer.pad_token_id)


def values(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def nudge(model, scale: float = 0.05) -> None:
    """Change the student's trainable values (as a task of training would)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lm_head" in n or "embed_tokens" in n or "layers.1.mlp" in n:
                p.add_(scale * torch.randn(p.shape, generator=g))


def hand_kl(student_logits, teacher_logits, labels, T, alpha):
    """sum_v p_t (log p_t - log p_s), per answer position (shifted), averaged, times T^2 alpha."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1] - 1):
            if labels[b, i + 1] == -100:
                continue
            lp_t = torch.log_softmax(teacher_logits[b, i].double() / T, -1)
            lp_s = torch.log_softmax(student_logits[b, i].double() / T, -1)
            total += float((lp_t.exp() * (lp_t - lp_s)).sum())
            count += 1
    return alpha * T * T * total / count


# The term

def test_no_term_before_the_first_task_ends(model, batch):
    m = LwF()
    outputs = forward(model, batch)
    assert m.loss(model, batch, outputs, TASK0) is None
    m.before_task(TASK0, model, [])
    assert m.loss(model, batch, outputs, TASK0) is None
    assert m.state_dict() == {}


def test_zero_right_after_the_snapshot_and_positive_once_the_student_moves(model, batch):
    m = LwF()
    m.after_task(TASK0, model, [])
    assert set(m.teacher) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(t.device.type == "cpu" and not t.requires_grad for t in m.teacher.values())
    model.eval()                       # deterministic student pass (the tiny model has no dropout anyway)
    term = m.loss(model, batch, forward(model, batch), TASK1)
    assert term is not None and abs(term.item()) < 1e-6
    model.train()
    nudge(model)
    assert m.loss(model, batch, forward(model, batch), TASK1).item() > 1e-4


def test_value_equals_the_masked_kl_by_hand(model, batch):
    teacher_model = copy.deepcopy(model).eval()
    m = LwF(alpha=0.7, temperature=1.5)
    m.after_task(TASK0, model, [])
    nudge(model)
    outputs = forward(model, batch)
    term = m.loss(model, batch, outputs, TASK1)
    with torch.no_grad():
        teacher_logits = teacher_model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert outputs.logits.shape[:2] == batch["labels"].shape     # one logit row per token
    expected = hand_kl(outputs.logits.detach(), teacher_logits, batch["labels"], 1.5, 0.7)
    assert expected > 0 and term.item() == pytest.approx(expected, rel=1e-4)
    # The teacher pass really used the snapshot: its logits are the copied model's.
    assert torch.allclose(m.teacher_logits(model, batch), teacher_logits, atol=1e-5)


def test_temperature_and_alpha_scale_the_term(model, batch):
    snap = LwF()
    snap.after_task(TASK0, model, [])
    nudge(model)
    outputs = forward(model, batch)

    def term(**kw):
        m = LwF(**kw)
        m.load_state_dict(snap.state_dict())
        return m.loss(model, batch, outputs, TASK1).item()

    assert term(alpha=2.0) == pytest.approx(2 * term(alpha=1.0), rel=1e-5)
    assert term(temperature=1.0) != pytest.approx(term(temperature=4.0), rel=1e-3)
    assert LwF(alpha=0).loss(model, batch, outputs, TASK1) is None     # off: no teacher pass


def test_student_values_restored_and_graph_backpropagates(model, batch):
    m = LwF()
    m.after_task(TASK0, model, [])
    nudge(model)
    student = values(model)
    versions = {n: p._version for n, p in model.named_parameters()}
    outputs = forward(model, batch)
    term = m.loss(model, batch, outputs, TASK1)
    assert same(values(model), student)
    assert {n: p._version for n, p in model.named_parameters()} == versions
    (outputs.loss + term).backward()          # the swap did not invalidate the student's saved tensors
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_gradient_of_the_term_moves_the_student_towards_the_teacher(model, batch):
    m = LwF()
    m.after_task(TASK0, model, [])
    nudge(model)
    term = m.loss(model, batch, forward(model, batch), TASK1)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(term, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p.sub_(0.5 * g)
    assert m.loss(model, batch, forward(model, batch), TASK1).item() < term.item()


def test_values_and_modes_restored_when_the_teacher_forward_raises(model, batch, monkeypatch):
    m = LwF()
    m.after_task(TASK0, model, [])
    nudge(model)
    model.train()
    model.model.vision_tower.eval()           # a mixed mode: every module keeps its own
    modes = {n: mod.training for n, mod in model.named_modules()}
    student = values(model)
    outputs = forward(model, batch)

    seen = {}

    def boom(*args, **kwargs):
        seen["training"] = model.training
        seen["teacher"] = same(
            {n: p.detach().clone() for n, p in model.named_parameters() if n in m.teacher},
            m.teacher)
        raise RuntimeError("forward failed")

    monkeypatch.setattr(model, "forward", boom)
    with pytest.raises(RuntimeError, match="forward failed"):
        m.loss(model, batch, outputs, TASK1)
    assert seen == {"training": False, "teacher": True}     # the teacher ran in eval mode, with its values
    assert same(values(model), student)
    assert {n: mod.training for n, mod in model.named_modules()} == modes


def test_train_and_eval_modes_restored(model, batch):
    m = LwF()
    m.after_task(TASK0, model, [])
    outputs = forward(model, batch)
    model.train()
    m.loss(model, batch, outputs, TASK1)
    assert all(mod.training for mod in model.modules())
    model.eval()
    m.loss(model, batch, outputs, TASK1)
    assert not any(mod.training for mod in model.modules())


def test_frozen_parameters_are_not_snapshotted(model, batch):
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    m = LwF()
    m.after_task(TASK0, model, [])
    assert m.teacher and not any("vision_tower" in n for n in m.teacher)
    assert m.loss(model, batch, forward(model, batch), TASK1).item() == pytest.approx(0, abs=1e-6)


# Resume

def test_state_round_trip_gives_the_same_term(model, batch, tmp_path):
    m = LwF(alpha=0.5, temperature=3.0)
    m.after_task(TASK0, model, [])
    nudge(model)
    outputs = forward(model, batch)
    term = m.loss(model, batch, outputs, TASK1).item()

    save_state(tmp_path, "methods", {"lwf": m.state_dict()})            # as the checkpoint does
    state = load_state(tmp_path, "methods")["lwf"]
    assert state["task"] == "colour" and set(state["teacher"]) == set(m.teacher)
    resumed = LwF(alpha=0.5, temperature=3.0)
    resumed.load_state_dict(state)
    assert resumed.loss(model, batch, outputs, TASK1).item() == pytest.approx(term, rel=1e-6)
    resumed.load_state_dict({})
    assert resumed.loss(model, batch, outputs, TASK1) is None and resumed.state_dict() == {}


def test_snapshot_does_not_follow_later_training(model):
    m = LwF()
    m.after_task(TASK0, model, [])
    before = {n: t.clone() for n, t in m.teacher.items()}
    nudge(model)
    assert same(m.teacher, before)
    m.after_task(TASK1, model, [])                 # the next task's end replaces the teacher
    assert not same(m.teacher, before) and m.teacher_task == "warmth"


def test_snapshot_parameter_missing_from_the_model_is_an_error(model, batch):
    m = LwF()
    m.load_state_dict({"teacher": {"no.such.weight": torch.zeros(1)}})
    with pytest.raises(ValueError, match="no.such.weight"):
        m.loss(model, batch, forward(model, batch), TASK1)


# Settings

def test_defaults():
    assert LwF.defaults == {"alpha": 1.0, "temperature": 2.0}
    assert LwF().hparams == {"alpha": 1.0, "temperature": 2.0} and LwF.name == "lwf"


@pytest.mark.parametrize("settings, key", [
    ({"alpha": -0.1}, "alpha"),
    ({"alpha": "1"}, "alpha"),
    ({"alpha": float("nan")}, "alpha"),
    ({"alpha": True}, "alpha"),
    ({"temperature": 0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": None}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"lambda": 1.0}, "lambda"),
])
def test_invalid_settings_name_the_setting(settings, key):
    with pytest.raises(ValueError, match=key):
        LwF(**settings)


# A real run

@pytest.mark.slow
def test_real_run_saves_the_teacher_with_each_checkpoint(tmp_path, colour_tasks, monkeypatch):
    import lvlm_cl.build
    import lvlm_cl.train
    from lvlm_cl.config import load_recipe
    from safetensors.torch import load_file

    made = []

    def build(specs):
        made.append(LwF(alpha=1.0, temperature=2.0))
        return made

    monkeypatch.setattr(lvlm_cl.build, "build_methods", build)
    calls = []
    original = LwF.loss

    def counting(self, *args):
        term = original(self, *args)
        calls.append(None if term is None else term.item())
        return term

    monkeypatch.setattr(LwF, "loss", counting)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, out, steps_per_task=4, batch_size=4,
                          eval_batch_size=24)
    cfg = load_recipe(recipe, [*SMALL_MODEL, "trainer.eval_max_samples=4", "eval_before_training=false"])
    _, _, state = lvlm_cl.train.run(cfg, progress=False)
    assert len(state.rows) == 2 and all(len(r) == 2 for r in state.rows)

    # No term on the first task; a finite, non-negative term on every step of the second.
    assert calls[:4] == [None] * 4 and len(calls) == 8
    assert all(c is not None and c >= 0 for c in calls[4:]) and max(calls[4:]) > 0

    for name in ("task-00-colour", "task-01-warmth"):
        ck = out / "checkpoints" / name
        lwf = load_state(ck, "methods")["lwf"]
        trained = load_file(str(ck / "trainable.safetensors"))
        # The teacher saved with a task is the model at the end of that task.
        assert lwf["task"] == name.split("-", 2)[2] and set(lwf["teacher"]) == set(trained)
        assert all(torch.equal(lwf["teacher"][n], trained[n]) for n in trained)
