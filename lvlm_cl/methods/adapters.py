"""LoRA adapters that methods add to the model themselves (``olora``, ``task_lora``), through PEFT's
public functional API (``peft.functional``: ``inject_adapter_in_model``, ``set_adapter``): the model stays
a transformers model, several named adapters live side by side in each targeted layer.

Adapter names start with ``cl_``: their parameters (``...q_proj.lora_A.cl_task_lora_00.weight``) belong
to the stage and are saved whole with every task checkpoint, frozen ones included (see
``lvlm_cl.models.trainable_state_dict``).
"""

from __future__ import annotations

import re
import warnings

import torch

from lvlm_cl.models.continual import unwrap

ADAPTER_PREFIX = "cl_"
# Module paths (transformers 5 LLaVA layout) of the language model's and the vision tower's projections.
LANGUAGE_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
VISION_TARGETS = r".*vision_tower\..*layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc(1|2))"


def targets(language: bool = True, vision: bool = False) -> str:
    chosen = ([LANGUAGE_TARGETS] if language else []) + ([VISION_TARGETS] if vision else [])
    return "|".join(f"(?:{t})" for t in chosen)


def refuse_recipe_lora(model: torch.nn.Module, method: str) -> None:
    """Methods that add their own adapters need a model without the recipe's LoRA."""
    if hasattr(model, "peft_config") or any("lora_" in n for n, _ in model.named_parameters()):
        raise ValueError(f"{method} adds its own LoRA adapters; remove model.lora from the recipe (the method's "
                         "settings r, alpha and target_modules say where its adapters go)")


def inject_lora(model: torch.nn.Module, adapter_name: str, *, r: int, alpha: float, dropout: float,
                target_modules: str) -> list[str]:
    """Add one LoRA adapter named ``adapter_name`` to every module matching ``target_modules`` (a regex on
    full module paths). Other parameters keep their ``requires_grad``; the new adapter is frozen (methods
    unfreeze the adapter of the task in training). Returns the adapted module paths."""
    from peft import LoraConfig
    from peft.functional import inject_adapter_in_model

    if not adapter_name.startswith(ADAPTER_PREFIX):
        raise ValueError(f"adapter names start with {ADAPTER_PREFIX!r}: {adapter_name!r}")
    base = unwrap(model)
    matched = [n for n, _ in base.named_modules() if re.fullmatch(target_modules, n)]
    if not matched:
        raise ValueError(f"target_modules {target_modules!r} matches no module of the model")
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    with warnings.catch_warnings():   # PEFT warns that a second adapter joins the first: that is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                           target_modules=target_modules), base, adapter_name=adapter_name)
    for n, p in base.named_parameters():
        p.requires_grad_(flags.get(n, False))
    return matched


def adapter_params(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in unwrap(model).named_parameters() if f".{adapter_name}." in n}


def set_trainable_adapter(model: torch.nn.Module, adapter_names: list[str], trainable: str | None) -> None:
    """Only ``trainable`` among ``adapter_names`` gets gradients; other parameters are left as they are."""
    for name in adapter_names:
        for p in adapter_params(model, name).values():
            p.requires_grad_(name == trainable)

