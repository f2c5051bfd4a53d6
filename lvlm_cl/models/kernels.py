"""Fused GPU kernels for the language model, from liger-kernel (``model.liger_kernel``).

liger-kernel's Triton kernels replace the language model's RMSNorm, SwiGLU / GeGLU MLP and rotary embedding
with fused ones (fewer passes over the activations, less memory kept for the backward). They are applied
through the library's public per-family entry points (``apply_liger_kernel_to_llava`` and its peers) on the
loaded model instance, before LoRA wraps it. Its fused linear cross-entropy is not used: the loop already
projects onto the vocabulary only at the answer positions (``loop.language_modelling_loss``), which is
where most of that kernel's saving comes from.

liger-kernel patches the transformers modules of the whole process (a model of the same family built later
in the process gets the fused layers too), and its kernels need a CUDA GPU; it is an optional dependency
(``pip install -e ".[gpu]"``).
"""

from __future__ import annotations

import importlib.util

import torch

# The model's config.model_type -> liger-kernel's public entry point for that family.
ENTRY_POINTS = {
    "llava": "apply_liger_kernel_to_llava",
    "gemma3": "apply_liger_kernel_to_gemma3",
    "qwen2_vl": "apply_liger_kernel_to_qwen2_vl",
    "qwen2_5_vl": "apply_liger_kernel_to_qwen2_5_vl",
}


def liger_status(model, setting, device: torch.device) -> tuple[bool, str]:
    """``(use, why)``: whether liger-kernel is applied to ``model`` for ``model.liger_kernel: setting``
    (true, false or "auto") on ``device``, and a sentence saying why. ``true`` where it cannot be used is a
    ``ModelError`` naming the reason; ``auto`` uses it wherever it can (a CUDA device, the package installed,
    a supported family) and says why not otherwise."""
    from lvlm_cl.models import ModelError

    if setting is False:
        return False, "off (model.liger_kernel: false)"
    family = getattr(model.config, "model_type", None)
    if family not in ENTRY_POINTS:
        problem = f"liger-kernel has no kernels for model type {family!r} (supported: {sorted(ENTRY_POINTS)})"
    elif device.type != "cuda":
        problem = f"liger-kernel's kernels need a CUDA GPU; this process runs on {device.type}"
    elif importlib.util.find_spec("liger_kernel") is None:
        problem = 'liger-kernel is not installed (pip install -e ".[gpu]")'
    else:
        return True, f"on ({ENTRY_POINTS[family]}: fused RMSNorm, MLP and rotary embedding)"
    if setting is True:
        raise ModelError(f"model.liger_kernel: true, but {problem}; set it to auto or false")
    return False, f"off: {problem}"


def apply_liger(model) -> None:
    """Fused RMSNorm, MLP and rotary embedding on ``model`` (an unwrapped transformers model of a family in
    ``ENTRY_POINTS``), in place. The loop computes its own loss, so liger's cross-entropy kernels stay off."""
    import liger_kernel.transformers as liger

    apply = getattr(liger, ENTRY_POINTS[model.config.model_type])
    apply(model=model, cross_entropy=False, fused_linear_cross_entropy=False)


def use_liger(model, setting, device: torch.device, log=print) -> bool:
    """Apply liger-kernel to ``model`` where ``setting`` and ``device`` allow it (``liger_status``), logging
    the decision once. Returns whether it was applied."""
    use, why = liger_status(model, setting, device)
    if use:
        apply_liger(model)
    if use or setting is not False:
        log(f"liger-kernel: {why}")
    return use


__all__ = ["ENTRY_POINTS", "apply_liger", "liger_status", "use_liger"]
