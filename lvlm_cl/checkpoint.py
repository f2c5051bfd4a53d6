"""What a run keeps on disk, written atomically, and read back to resume.

    <output_dir>/
      config.json               the resolved recipe (a different recipe in the same folder is refused)
      run_state.json            tasks, the accuracy rows so far, which tasks are trained
      base_model/               the built-in model in Hugging Face format (a local model is referred to)
      checkpoints/task-00-<name>/
          trainable.safetensors the parameters that trained, by name
          methods.pt            each method's state_dict
          meta.json             written last: a checkpoint without it is incomplete and is not used
      predictions/<stage>/<task>.jsonl
      metrics.json, report.md, accuracy_matrix.png
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lvlm_cl.io import atomic_replace_dir, atomic_write_json


class CheckpointError(RuntimeError):
    pass


@dataclass
class RunState:
    tasks: list[str]
    data: str = ""                                          # data_fingerprint of the task files
    initial: list[float] | None = None
    rows: list[list[float]] = field(default_factory=list)   # rows[t] = scores on every task after task t
    trained: int = 0                                        # tasks whose checkpoint is written
    extra: dict = field(default_factory=dict)               # per-stage extras (timings, routing...)

    @classmethod
    def load(cls, run_dir: Path) -> "RunState | None":
        path = run_dir / "run_state.json"
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError) as e:
            raise CheckpointError(f"{path} is unreadable ({e}); delete the output folder or start with --overwrite") from None

    def save(self, run_dir: Path) -> None:
        atomic_write_json(run_dir / "run_state.json", asdict(self))


def prepare_run_dir(run_dir: Path, resolved_config: dict, *, overwrite: bool) -> None:
    """Create the output folder. ``overwrite`` starts over; otherwise a folder holding a different run is
    refused (the same recipe resumes)."""
    cfg_path = run_dir / "config.json"
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    elif cfg_path.is_file():
        old = json.loads(cfg_path.read_text(encoding="utf-8"))
        if old != resolved_config:
            changed = sorted(k for k in set(old) | set(resolved_config) if old.get(k) != resolved_config.get(k))
            raise CheckpointError(f"{run_dir} holds a different run (keys differ: {changed}); choose another "
                                  "output_dir, or pass --overwrite to start over")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg_path, resolved_config)


def data_fingerprint(paths: list[str]) -> str:
    """A hash of the task files' bytes: a resumed run must see the data it started with."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def task_dir(run_dir: Path, index: int, name: str) -> Path:
    return run_dir / "checkpoints" / f"task-{index:02d}-{name}"


def save_task_checkpoint(run_dir: Path, index: int, name: str, trainable: dict[str, torch.Tensor],
                         methods_state: dict, meta: dict) -> Path:
    final = task_dir(run_dir, index, name)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    torch.save(methods_state, tmp / "methods.pt")
    atomic_write_json(tmp / "meta.json", {"task_index": index, "task": name, **meta})
    return atomic_replace_dir(tmp, final)


def load_task_checkpoint(run_dir: Path, index: int, name: str) -> tuple[dict, dict, dict]:
    """(trainable tensors, methods state, meta); a checkpoint missing any part is refused."""
    d = task_dir(run_dir, index, name)
    if not (d / "meta.json").is_file():
        raise CheckpointError(f"checkpoint {d} is missing or incomplete (no meta.json)")
    try:
        tensors = load_file(str(d / "trainable.safetensors"))
        methods_state = torch.load(d / "methods.pt", weights_only=False)
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    except Exception as e:  # safetensors/pickle/json each raise their own types on damaged files
        raise CheckpointError(f"checkpoint {d} is damaged ({type(e).__name__}: {e})") from None
    return tensors, methods_state, meta


def restore_trainable(model, tensors: dict[str, torch.Tensor], where: str) -> None:
    params = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise CheckpointError(f"{where}: parameters {missing[:3]} are not in the model (was the recipe's model "
                              "or method list changed?)")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)


def restore_task(run_dir: Path, task, model, methods) -> dict:
    """Put the model and the methods back as they were after ``task``; returns the checkpoint's meta.

    Methods load first: they may add modules (prompts, adapters) whose parameters the checkpoint holds.
    """
    tensors, methods_state, meta = load_task_checkpoint(run_dir, task.index, task.name)
    for m in methods:
        m.load_state_dict(methods_state.get(m.name, {}))
    restore_trainable(model, tensors, str(run_dir))
    return meta
