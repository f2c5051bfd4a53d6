"""Formatting and label masking, in one place that fails loudly.

A canonical record becomes model inputs through the processor's chat template:
``processor.apply_chat_template(..., return_assistant_tokens_mask=True)`` renders the conversation,
expands every ``<image>`` into the vision tower's patch tokens, and marks the assistant tokens. Labels are
the input ids at assistant positions and -100 everywhere else (system and user turns, image tokens,
padding). Anything that does not add up raises ``EncodingError`` naming the record; nothing is truncated.

What the model needs of the images comes with the ids: ``pixel_values`` (one (C, H, W) row per image for a
fixed-resolution model; for Qwen2-VL / Qwen2.5-VL the flattened patches, one row per patch), and for Qwen
``image_grid_thw`` (each image's patch grid) and ``mm_token_type_ids`` (1 at image tokens), from which the
model computes its 3-D rotary positions.
"""

from __future__ import annotations

import re

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from lvlm_cl.data.records import RecordError

IGNORE_INDEX = -100


def has_generation_markers(template: str | None) -> bool:
    """Whether a chat template marks assistant spans ({% generation %}), which assistant masks need."""
    return bool(re.search(r"\{%-?\s*generation\s*-?%\}", template or ""))


class EncodingError(RecordError):
    """A record cannot be encoded faithfully (too long, no assistant tokens, template without masks...)."""


def load_image(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _conversation(record: dict, upto: int | None = None) -> list[dict]:
    """The record's messages with its images attached to the image parts, in order."""
    images = iter(enumerate(record.get("images", [])))
    conv = []
    for turn in record["messages"][:upto]:
        parts = []
        for part in turn["content"]:
            if part["type"] == "image":
                k, path = next(images)
                try:
                    image = load_image(path)
                except FileNotFoundError:
                    raise EncodingError(f"image not found: {path}", record_id=record["id"], field=f"images[{k}]") from None
                except Exception as e:  # noqa: BLE001 - PIL raises several types for unreadable or truncated data
                    raise EncodingError(f"image cannot be read ({type(e).__name__}: {e}): {path}", record_id=record["id"],
                                        field=f"images[{k}]") from None
                parts.append({"type": "image", "image": image})
            else:
                parts.append({"type": "text", "text": part["text"]})
        conv.append({"role": turn["role"], "content": parts})
    return conv


def image_token_id(processor) -> int:
    """The id of the tokens an image becomes in the text (the model's ``image_token_id``): the tokenizer's
    image token where it names one (Gemma 3's processor calls the begin-of-image marker its image token)."""
    token = getattr(processor.tokenizer, "image_token", None) or processor.image_token
    return processor.tokenizer.convert_tokens_to_ids(token)


@dataclass
class Encoded:
    input_ids: torch.Tensor          # (L,)
    labels: torch.Tensor             # (L,) -100 outside assistant tokens; empty for prompts
    pixel_values: torch.Tensor | None  # (n_images, C, H, W); Qwen: (patches of all images, C * T * P * P)
    image_grid_thw: torch.Tensor | None = None      # Qwen: (n_images, 3), each image's (t, h, w) patch grid
    mm_token_type_ids: torch.Tensor | None = None   # Qwen: (L,) 1 at image tokens, 0 elsewhere


def _image_inputs(out, row: int | None = None) -> dict:
    """The image inputs of a processor output beside ``pixel_values``: ``image_grid_thw``, and row ``row`` of
    ``mm_token_type_ids`` (all of it for None)."""
    types = out.get("mm_token_type_ids")
    if types is not None:
        types = torch.as_tensor(types)[0 if row is None else row]
    return {"image_grid_thw": out.get("image_grid_thw"), "mm_token_type_ids": types}


def encode_record(processor, record: dict, max_length: int) -> Encoded:
    """Training encoding with assistant-only labels."""
    if not has_generation_markers(processor.chat_template):
        raise EncodingError("the chat template has no {% generation %} markers, so assistant tokens cannot be "
                            "masked (set model.chat_template: llava15, or a .jinja file with those markers)",
                            record_id=record["id"])
    out = processor.apply_chat_template(_conversation(record), tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True, return_tensors="pt")
    ids = out["input_ids"][0]
    if "assistant_masks" not in out:
        raise EncodingError("the processor returned no assistant mask", record_id=record["id"])
    mask = torch.as_tensor(out["assistant_masks"][0]).bool()
    if mask.shape != ids.shape:
        raise EncodingError(f"assistant mask length {mask.numel()} != token count {ids.numel()}", record_id=record["id"])
    return _encoded(processor, record, ids, max_length, mask, out.get("pixel_values"), **_image_inputs(out))


def encode_prompt(processor, record: dict, max_length: int) -> Encoded:
    """Generation encoding: every turn but the last assistant answer, then the generation prompt."""
    out = processor.apply_chat_template(_conversation(record, upto=-1), tokenize=True, return_dict=True,
                                        add_generation_prompt=True, return_tensors="pt")
    return _encoded(processor, record, out["input_ids"][0], max_length, None, out.get("pixel_values"),
                    **_image_inputs(out))


def encode_many(processor, records: Sequence[dict], max_length: int, *, prompt: bool) -> list[Encoded]:
    """``encode_prompt`` (``prompt``) or ``encode_record`` of each record, through one processor call for all
    of them: the chat template renders each conversation, then the tokenizer and the image processor run
    once on the lot (about twice as fast as one call per record on small images; see docs/benchmarks.md).
    The result is the same as one call per record (tested): each row is cut out of the padded batch by its
    attention mask, and the same checks run on it. When the batched call fails, or its images do not come
    out one ``pixel_values`` row per image (per patch of its grid, for Qwen), the records are encoded one by
    one, so a bad record raises the same ``EncodingError`` naming it."""
    one = encode_prompt if prompt else encode_record
    if len(records) < 2 or (not prompt and not has_generation_markers(processor.chat_template)):
        return [one(processor, r, max_length) for r in records]
    try:
        conversations = [_conversation(r, upto=-1 if prompt else None) for r in records]
        out = processor.apply_chat_template(conversations, tokenize=True, return_dict=True, return_tensors="pt",
                                            processor_kwargs={"padding": True},
                                            **({"add_generation_prompt": True} if prompt
                                               else {"return_assistant_tokens_mask": True}))
    except Exception:       # noqa: BLE001 - one record at a time says which one and why
        return [one(processor, r, max_length) for r in records]
    counts = [len(r.get("images", [])) for r in records]
    pixels, grids = out.get("pixel_values"), out.get("image_grid_thw")
    # pixel_values rows per image: one, or (Qwen) the patches of its grid
    rows = [1] * sum(counts) if grids is None else grids.prod(-1).tolist()
    if (pixels is None) != (sum(counts) == 0) or (pixels is not None and (pixels.shape[0] != sum(rows)
                                                                          or len(rows) != sum(counts))) \
            or (not prompt and "assistant_masks" not in out):
        return [one(processor, r, max_length) for r in records]
    first = [sum(counts[:i]) for i in range(len(counts))]          # each record's first image
    start = [sum(rows[:k]) for k in range(len(rows) + 1)]           # each image's first row
    result = []
    for i, record in enumerate(records):
        keep = out["attention_mask"][i].bool()
        ids = out["input_ids"][i][keep]
        images = slice(first[i], first[i] + counts[i])
        pix = pixels[start[images.start]:start[images.stop]] if counts[i] else None
        image = _image_inputs(out, i)
        if image["mm_token_type_ids"] is not None:
            image["mm_token_type_ids"] = image["mm_token_type_ids"][keep]
        if grids is not None:
            image["image_grid_thw"] = grids[images] if counts[i] else None
        mask = None if prompt else torch.as_tensor(out["assistant_masks"][i]).bool()[keep]
        result.append(_encoded(processor, record, ids, max_length, mask, pix, **image))
    return result


def _encoded(processor, record: dict, ids: torch.Tensor, max_length: int, mask: torch.Tensor | None,
             pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None = None,
             mm_token_type_ids: torch.Tensor | None = None) -> Encoded:
    """The checked encoding of one record: labels are the ids where ``mask`` (assistant tokens) holds and -100
    elsewhere, or empty for a prompt (``mask`` None)."""
    _check(processor, record, ids, max_length, mask)
    if mm_token_type_ids is not None and mm_token_type_ids.shape != ids.shape:
        raise EncodingError(f"mm_token_type_ids length {mm_token_type_ids.numel()} != token count {ids.numel()}",
                            record_id=record["id"])
    labels = (torch.empty(0, dtype=torch.long) if mask is None
              else torch.where(mask, ids, torch.full_like(ids, IGNORE_INDEX)))
    return Encoded(ids, labels, pixel_values, image_grid_thw,
                   None if mm_token_type_ids is None else mm_token_type_ids.long())


def _check(processor, record: dict, ids: torch.Tensor, max_length: int, mask: torch.Tensor | None) -> None:
    rid = record["id"]
    if ids.numel() > max_length:
        raise EncodingError(f"{ids.numel()} tokens (images expanded) exceed model.max_length={max_length}; "
                            "truncating would cut the answer or image tokens. Shorten the sample or raise "
                            "model.max_length", record_id=rid, field="messages")
    is_image = ids == image_token_id(processor)
    n_images = len(record.get("images", []))
    if n_images and not is_image.any():
        raise EncodingError("the record has images but the encoded text has no image tokens", record_id=rid,
                            field="images")
    if mask is not None:
        if not mask.any():
            raise EncodingError("no assistant tokens to learn from (empty assistant mask)", record_id=rid,
                                field="messages")
        if (mask & is_image).any():
            raise EncodingError("assistant mask covers image tokens: the chat template is inconsistent",
                                record_id=rid, field="messages")


def count_tokens(processor, record: dict) -> int:
    """Sequence length of a record after image-token expansion (for data_tools validate/stats)."""
    out = processor.apply_chat_template(_conversation(record), tokenize=True, return_dict=True, return_tensors="pt")
    return int(out["input_ids"].shape[-1])


def collate_train(items: Sequence[Encoded], pad_id: int) -> dict:
    """Right-padded batch for training."""
    n = max(it.input_ids.numel() for it in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    labels = torch.full((len(items), n), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((len(items), n), dtype=torch.long)
    for i, it in enumerate(items):
        L = it.input_ids.numel()
        ids[i, :L], labels[i, :L], attn[i, :L] = it.input_ids, it.labels, 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels, **_images(items, n, left=False)}


def collate_prompts(items: Sequence[Encoded], pad_id: int) -> dict:
    """Left-padded batch for generation (new tokens then line up at the right)."""
    n = max(it.input_ids.numel() for it in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    attn = torch.zeros((len(items), n), dtype=torch.long)
    for i, it in enumerate(items):
        L = it.input_ids.numel()
        ids[i, n - L:], attn[i, n - L:] = it.input_ids, 1
    return {"input_ids": ids, "attention_mask": attn, **_images(items, n, left=True)}


def _images(items: Sequence[Encoded], n: int, *, left: bool) -> dict:
    """The batch's image inputs: every image's ``pixel_values`` rows (and Qwen's ``image_grid_thw``) in the
    order of the samples, and ``mm_token_type_ids`` padded as the ids are (0: text)."""
    out = {}
    pix = [it.pixel_values for it in items if it.pixel_values is not None]
    if pix:
        out["pixel_values"] = torch.cat(pix, dim=0)
    grids = [it.image_grid_thw for it in items if it.image_grid_thw is not None]
    if grids:
        out["image_grid_thw"] = torch.cat(grids, dim=0)
    if any(it.mm_token_type_ids is not None for it in items):
        types = torch.zeros((len(items), n), dtype=torch.long)
        for i, it in enumerate(items):
            L = it.input_ids.numel()
            if it.mm_token_type_ids is not None:
                types[i, slice(n - L, n) if left else slice(0, L)] = it.mm_token_type_ids
        out["mm_token_type_ids"] = types
    return out
