"""The built-in tiny Gemma 3: a second model family, a real ``Gemma3ForConditionalGeneration`` built offline
from a config (SigLIP vision tower, Gemma 3's pooling projector, Gemma 3 decoder) with a ``Gemma3Processor``,
saved and read back like any Hugging Face directory (``builtin:tiny-gemma3-random``).

It takes the same code path as the tiny LLaVA: ``AutoModelForImageTextToText``, the processor's chat
template (``templates/gemma3.jinja``, Gemma 3's turn format with assistant-span markers), and the same
part names (``vision_tower``, ``multi_modal_projector``, ``language_model``), so freezing, LoRA, the
methods' hooks and checkpoints need nothing per family. Sizes come from the recipe's ``model.tiny``.

One simplification: the loop does not pass ``token_type_ids``, so image tokens attend causally, as text
does, instead of Gemma 3's bidirectional attention inside an image (the same in training and generation).
"""

from __future__ import annotations

import torch

from lvlm_cl.models.tiny import TinyLlavaSize, build_tokenizer, chat_template

SPECIAL = {"unk": "<unk>", "bos": "<bos>", "eos": "<eos>", "pad": "<pad>",
           "extra": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                     "image_token": "<image_soft_token>"},
           "more": ["<start_of_turn>", "<end_of_turn>"]}


def image_tokens_per_image(size: TinyLlavaSize) -> int:
    """Gemma 3 pools the patch grid to a square of ``mm_tokens_per_image`` tokens: a quarter of the patches
    (2 x 2 pooling), at least one."""
    side = size.image_size // size.patch_size
    return max(1, (side // 2) ** 2)


def build_tiny_gemma3_processor(size: TinyLlavaSize):
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokenizer = build_tokenizer(size.vocab_size, SPECIAL)
    image_processor = Gemma3ImageProcessorPil(size={"height": size.image_size, "width": size.image_size},
                                              image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template("gemma3"),
                           image_seq_length=image_tokens_per_image(size))


def build_tiny_gemma3(size: TinyLlavaSize, seed: int):
    """Build ``(model, processor)`` from config; weights are deterministic for a seed."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    if size.image_size % size.patch_size or (size.image_size // size.patch_size) % 2:
        raise ValueError(f"model.tiny: image_size/patch_size ({size.image_size}/{size.patch_size}) must be an even "
                         "whole number for Gemma 3's 2 x 2 pooling")
    processor = build_tiny_gemma3_processor(size)
    tok = processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in SPECIAL["extra"].items()}
    head_dim = size.text_hidden // size.text_heads
    config = Gemma3Config(
        text_config=dict(hidden_size=size.text_hidden, intermediate_size=size.text_intermediate,
                         num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
                         num_key_value_heads=size.text_heads, head_dim=head_dim, vocab_size=len(tok),
                         max_position_embeddings=size.max_position_embeddings,
                         sliding_window=size.max_position_embeddings, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=size.vision_hidden, intermediate_size=4 * size.vision_hidden,
                           num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
                           image_size=size.image_size, patch_size=size.patch_size),
        mm_tokens_per_image=image_tokens_per_image(size), boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"], image_token_index=ids["image_token"])
    config.pad_token_id = tok.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma3ForConditionalGeneration(config)
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, end_of_turn]
    model.generation_config.bos_token_id = tok.bos_token_id
    return model, processor
