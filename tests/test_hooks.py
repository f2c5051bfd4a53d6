"""The loop calls every method hook, in order, with what the contract promises."""

import pytest
import torch

from conftest import SMALL_MODEL, write_recipe
from lvlm_cl.config import load_recipe
from lvlm_cl.methods.base import Method
from lvlm_cl.train import run

pytestmark = pytest.mark.slow


class Recorder(Method):
    name = "recorder"

    def __init__(self):
        super().__init__()
        self.calls = []
        self.losses = []

    def setup(self, model, stream):
        self.calls.append(("setup", [t.name for t in stream]))

    def before_task(self, task, model, train_data):
        self.calls.append(("before_task", task.name))
        return train_data[: len(train_data) // 2]            # the returned data is what trains

    def loss(self, model, batch, outputs, task):
        self.calls.append(("loss", task.name))
        self.losses.append(outputs.loss.detach())
        return None

    def after_backward(self, model, task):
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)  # called after a real backward pass
        self.calls.append(("after_backward", task.name))

    def after_task(self, task, model, train_data):
        self.calls.append(("after_task", task.name, len(train_data)))

    def state_dict(self):
        return {"n": len(self.calls)}


def test_every_hook_is_reached_in_order(tmp_path, colour_tasks, monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr("lvlm_cl.build.build_methods", lambda specs: [recorder])
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, tmp_path / "run", steps_per_task=3, grad_accum=2)
    run(load_recipe(recipe, SMALL_MODEL), progress=False)

    names = [c[0] for c in recorder.calls]
    assert recorder.calls[0] == ("setup", ["colour", "warmth"])
    for task in ("colour", "warmth"):
        mine = [c for c in recorder.calls if c[1] == task]
        kinds = [c[0] for c in mine]
        assert kinds[0] == "before_task" and kinds[-1] == "after_task"
        assert kinds.count("loss") == 6 and kinds.count("after_backward") == 6     # 3 steps x 2 micro-steps
        assert mine[-1][2] == 24                                                      # half of 48 records
    assert names.count("setup") == 1
    assert all(torch.isfinite(l) for l in recorder.losses)


def test_loss_terms_are_added_once(tmp_path, colour_tasks, monkeypatch):
    # A method returning 0 * loss must leave training identical to no method at all (the language-modelling
    # loss is counted once, whatever the methods return).
    class Zero(Method):
        name = "zero"

        def loss(self, model, batch, outputs, task):
            return 0.0 * outputs.loss

    results = {}
    for label, methods in (("plain", None), ("zero", [Zero()])):
        if methods is not None:
            monkeypatch.setattr("lvlm_cl.build.build_methods", lambda specs, m=methods: m)
        recipe = write_recipe(tmp_path / f"{label}.yaml", colour_tasks, tmp_path / label, steps_per_task=4)
        model, _, _ = run(load_recipe(recipe, SMALL_MODEL), progress=False)
        results[label] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(results["plain"], results["zero"])
