"""On a GPU (``pytest -m gpu``; skipped without CUDA): the main command, a routed method, QLoRA 4/8-bit,
ZeRO-2/3 with one process, evaluate and chat, each with every tensor that reaches the model's forward on
the model's device. CI has no GPU: these run on a lent one (docs/versions.md says what ran where)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SMALL_MODEL, write_colour_tasks, write_recipe

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
ROUTED = "methods=[task_prompts, {name: replay, memory_per_task: 4}]"
LORA = ["model.freeze_language_model=true", "model.lora={r: 4, alpha: 8}", "trainer.lr=1e-3"]


def tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors(v)


@pytest.fixture
def device_checked(monkeypatch):
    """Every model the loop loads gets a forward pre-hook that records any input tensor not on the model's
    device (a CPU tensor reaching a CUDA model is the bug this file is about)."""
    import lvlm_cl.build as build

    strays: list[str] = []
    load = build.load_model_dir

    def loading(*args, **kwargs):
        model, processor = load(*args, **kwargs)
        device = next(model.parameters()).device

        def check(module, args, kwargs):
            strays.extend(f"{type(module).__name__}: {tuple(t.shape)} on {t.device}"
                          for t in tensors((args, kwargs)) if t.device != device)
        model.register_forward_pre_hook(check, with_kwargs=True)
        return model, processor

    monkeypatch.setattr(build, "load_model_dir", loading)
    return strays


def launch(recipe: Path, out: Path, *overrides: str, config: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
           *(["--config_file", f"recipes/accelerate/{config}.yaml"] if config else []),
           "lvlm_cl/train.py", str(recipe), f"output_dir={out}", *SMALL_MODEL, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_colour_tasks(tmp_path_factory.mktemp("gpu") / "data", n_train=32, n_test=8)


def test_a_routed_run_trains_and_evaluates_on_the_gpu(tmp_path, tasks, device_checked):
    from lvlm_cl.config import load_recipe
    from lvlm_cl.train import run

    recipe = write_recipe(tmp_path / "r.yaml", tasks, tmp_path / "run", steps_per_task=30)
    model, _, state = run(load_recipe(recipe, [*SMALL_MODEL, ROUTED, "trainer.lr=1e-3"]), progress=False)
    assert next(model.parameters()).device.type == "cuda"
    assert device_checked == []
    assert len(state.rows) == 2
    answers = [json.loads(line)["prediction"] for f in (tmp_path / "run" / "predictions").glob("after-*/*.jsonl")
               for line in f.read_text().splitlines()]
    assert any(answers)                                   # decoded real tokens through the routed prompts


def test_the_main_command_in_bf16_on_a_short_sequence(tmp_path):
    out = tmp_path / "seq5"
    metrics = launch(ROOT / "recipes" / "seq5.yaml", out, "model.path=builtin:tiny-llava-random",
                     "benchmark={name: seq5, tasks: [digits, scienceqa, vqa], train_size: 64, test_size: 16}",
                     "trainer.steps_per_task=10", "trainer.epochs_per_task=null", "trainer.eval_batch_size=16",
                     "trainer.mixed_precision=bf16", "report_to=[]")
    assert len(metrics["matrix"]) == 3 and (out / "report.md").is_file()


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_qlora_trains_on_the_gpu(tmp_path, tasks, quantization):
    recipe = write_recipe(tmp_path / "q.yaml", tasks, tmp_path / "unused", steps_per_task=6, log_every=1)
    metrics = launch(recipe, tmp_path / quantization, *LORA, f"model.quantization={quantization}",
                     "trainer.mixed_precision=bf16", "trainer.eval_max_samples=4")
    for curve in metrics["train_loss"].values():
        assert len(curve) == 6 and curve[-1] < curve[0]


@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_zero_with_one_process_trains_a_routed_method(tmp_path, tasks, config):
    recipe = write_recipe(tmp_path / "z.yaml", tasks, tmp_path / "unused", steps_per_task=4)
    metrics = launch(recipe, tmp_path / config, *LORA, ROUTED, "trainer.mixed_precision=bf16",
                     "trainer.eval_max_samples=4", config=config)
    assert len(metrics["matrix"]) == 2


def test_evaluate_and_chat_run_a_stage_on_the_gpu(tmp_path, tasks):
    from lvlm_cl import chat, evaluate
    from lvlm_cl.stage import load_stage

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tasks, out, steps_per_task=10)
    metrics = launch(recipe, out, ROUTED, "trainer.lr=1e-3", "trainer.mixed_precision=bf16")
    assert next(load_stage(out).model.parameters()).device.type == "cuda"
    test = str(tasks["warmth"][1])
    assert evaluate.main(["--run", str(out), "--data", test, "--metric", "exact_match",
                          "--output", str(tmp_path / "eval")]) == 0
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())["scores"]
    assert list(scores.values()) == [metrics["matrix"][-1][1]]
    import io

    image = next((tasks["colour"][0].parent / "img").glob("*.png"))
    buffer = io.StringIO()
    assert chat.main(["--run", str(out), "--image", str(image), "--prompt", "What colour is this image?",
                      "--show-routing"], stdout=buffer) == 0
    assert re.search(r"routing: (colour|warmth) \(cos", buffer.getvalue())   # the stage's keys chose a task


def test_liger_kernel_trains_to_the_same_losses_up_to_bf16_rounding(tmp_path, tasks):
    pytest.importorskip("liger_kernel", reason='liger-kernel is not installed (pip install -e ".[gpu]")')
    recipe = write_recipe(tmp_path / "l.yaml", tasks, tmp_path / "unused", steps_per_task=6, log_every=1)
    common = [*LORA, "trainer.mixed_precision=bf16", "trainer.eval_max_samples=4"]
    plain = launch(recipe, tmp_path / "plain", *common, "model.liger_kernel=false")
    fused = launch(recipe, tmp_path / "liger", *common, "model.liger_kernel=true")
    for task, curve in plain["train_loss"].items():
        assert fused["train_loss"][task] == pytest.approx(curve, rel=3e-2), task


def test_auto_checkpointing_probes_the_gpu_and_keeps_it_off_for_a_small_model(tmp_path, tasks):
    recipe = write_recipe(tmp_path / "a.yaml", tasks, tmp_path / "unused", steps_per_task=4, log_every=1)
    cmd = [sys.executable, "lvlm_cl/train.py", str(recipe), f"output_dir={tmp_path / 'auto'}", *SMALL_MODEL,
           "model.gradient_checkpointing=auto", "trainer.mixed_precision=bf16", "trainer.eval_max_samples=4"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    decisions = re.findall(r"gradient checkpointing \(auto\) before task \w+: (on|off): the longest batch needs "
                           r"([\d.]+) GiB", proc.stdout)
    assert [d for d, _ in decisions] == ["off", "off"]     # a tiny model is far within any GPU's memory
