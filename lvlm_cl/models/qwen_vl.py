"""Qwen2-VL and Qwen2.5-VL: their processors without the video part, and when a model directory needs one.

transformers' ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` require a video processor, and every video
processor needs torchvision, which is not installed beside the CPU torch wheel of these machines (and is
not needed for images). lvlm_cl's records hold images and text only, so for these two families it uses the
library's processor class with only its image processor, tokenizer and chat template: a subclass whose
``__init__`` takes just those (``ProcessorMixin`` derives a processor's parts from its ``__init__``
signature, so ``save_pretrained`` / ``from_pretrained`` handle exactly these three). Everything an image goes
through is transformers' own code: the image processor (``Qwen2VLImageProcessor``, in whichever backend is
installed: the PIL one without torchvision), ``replace_image_token`` (``<|image_pad|>`` becomes
``image_grid_thw.prod() // merge_size**2`` tokens), ``mm_token_type_ids`` (which the model needs to place its
3-D rotary positions). tests/test_qwen25vl.py compares it with the image processor called directly.

The same class loads a real ``Qwen/Qwen2.5-VL-*-Instruct`` or ``Qwen/Qwen2-VL-*`` directory, on every machine,
with torchvision or without, so the tests on CPU run the code a GPU run runs. Nothing is registered with
``AutoProcessor``: ``load_model_dir`` picks the class from the model's config class
(``image_text_processor_class``), as transformers' Auto classes do.
"""

from __future__ import annotations

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLConfig, Qwen2VLProcessor


class Qwen2VLImageTextProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for images and text (no video processor)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # The parent hands ProcessorMixin (image_processor, tokenizer, video_processor=None); ProcessorMixin
        # pairs them with this signature's parts (image_processor, tokenizer) and keeps only those.
        super().__init__(image_processor, tokenizer, chat_template=chat_template)


class Qwen2_5_VLImageTextProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` for images and text (no video processor)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)


# The model's config class -> the processor lvlm_cl loads its directory with (the others: AutoProcessor).
# Qwen2_5_VLConfig first: the order of isinstance checks must not let a subclass match its parent's entry.
_BY_CONFIG = ((Qwen2_5_VLConfig, Qwen2_5_VLImageTextProcessor), (Qwen2VLConfig, Qwen2VLImageTextProcessor))

IMAGE_TEXT_PROCESSORS = tuple(cls for _, cls in _BY_CONFIG)


def image_text_processor_class(config) -> type | None:
    """The image-text processor class for a model of ``config`` (a Qwen2-VL or Qwen2.5-VL config), or None
    (load the directory's processor with ``AutoProcessor``)."""
    return next((cls for config_class, cls in _BY_CONFIG if isinstance(config, config_class)), None)


def is_dynamic_resolution(processor) -> bool:
    """Whether ``processor`` sizes each image by its own resolution (Qwen: between ``min_pixels`` and
    ``max_pixels``), so an image's token count depends on its size."""
    return isinstance(processor, IMAGE_TEXT_PROCESSORS)


def set_pixel_range(processor, min_pixels: int | None, max_pixels: int | None) -> None:
    """The recipe's ``model.min_pixels`` / ``model.max_pixels`` on a Qwen image processor: an image is resized
    (keeping its aspect ratio, to multiples of ``patch_size * merge_size``) so that its pixel count lies in
    that range; None keeps the processor's own bound. The image processor's ``size`` holds them as
    ``shortest_edge`` (min) and ``longest_edge`` (max), as its own ``min_pixels`` / ``max_pixels`` arguments set."""
    if min_pixels is None and max_pixels is None:
        return
    image_processor = processor.image_processor
    size = dict(image_processor.size)
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    if size["shortest_edge"] > size["longest_edge"]:
        raise ValueError(f"model.min_pixels ({size['shortest_edge']}) is above model.max_pixels "
                         f"({size['longest_edge']})")
    image_processor.size = type(image_processor.size)(**{k: v for k, v in size.items() if v is not None})


__all__ = ["IMAGE_TEXT_PROCESSORS", "Qwen2VLImageTextProcessor", "Qwen2_5_VLImageTextProcessor",
           "image_text_processor_class", "is_dynamic_resolution", "set_pixel_range"]
