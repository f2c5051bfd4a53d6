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
import math
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
from accelerate.utils import send_to_device
from tqdm.auto import tqdm

from lvlm_cl.checkpoint import (CheckpointError, RunState, checkpoint_state, load_methods_state, lock_run_dir,
                                prepare_run_dir, read_step_checkpoint, remove_step_checkpoint, restore_task,
                                restore_trainable, save_step_checkpoint, save_task_checkpoint, set_aside,
                                write_run_config)
from lvlm_cl.config import ConfigError, RunConfig, cache_dir, load_recipe, to_dict
from lvlm_cl.data.dataset import Collator, StepBatchOrder, check_batch, loader
from lvlm_cl.data.encoding import IGNORE_INDEX
from lvlm_cl.data.lengths import TokenCounter, counted
from lvlm_cl.data.records import final_answer, user_text
from lvlm_cl.distributed import (gathered, make_accelerator, shard, unshard, uses_deepspeed, zero3_init_disabled,
                                 zero_stage)
from lvlm_cl.errors import report, user_errors
from lvlm_cl.evaluation import cl_metrics_partial, score_many, write_predictions, write_report
from lvlm_cl.evaluation.generate import generate_answers
from lvlm_cl.io import atomic_replace_dir, atomic_write_json, under
from lvlm_cl.methods import build_methods, refuse_unsupported
from lvlm_cl.models import (BUILTIN_GEMMA3, BUILTIN_PRETRAINED, BUILTIN_RANDOM, apply_training_setup, count_parameters,
                            load_model_dir, resolve_model_dir, trainable_state_dict, upcast_trainable, weights_dtype)
from lvlm_cl.models.continual import held_for_batch, model_inputs
from lvlm_cl.models.kernels import use_liger
from lvlm_cl.models.memory import enable_checkpointing, optimizer_bytes, peak_reader, probe_needs_checkpointing
from lvlm_cl.models.tiny import save_model_dir
from lvlm_cl.pretrained import pretrain_config, pretrained_is_cached
from lvlm_cl.stream import build_stream


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
        prepare_run_dir(run_dir, to_dict(cfg), overwrite=overwrite)
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
    # In the recipe's precision, straight onto this process's device: the zero-shot evaluation and the
    # methods' setup already run there. Under ZeRO-3 transformers builds it partitioned, on the devices,
    # inside deepspeed.zero.Init (no device map there).
    model, processor = load_model_dir(model_dir, cfg.model, dtype=weights_dtype(cfg.trainer.mixed_precision),
                                      quantization=cfg.model.quantization,
                                      device=None if zero_stage(accelerator) == 3 else accelerator.device)
    if cfg.model.path in (BUILTIN_PRETRAINED, BUILTIN_RANDOM, BUILTIN_GEMMA3) and accelerator.is_main_process \
            and not (run_dir / "base_model").exists():
        tmp = run_dir / ".base_model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(model_dir, tmp)
        atomic_replace_dir(tmp, run_dir / "base_model")
    use_liger(model, cfg.model.liger_kernel, accelerator.device, log)     # before LoRA wraps its layers
    model = apply_training_setup(model, cfg.model)

    # The stream: every task's records read and validated, into compact tables; the data's fingerprint
    # from the same read.
    digest = hashlib.sha256()
    with accelerator.main_process_first():  # one process generates a missing benchmark, the others read it
        stream, files = build_stream(cfg, cache, digest)
    names = [t.name for t in stream]
    log(f"stream: {len(stream)} tasks: " + ", ".join(f"{t.name} ({len(t.train_records)} train / "
                                                      f"{len(t.test_records)} test, {t.metric})" for t in stream))
    methods = build_methods(cfg.methods)
    refuse_unsupported(methods, accelerator)
    for m in methods:
        m.setup(model, stream)

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
    while state.trained:
        last = stream[state.trained - 1]
        try:
            restore_task(run_dir, last, model, methods)
        except CheckpointError as e:
            # The previous good checkpoint is used and the task is trained again (from its own seed: the same
            # result). Every process sees the same files, so all of them take the same branch.
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

    trainable, total = count_parameters(model)
    log(f"model: {model_dir} | {trainable:,} trainable of {total:,} parameters | methods: "
        f"{[m.name for m in methods]} | batch {cfg.trainer.batch_size} x accumulation {cfg.trainer.grad_accum} "
        f"x {accelerator.num_processes} processes = {cfg.trainer.batch_size * cfg.trainer.grad_accum * accelerator.num_processes}")
    if cfg.report_to:
        accelerator.init_trackers("lvlm_cl", config={"seed": cfg.seed, "lr": cfg.trainer.lr})

    if cfg.eval_before_training and state.initial is None:
        state.initial, _ = evaluate_stream(accelerator, model, processor, stream, cfg, run_dir,
                                           "before", progress, kept)
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
            bank = sum(m.memory_size() for m in methods if hasattr(m, "memory_size"))
            if bank:
                state.extra.setdefault("memory_records", {})[task.name] = bank
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
        row, routing = evaluate_stream(accelerator, model, processor, stream, cfg, run_dir,
                                       f"after-{task.index:02d}-{task.name}", progress, kept)
        if routing:
            state.extra.setdefault("routing_accuracy", {})[task.name] = routing
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


def check_samples(to_train, stream, files: list[str], counter, trainer, log, progress: bool) -> None:
    """Count the tokens of every training sample of the tasks still to train and of every test prompt,
    before any training time is spent, from the text and the image headers (no pixel is processed:
    ``lengths.TokenCounter``): a missing or unreadable image, a sample longer than ``model.max_length``
    (truncation would cut its answer or image tokens), one with no answer tokens, or one the chat template
    cannot encode stops the run here, naming its file, record and field. The counts are kept in the tables
    (``RecordTable.lengths``): they order the evaluation's batches and group training batches by length."""
    import numpy as np

    work = [(files[2 * t.index], t.train_records, False, t, "train_records") for t in to_train]
    work += [(files[2 * t.index + 1], eval_records(t, trainer), True, t, "test_records") for t in stream]
    with tqdm(total=sum(len(records) for _, records, *_ in work), desc="checking samples", disable=not progress,
              unit="sample") as bar:
        for path, records, prompt, task, which in work:
            if not counter.verify(records, prompt=prompt):
                log(f"{path}: token counts from the text differ from the processor's for this model; counting by "
                    "encoding every sample instead (slower)")
            counts = counter.count(records, prompt=prompt, path=path, progress=bar.update)
            table = getattr(task, which)
            if hasattr(table, "lengths"):
                full = np.full(len(table), -1, dtype=np.int32)
                full[:len(counts)] = counts
                table.lengths = full


def with_lengths(records, counter):
    """``records`` as a table whose every sample has its training token count (replayed records added by a
    method come without one: counted here, from the text)."""
    from lvlm_cl.data.records import RecordTable

    table = records if isinstance(records, RecordTable) else RecordTable(records)
    table.lengths = counted(table, counter, prompt=False)
    return table


def worker_count(accelerator, trainer) -> int:
    """DataLoader workers for this process: ``trainer.num_workers``, except in a run of several processes on
    CPUs (gloo), where a worker forked beside the collective's threads was seen to hang in its start (CI,
    ZeRO-3, 2 processes); there batches are encoded in the training process. GPU runs (NCCL) fork them as
    every PyTorch loader does."""
    if accelerator.num_processes > 1 and accelerator.device.type == "cpu":
        return 0
    return trainer.num_workers


def task_paths(stream, files: list[str]) -> dict[str, str]:
    """Each task's training file, by task name (what a batch's encoding error names)."""
    return {t.name: files[2 * t.index] for t in stream}


def train_task(accelerator, model, methods, task, train_data, collate, cfg, log, progress, names,
               run_dir: Path) -> list[float]:
    """The loop for one task: AdamW over whatever requires grad, a fresh optimizer per task. Returns the
    training loss every ``log_every`` steps (mean over the window and over processes).

    ``model`` is the plain model; it is wrapped by ``accelerator.prepare`` (DDP, DeepSpeed) for this task
    only and released at the end, so no optimizer state outlives its task. Hooks see the plain model.

    Every ``trainer.save_every`` optimizer steps a step checkpoint is written; a step checkpoint of this
    task found at the start is resumed from (parameters, optimizer, scheduler, RNG states, methods' state,
    the loss curve; the batch order continues at the next step).
    """
    from transformers import get_scheduler

    tr = cfg.trainer
    world = accelerator.num_processes
    samples_per_step = tr.batch_size * tr.grad_accum * world
    steps = tr.steps_per_task or max(1, math.ceil(tr.epochs_per_task * len(train_data) / samples_per_step))
    if not uses_deepspeed(accelerator):     # DeepSpeed keeps its own float32 copy of what trains
        upcast_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"task {task.name!r}: nothing trains: every part of the model is frozen and no method adds "
                         "trainable parameters (check the recipe's model section and methods)")
    optimizer = torch.optim.AdamW(params, lr=tr.lr, weight_decay=tr.weight_decay,
                                  **({"fused": True} if tr.optimizer == "adamw_fused" else {}))
    scheduler = get_scheduler(tr.lr_schedule, optimizer, num_warmup_steps=tr.warmup_steps, num_training_steps=steps)
    wrapped, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    lengths = getattr(train_data, "lengths", None) if tr.group_by_length else None
    if tr.group_by_length and (lengths is None or (lengths < 0).any()):
        raise ValueError("trainer.group_by_length: the training records have no token counts (with_lengths)")
    order = StepBatchOrder(len(train_data), tr.batch_size * world, steps * tr.grad_accum,
                           seed=cfg.seed * 1000 + task.index, rank=accelerator.process_index, world=world,
                           lengths=lengths)

    step, running, curve = 0, [], []
    resumed = resume_step(accelerator, model, methods, task, run_dir, len(train_data), log)
    if resumed is not None:
        step, running, curve = resumed["step"], resumed["running"], resumed["curve"]
        order.start = step * tr.grad_accum
    deepspeed = uses_deepspeed(accelerator)

    def save_step():
        trainable = trainable_state_dict(model) if not deepspeed and accelerator.is_main_process else None
        save_step_checkpoint(accelerator, run_dir, {"task_index": task.index, "task": task.name, "step": step,
                                                    "steps": steps, "train_samples": len(train_data),
                                                    "curve": curve, "running": running},
                             trainable, {m.name: m.state_dict() for m in methods})

    # Batches are encoded and collated in trainer.num_workers worker processes (pinned on a GPU, so the copy
    # overlaps compute) and sent to the process's device here: the DataLoader is not prepared, since
    # StepBatchOrder already shards by rank.
    batches = loader(train_data, collate, order, num_workers=worker_count(accelerator, tr), device=accelerator.device)
    wrapped.train()
    bar = tqdm(total=steps, initial=step, desc=f"task {task.index + 1} {task.name}",
               disable=not (progress and accelerator.is_main_process))
    first, started = step, time.time()
    full = any(m.full_outputs for m in methods)
    pending: list[torch.Tensor] = []     # the micro-steps' losses since they were last read, on the device
    for batch in batches:
        batch = send_to_device(check_batch(batch), accelerator.device, non_blocking=True)
        with accelerator.accumulate(wrapped):
            outputs, loss = language_modelling_loss(wrapped, batch, full)
            with accelerator.autocast():       # a method's own forwards (a teacher's) in the loop's precision
                terms = [m.loss(model, batch, outputs, task) for m in methods]
            for term in terms:
                if term is not None:
                    loss = loss + term
            accelerator.backward(loss)
            for m in methods:
                m.after_backward(model, task)
            if accelerator.sync_gradients and tr.max_grad_norm:
                accelerator.clip_grad_norm_(params, tr.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        # No host synchronisation per micro-step: the losses stay on the device and are read (and checked for
        # NaN or inf) once per logging window and before a step checkpoint.
        pending.append(loss.detach().float())
        if accelerator.sync_gradients:
            step += 1
            for m in methods:
                m.after_step(model, task)
            bar.update(1)
            saving = bool(tr.save_every) and step % tr.save_every == 0 and step < steps
            if step % tr.log_every == 0 or step == steps or saving:
                losses = torch.stack(pending).tolist()
                pending = []
                bad = [x for x in losses if not math.isfinite(x)]
                if bad:
                    raise FloatingPointError(f"task {task.name!r}: loss became {bad[0]} by step {step}; the last "
                                             "task checkpoint is kept. Lower trainer.lr or check the data.")
                running.extend(losses)
            if step % tr.log_every == 0 or step == steps:
                mean = sum(running) / len(running)
                if accelerator.num_processes > 1:   # the mean over processes (every process logs at this step)
                    mean = accelerator.reduce(torch.tensor(mean, device=accelerator.device), "mean").item()
                running = []
                curve.append(round(mean, 6))
                bar.set_postfix(loss=f"{mean:.4f}")
                accelerator.log({f"train/loss/{task.name}": mean, "train/lr": scheduler.get_last_lr()[0]},
                                step=task.index * 100_000 + step)
                if not progress:
                    log(f"task {task.name} step {step}/{steps} loss {mean:.4f} "
                        f"({(step - first) / (time.time() - started):.1f} steps/s)")
            if saving:
                save_step()
    bar.close()
    accelerator.free_memory()
    return curve


def decide_checkpointing(accelerator, model, methods, task, train_data, collate, cfg, log) -> bool:
    """``model.gradient_checkpointing: auto`` before a task: on if this task's worst batch (its longest sample,
    replayed ones included, ``trainer.batch_size`` times) would not fit the device's memory with the
    optimizer's state (``models.memory``); the processes agree. Once on, it stays on for the run.
    ``train_data`` carries its token counts (``with_lengths``); ``collate`` is the loop's. Returns whether it
    is on."""
    deepspeed = uses_deepspeed(accelerator)
    measure = peak_reader(accelerator.device)
    if zero_stage(accelerator) == 3:
        needed, why = True, "always under DeepSpeed ZeRO-3"
    elif measure is None:
        needed, why = False, f"not needed on {accelerator.device.type} (only a GPU's memory is probed)"
    else:
        if not deepspeed:
            upcast_trainable(model)         # as train_task trains it: what trains in float32
        longest = train_data[int(train_data.lengths.argmax())]
        batch = send_to_device(check_batch(collate([longest] * cfg.trainer.batch_size)), accelerator.device)
        extra = optimizer_bytes(model, shards=accelerator.num_processes if deepspeed else 1,
                                ddp=accelerator.num_processes > 1 and not deepspeed)
        full = any(m.full_outputs for m in methods)
        needed, why = probe_needs_checkpointing(model, batch, lambda mod, b: language_modelling_loss(mod, b, full)[1],
                                                extra_bytes=extra, measure=measure,
                                                autocast=accelerator.autocast())
    if accelerator.num_processes > 1:       # one process that needs it turns it on for all
        needed = bool(accelerator.gather(torch.tensor([needed], device=accelerator.device)).any())
    if needed:
        enable_checkpointing(model)
    log(f"gradient checkpointing (auto) before task {task.name}: {'on' if needed else 'off'}: {why}")
    return needed


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the positions whose next token is an answer token (labels[:, 1:] != -100)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def language_modelling_loss(model, batch: dict, full: bool = False):
    """``(outputs, loss)``: the model's forward on a training batch and the mean cross-entropy of its answer
    tokens.

    By default the logits are computed only at the positions that predict an answer token (transformers'
    ``logits_to_keep`` with a boolean mask): the projection onto the vocabulary and the loss skip the image,
    instruction and padding positions, which are most of a sample (measured in docs/benchmarks.md; a 7B model
    with a 32k vocabulary would otherwise also hold B x L x 32000 float32 logits). The loss is the same as the
    model's own (the mean over the batch's answer tokens, upcast to float32), and is also set as
    ``outputs.loss``, as the model's own forward would. ``full``: the model's own forward with ``labels``
    (every position's logits), for methods that need them (``Method.full_outputs``). The forward runs with
    the batch's routing choice held (``routing.held``: each sample's task from ``cl_task_ids``, which the
    model itself never receives).
    """
    labels = batch["labels"]
    inputs = model_inputs(batch)
    with held_for_batch(model, batch):
        if full:
            outputs = model(**inputs)
            return outputs, outputs.loss
        keep = answer_positions(labels)
        inputs.pop("labels")
        outputs = model(**inputs, logits_to_keep=keep)
    targets = labels[:, 1:][keep[:, :-1]]
    if outputs.logits.shape[:-1] != targets.shape:
        raise RuntimeError(f"logits_to_keep gave logits {tuple(outputs.logits.shape)} for {targets.numel()} answer "
                           f"tokens: a forward hook changed the sequence length without restoring it (set "
                           f"full_outputs = True on the method)")
    outputs.loss = torch.nn.functional.cross_entropy(outputs.logits.float(), targets.to(outputs.logits.device))
    return outputs, outputs.loss


def resume_step(accelerator, model, methods, task, run_dir: Path, train_samples: int, log) -> dict | None:
    """Load this task's step checkpoint into the prepared model, optimizer and scheduler and the methods;
    its meta, or None to start the task from its beginning (none, or one that cannot be used: said why)."""
    meta, problem = read_step_checkpoint(run_dir, task.index, accelerator.num_processes)
    if problem:
        log(f"step checkpoint not used, task {task.name} starts over: {problem}")
        return None
    if meta is None:
        return None
    if meta["train_samples"] != train_samples:
        raise CheckpointError(f"{meta['folder']}: task {task.name} had {meta['train_samples']} training samples "
                              f"and has {train_samples} now; the run's data or methods changed")
    folder = Path(meta["folder"])
    deepspeed = uses_deepspeed(accelerator)
    accelerator.load_state(str(folder / "accelerate"), **({"load_module_strict": False} if deepspeed else {}))
    if not deepspeed:
        from safetensors.torch import load_file

        restore_trainable(model, load_file(str(folder / "trainable.safetensors")), str(folder))
    states = load_methods_state(folder, f"methods-rank{accelerator.process_index}")
    for m in methods:
        m.load_state_dict(states.get(m.name, {}))
    log(f"resuming task {task.name} at step {meta['step']}/{meta['steps']}")
    return meta


def eval_records(task, trainer) -> list[dict]:
    """The test records a task is scored on (the first ``trainer.eval_max_samples`` if set)."""
    return task.test_records[:trainer.eval_max_samples] if trainer.eval_max_samples else task.test_records


def evaluate_stream(accelerator, model, processor, stream, cfg, run_dir: Path, stage: str,
                    progress: bool, kept: dict | None = None) -> tuple[list[float], dict[str, float]]:
    """Score on every task's test split (percent; predictions are written per task), and the routing
    accuracy of a method that routes by task keys (counted on the same prompt batches). Under ZeRO-3 the
    model is gathered whole on every process for the duration (it must fit one device for inference)."""
    from lvlm_cl.methods.routing import routers

    tr = cfg.trainer
    row, routing = [], {}
    found = routers(model)
    router = found[0] if found else None
    with gathered(model):
        for task in stream:
            records = eval_records(task, tr)
            mine = shard(records, accelerator)
            real = len(range(accelerator.process_index, len(records), accelerator.num_processes))  # unpadded share
            counted = router is not None and task.index < router.num_known
            hits = torch.zeros(2, dtype=torch.long, device=accelerator.device)

            def observe(batch, positions):
                keep = torch.tensor([p < real for p in positions], device=batch["input_ids"].device)
                best, _ = router.route(batch["input_ids"], batch.get("attention_mask"))
                hits[0] += ((best == task.index) & keep).sum()
                hits[1] += keep.sum()

            # Each process generates its share; under ZeRO-3 all of them step together (synced_gpus).
            with accelerator.autocast():
                local = generate_answers(model, processor, mine, max_length=cfg.model.max_length,
                                         batch_size=tr.eval_batch_size, max_new_tokens=tr.max_new_tokens,
                                         desc=f"eval {stage} {task.name}",
                                         progress=progress and accelerator.is_main_process,
                                         synced_gpus=zero_stage(accelerator) == 3 and accelerator.num_processes > 1,
                                         device=accelerator.device, num_workers=worker_count(accelerator, tr),
                                         observe=observe if counted else None, keep=kept)
            predictions = unshard(local, len(records), accelerator)
            if counted:
                total = accelerator.reduce(hits, "sum") if accelerator.num_processes > 1 else hits
                routing[task.name] = round(100.0 * int(total[0]) / max(1, int(total[1])), 2)
            answers = [final_answer(r) for r in records]
            scores = score_many(task.metric, predictions, answers)
            row.append(100.0 * sum(scores) / len(scores))
            if accelerator.is_main_process:
                write_predictions(under(run_dir, "predictions", stage, f"{task.name}.jsonl"),
                                  ({"id": r["id"], "prompt": user_text(r), "prediction": p, "answer": a,
                                    "correct": s} for r, p, a, s in zip(records, predictions, answers, scores)))
        return row, routing


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
