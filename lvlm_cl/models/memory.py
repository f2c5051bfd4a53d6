"""Gradient checkpointing only where memory needs it (``model.gradient_checkpointing: auto``).

Recomputing activations in the backward pass costs about a third more time per step (docs/benchmarks.md);
a model that fits without it should not pay that. ``auto`` decides once per run, before the first task,
by measuring: every process runs one forward and backward of the worst batch it can meet (its longest
training sample, ``trainer.batch_size`` times) with checkpointing off, reads the device's peak allocated
memory, adds what the optimizer will hold (AdamW's two float32 moments per trained value, divided over the
processes under DeepSpeed ZeRO, plus DDP's gradient buckets), and turns checkpointing on if that exceeds
``HEADROOM`` of the device's memory, or if the probe itself runs out of memory. The processes agree: one
that needs it turns it on everywhere. Under ZeRO-3 it is always on (the parameters are gathered per layer,
and a probe outside DeepSpeed's engine would gather the whole model). On a CPU it is off: host memory is
not the limit there the way a GPU's is.

The probe leaves nothing behind: the random number generators are restored, the gradients dropped, the
cached device memory released.
"""

from __future__ import annotations

from typing import Callable

import torch

HEADROOM = 0.9              # of the device's total memory; the rest is fragmentation, other kernels' workspace
ADAM_BYTES = 8              # AdamW keeps two float32 moments per trained value


def enable_checkpointing(model) -> None:
    """Recompute activations in the backward pass (non-reentrant, so frozen embeddings before LoRA adapters
    need no input gradients), on ``model`` or the model inside a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.use_cache = False
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def optimizer_bytes(model, shards: int = 1, ddp: bool = False) -> int:
    """What training adds to the probe's peak beyond the gradients it already holds: AdamW's moments
    (partitioned over ``shards`` processes under ZeRO) and, under DDP, the gradient buckets (one more copy
    of the gradients)."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ADAM_BYTES * trained // max(1, shards) + (4 * trained if ddp else 0)


def cuda_peak(device: torch.device) -> Callable[[Callable[[], None]], tuple[int, int]]:
    """The measurement on a CUDA device: ``measure(work) -> (peak allocated bytes while work ran, total
    device bytes)``."""
    def measure(work):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        work()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device), torch.cuda.get_device_properties(device).total_memory
    return measure


def peak_reader(device: torch.device):
    """How ``device``'s peak memory is measured (``cuda_peak``), or None where it is not (a CPU)."""
    return cuda_peak(device) if device.type == "cuda" else None


def probe_needs_checkpointing(model, batch: dict, loss_of, *, extra_bytes: int, measure,
                              autocast=None) -> tuple[bool, str]:
    """``(needed, why)``: run ``loss_of(model, batch)`` forward and backward with checkpointing off, measured
    by ``measure`` (``cuda_peak``), and decide. The model's gradients are dropped afterwards and the random
    number generators restored, so training starts as if the probe never ran."""
    import contextlib

    device = batch["input_ids"].device
    was_training = model.training
    model.train()

    def work():
        with autocast or contextlib.nullcontext():
            loss = loss_of(model, batch)
        loss.backward()

    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            peak, total = measure(work)
    except torch.OutOfMemoryError:
        needed, why = True, "the longest batch ran out of device memory without it"
    else:
        need = peak + extra_bytes
        needed = need > HEADROOM * total
        why = (f"the longest batch needs {need / 2 ** 30:.1f} GiB without it ({peak / 2 ** 30:.1f} GiB measured + "
               f"{extra_bytes / 2 ** 30:.1f} GiB of optimizer state) of {total / 2 ** 30:.1f} GiB "
               f"({'over' if needed else 'within'} {HEADROOM:.0%})")
    finally:
        for p in model.parameters():
            p.grad = None
        model.train(was_training)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return needed, why


__all__ = ["ADAM_BYTES", "HEADROOM", "cuda_peak", "enable_checkpointing", "optimizer_bytes", "peak_reader",
           "probe_needs_checkpointing"]
