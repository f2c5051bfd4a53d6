"""A trained run, as it was after one of its tasks: model, processor, methods and task stream.

    stage = load_stage("runs/seq5")            # after the last trained task
    stage = load_stage("runs/seq5", index=1)   # after the second task

Built the way the training loop builds them (same recipe, same base model, same methods), then the
task's checkpoint is restored, so evaluation and chat see exactly what training left.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lvlm_cl.build import build
from lvlm_cl.checkpoint import CheckpointError, RunState, restore_task
from lvlm_cl.config import RunConfig, cache_dir, from_dict
from lvlm_cl.methods.base import Method
from lvlm_cl.models import default_device, resolve_model_dir
from lvlm_cl.pretrained import cached_dir
from lvlm_cl.stream import Task


@dataclass
class Stage:
    model: object
    processor: object
    cfg: RunConfig
    stream: list[Task]
    methods: list[Method]
    index: int                  # the task after which this stage was saved
    run_dir: Path

    @property
    def task(self) -> Task:
        return self.stream[self.index]

    def restore(self, index: int) -> None:
        """Become the stage after task ``index`` of the same run (every checkpoint holds all that trained, so
        the model and methods need not be built again)."""
        restore_task(self.run_dir, self.stream[index], self.model, self.methods)
        self.index = index


def read_run(run_dir: Path) -> tuple[RunConfig, RunState]:
    """The run's resolved recipe and state; refused if it is not a run folder or nothing has trained."""
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{run_dir} is not a run folder (no config.json)")
    cfg = from_dict(RunConfig, json.loads(cfg_path.read_text(encoding="utf-8")), where=str(cfg_path))
    state = RunState.load(run_dir)
    if state is None or state.trained == 0:
        raise CheckpointError(f"{run_dir} has no trained task yet")
    return cfg, state


def stage_index(run_dir: Path, state: RunState, index: int | None) -> int:
    """``index`` checked against the trained stages (None: the last one)."""
    index = state.trained - 1 if index is None else index
    if not 0 <= index < state.trained:
        raise CheckpointError(f"{run_dir}: stage {index} does not exist; trained stages are 0..{state.trained - 1} "
                              f"({', '.join(state.tasks[:state.trained])})")
    return index


def load_stage(run_dir: str | Path, index: int | None = None, *, quantization: str | None = None,
               device: torch.device | str | None = None) -> Stage:
    """``index`` is the 0-based task after which the stage was saved (default: the last trained one). The
    model loads in the run's precision (its base in bf16 for a bf16 run) straight onto ``device`` (default:
    the current GPU, else the CPU).
    ``quantization`` ("4bit" / "8bit") loads the base language model quantized; refused when the run trained
    weights that quantization would replace (full fine-tuning of the language model). A run trained on a
    quantized model (``model.quantization``) loads quantized the same way unless told otherwise."""
    run_dir = Path(run_dir)
    cfg, state = read_run(run_dir)
    quantization = quantization or cfg.model.quantization
    index = stage_index(run_dir, state, index)
    if quantization and not cfg.model.freeze_language_model and cfg.model.lora is None:
        raise CheckpointError(f"{run_dir}: this run trained the language model's own weights "
                              "(model.freeze_language_model: false, no LoRA); loading it quantized would replace "
                              "them. Load it without 4-bit/8-bit.")
    cache = cache_dir(cfg)
    # The run keeps a copy of a built-in base model; a local model directory is read where it is.
    base = run_dir / "base_model"
    model_dir = base if base.is_dir() else resolve_model_dir(cfg.model, cfg.seed, cache, pretrained=cached_dir)
    built = build(cfg, model_dir, cache=cache, quantization=quantization,
                  device=default_device() if device is None else device)
    model = built.model
    stage = Stage(model, built.processor, cfg, built.stream, built.methods, index, run_dir)
    stage.restore(index)
    model.eval()
    return stage
