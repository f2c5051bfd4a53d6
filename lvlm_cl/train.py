"""Train a LLaVA-style model on a sequence of instruction tasks, evaluating every task after each one.

    accelerate launch lvlm_cl/train.py recipes/seq5.yaml [key=value ...] [--overwrite]

Reads top to bottom: recipe -> model -> task stream -> methods -> for each task: method hooks, the
training loop, a checkpoint, evaluation on every task, the report. Running the same command again
resumes: from the last step checkpoint inside a task (every ``trainer.save_every`` optimizer steps) or
after the last finished task.
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import os
import platform
import shutil
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch lvlm_cl/train.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from lvlm_cl.build import build, check_samples, eval_records, task_paths, with_lengths
from lvlm_cl.checkpoint import (JUDGE_CACHE, CheckpointError, RunState, checkpoint_state, lock_run_dir,
                                prediction_stage, prepare_run_dir, remove_step_checkpoint, resume_after_last_task,
                                save_task_checkpoint, write_run_config)
from lvlm_cl.config import ConfigError, RunConfig, cache_dir, from_dict, load_recipe, to_dict
from lvlm_cl.data.dataset import Collator
from lvlm_cl.data.lengths import TokenCounter
from lvlm_cl.distributed import gathered, make_accelerator, zero3_init_disabled, zero_stage
from lvlm_cl.errors import report, user_errors
from lvlm_cl.evaluation import cl_metrics_partial, write_predictions, write_report
from lvlm_cl.evaluation.judge import settings_from
from lvlm_cl.evaluation.pipeline import score_records
from lvlm_cl.io import atomic_replace_dir, atomic_write_json, under
from lvlm_cl.loop import decide_checkpointing, train_task, worker_count
from lvlm_cl.models import BUILTIN_PRETRAINED, RANDOM_FAMILIES, count_parameters, resolve_model_dir
from lvlm_cl.models.continual import task_router
from lvlm_cl.models.tiny import save_model_dir
from lvlm_cl.pretrained import pretrain_config, pretrained_is_cached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.lr=1e-4")
    parser.add_argument("--overwrite", action="store_true", help="start over in an output folder holding another run")
    args = parser.parse_args(argv)
    _die_with_launcher()
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        cfg = load_recipe(args.recipe, args.overrides)
        run(cfg, overwrite=args.overwrite)
    except user_errors() as e:
        # What the user can fix (the recipe, the data, the model folder, the run folder, the learning rate, the
        # disk): one message naming what is wrong and where, no traceback.
        return report(e)
    except (KeyboardInterrupt, Terminated) as e:
        if int(os.environ.get("RANK", "0")) == 0:     # one line per launch, not one per process
            print(f"lvlm_cl: {'terminated' if isinstance(e, Terminated) else 'interrupted'}; run the same command "
                  "to resume (from the last step checkpoint)", file=sys.stderr, flush=True)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


class Terminated(Exception):
    """SIGTERM, raised where the process is (a step checkpoint being written is finished atomically or not
    at all), so that the run stops with one line instead of silently."""


def _terminated(signum, frame):
    raise Terminated()


def _die_with_launcher() -> None:
    """A process started by ``accelerate launch`` (or torchrun) is sent SIGTERM when its launcher dies, instead
    of training on as an orphan that holds the run folder (Linux's PR_SET_PDEATHSIG; elsewhere nothing)."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)     # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run(cfg: RunConfig, *, overwrite: bool = False, progress: bool = True):
    """Train the whole stream (or what is left of it) and return ``(model, processor, run_state)``. The main
    process holds the run folder's lock throughout (a second run on the same folder is refused)."""
    run_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg, str(run_dir / "logs"))
    # Step checkpoints keep the trained parameters themselves (only those): accelerate's save_state would
    # write the whole model, frozen base included, and its load_state would read it back.
    accelerator.register_save_state_pre_hook(lambda models, weights, folder: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, folder: models.clear())
    lock = lock_run_dir(run_dir) if accelerator.is_main_process else None
    try:
        return _run(cfg, accelerator, run_dir, overwrite, progress)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: RunConfig, accelerator, run_dir: Path, overwrite: bool, progress: bool):
    from accelerate.utils import set_seed

    log = _logger(accelerator)
    if accelerator.is_main_process:
        prepare_run_dir(run_dir, to_dict(cfg), overwrite=overwrite,
                        normalize=lambda old: to_dict(from_dict(RunConfig, old, where=str(run_dir / "config.json"))))
        atomic_write_json(run_dir / "versions.json", _versions())
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    cache = cache_dir(cfg)

    # The model: every source is a Hugging Face directory, loaded the same way. A randomly initialised
    # built-in model is built by the main process while the others wait (transformers' save_pretrained
    # writes only from the main process), whole: not under DeepSpeed ZeRO-3's partitioned initialisation,
    # which transformers enters under a ZeRO-3 launch and which cannot initialise it.
    if cfg.model.path == BUILTIN_PRETRAINED:
        if accelerator.num_processes > 1 and not pretrained_is_cached(cfg.model, cache):
            raise ConfigError(f"model.path {BUILTIN_PRETRAINED!r}: the pretrained tiny base is not built yet, and it "
                              "is built by a training run of its own, in one process. Build it once with one "
                              "process (python -m lvlm_cl.pretrain <this recipe> <the same overrides>), then "
                              "launch again.")
        model_dir = resolve_model_dir(cfg.model, cfg.seed, cache, pretrained=pretrained_base)
    else:
        with zero3_init_disabled(accelerator), accelerator.main_process_first():
            model_dir = resolve_model_dir(cfg.model, cfg.seed, cache)
    if (cfg.model.path == BUILTIN_PRETRAINED or cfg.model.path in RANDOM_FAMILIES) and accelerator.is_main_process \
            and not (run_dir / "base_model").exists():
        tmp = run_dir / ".base_model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(model_dir, tmp)
        atomic_replace_dir(tmp, run_dir / "base_model")
    # The model in the recipe's precision, straight onto this process's device (the zero-shot evaluation and
    # the methods' setup already run there; under ZeRO-3 transformers builds it partitioned, on the devices,
    # inside deepspeed.zero.Init); the stream, every task's records read and validated into compact tables,
    # the data's fingerprint from the same read; the methods, set up on both.
    digest = hashlib.sha256()
    built = build(cfg, model_dir, cache=cache, quantization=cfg.model.quantization,
                  device=None if zero_stage(accelerator) == 3 else accelerator.device,
                  accelerator=accelerator, digest=digest, log=log)
    model, processor, stream, files, methods = built.model, built.processor, built.stream, built.files, built.methods
    names = [t.name for t in stream]

    fingerprint = digest.hexdigest()[:16]           # = checkpoint.data_fingerprint(files)
    state = RunState.load(run_dir) or RunState(tasks=names, data=fingerprint)
    if state.tasks != names or state.data != fingerprint:
        raise CheckpointError(f"{run_dir} was started on other data (tasks {state.tasks}, fingerprint {state.data}; "
                              f"now {names}, {fingerprint}): the task files changed. Pass --overwrite to start over.")
    counter = TokenCounter(processor, cfg.model.max_length)
    kept = {} if cfg.trainer.keep_encodings else None      # trainer.keep_encodings: small data on a CPU
    check_samples(stream[state.trained:], stream, files, counter, cfg.trainer, log,
                  progress and accelerator.is_main_process)
    if accelerator.is_main_process:
        write_run_config(run_dir, to_dict(cfg))         # the inputs passed: this folder is now this recipe's run
    state = resume_after_last_task(accelerator, run_dir, state, stream, model, methods, log)

    trainable, total = count_parameters(model)
    log(f"model: {model_dir} | {trainable:,} trainable of {total:,} parameters | methods: "
        f"{[m.name for m in methods]} | batch {cfg.trainer.batch_size} x accumulation {cfg.trainer.grad_accum} "
        f"x {accelerator.num_processes} processes = {cfg.trainer.batch_size * cfg.trainer.grad_accum * accelerator.num_processes}")
    if cfg.report_to:
        accelerator.init_trackers("lvlm_cl", config={"seed": cfg.seed, "lr": cfg.trainer.lr})

    if cfg.eval_before_training and state.initial is None:
        state.initial, _, formats = evaluate_stream(accelerator, model, processor, stream, cfg, run_dir,
                                                    prediction_stage(), progress, kept)
        keep_formats(state, "before training", formats)
        _save_progress(accelerator, run_dir, state, stream)

    checkpointing = cfg.model.gradient_checkpointing is True
    for task in stream[len(state.rows):]:
        if task.index >= state.trained:
            started = time.time()
            # Each task starts from its own seed, so a run resumed after a finished task draws the same random
            # numbers (adapter initialisations...) as one that never stopped.
            set_seed(cfg.seed * 1000 + task.index)
            train_data = task.train_records
            for m in methods:
                train_data = m.before_task(task, model, train_data)
            state.extra.setdefault("trainable_parameters", {})[task.name] = count_parameters(model)[0]
            train_data = with_lengths(train_data, counter)
            collate = Collator(processor, cfg.model.max_length, files=task_paths(stream, files), keep=kept,
                               task_index={n: i for i, n in enumerate(names)}
                               if any(m.uses_task_ids for m in methods) else None)
            if cfg.model.gradient_checkpointing == "auto" and not checkpointing:
                checkpointing = decide_checkpointing(accelerator, model, methods, task, train_data, collate, cfg,
                                                     log)
            curve = train_task(accelerator, model, methods, task, train_data, collate, cfg, log, progress, names,
                               run_dir)
            state.extra.setdefault("train_loss", {})[task.name] = curve
            for m in methods:
                m.after_task(task, model, train_data)
            state.extra.setdefault("train_seconds", {})[task.name] = round(time.time() - started, 2)
            for key, value in method_figures(methods).items():
                state.extra.setdefault(key, {})[task.name] = value
            trained_values = checkpoint_state(model, accelerator)   # collective under ZeRO-3
            if accelerator.is_main_process:
                save_task_checkpoint(run_dir, task.index, task.name, trained_values,
                                     {m.name: m.state_dict() for m in methods},
                                     {"train_samples": len(train_data), "task_records": len(task.train_records)})
            state.trained = task.index + 1
            _save_progress(accelerator, run_dir, state, stream)
            if accelerator.is_main_process:
                remove_step_checkpoint(run_dir)     # the task's own checkpoint supersedes it
        started = time.time()
        row, routing, formats = evaluate_stream(accelerator, model, processor, stream, cfg, run_dir,
                                                prediction_stage(task.index, task.name), progress, kept)
        if routing:
            state.extra.setdefault("routing_accuracy", {})[task.name] = routing
        keep_formats(state, task.name, formats)
        state.extra.setdefault("eval_seconds", {})[task.name] = round(time.time() - started, 2)
        state.rows.append(row)
        _save_progress(accelerator, run_dir, state, stream)
        metrics = cl_metrics_partial(state.rows, state.initial, len(stream))
        log(f"after {task.name}: " + " ".join(f"{n}={s:.1f}" for n, s in zip(names, row)) + " | "
            + " ".join(f"{k}={v:.2f}" for k, v in metrics.items() if v is not None))
    # Every process waits for the main one's last writes before the process group is torn down: a process
    # leaving early aborted now and then in 2-process CI runs ("terminate called without an active exception").
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return model, processor, state


def pretrained_base(model_cfg, cache: Path) -> Path:
    """The cached pretrained tiny base (``lvlm_cl.pretrained``), built now by a training run of its own
    (resumably) if it is not there yet."""
    cfg, key = pretrain_config(model_cfg, cache)
    final = cache / "models" / f"tiny-llava-pretrained-{key}"
    if (final / "config.json").is_file():
        return final
    from filelock import FileLock

    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):     # two runs started at once on a fresh cache: one builds, one waits
        if (final / "config.json").is_file():
            return final
        return _build_pretrained(cfg, model_cfg, final)


def _build_pretrained(cfg, model_cfg, final: Path) -> Path:
    print(f"[lvlm_cl] building the pretrained tiny base (once, cached in {final}) with {model_cfg.pretrain_recipe}",
          flush=True)
    started = time.time()
    model, processor, state = run(cfg)
    model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    save_model_dir(model, processor, final)
    atomic_write_json(final / "pretrain_summary.json", {
        "recipe": str(model_cfg.pretrain_recipe), "seconds": round(time.time() - started, 1),
        "tasks": state.tasks, "scores_after": state.rows[-1] if state.rows else None})
    print(f"[lvlm_cl] pretrained tiny base ready in {time.time() - started:.0f}s", flush=True)
    return final


def keep_formats(state: RunState, stage: str, formats: dict) -> None:
    """A stage's format errors into the run's figures (``metrics.json``: ``{stage: {task: percent}}``)."""
    for key, per_task in formats.items():
        state.extra.setdefault(key, {})[stage] = per_task


def method_figures(methods) -> dict[str, float]:
    """What the methods report after a task (``Method.report``), summed by name; zeros left out."""
    figures: dict[str, float] = {}
    for m in methods:
        for key, value in m.report().items():
            figures[key] = figures.get(key, 0) + value
    return {k: v for k, v in figures.items() if v}


def evaluate_stream(accelerator, model, processor, stream, cfg, run_dir: Path, stage: str,
                    progress: bool, kept: dict | None = None) -> tuple[list[float], dict[str, float], dict]:
    """Score on every task's test split (percent; predictions are written per task) through the evaluation
    pipeline; the routing accuracy of a method that routes by task keys (counted on the same prompt
    batches); and the format errors (``evaluation.formats``: ``format_errors`` and ``wrong_format_share``,
    each ``{task: percent}``). Under ZeRO-3 the model is gathered whole on every process for the duration (it
    must fit one device for inference)."""
    tr = cfg.trainer
    judge = settings_from(cfg.judge, run_dir / JUDGE_CACHE) if cfg.judge is not None else None
    row, routing = [], {}
    formats: dict[str, dict[str, float | None]] = {"format_errors": {}, "wrong_format_share": {}}
    router = task_router(model)
    with gathered(model):
        for task in stream:
            records = eval_records(task, tr)
            real = len(range(accelerator.process_index, len(records), accelerator.num_processes))  # unpadded share
            counted = router is not None and task.index < router.num_known
            hits = torch.zeros(2, dtype=torch.long, device=accelerator.device)

            def observe(batch, positions):
                keep = torch.tensor([p < real for p in positions], device=batch["input_ids"].device)
                best, _ = router.route(batch["input_ids"], batch.get("attention_mask"))
                hits[0] += ((best == task.index) & keep).sum()
                hits[1] += keep.sum()

            with accelerator.autocast():
                scored = score_records(model, processor, records, task.metric, accelerator=accelerator,
                                       max_length=cfg.model.max_length, batch_size=tr.eval_batch_size,
                                       max_new_tokens=tr.max_new_tokens, desc=f"eval {stage} {task.name}",
                                       progress=progress and accelerator.is_main_process,
                                       num_workers=worker_count(accelerator, tr),
                                       observe=observe if counted else None, keep=kept, judge=judge)
            if counted:
                total = accelerator.reduce(hits, "sum") if accelerator.num_processes > 1 else hits
                routing[task.name] = round(100.0 * int(total[0]) / max(1, int(total[1])), 2)
            row.append(scored.percent)
            for key, value in scored.format_figures().items():
                formats[key][task.name] = value
            if accelerator.is_main_process:
                write_predictions(under(run_dir, "predictions", stage, f"{task.name}.jsonl"), scored.rows(records))
        return row, routing, formats


def _save_progress(accelerator, run_dir: Path, state: RunState, stream) -> None:
    if not accelerator.is_main_process:
        return
    state.save(run_dir)
    if state.rows or state.initial is not None:
        write_report(run_dir, [t.name for t in stream], state.rows, state.initial, extra=state.extra or None)


def _logger(accelerator):
    def log(message: str) -> None:
        if accelerator.is_main_process:
            print(f"[lvlm_cl {time.strftime('%H:%M:%S')}] {message}", flush=True)
    return log


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "accelerate", "deepspeed", "lvlm-cl"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


if __name__ == "__main__":
    # A training process that dies in native code (a signal, an abort inside a communication library) prints
    # the Python stack of every thread: where it was is the first thing to know about such a failure.
    faulthandler.enable()
    sys.exit(main())
