"""Build ``(model, processor)`` from the recipe's ``model`` section.

Three sources, one path after loading: every model is a Hugging Face directory read with
``from_pretrained`` (the built-in tiny LLaVA is written as one first), then frozen / LoRA-wrapped by the
same code. Nothing keys off a model's name.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from lvlm_cl.data.encoding import has_generation_markers
from lvlm_cl.errors import UserError
from lvlm_cl.models.tiny import TinyLlavaSize, build_tiny_llava, build_tiny_processor, chat_template, save_model_dir

BUILTIN_RANDOM = "builtin:tiny-llava-random"
BUILTIN_PRETRAINED = "builtin:tiny-llava"
BUILTIN_GEMMA3 = "builtin:tiny-gemma3-random"     # a second family, randomly initialised (docs/models.md)
BUILTIN_QWEN25VL = "builtin:tiny-qwen2.5-vl-random"   # a third family: Qwen2.5-VL, randomly initialised
# The randomly initialised built-in models: name -> family (``random_model_dir``).
RANDOM_FAMILIES = {BUILTIN_RANDOM: "llava", BUILTIN_GEMMA3: "gemma3", BUILTIN_QWEN25VL: "qwen2.5-vl"}


class ModelError(ValueError, UserError):
    """The model directory or its settings cannot be used; the message says what to do."""


def parts(model) -> dict[str, torch.nn.Module]:
    """The vision tower, projector and language model of a LLaVA-style model (transformers 5 layout). Qwen2-VL
    and Qwen2.5-VL name their vision tower ``visual`` and its last module, the patch merger that maps merged
    patches into the language model's width, is their projector: it is inside the vision tower, so whatever
    is done to the projector (``freeze_projector``) comes after what is done to the tower."""
    inner = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    visual = getattr(inner, "visual", None)
    if visual is not None and hasattr(visual, "merger") and hasattr(inner, "language_model"):
        return {"vision_tower": visual, "projector": visual.merger, "language_model": inner.language_model}
    try:
        return {"vision_tower": inner.vision_tower, "projector": inner.multi_modal_projector,
                "language_model": inner.language_model}
    except AttributeError as e:
        raise ModelError(f"{type(model).__name__} is not a LLaVA-style model (vision_tower, multi_modal_projector, "
                         f"language_model) nor a Qwen-VL one (visual, visual.merger, language_model): {e}") from None


def random_model_dir(size: TinyLlavaSize, seed: int, cache: Path, family: str = "llava") -> Path:
    """A randomly initialised tiny model of ``family`` ("llava", "gemma3" or "qwen2.5-vl"), written once per
    (size, seed) into the cache."""
    import dataclasses
    import hashlib
    import json

    payload = [dataclasses.asdict(size), seed] if family == "llava" else [family, dataclasses.asdict(size), seed]
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
    from filelock import FileLock

    path = cache / "models" / f"tiny-{family}-random-{key}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):     # the processes of one launch (or two runs) build it once
        if not (path / "config.json").is_file():
            if family == "gemma3":
                from lvlm_cl.models.tiny_gemma3 import build_tiny_gemma3

                model, processor = build_tiny_gemma3(size, seed)
            elif family == "qwen2.5-vl":
                from lvlm_cl.models.tiny_qwen25vl import build_tiny_qwen25vl

                model, processor = build_tiny_qwen25vl(size, seed)
            else:
                model, processor = build_tiny_llava(size, seed)
            save_model_dir(model, processor, path)
    return path


def resolve_model_dir(model_cfg, seed: int, cache: Path, pretrained=None) -> Path:
    """The Hugging Face directory the recipe's ``model.path`` stands for (building a randomly initialised
    built-in one). The pretrained tiny base is trained by a run of its own, so it comes from the caller:
    ``pretrained(model_cfg, cache) -> Path`` (``lvlm_cl.train.pretrained_base`` builds it when missing,
    ``lvlm_cl.pretrained.cached_dir`` only finds it)."""
    if model_cfg.path in RANDOM_FAMILIES:
        return random_model_dir(model_cfg.tiny, seed, cache, family=RANDOM_FAMILIES[model_cfg.path])
    if model_cfg.path == BUILTIN_PRETRAINED:
        if pretrained is None:
            raise ModelError(f"model.path {BUILTIN_PRETRAINED!r}: the pretrained tiny base is built by a training run "
                             "(lvlm_cl.train.pretrained_base, or python -m lvlm_cl.pretrain RECIPE)")
        return pretrained(model_cfg, cache)
    if model_cfg.path.startswith("builtin:"):
        raise ModelError(f"model.path: unknown built-in model {model_cfg.path!r}; "
                         f"available: {[BUILTIN_PRETRAINED, *RANDOM_FAMILIES]}")
    path = Path(model_cfg.path).expanduser()
    if not path.is_dir():
        raise ModelError(f"model.path: {path} is not a directory (expected a local Hugging Face model directory, "
                         f"or {BUILTIN_PRETRAINED!r})")
    if not (path / "config.json").is_file():
        raise ModelError(f"model.path: {path} has no config.json; is it a Hugging Face model directory?")
    return path


def load_processor(path_or_builtin: str, chat_template_name: str | None = None, model_cfg=None):
    """The processor alone (for data_tools token counts): a directory or a built-in name (at the default
    ``model.tiny`` sizes), with ``model_cfg``'s ``min_pixels`` / ``max_pixels`` when given."""
    if path_or_builtin == BUILTIN_GEMMA3:
        from lvlm_cl.models.tiny_gemma3 import build_tiny_gemma3_processor

        processor = build_tiny_gemma3_processor(TinyLlavaSize())
    elif path_or_builtin == BUILTIN_QWEN25VL:
        from lvlm_cl.models.tiny_qwen25vl import build_tiny_qwen25vl_processor

        processor = build_tiny_qwen25vl_processor(TinyLlavaSize())
    elif path_or_builtin.startswith("builtin:"):
        processor = build_tiny_processor(TinyLlavaSize())
    else:
        processor = _processor_of_dir(path_or_builtin)
    _set_pixel_range(processor, model_cfg, path_or_builtin)
    _set_template(processor, chat_template_name, path_or_builtin)
    return processor


def _processor_of_dir(path) -> object:
    """A directory's processor: ``AutoProcessor``, or for Qwen2-VL / Qwen2.5-VL (by the model's config class)
    their image-text processor (``qwen_vl``: the same processing of images, without the video processor that
    needs torchvision)."""
    from transformers import AutoConfig, AutoProcessor

    from lvlm_cl.models.qwen_vl import image_text_processor_class

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        config = None           # no model config (a processor-only folder): AutoProcessor says what is missing
    cls = image_text_processor_class(config)
    return cls.from_pretrained(path) if cls is not None else AutoProcessor.from_pretrained(path)


def _set_pixel_range(processor, model_cfg, where: str) -> None:
    """The recipe's ``model.min_pixels`` / ``model.max_pixels`` on a dynamic-resolution image processor;
    refused for a model whose images have one fixed size."""
    from lvlm_cl.models.qwen_vl import is_dynamic_resolution, set_pixel_range

    low, high = getattr(model_cfg, "min_pixels", None), getattr(model_cfg, "max_pixels", None)
    if low is None and high is None:
        return
    if not is_dynamic_resolution(processor):
        raise ModelError(f"{where}: model.min_pixels / model.max_pixels apply to models that size each image by its "
                         f"resolution (Qwen2-VL, Qwen2.5-VL); {type(processor).__name__} resizes every image to one "
                         "size: remove them from the recipe")
    try:
        set_pixel_range(processor, low, high)
    except ValueError as e:
        raise ModelError(f"{where}: {e}") from None


def _set_template(processor, name: str | None, where: str, require_markers: bool = True) -> None:
    if name:
        processor.chat_template = (Path(name).read_text(encoding="utf-8") if name.endswith(".jinja")
                                   else chat_template(name))
    if not processor.chat_template:
        raise ModelError(f"{where}: the processor has no chat template; set model.chat_template: llava15 (LLaVA-1.5 "
                         "format), gemma3, qwen2_5_vl or a .jinja file")
    if require_markers and not has_generation_markers(processor.chat_template):
        raise ModelError(f"{where}: the processor's chat template has no {{% generation %}} markers, so assistant "
                         "tokens cannot be masked for training. Set model.chat_template: llava15 (LLaVA-1.5 format), "
                         "gemma3, qwen2_5_vl (Qwen2-VL and Qwen2.5-VL's ChatML) or a .jinja file with those markers.")


QUANTIZATIONS = ("4bit", "8bit")
# Kept in full precision when quantizing (full module paths, transformers 5 layout; Qwen's vision tower, with
# its merger, is ``model.visual``): the vision tower and projector are small and sensitive, and lm_head is tied
# to the embeddings in small models.
UNQUANTIZED = ["model.vision_tower", "model.multi_modal_projector", "model.visual", "lm_head"]


# The dtype of the weights that do not train, by the recipe's trainer.mixed_precision: a model trained in bf16
# autocast keeps its frozen base in bf16 (half the memory of float32); what trains is float32
# (``upcast_trainable``), as the optimizer needs.
WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def weights_dtype(mixed_precision: str) -> torch.dtype:
    return WEIGHT_DTYPES[mixed_precision]


def default_device() -> torch.device:
    """Where a single process runs a model for inference: the current CUDA device, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def autocast_for(model):
    """Autocast in the dtype of the model's weights, on its device (nothing for float32 weights): inference
    outside the training loop on a model whose parts are in mixed dtypes (a bf16 base, float32 adapters)."""
    import contextlib

    param = next(model.parameters())
    dtype = getattr(model, "dtype", param.dtype)
    if dtype not in (torch.bfloat16, torch.float16):
        return contextlib.nullcontext()
    return torch.autocast(device_type=param.device.type, dtype=dtype)


def upcast_trainable(model) -> int:
    """Every floating parameter that trains, in float32 (the optimizer's precision; the frozen weights
    keep theirs, the forward runs under autocast). Returns how many were cast."""
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            cast += 1
    return cast


def quantization_config(kind: str, compute_dtype: torch.dtype = torch.float32):
    """bitsandbytes settings: NF4 with double quantisation (QLoRA, computing in ``compute_dtype``: the
    recipe's mixed precision) or LLM.int8."""
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=UNQUANTIZED)
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=UNQUANTIZED)
    raise ModelError(f"unknown quantization {kind!r}; choose one of {list(QUANTIZATIONS)}")


def load_model_dir(path: Path, model_cfg=None, *, dtype=torch.float32, quantization: str | None = None,
                   require_markers: bool = True, device: torch.device | str | None = None):
    """``from_pretrained`` for model and processor (the one loading path for every source).

    The weights load in ``dtype`` (``weights_dtype`` of the recipe's mixed precision) and, with ``device``,
    straight onto that device (no float32 copy in host memory first); without it (DeepSpeed, which places
    the model itself) they stay on the CPU. ``quantization`` ("4bit" / "8bit") loads the language model
    through bitsandbytes, computing in ``dtype``. ``require_markers`` (training) refuses a chat template
    without ``{% generation %}`` markers; generation does not need them. A Qwen2-VL / Qwen2.5-VL directory's
    images are sized between ``model.min_pixels`` and ``model.max_pixels`` where the recipe sets them.
    """
    from transformers import AutoModelForImageTextToText

    processor = _processor_of_dir(path)
    _set_pixel_range(processor, model_cfg, str(path))
    extra = {"quantization_config": quantization_config(quantization, dtype)} if quantization else {}
    if device is not None:
        extra["device_map"] = {"": torch.device(device)}
    attention = getattr(model_cfg, "attn_implementation", None)
    if attention is not None:
        extra["attn_implementation"] = attention
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **extra)
    except ImportError as e:          # flash_attention_2 without the flash-attn package, or without a GPU
        raise ModelError(f"model.attn_implementation {attention!r} cannot be used here: "
                         f"{str(e).splitlines()[0]}") from None
    _set_template(processor, getattr(model_cfg, "chat_template", None), str(path), require_markers)
    processor.tokenizer.padding_side = "left"
    return model, processor


def apply_training_setup(model, model_cfg):
    """Freeze parts and wrap LoRA adapters as the recipe says; returns the model to train. Everything may be
    frozen here: methods can add what trains (prompts, per-task adapters); the loop refuses a task with
    nothing to train.

    A quantized model first goes through peft's ``prepare_model_for_kbit_training`` (layer norms and
    unquantized parts in fp32, input gradients enabled for adapters behind frozen embeddings).
    ``gradient_checkpointing: true`` recomputes activations in the backward pass (non-reentrant); ``auto`` is
    decided before each task by ``models.memory`` (the loop's ``decide_checkpointing``)."""
    if getattr(model, "is_quantized", False):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if getattr(model_cfg, "gradient_checkpointing", False) is True:     # "auto" is decided by a probe later
        from lvlm_cl.models.memory import enable_checkpointing

        enable_checkpointing(model)
    for name, module in parts(model).items():
        frozen = getattr(model_cfg, f"freeze_{name}")
        for p in module.parameters():
            p.requires_grad_(not frozen)
    # lm_head is tied to the input embeddings in the tiny model; otherwise it follows the language model.
    for p in model.lm_head.parameters():
        p.requires_grad_(not model_cfg.freeze_language_model)
    if model_cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = model_cfg.lora
        names = [n for n, _ in model.named_modules()]
        targets = lora.target_modules
        matched = ([n for n in names if re.fullmatch(targets, n)] if isinstance(targets, str)
                   else [n for n in names if any(n.endswith(t) for t in targets)])
        if not matched:
            raise ModelError(f"model.lora.target_modules {targets!r} matches no module of the model")
        for p in model.parameters():
            p.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=targets, modules_to_save=lora.modules_to_save or None))
    return model


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """What a task checkpoint stores, by name: the parameters that train, and every parameter and buffer
    of the modules methods attached to the model (prompts, keys, per-task adapters: those of finished
    tasks are frozen but belong to the stage)."""
    from lvlm_cl.models.continual import is_continual

    out = {n: p.detach().clone().contiguous() for n, p in model.named_parameters()
           if p.requires_grad or is_continual(n)}
    out.update({n: b.detach().clone().contiguous() for n, b in model.named_buffers() if is_continual(n)})
    return out


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; whole sizes also under DeepSpeed ZeRO-3 (``ds_numel``) and for
    bitsandbytes 4-bit weights (packed two to a byte: their ``quant_state`` keeps the shape)."""
    def size(p):
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        return math.prod(shape) if shape is not None else getattr(p, "ds_numel", p.numel())

    total = sum(size(p) for p in model.parameters())
    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    return trainable, total


__all__ = ["BUILTIN_GEMMA3", "BUILTIN_PRETRAINED", "BUILTIN_QWEN25VL", "BUILTIN_RANDOM", "ModelError", "RANDOM_FAMILIES", "QUANTIZATIONS", "WEIGHT_DTYPES",
           "apply_training_setup", "autocast_for", "count_parameters", "default_device", "quantization_config", "load_model_dir",
           "load_processor", "parts", "resolve_model_dir", "trainable_state_dict", "upcast_trainable", "weights_dtype"]
