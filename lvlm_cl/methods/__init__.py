"""The method registry: names -> classes, validated at load time.

Unknown names, duplicate registrations and unknown settings are errors that list what is allowed; a setting's
value is checked against the type and range its method's settings dataclass declares.
"""

from __future__ import annotations

import dataclasses
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
from lvlm_cl.settings import Settings, build


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
        if not (dataclasses.is_dataclass(cls.settings_class) and issubclass(cls.settings_class, Settings)):
            raise TypeError(f"{cls.__name__}.settings_class must be a dataclass deriving from "
                            "lvlm_cl.settings.Settings")
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
    """Validate names and settings of ``MethodSpec``s without building anything: each method's ``args`` are
    checked against its settings dataclass (``lvlm_cl.settings.build``: unknown keys, types, finite numbers,
    ranges, choices, cross-field rules), so a bad value fails at load time, not mid-run."""
    seen = set()
    for spec in specs:
        cls = _lookup(spec.name)
        if spec.name in seen:
            raise ValueError(f"method {spec.name!r} is listed twice")
        seen.add(spec.name)
        build(cls.settings_class, spec.args, owner=f"method {spec.name!r}")


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
