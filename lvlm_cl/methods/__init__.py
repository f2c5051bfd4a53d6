"""The method registry: names -> classes, validated at load time.

Unknown names, duplicate registrations and unknown hyper-parameters are errors that list what is allowed.
"""

from __future__ import annotations

from typing import Iterable

from lvlm_cl.distributed import zero_stage
from lvlm_cl.errors import ConfigError
from lvlm_cl.methods.base import Method, Task
from lvlm_cl.methods.cross_modal_moe import CrossModalMoE
from lvlm_cl.methods.dual_modality import DualModality
from lvlm_cl.methods.ewc import EWC
from lvlm_cl.methods.finetune import Finetune
from lvlm_cl.methods.lwf import LwF
from lvlm_cl.methods.moelora import MoELoRA
from lvlm_cl.methods.multitask import Multitask
from lvlm_cl.methods.olora import OLoRA
from lvlm_cl.methods.replay import Replay
from lvlm_cl.methods.semantic_transfer import SemanticTransfer
from lvlm_cl.methods.task_lora import TaskLoRA
from lvlm_cl.methods.task_prompts import TaskPrompts


def _registry() -> dict[str, type[Method]]:
    registry: dict[str, type[Method]] = {}
    for cls in (
        Finetune,
        Multitask,
        Replay,
        EWC,
        LwF,
        TaskPrompts,
        TaskLoRA,
        OLoRA,
        MoELoRA,
        DualModality,
        CrossModalMoE,
        SemanticTransfer,
    ):
        if not cls.name:
            raise TypeError(f"{cls.__name__} has no registry name")
        if cls.name in registry:
            raise TypeError(f"method name {cls.name!r} registered twice ({registry[cls.name].__name__}, {cls.__name__})")
        registry[cls.name] = cls
    return registry


def available() -> list[str]:
    return sorted(_registry())


def _lookup(name: str) -> type[Method]:
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown method {name!r}; available: {sorted(registry)}")
    return registry[name]


def check_methods(specs: Iterable) -> None:
    """Validate names and hyper-parameters of ``MethodSpec``s without building anything."""
    seen = set()
    for spec in specs:
        cls = _lookup(spec.name)
        if spec.name in seen:
            raise ValueError(f"method {spec.name!r} is listed twice")
        seen.add(spec.name)
        unknown = sorted(set(spec.args) - set(cls.defaults))
        if unknown:
            raise ValueError(f"method {spec.name!r} has no setting {unknown[0]!r}; its settings: {sorted(cls.defaults)}")
        for key, value in spec.args.items():   # what holds for every method's settings
            problem = _general_problem(key, value)
            if problem:
                raise ValueError(f"method {spec.name!r}: setting {key!r} {problem}, got {value!r}")
        try:
            cls(**spec.args)  # settings' values are checked by the constructor: fail at load time, not mid-run
        except (TypeError, ValueError) as e:
            raise ValueError(f"method {spec.name!r}: {e}") from None


def _general_problem(key: str, value) -> str | None:
    """A number is finite (no setting means anything by NaN or infinity); a ``seed`` is an integer from 0 to
    2**32 - 1 (what every generator takes). Each method checks its own ranges besides."""
    import math

    from lvlm_cl.methods.base import is_number

    if key == "seed" and not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 32):
        return "must be an integer from 0 to 4294967295"
    if is_number(value) and not math.isfinite(value):
        return "must be a finite number"
    return None


def build_methods(specs: Iterable) -> list[Method]:
    specs = list(specs)
    check_methods(specs)
    return [_lookup(s.name)(**s.args) for s in specs] or [Finetune()]


def refuse_unsupported(methods, accelerator) -> None:
    """Methods that read gradients from p.grad cannot run under ZeRO; methods that need whole parameter
    values outside the forward cannot run under ZeRO-3. Both are refused before anything loads."""
    stage = zero_stage(accelerator)
    for m in methods:
        if stage >= 1 and m.zero_unsupported:
            raise ConfigError(f"method {m.name!r} does not run under DeepSpeed ZeRO: {m.zero_unsupported}. "
                              "Use DDP (recipes/accelerate/ddp.yaml) or one process for it.")
        if stage == 3 and m.zero3_unsupported:
            raise ConfigError(f"method {m.name!r} does not run under DeepSpeed ZeRO-3: {m.zero3_unsupported}. "
                              "Use ZeRO-2 (recipes/accelerate/zero2.yaml) or DDP for it.")


__all__ = ["Method", "Task", "available", "build_methods", "check_methods", "refuse_unsupported"]
