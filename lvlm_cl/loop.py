"""The training loop of one task: what ``lvlm_cl.train`` runs for every task of the stream.

``train_task`` is the loop itself (AdamW over whatever requires grad, accelerate's accumulation, the methods'
hooks at every micro-step and step, step checkpoints and their resume); ``language_modelling_loss`` is the
loss every step computes (the logits of answer positions only); ``decide_checkpointing`` is
``model.gradient_checkpointing: auto``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from accelerate.utils import send_to_device
from tqdm.auto import tqdm

from lvlm_cl.checkpoint import (CheckpointError, load_methods_state, read_step_checkpoint, restore_trainable,
                                save_step_checkpoint)
from lvlm_cl.data.dataset import StepBatchOrder, check_batch, loader
from lvlm_cl.data.encoding import IGNORE_INDEX
from lvlm_cl.distributed import uses_deepspeed, zero_stage
from lvlm_cl.errors import ConfigError
from lvlm_cl.models import trainable_state_dict, upcast_trainable
from lvlm_cl.models.continual import held_for_batch, model_inputs
from lvlm_cl.models.memory import enable_checkpointing, optimizer_bytes, peak_reader, probe_needs_checkpointing


def worker_count(accelerator, trainer) -> int:
    """DataLoader workers for this process: ``trainer.num_workers``, except in a run of several processes on
    CPUs (gloo), where a worker forked beside the collective's threads was seen to hang in its start (CI,
    ZeRO-3, 2 processes); there batches are encoded in the training process. GPU runs (NCCL) fork them as
    every PyTorch loader does."""
    if accelerator.num_processes > 1 and accelerator.device.type == "cpu":
        return 0
    return trainer.num_workers


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
    optimizer = make_optimizer(model, params, tr)
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
    the batch's routing choice held (``continual.held``: each sample's task from ``cl_task_ids``, which the
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


def make_optimizer(model, params: list, tr) -> torch.optim.Optimizer:
    """AdamW over ``params`` (the trainable ones) at ``trainer.lr``; with ``trainer.lora_plus_ratio``, PEFT's
    LoRA+ grouping (``peft.optimizers.create_loraplus_optimizer``): every ``lora_B`` matrix at lr x ratio."""
    fused = {"fused": True} if tr.optimizer == "adamw_fused" else {}
    if tr.lora_plus_ratio is None:
        return torch.optim.AdamW(params, lr=tr.lr, weight_decay=tr.weight_decay, **fused)
    from peft.optimizers import create_loraplus_optimizer

    if not any("lora_B" in n for n, p in model.named_parameters() if p.requires_grad):
        raise ConfigError("trainer.lora_plus_ratio: nothing that trains is a LoRA adapter (no lora_B parameter); "
                          "remove the setting or add LoRA (model.lora, or a method's adapters)")
    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=tr.lr, loraplus_lr_ratio=tr.lora_plus_ratio,
                                     weight_decay=tr.weight_decay, loraplus_weight_decay=tr.weight_decay, **fused)
