"""The built-in tiny Qwen2.5-VL: a third model family, a real ``Qwen2_5_VLForConditionalGeneration`` built
offline from a config (Qwen's vision tower with window attention, its patch merger, the Qwen2 decoder with
3-D rotary positions) and an image-text ``Qwen2_5_VLProcessor`` (``qwen_vl.Qwen2_5_VLImageTextProcessor``),
saved and read back like any Hugging Face directory (``builtin:tiny-qwen2.5-vl-random``).

It takes the path of a real ``Qwen/Qwen2.5-VL-7B-Instruct`` directory: ``AutoModelForImageTextToText``, the
processor class chosen by the config, the chat template ``templates/qwen2_5_vl.jinja`` (ChatML with
assistant-span markers). What differs from LLaVA and Gemma 3 is handled where it lives:

- dynamic resolution: an image becomes ``image_grid_thw.prod() // merge_size**2`` tokens, so token counts
  depend on each image's size (``data.lengths.TokenCounter`` measures one count per size) and the batch carries
  ``image_grid_thw`` and the flattened patches (``pixel_values`` of shape (patches, C * T * P * P));
- M-RoPE: the model computes (3, B, L) position ids from ``mm_token_type_ids`` and the grids (the batch
  carries ``mm_token_type_ids``); prompts prepended to the language model's input shift all three rows;
- the parts: ``model.visual`` is the vision tower, its ``merger`` the projector, ``model.language_model``.

Sizes come from the recipe's ``model.tiny``: the vision tower's depth, width and heads, the decoder's, the
patch size; an image keeps its size between one merged token and ``(2 * image_size)**2`` pixels (the recipe's
``model.min_pixels`` / ``model.max_pixels`` change that range at loading, for the tiny model as for a real one).
"""

from __future__ import annotations

import torch

from lvlm_cl.models.tiny import TinyLlavaSize, build_tokenizer, chat_template

MERGE = 2            # Qwen merges 2 x 2 patches into one language-model token
TEMPORAL_PATCH = 2   # an image is repeated to Qwen's temporal patch of 2 frames

# Qwen2.5-VL's special tokens (no bos and no unk token: byte-level BPE encodes every text).
SPECIAL = {"unk": None, "bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>",
           "extra": {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                     "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
           "more": ["<|im_start|>"]}


def mrope_section(head_dim: int) -> list[int]:
    """How the rotary frequencies of a head (``head_dim / 2``) split over time, height and width: Qwen2.5-VL's
    [16, 24, 24] of 64 at any size (a quarter for time, the rest halved)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def build_tiny_qwen25vl_processor(size: TinyLlavaSize):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from lvlm_cl.models.qwen_vl import Qwen2_5_VLImageTextProcessor

    factor = size.patch_size * MERGE
    image_processor = Qwen2VLImageProcessorPil(patch_size=size.patch_size, merge_size=MERGE,
                                               temporal_patch_size=TEMPORAL_PATCH, min_pixels=factor * factor,
                                               max_pixels=(2 * size.image_size) ** 2)
    return Qwen2_5_VLImageTextProcessor(image_processor=image_processor, tokenizer=build_tokenizer(size.vocab_size, SPECIAL),
                                        chat_template=chat_template("qwen2_5_vl"))


def build_tiny_qwen25vl(size: TinyLlavaSize, seed: int):
    """Build ``(model, processor)`` from config; weights are deterministic for a seed."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    head_dim = size.text_hidden // size.text_heads
    if size.text_hidden % size.text_heads or head_dim % 2 or (size.vision_hidden // size.vision_heads) % 4:
        raise ValueError(f"model.tiny: text_hidden/text_heads ({size.text_hidden}/{size.text_heads}) must be an even "
                         f"whole number and vision_hidden/vision_heads ({size.vision_hidden}/{size.vision_heads}) a "
                         "multiple of 4, for Qwen's rotary embeddings")
    processor = build_tiny_qwen25vl_processor(size)
    tok = processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in SPECIAL["extra"].items()}
    kv_heads = size.text_heads // 2 if size.text_heads % 2 == 0 else size.text_heads   # grouped-query, as Qwen
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=size.text_hidden, intermediate_size=size.text_intermediate,
                         num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
                         num_key_value_heads=kv_heads, vocab_size=len(tok),
                         max_position_embeddings=size.max_position_embeddings,
                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                                          "mrope_section": mrope_section(head_dim)},
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=True),
        vision_config=dict(depth=size.vision_layers, hidden_size=size.vision_hidden,
                           intermediate_size=4 * size.vision_hidden, num_heads=size.vision_heads,
                           out_hidden_size=size.text_hidden, patch_size=size.patch_size, spatial_merge_size=MERGE,
                           temporal_patch_size=TEMPORAL_PATCH,
                           # Windows of 2 x 2 merged tokens (Qwen's 112 px = 4 x 4 at patch 14), every layer
                           # windowed but the last, which attends over the whole image (Qwen: every 8th).
                           window_size=2 * MERGE * size.patch_size,
                           fullatt_block_indexes=[size.vision_layers - 1]),
        image_token_id=ids["image_token"], video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_bos_token"], vision_end_token_id=ids["vision_eos_token"],
        tie_word_embeddings=True)
    config.pad_token_id = tok.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    # As Qwen2.5-VL-Instruct's generation config: stop at the end of the turn or of the text.
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.pad_token_id]
    model.generation_config.bos_token_id = tok.pad_token_id
    return model, processor
