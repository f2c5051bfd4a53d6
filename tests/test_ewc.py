"""EWC: the empirical Fisher from training gradients, the penalty, online accumulation, resume, a real run."""

import pytest
import torch

from conftest import SMALL_MODEL, write_recipe
from lvlm_cl.methods.base import Task
from lvlm_cl.methods.ewc import EWC
from lvlm_cl.state_io import load_state


def task(index: int) -> Task:
    return Task(index=index, name=f"t{index}", metric="exact_match", train_records=[], test_records=[])


def linear() -> torch.nn.Linear:
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
        model.bias.fill_(0.5)
    return model


def micro_step(method: EWC, model, t: Task, weight_grad, bias_grad, scale: float = 1.0) -> None:
    """One real backward pass whose gradient is ``scale`` x (weight_grad, bias_grad): a loss linear in the
    parameters (the method's penalty is left out, so the gradient is exactly the one given)."""
    method.loss(model, {}, None, t)                  # the loop calls it before every backward
    loss = (torch.tensor([weight_grad]) * model.weight).sum() + (torch.tensor(bias_grad) * model.bias).sum()
    (scale * loss).backward()
    method.after_backward(model, t)


def backward_with(method: EWC, model, t: Task, weight_grad, bias_grad) -> None:
    """One optimizer step without accumulation: a micro-step, the step, the gradients cleared."""
    micro_step(method, model, t, weight_grad, bias_grad)
    method.after_step(model, t)
    model.zero_grad(set_to_none=True)


def train_task(method: EWC, model, t: Task, grads) -> None:
    for w, b in grads:
        backward_with(method, model, t, w, b)
    method.after_task(t, model, [])


def hand_penalty(lam, fisher, anchor, model) -> float:
    total = 0.0
    for n, p in model.named_parameters():
        total += (fisher[n] * (p.detach() - anchor[n]) ** 2).sum().item()
    return lam / 2 * total


def test_fisher_is_the_mean_of_squared_gradients_and_anchor_the_values():
    model, m, t0 = linear(), EWC(lambda_=10.0), task(0)
    assert m.loss(model, {}, None, t0) is None                     # nothing before the first task ends
    train_task(m, model, t0, [([1.0, 2.0], [3.0]), ([3.0, 0.0], [-1.0])])
    [anchor] = m.anchors
    assert torch.equal(anchor["fisher"]["weight"], torch.tensor([[5.0, 2.0]]))    # (1+9)/2, (4+0)/2
    assert torch.equal(anchor["fisher"]["bias"], torch.tensor([5.0]))            # (9+1)/2
    assert torch.equal(anchor["params"]["weight"], torch.tensor([[1.0, -2.0]]))
    assert m.tasks == ["t0"] and m.micro_steps == {"t0": 2}
    assert m.loss(model, {}, None, task(1)).item() == 0.0          # zero right at the anchor


def test_penalty_matches_the_formula_and_its_gradient_pulls_back():
    model, m = linear(), EWC(lambda_=4.0)
    train_task(m, model, task(0), [([1.0, 2.0], [3.0]), ([3.0, 0.0], [-1.0])])
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.5, -1.0]]))
        model.bias.fill_(0.0)
    # 4/2 * (5 * 0.5² + 2 * 1² + 5 * 0.5²) = 2 * 4.5 = 9
    penalty = m.loss(model, {}, None, task(1))
    assert penalty.item() == pytest.approx(9.0)
    fisher = {"weight": torch.tensor([[5.0, 2.0]]), "bias": torch.tensor([5.0])}
    anchor = {"weight": torch.tensor([[1.0, -2.0]]), "bias": torch.tensor([0.5])}
    assert penalty.item() == pytest.approx(hand_penalty(4.0, fisher, anchor, model))
    penalty.backward()
    # d/dθ = λ F (θ − θ*)
    assert torch.allclose(model.weight.grad, torch.tensor([[4 * 5 * 0.5, 4 * 2 * 1.0]]))
    assert torch.allclose(model.bias.grad, torch.tensor([4 * 5 * -0.5]))
    before = [(p.detach() - anchor[n]).abs() for n, p in model.named_parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.01 * p.grad
    after = [(p.detach() - anchor[n]).abs() for n, p in model.named_parameters()]
    assert all((a < b).all() for a, b in zip(after, before))
    assert m.loss(model, {}, None, task(1)).item() < 9.0


def test_accumulated_gradients_give_each_micro_steps_own_gradient():
    # grad_accum = 2: accelerate divides each micro-batch loss by 2 and p.grad sums the window; the hooks
    # see each micro-batch's own (halved) gradient.
    def run(accumulate: bool) -> EWC:
        model, m, t = linear(), EWC(), task(0)
        micro = [([1.0, 2.0], [3.0]), ([3.0, 0.0], [-1.0]), ([2.0, 2.0], [0.0]), ([0.0, 4.0], [1.0])]
        if not accumulate:
            train_task(m, model, t, micro)
            return m
        for i, (w, b) in enumerate(micro):
            micro_step(m, model, t, w, b, scale=0.5)         # p.grad sums the window's halved gradients
            if i % 2 == 1:
                m.after_step(model, t)
                model.zero_grad(set_to_none=True)
        m.after_task(t, model, [])
        return m

    plain, accumulated = run(False), run(True)
    for n in ("weight", "bias"):
        assert torch.allclose(plain.anchors[0]["fisher"][n], accumulated.anchors[0]["fisher"][n])
    assert accumulated.micro_steps == {"t0": 4}
    assert torch.allclose(plain.anchors[0]["fisher"]["weight"], torch.tensor([[14 / 4, 24 / 4]]))


def test_untouched_trainable_parameters_get_zero_fisher_and_frozen_ones_none():
    model, m = linear(), EWC()
    model.bias.requires_grad_(False)
    extra = torch.nn.Linear(1, 1)
    model.add_module("extra", extra)
    m.loss(model, {}, None, task(0))
    model.weight.sum().backward()                        # extra gets no gradient, bias is frozen
    m.after_backward(model, task(0))
    m.after_step(model, task(0))
    m.after_task(task(0), model, [])
    fisher = m.anchors[0]["fisher"]
    assert set(fisher) == {"weight", "extra.weight", "extra.bias"}       # only what requires grad
    assert fisher["extra.weight"].abs().sum() == 0


def test_no_gradient_at_all_is_an_error():
    with pytest.raises(RuntimeError, match="no gradient"):
        EWC().after_task(task(0), linear(), [])


def test_online_accumulates_with_gamma_and_moves_the_anchor():
    model, m = linear(), EWC(lambda_=2.0, gamma=0.5)
    train_task(m, model, task(0), [([2.0, 0.0], [1.0])])              # F0 = [4, 0], [1]
    with torch.no_grad():
        model.weight.add_(1.0)
    train_task(m, model, task(1), [([0.0, 2.0], [3.0])])              # F1 = [0, 4], [9]
    [anchor] = m.anchors
    assert torch.equal(anchor["fisher"]["weight"], torch.tensor([[2.0, 4.0]]))      # 0.5 * F0 + F1
    assert torch.equal(anchor["fisher"]["bias"], torch.tensor([9.5]))
    assert torch.equal(anchor["params"]["weight"], torch.tensor([[2.0, -1.0]]))      # the latest values
    assert m.tasks == ["t0", "t1"] and m.loss(model, {}, None, task(2)).item() == 0.0


def test_separate_penalties_per_task():
    model, m = linear(), EWC(lambda_=2.0, online=False)
    train_task(m, model, task(0), [([2.0, 0.0], [1.0])])              # F0 = [4, 0], [1] at w=[1,-2], b=.5
    with torch.no_grad():
        model.weight.add_(1.0)
    train_task(m, model, task(1), [([0.0, 2.0], [3.0])])              # F1 = [0, 4], [9] at w=[2,-1], b=.5
    assert [a["task"] for a in m.anchors] == ["t0", "t1"]
    # Now θ = anchor 1: only task 0's penalty is left: 2/2 * (4 * 1² + 0 * 1²) = 4
    assert m.loss(model, {}, None, task(2)).item() == pytest.approx(4.0)


def test_state_round_trip_gives_the_same_penalty_and_continues():
    model, m = linear(), EWC(lambda_=3.0, gamma=0.7)
    train_task(m, model, task(0), [([1.0, 2.0], [3.0]), ([3.0, 0.0], [-1.0])])
    state = m.state_dict()
    assert all(t.device.type == "cpu" for a in state["anchors"] for d in (a["fisher"], a["params"])
               for t in d.values())
    with torch.no_grad():
        model.weight.mul_(1.3)
    resumed = EWC(lambda_=3.0, gamma=0.7)
    resumed.load_state_dict(state)
    assert resumed.penalty(model).item() == pytest.approx(m.penalty(model).item())
    assert resumed.penalty(model).item() > 0
    state["anchors"][0]["fisher"]["weight"].zero_()                       # a copy, not shared
    assert m.anchors[0]["fisher"]["weight"].abs().sum() > 0
    for method in (m, resumed):
        train_task(method, model, task(1), [([1.0, 1.0], [1.0])])
    assert torch.equal(m.anchors[0]["fisher"]["weight"], resumed.anchors[0]["fisher"]["weight"])
    assert resumed.tasks == ["t0", "t1"]
    with pytest.raises(ValueError, match="online"):
        EWC(online=False).load_state_dict(m.state_dict())
    resumed.load_state_dict({})
    assert resumed.loss(model, {}, None, task(2)) is None


def test_a_parameter_added_after_anchoring_is_skipped_and_lambda_zero_adds_nothing():
    model, m = linear(), EWC()
    train_task(m, model, task(0), [([1.0, 2.0], [3.0])])
    model.add_module("prompt", torch.nn.Linear(1, 1))
    assert m.loss(model, {}, None, task(1)).item() == 0.0
    zero = EWC(lambda_=0)
    train_task(zero, model, task(0), [([1.0, 2.0], [3.0])])
    assert zero.loss(model, {}, None, task(1)) is None and zero.anchors


@pytest.mark.parametrize("settings, key", [
    ({"lambda_": -1.0}, "lambda_"),
    ({"lambda_": "big"}, "lambda_"),
    ({"lambda_": float("inf")}, "lambda_"),
    ({"online": "yes"}, "online"),
    ({"gamma": 0.0}, "gamma"),
    ({"gamma": 1.5}, "gamma"),
    ({"gamma": True}, "gamma"),
    ({"online": False, "gamma": 0.9}, "gamma"),
])
def test_invalid_settings_name_the_setting(settings, key):
    with pytest.raises(ValueError, match=key):
        EWC(**settings)


def test_defaults():
    m = EWC()
    assert m.name == "ewc" and m.hparams == {"lambda_": 100.0, "online": True, "gamma": 1.0}


# A real run

@pytest.mark.slow
def test_real_run_saves_the_fisher_with_each_checkpoint(tmp_path, colour_tasks, monkeypatch):
    import lvlm_cl.build
    import lvlm_cl.train
    from safetensors.torch import load_file

    from lvlm_cl.config import load_recipe

    monkeypatch.setattr(lvlm_cl.build, "build_methods", lambda specs: [EWC(lambda_=50.0)])
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, out, steps_per_task=4, eval_batch_size=24)
    cfg = load_recipe(recipe, [*SMALL_MODEL, "trainer.eval_max_samples=4"])
    _, _, state = lvlm_cl.train.run(cfg, progress=False)
    assert len(state.rows) == 2 and all(len(r) == 2 for r in state.rows)

    for index, name, tasks in ((0, "colour", ["colour"]), (1, "warmth", ["colour", "warmth"])):
        ck = out / "checkpoints" / f"task-{index:02d}-{name}"
        ewc = load_state(ck, "methods")["ewc"]
        trainable = load_file(str(ck / "trainable.safetensors"))
        assert ewc["tasks"] == tasks and ewc["micro_steps"][name] == 4
        [anchor] = ewc["anchors"]                                       # online: one running anchor
        assert set(anchor["fisher"]) == set(anchor["params"]) == set(trainable)
        for n, f in anchor["fisher"].items():
            assert f.shape == trainable[n].shape and f.dtype == torch.float32
            assert torch.isfinite(f).all() and (f >= 0).all()
        assert sum(f.sum().item() for f in anchor["fisher"].values()) > 0
        if index == 1:                                                   # θ* = the values the task ended with
            assert all(torch.equal(anchor["params"][n], trainable[n]) for n in trainable)
