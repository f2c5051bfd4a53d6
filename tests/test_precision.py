"""Real-model settings, tested small on CPU: QLoRA (4-bit NF4) and 8-bit training through bitsandbytes with
the vision tower and projector unquantized, bf16 mixed precision, gradient checkpointing."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SMALL_MODEL, stage_scores, write_recipe
from lvlm_cl.config import ConfigError, load_recipe
from lvlm_cl.stage import load_stage
from lvlm_cl.train import run

ROOT = Path(__file__).resolve().parent.parent
LORA = ["model.freeze_language_model=true", "model.lora={r: 4, alpha: 8}", "trainer.lr=1e-3"]


def train(tmp_path, tasks, name, *overrides, steps=3):
    out = tmp_path / name
    recipe = write_recipe(tmp_path / f"{name}.yaml", tasks, out, steps_per_task=steps, log_every=1)
    cfg = load_recipe(recipe, [*SMALL_MODEL, "trainer.eval_max_samples=4", *overrides])
    model, _, state = run(cfg, progress=False)
    return out, model, json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_qlora_4bit_trains_adapters_on_a_quantized_language_model_and_reloads(tmp_path, colour_tasks):
    import bitsandbytes as bnb

    out, model, metrics = train(tmp_path, colour_tasks, "q4", *LORA, "model.quantization=4bit", steps=10)
    layers = dict(model.named_modules())
    quantized = [n for n, m in layers.items() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all("language_model" in n for n in quantized)           # only the language model
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for n, m in layers.items()
                   if "vision_tower" in n or "multi_modal_projector" in n)
    weight = layers[quantized[0]].weight                                          # bitsandbytes' Params4bit
    assert weight.quant_state.quant_type == "nf4" and weight.dtype == torch.uint8
    for task in ("colour", "warmth"):
        curve = metrics["train_loss"][task]
        assert len(curve) == 10 and curve[-1] < curve[0], (task, curve)          # the adapters learn
    # The checkpoint holds the adapters (not the quantized weights); the run reloads quantized and scores
    # what it scored.
    from safetensors.torch import load_file

    saved = load_file(str(out / "checkpoints" / "task-01-warmth" / "trainable.safetensors"))
    assert saved and all("lora_" in n for n in saved)
    stage = load_stage(out)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in stage.model.modules())
    assert stage_scores(stage) == metrics["matrix"][-1]
    assert metrics["trainable_parameters"]["colour"] == sum(t.numel() for t in saved.values())


@pytest.mark.slow
@pytest.mark.parametrize("quantization, method", [("8bit", "{name: task_lora, r: 2}"), ("4bit", "{name: olora, r: 2}"),
                                                  ("4bit", "{name: moelora, r: 4, experts: 2}")])
def test_every_adapter_method_trains_on_a_quantized_language_model(tmp_path, colour_tasks, quantization, method):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt if quantization == "8bit" else bnb.nn.Linear4bit
    out, model, metrics = train(tmp_path, colour_tasks, "q", "model.freeze_language_model=true",
                                f"model.quantization={quantization}", f"methods=[{method}]", "trainer.lr=1e-3")
    assert any(isinstance(m, layer) for m in model.modules())
    assert metrics["num_completed"] == 2 and all(len(c) == 3 for c in metrics["train_loss"].values())
    assert stage_scores(load_stage(out)) == metrics["matrix"][-1]


def test_a_quantized_language_model_that_would_train_in_full_is_refused(tmp_path, colour_tasks):
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, tmp_path / "out")
    with pytest.raises(ConfigError, match="'model.quantization' \\(4bit\\) needs 'model.freeze_language_model: true'"):
        load_recipe(recipe, ["model.quantization=4bit"])
    with pytest.raises(ConfigError, match="model.quantization"):
        load_recipe(recipe, ["model.freeze_language_model=true", "model.quantization=2bit"])


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_losses_and_bf16_close_ones(tmp_path, colour_tasks):
    full = ["model.freeze_vision_tower=false"]
    _, _, plain = train(tmp_path, colour_tasks, "plain", *full)
    _, model, checkpointed = train(tmp_path, colour_tasks, "checkpointed", *full, "model.gradient_checkpointing=true")
    assert model.is_activation_checkpointing
    # Recomputing activations in the backward pass changes nothing on CPU: the same losses, exactly.
    assert checkpointed["train_loss"] == plain["train_loss"]
    # Mixed precision is fixed per process (accelerate's state): its own process.
    recipe = write_recipe(tmp_path / "bf16.yaml", colour_tasks, tmp_path / "bf16", steps_per_task=3, log_every=1)
    proc = subprocess.run([sys.executable, "lvlm_cl/train.py", str(recipe), *SMALL_MODEL, "trainer.eval_max_samples=4",
                           *full, "trainer.mixed_precision=bf16"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bf16 = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    for task, curve in plain["train_loss"].items():
        assert bf16["train_loss"][task] != curve                                    # autocast is on
        assert bf16["train_loss"][task] == pytest.approx(curve, rel=2e-2)           # and close to fp32


@pytest.mark.slow
def test_a_bf16_run_keeps_its_base_in_bf16_trains_float32_adapters_and_reloads_so(tmp_path, colour_tasks):
    """trainer.mixed_precision: bf16 loads the weights in bf16 (half the memory of float32); what trains is
    float32, as the optimizer needs; the checkpoint keeps it so, and the stage reloads to the same scores."""
    from safetensors.torch import load_file

    out = tmp_path / "bf16-lora"
    recipe = write_recipe(tmp_path / "bf16-lora.yaml", colour_tasks, out, steps_per_task=4, log_every=1)
    proc = subprocess.run([sys.executable, "lvlm_cl/train.py", str(recipe), *SMALL_MODEL, *LORA,
                           "trainer.eval_max_samples=4", "trainer.mixed_precision=bf16"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = load_file(str(out / "checkpoints" / "task-01-warmth" / "trainable.safetensors"))
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(len(c) == 4 and all(map(math.isfinite, c)) for c in metrics["train_loss"].values())
    stage = load_stage(out)
    dtypes = {n: p.dtype for n, p in stage.model.named_parameters()}
    frozen = {d for n, d in dtypes.items() if "lora_" not in n}
    assert frozen == {torch.bfloat16}                                           # the whole base, vision included
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert stage_scores(stage) == metrics["matrix"][-1]
