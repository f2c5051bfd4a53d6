"""What one process or many need from accelerate and DeepSpeed ZeRO, in one place.

The loop is the same for one CPU process and many GPUs; the launch config (``recipes/accelerate/``)
decides. Three things differ and live here:

- the process group: without CUDA several processes must talk over gloo (accelerate would otherwise
  leave every process believing it is alone);
- DeepSpeed's batch settings come from the recipe: "auto" in the JSON is filled in, and an explicit value
  that disagrees with the recipe stops the run before anything loads;
- under ZeRO-3 parameters are partitioned across processes: what a checkpoint saves is gathered first,
  evaluation runs on every process with ``synced_gpus`` (each process generates the same number of
  steps), and methods that read parameter values outside the forward refuse at start.
"""

from __future__ import annotations

import contextlib
import os

import torch

from lvlm_cl.errors import ConfigError


def make_accelerator(cfg, project_dir: str):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1        # set by accelerate launch / torchrun
    handlers = [InitProcessGroupKwargs(backend="gloo")] if several and not torch.cuda.is_available() else []
    accelerator = Accelerator(gradient_accumulation_steps=cfg.trainer.grad_accum, log_with=cfg.report_to or None,
                              project_dir=project_dir, kwargs_handlers=handlers,
                              mixed_precision=cfg.trainer.mixed_precision)
    configure_deepspeed(accelerator, cfg.trainer)
    return accelerator


@contextlib.contextmanager
def zero3_init_disabled(accelerator):
    """A block in which models are built whole, on each process alone, even under a DeepSpeed ZeRO-3 launch.

    Under ZeRO-3 accelerate registers DeepSpeed's config with transformers, which then builds every model
    inside ``deepspeed.zero.Init``: partitioned, and with collectives, so one process cannot build it alone.
    The registration is lifted for the block (transformers' ``unset_hf_deepspeed_config``) and made again
    after it (the plugin's ``set_deepspeed_weakref``). accelerate's own ``zero3_init_context_manager`` does
    not lift it in accelerate 1.15 (it registers the config again whatever the flag)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def uses_deepspeed(accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def zero_stage(accelerator) -> int:
    return int(accelerator.state.deepspeed_plugin.zero_stage) if uses_deepspeed(accelerator) else 0


def configure_deepspeed(accelerator, trainer) -> None:
    """Fill DeepSpeed's "auto" batch settings from the recipe; refuse explicit ones that disagree."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    conf = plugin.deepspeed_config
    world = accelerator.num_processes
    wanted = {
        "train_micro_batch_size_per_gpu": (trainer.batch_size, "trainer.batch_size"),
        "gradient_accumulation_steps": (trainer.grad_accum, "trainer.grad_accum"),
        "train_batch_size": (trainer.batch_size * trainer.grad_accum * world,
                             f"trainer.batch_size x trainer.grad_accum x {world} processes"),
        "gradient_clipping": (float(trainer.max_grad_norm or 0.0), "trainer.max_grad_norm"),
    }
    for key, (value, source) in wanted.items():
        have = conf.get(key, "auto")
        if have == "auto":
            conf[key] = value
        elif float(have) != float(value):
            raise ConfigError(f"the DeepSpeed config sets {key}={have} but the recipe gives {value} ({source}); "
                              f"set {key} to \"auto\" in the launch config's JSON, or change the recipe")


@contextlib.contextmanager
def whole(params: list[torch.nn.Parameter], modifier_rank: int | None = None):
    """Parameters whole for the duration: under DeepSpeed ZeRO-3 (partitioned parameters carry ``ds_id``)
    they are gathered, collectively, so every process must enter; with ``modifier_rank`` what that process
    writes in place is given to all. Without ZeRO-3 nothing to do."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
            yield
    else:
        yield


def gathered(model, names: set[str] | None = None):
    """``whole`` for every parameter of ``model`` (or those named)."""
    return whole([p for n, p in model.named_parameters() if names is None or n in names])


def shard(items: list, accelerator) -> list:
    """This process's share: every n-th item. Under ZeRO-3 every process must run the same number of
    generation batches, so shards are padded with the first item (dropped again by ``unshard``)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if world == 1:
        return items
    mine = items[rank::world]
    if zero_stage(accelerator) == 3:
        size = -(-len(items) // world)
        mine = mine + [items[0]] * (size - len(mine))
    return mine


def unshard(local: list, total: int, accelerator) -> list:
    """Every process's ``local`` results put back in the original order (on every process)."""
    world = accelerator.num_processes
    if world == 1:
        return local
    parts = gather_objects((accelerator.process_index, local))
    out = [None] * total
    for rank, part in parts:
        positions = range(rank, total, world)
        for i, value in zip(positions, part):
            out[i] = value
    return out


def gather_objects(obj) -> list:
    """``obj`` of every process, in process order (``[obj]`` when the run has one process). Every process
    must call it. torch's own ``all_gather_object``: accelerate's ``gather_object`` skips MULTI_GPU on CPU."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, obj)
    return parts


def from_main(compute, accelerator):
    """``compute()`` run by the main process only, its result given to every process (one call to an
    external service, such as a judge, instead of one per process). Every process must call it."""
    if accelerator is None or accelerator.num_processes == 1:
        return compute()
    box = [compute() if accelerator.is_main_process else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
