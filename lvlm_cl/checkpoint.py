"""What a run keeps on disk, written atomically, and read back to resume.

    <output_dir>/
      config.json               the resolved recipe (a different recipe in the same folder is refused)
      run_state.json            tasks, the accuracy rows so far, which tasks are trained
      base_model/               the built-in model in Hugging Face format (a local model is referred to)
      checkpoints/task-00-<name>/
          trainable.safetensors the parameters that trained, by name
          methods.safetensors   each method's state_dict: its tensors (state_io: no pickle anywhere)
          methods.json          ... and the rest of it
          meta.json             written last: a checkpoint without it is incomplete and is not used
      checkpoints/step/         the latest step checkpoint inside the task in training (trainer.save_every);
                                removed once that task's own checkpoint is written
          accelerate/           accelerate's save_state: optimizer, scheduler, every process's RNG states
                                (under DeepSpeed, its engine checkpoint: trained weights and ZeRO shards)
          trainable.safetensors the parameters that train (without DeepSpeed)
          methods-rank<r>.*     each method's state_dict on process r (mid-task state is per process)
          meta.json             written last: task, step, loss curve so far, and every file's size and
                                sha256 (a damaged step checkpoint is refused and the task starts over)
      predictions/<stage>/<task>.jsonl   <stage>: before, after-NN-<task> (``prediction_stage``)
      metrics.json, report.md, accuracy_matrix.png, format_matrix.png
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

from lvlm_cl.distributed import gathered, uses_deepspeed, whole
from lvlm_cl.errors import UserError
from lvlm_cl.io import atomic_replace_dir, atomic_write_json, complete_dir, under
from lvlm_cl.models import trainable_state_dict
from lvlm_cl.models.continual import is_continual
from lvlm_cl.state_io import StateFormatError, has_state, load_state, save_state


class CheckpointError(RuntimeError, UserError):
    """A run folder that cannot be used as it is (not a run, another run's, a damaged checkpoint)."""


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


# What a run writes at the top of its folder (and what --overwrite may remove): nothing else is touched.
JUDGE_CACHE = "judge_cache.jsonl"    # the judge's verdicts (metric: judge), kept so a rerun asks nothing again
RUN_ENTRIES = {"config.json", "run_state.json", "versions.json", "metrics.json", "report.md", "accuracy_matrix.png",
               "format_matrix.png", "base_model", "checkpoints", "predictions", "logs", "evaluations", JUDGE_CACHE,
               JUDGE_CACHE + ".lock"}
LOCK_FILE = ".lock"


def _protected(run_dir: Path) -> str | None:
    """Why ``run_dir`` must never be emptied (None: it may be a run folder)."""
    if str(run_dir) in ("", "."):
        return "an empty output_dir or '.' (the working folder)"
    resolved = run_dir.expanduser().resolve()
    cwd = Path.cwd().resolve()
    if resolved == Path(resolved.anchor):
        return "the root of the file system"
    if resolved == Path.home().resolve():
        return "the home folder"
    if resolved == cwd or resolved in cwd.parents:
        return "the working folder or one of its parents"
    return None


def is_run_dir(run_dir: Path) -> bool:
    """A folder this project's runs wrote: nothing at its top but run files (and hidden temporaries), with
    the versions.json every run writes first, or a run's config.json."""
    if not all(e.name in RUN_ENTRIES or e.name.startswith(".") for e in run_dir.iterdir()):
        return False
    if (run_dir / "versions.json").is_file():
        return True
    try:
        cfg = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(cfg, dict) and {"model", "trainer", "output_dir"} <= set(cfg)


def prepare_run_dir(run_dir: Path, resolved_config: dict, *, overwrite: bool, normalize=None) -> None:
    """Create the output folder, refusing one that holds a different run (the same recipe resumes;
    ``output_dir`` itself may differ: a run folder moved or copied elsewhere resumes there). ``overwrite``
    starts over: it removes the run's own files (``RUN_ENTRIES``) and only from a folder that is a run of
    this project (``is_run_dir``), never from ``.``, an empty path, the home folder, the file system's root
    or the working folder and its parents; anything else in the folder is left alone. The config is written
    later, once the inputs are checked (``write_run_config``): a run stopped by bad data leaves none, so the
    fixed recipe starts there. ``normalize(old config) -> dict`` reads the folder's config as the current
    schema would (a key added to the schema since the run started takes its default), so a run started by an
    earlier version of lvlm-cl resumes; where it cannot be read so, it is compared as written."""
    cfg_path = run_dir / "config.json"
    if overwrite and run_dir.exists() and any(e.name != LOCK_FILE for e in run_dir.iterdir()):
        why = _protected(run_dir)
        if why is not None:
            raise CheckpointError(f"--overwrite refused: output_dir {str(run_dir)!r} is {why}; point output_dir at "
                                  "the run's own folder")
        if not is_run_dir(run_dir):
            raise CheckpointError(f"--overwrite refused: {run_dir} is not a run folder of lvlm-cl (no run config.json, "
                                  f"or files a run does not write: "
                                  f"{sorted(e.name for e in run_dir.iterdir() if e.name not in RUN_ENTRIES and not e.name.startswith('.'))[:5]}); "
                                  "remove it yourself or choose another output_dir")
        for entry in run_dir.iterdir():
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    elif cfg_path.is_file():
        try:
            old = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{cfg_path} is unreadable ({e}); pass --overwrite to start over") from None
        if normalize is not None:
            try:
                old = normalize(old)
            except ValueError:          # a key the schema no longer has: compared as written, and refused
                pass
        keys = (set(old) | set(resolved_config)) - {"output_dir"}
        changed = sorted(k for k in keys if old.get(k) != resolved_config.get(k))
        if changed:
            raise CheckpointError(f"{run_dir} holds a different run (keys differ: {changed}); choose another "
                                  "output_dir, or pass --overwrite to start over")
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_orphans(run_dir)


def write_run_config(run_dir: Path, resolved_config: dict) -> None:
    """The run's config.json (once its inputs have passed the start's checks)."""
    atomic_write_json(run_dir / "config.json", resolved_config)


def lock_run_dir(run_dir: Path):
    """An exclusive lock on the run folder for the life of this process (released by the OS if it dies):
    a second run started on the same output_dir is refused instead of corrupting the first one's files."""
    from filelock import FileLock, Timeout

    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise CheckpointError(f"another run is using {run_dir} (it holds {run_dir / LOCK_FILE}); wait for it to end, "
                              "or choose another output_dir") from None
    return lock


def remove_orphans(run_dir: Path) -> list[Path]:
    """What a killed run left half-written: temporary files of atomic writes (``.NAME.XXXX.tmp``) and
    temporary checkpoint folders (``checkpoints/.task-NN-NAME.XXXXXXXX``; a full checkpoint each). Kept:
    ``.NAME.old`` twins (the last good copy when a kill came between two renames) and ``.damaged-*``."""
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            name = entry.name
            if not name.startswith(".") or name.endswith(".old") or name.startswith(".damaged-") or name == LOCK_FILE:
                continue
            if name.endswith(".tmp") or (folder.name == "checkpoints" and name.startswith(".task-")):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def data_fingerprint(paths: list[str]) -> str:
    """A hash of the task files' bytes: a resumed run must see the data it started with."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def checkpoint_state(model, accelerator) -> dict[str, torch.Tensor] | None:
    """``trainable_state_dict`` on the main process (whole tensors, also under ZeRO-3), None elsewhere.
    Every process must call it."""
    names = {n for n, p in model.named_parameters() if p.requires_grad or is_continual(n)}
    with gathered(model, names):
        return trainable_state_dict(model) if accelerator.is_main_process else None


def prediction_stage(index: int | None = None, name: str = "") -> str:
    """The folder of ``predictions/`` for the evaluation before training (no index) or after task ``index``
    (named ``name``): where the run writes a stage's predictions and ``scripts/evaluate.py --rescore`` reads
    them."""
    return "before" if index is None else f"after-{index:02d}-{name}"


def task_dir(run_dir: Path, index: int, name: str) -> Path:
    return under(run_dir, "checkpoints", f"task-{index:02d}-{name}")


def save_task_checkpoint(run_dir: Path, index: int, name: str, trainable: dict[str, torch.Tensor],
                         methods_state: dict, meta: dict) -> Path:
    final = task_dir(run_dir, index, name)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    save_state(tmp, "methods", methods_state)          # safetensors + JSON: nothing to unpickle on loading
    atomic_write_json(tmp / "meta.json", {"task_index": index, "task": name, **meta})
    return atomic_replace_dir(tmp, final)


def step_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "step"


def _manifest(folder: Path) -> dict[str, list]:
    """[size, sha256] of every file under ``folder``, by relative path."""
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != "meta.json":
            with open(f, "rb") as fh:
                out[f.relative_to(folder).as_posix()] = [f.stat().st_size, hashlib.file_digest(fh, "sha256").hexdigest()]
    return out


def save_step_checkpoint(accelerator, run_dir: Path, meta: dict, trainable: dict[str, torch.Tensor] | None,
                         methods_state: dict) -> Path:
    """The state in the middle of a task, written by every process into one folder that replaces the
    previous step checkpoint only when complete. Every process must call it (DeepSpeed saves collectively).

    ``trainable`` (main process, without DeepSpeed) holds the trained parameters; under DeepSpeed its engine
    checkpoint holds them (frozen parameters excluded)."""
    final = step_dir(run_dir)
    tmp = final.with_name(".step.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerate"),
                           **({"exclude_frozen_parameters": True} if uses_deepspeed(accelerator) else {}))
    save_state(tmp, f"methods-rank{accelerator.process_index}", methods_state)
    if accelerator.is_main_process and trainable is not None:
        save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / "meta.json", {**meta, "processes": accelerator.num_processes,
                                              "files": _manifest(tmp)})
        atomic_replace_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final


def read_step_checkpoint(run_dir: Path, task_index: int, processes: int) -> tuple[dict | None, str | None]:
    """(meta, None) when a complete, undamaged step checkpoint of task ``task_index`` exists, saved by
    ``processes`` processes; otherwise (None, why it cannot be used, or None when there is none)."""
    folder = complete_dir(step_dir(run_dir), "meta.json")
    if folder is None:
        return None, None
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        return None, f"{folder / 'meta.json'} is unreadable ({e})"
    if meta.get("task_index") != task_index:
        return None, None                       # an older task's: stale
    if meta.get("processes") != processes:
        return None, (f"{folder} was saved by {meta.get('processes')} processes and this run has {processes}; "
                      "its per-process state cannot be split differently")
    files = _manifest(folder)
    for name, want in meta.get("files", {}).items():
        if files.get(name) != want:
            return None, f"{folder / name} is missing or damaged (size or sha256 differs from meta.json)"
    meta["folder"] = str(folder)
    return meta, None


def remove_step_checkpoint(run_dir: Path) -> None:
    for name in ("step", ".step.old", ".step.tmp"):
        shutil.rmtree(step_dir(run_dir).with_name(name), ignore_errors=True)


def load_task_checkpoint(run_dir: Path, index: int, name: str) -> tuple[dict, dict, dict]:
    """(trainable tensors, methods state, meta); a checkpoint missing any part is refused."""
    d = complete_dir(task_dir(run_dir, index, name), "meta.json")
    if d is None:
        raise CheckpointError(f"checkpoint {task_dir(run_dir, index, name)} is missing or incomplete (no meta.json)")
    try:
        tensors = load_file(str(d / "trainable.safetensors"))
        methods_state = load_methods_state(d, "methods")
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    except CheckpointError:
        raise
    except Exception as e:  # safetensors/json each raise their own types on damaged files
        raise CheckpointError(f"checkpoint {d} is damaged ({type(e).__name__}: {e})") from None
    return tensors, methods_state, meta


def load_methods_state(folder: Path, name: str) -> dict:
    """The methods' state saved as ``name`` in ``folder`` (``state_io``: safetensors + JSON). A folder written
    by lvlm-cl before that format holds ``name.pt``, a pickle: it is read only through torch's restricted
    loader (``weights_only=True``: tensors and plain containers, no code), and refused if it needs more."""
    if has_state(folder, name):
        try:
            return load_state(folder, name)
        except StateFormatError as e:
            raise CheckpointError(f"checkpoint {folder} is damaged: {e}") from None
    legacy = folder / f"{name}.pt"
    if not legacy.is_file():
        raise CheckpointError(f"checkpoint {folder} has no methods' state ({name}.json)")
    try:
        return torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the restricted unpickler refuses anything beyond tensors and containers
        raise CheckpointError(f"{legacy}: an older run's methods' state that holds more than tensors and plain values "
                              f"({type(e).__name__}); it is not unpickled, since a pickle can run code. Train this "
                              "task again (remove the checkpoint) or start over with --overwrite") from None


def set_aside(run_dir: Path, task) -> Path | None:
    """Move a task checkpoint that cannot be used out of the way (kept for inspection, never read again)."""
    d = task_dir(run_dir, task.index, task.name)
    if not d.exists():
        return None
    target = d.with_name(f".damaged-{d.name}")
    shutil.rmtree(target, ignore_errors=True)
    d.rename(target)
    return target


def restore_trainable(model, tensors: dict[str, torch.Tensor], where: str) -> None:
    params = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise CheckpointError(f"{where}: parameters {missing[:3]} are not in the model (was the recipe's model "
                              "or method list changed?)")
    # Under DeepSpeed ZeRO-3 a parameter built partitioned holds an empty shard here: it is gathered whole,
    # written (the same file on every process; the main one's values are given to all) and partitioned again.
    # Collective: every process restores the same names.
    partitioned = [params[n] for n in tensors if hasattr(params[n], "ds_id")]
    with torch.no_grad(), whole(partitioned, modifier_rank=0):
        for n, t in tensors.items():
            p = params[n]
            if p.is_floating_point() and t.is_floating_point() and p.dtype != t.dtype and not hasattr(p, "ds_id"):
                p.data = t.to(p.device)       # saved in the precision it trained in (float32 over a bf16 base)
            else:
                p.copy_(t)


def restore_task(run_dir: Path, task, model, methods) -> dict:
    """Put the model and the methods back as they were after ``task``; returns the checkpoint's meta.

    Methods load first: they may add modules (prompts, adapters) whose parameters the checkpoint holds.
    """
    tensors, methods_state, meta = load_task_checkpoint(run_dir, task.index, task.name)
    for m in methods:
        m.load_state_dict(methods_state.get(m.name, {}))
    restore_trainable(model, tensors, str(run_dir))
    return meta


def resume_after_last_task(accelerator, run_dir: Path, state: "RunState", stream, model, methods, log) -> "RunState":
    """The model and methods as after the last finished task of ``state`` (its task checkpoint restored); a
    checkpoint that cannot be used is set aside and its task trained again, from the one before (from its own
    seed: the same result). Every process sees the same files, so all of them take the same branch. The
    run's state, as it is now."""
    while state.trained:
        last = stream[state.trained - 1]
        try:
            restore_task(run_dir, last, model, methods)
        except CheckpointError as e:
            log(f"{e}; task {last.name} will be trained again")
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                set_aside(run_dir, last)
                state.trained -= 1
                del state.rows[state.trained:]
                state.save(run_dir)
            accelerator.wait_for_everyone()
            state = RunState.load(run_dir)
            continue
        log(f"resuming after task {state.trained}/{len(stream)} ({last.name})")
        break
    return state
