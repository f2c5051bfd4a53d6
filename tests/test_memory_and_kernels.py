"""``model.gradient_checkpointing: auto`` (a measured decision, before each task) and ``model.liger_kernel``
(liger-kernel's fused layers where they can run). The GPU side is in tests/test_gpu.py; here the decision
logic runs on the CPU with the device's memory reading replaced by a stated one."""

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import SMALL_MODEL, write_recipe
from lvlm_cl.config import ConfigError, load_recipe
from lvlm_cl.models import ModelError
from lvlm_cl.models import memory
from lvlm_cl.models.kernels import ENTRY_POINTS, liger_status, use_liger


def test_the_recipe_keys_take_true_false_or_auto(tmp_path, colour_tasks):
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, tmp_path / "out")
    cfg = load_recipe(recipe)
    assert cfg.model.gradient_checkpointing is False and cfg.model.liger_kernel == "auto"
    cfg = load_recipe(recipe, ["model.gradient_checkpointing=auto", "model.liger_kernel=false"])
    assert cfg.model.gradient_checkpointing == "auto" and cfg.model.liger_kernel is False
    with pytest.raises(ConfigError, match="model.gradient_checkpointing"):
        load_recipe(recipe, ["model.gradient_checkpointing=sometimes"])
    with pytest.raises(ConfigError, match="model.liger_kernel"):
        load_recipe(recipe, ["model.liger_kernel=yes please"])


def fake_model(model_type: str):
    return SimpleNamespace(config=SimpleNamespace(model_type=model_type))


def test_liger_is_used_only_where_it_can_run_and_true_says_why_not():
    cpu = torch.device("cpu")
    assert liger_status(fake_model("llava"), False, cpu) == (False, "off (model.liger_kernel: false)")
    use, why = liger_status(fake_model("llava"), "auto", cpu)
    assert not use and "need a CUDA GPU" in why
    with pytest.raises(ModelError, match="model.liger_kernel: true, but liger-kernel's kernels need a CUDA GPU"):
        liger_status(fake_model("llava"), True, cpu)
    # a family liger-kernel has no kernels for, even on a GPU
    use, why = liger_status(fake_model("mllama"), "auto", torch.device("cuda", 0))
    assert not use and "no kernels for model type 'mllama'" in why
    with pytest.raises(ModelError, match="no kernels for model type 'mllama'"):
        liger_status(fake_model("mllama"), True, torch.device("cuda", 0))
    # the built-in families are covered
    assert {"llava", "gemma3"} <= set(ENTRY_POINTS)
    lines = []
    assert use_liger(fake_model("llava"), "auto", cpu, log=lines.append) is False
    assert lines == ["liger-kernel: off: liger-kernel's kernels need a CUDA GPU; this process runs on cpu"]
    lines.clear()
    assert use_liger(fake_model("llava"), False, cpu, log=lines.append) is False and lines == []


def test_liger_needs_the_package_on_a_gpu(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    use, why = liger_status(fake_model("gemma3"), "auto", torch.device("cuda", 0))
    assert not use and why == 'off: liger-kernel is not installed (pip install -e ".[gpu]")'


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.b(torch.nn.functional.dropout(self.a(x), 0.5, self.training))


def measured(peak: int, total: int, log: list):
    def measure(work):
        work()
        log.append("ran")
        return peak, total
    return measure


def test_the_probe_decides_from_the_peak_and_the_optimizer_state_and_leaves_nothing_behind():
    torch.manual_seed(0)
    net = Net().eval()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    batch = {"input_ids": torch.zeros(1), "x": torch.randn(4, 8)}

    def loss_of(model, b):
        return model(b["x"]).pow(2).mean()

    torch.manual_seed(1)
    expected_next = torch.rand(3)
    torch.manual_seed(1)
    ran = []
    needed, why = memory.probe_needs_checkpointing(net, batch, loss_of, extra_bytes=2 ** 30,
                                                   measure=measured(8 * 2 ** 30, 10 * 2 ** 30, ran))
    # 8 GiB measured + 1 GiB of optimizer state = 9 GiB of 10: exactly 90%, not over
    assert ran == ["ran"] and not needed and "9.0 GiB" in why and "within 90%" in why
    assert torch.equal(torch.rand(3), expected_next)                 # the generator is where it was
    assert all(p.grad is None for p in net.parameters())             # the backward ran, its gradients are gone
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())
    assert not net.training                                          # the mode it had
    needed, why = memory.probe_needs_checkpointing(net, batch, loss_of, extra_bytes=2 ** 30 + 1,
                                                   measure=measured(8 * 2 ** 30, 10 * 2 ** 30, ran))
    assert needed and "over 90%" in why

    def out_of_memory(work):
        raise torch.OutOfMemoryError("CUDA out of memory")
    needed, why = memory.probe_needs_checkpointing(net, batch, loss_of, extra_bytes=0, measure=out_of_memory)
    assert needed and "ran out of device memory" in why


def test_the_optimizer_state_is_adam_moments_split_over_zero_shards_plus_ddp_buckets():
    net = Net()
    net.b.requires_grad_(False)
    trained = 8 * 8 + 8
    assert memory.optimizer_bytes(net) == 8 * trained
    assert memory.optimizer_bytes(net, shards=4) == 2 * trained
    assert memory.optimizer_bytes(net, ddp=True) == 8 * trained + 4 * trained
    assert memory.peak_reader(torch.device("cpu")) is None


def run_auto(tmp_path, colour_tasks, name, monkeypatch, peak, total):
    """A two-task run with gradient_checkpointing: auto and the device's memory reading replaced."""
    import lvlm_cl.loop as loop

    seen = []

    def reader(device):
        def measure(work):
            work()
            seen.append(device)
            return peak, total
        return measure

    monkeypatch.setattr(loop, "peak_reader", reader)
    probes = []
    real = loop.probe_needs_checkpointing

    def spy(model, batch, loss_of, **kw):
        probes.append({k: v.shape for k, v in batch.items() if torch.is_tensor(v)})
        return real(model, batch, loss_of, **kw)
    monkeypatch.setattr(loop, "probe_needs_checkpointing", spy)
    out = tmp_path / name
    recipe = write_recipe(tmp_path / f"{name}.yaml", colour_tasks, out, steps_per_task=3, log_every=1, batch_size=4)
    cfg = load_recipe(recipe, [*SMALL_MODEL, "trainer.eval_max_samples=4", "model.gradient_checkpointing=auto",
                               "methods=[{name: task_prompts, length: 2}]"])
    from lvlm_cl.train import run

    model, _, _ = run(cfg, progress=False)
    return model, probes, json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_auto_turns_checkpointing_on_when_the_longest_batch_would_not_fit(tmp_path, colour_tasks, monkeypatch,
                                                                          capsys):
    plain_model, probes, plain = run_auto(tmp_path, colour_tasks, "fits", monkeypatch, 2 ** 20, 2 ** 40)
    assert not plain_model.is_activation_checkpointing
    assert len(probes) == 2                       # before each task while it is off
    # the worst batch: trainer.batch_size copies of the longest sample, with the task ids routing needs
    assert probes[0]["input_ids"][0] == 4 and probes[0]["cl_task_ids"] == (4,)

    assert "gradient checkpointing (auto) before task warmth: off: the longest batch needs" in capsys.readouterr().out
    model, probes, tight = run_auto(tmp_path, colour_tasks, "tight", monkeypatch, 2 ** 30, 2 ** 30)
    assert model.is_activation_checkpointing
    assert len(probes) == 1                       # on from the first task; once on, it stays on
    # recomputation changes nothing on the CPU: the same losses as the run that kept it off
    assert tight["train_loss"] == plain["train_loss"]
    assert "gradient checkpointing (auto) before task colour: on: the longest batch needs 1.0 GiB" \
        in capsys.readouterr().out


@pytest.mark.slow
def test_auto_is_off_on_a_cpu_without_probing(tmp_path, colour_tasks, capsys):
    from lvlm_cl.train import run

    out = tmp_path / "cpu"
    recipe = write_recipe(tmp_path / "cpu.yaml", colour_tasks, out, steps_per_task=2, log_every=1)
    cfg = load_recipe(recipe, [*SMALL_MODEL, "trainer.eval_max_samples=4", "model.gradient_checkpointing=auto"])
    model, _, _ = run(cfg, progress=False)
    assert not model.is_activation_checkpointing
    err = capsys.readouterr()
    assert "gradient checkpointing (auto) before task colour: off: not needed on cpu" in err.out + err.err
