"""Token counts of records without processing a pixel: what the start of a run checks.

A record's length after the processor expands its images is the length of its text through the chat
template and the tokenizer (each image still one placeholder) plus, per image, the tokens the processor
adds for an image of that size. The first part is the tokenizer's own ``apply_chat_template`` with the
processor's template, batched, which also gives the assistant mask (an empty answer is found here). The
second is measured once per distinct image size, on a blank image of that size through the processor itself
(a fixed-resolution model such as LLaVA-1.5 gives one number for every size; a dynamic-resolution one a
number per size), and image sizes come from the files' headers. So the start reads every record and every
image header, and decodes no image.

The sum is checked against the processor: ``TokenCounter.verify`` encodes a few records per file in full and
compares. Where the two disagree (a template whose text around an image merges differently), the counts are
taken by the processor itself, as exact and as slow as encoding (the log says so).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from lvlm_cl.data.encoding import EncodingError, encode_many, has_generation_markers, image_token_id

CHUNK = 256


# The bytes a complete file of these formats ends with (within its last KiB: a few writers append a little
# after them): a file cut short, by a failed copy or download, lacks them. Read without decoding anything.
TRAILERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82", "GIF": b";"}


def image_size(path: str, *, record_id: str, field: str) -> tuple[int, int]:
    """(width, height) from an image file's header (nothing decoded); a missing or unreadable file, or a
    JPEG / PNG / GIF cut short (its end marker missing), is an ``EncodingError`` naming the record and field."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            size, trailer = im.size, TRAILERS.get(im.format)
            if trailer is not None:
                im.fp.seek(0, os.SEEK_END)
                im.fp.seek(max(0, im.fp.tell() - 1024))
                if trailer not in im.fp.read():
                    raise EncodingError(f"image cannot be read (truncated: the {im.format} file ends before its end "
                                        f"marker): {path}", record_id=record_id, field=field)
            return size
    except EncodingError:
        raise
    except FileNotFoundError:
        raise EncodingError(f"image not found: {path}", record_id=record_id, field=field) from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise EncodingError(f"image cannot be read ({type(e).__name__}: {e}): {path}", record_id=record_id,
                            field=field) from None


def _text_conversation(record: dict, upto: int | None) -> list[dict]:
    """The record's messages with image parts left as placeholders (no image attached)."""
    return [{"role": turn["role"], "content": [dict(part) for part in turn["content"]]}
            for turn in record["messages"][:upto]]


class TokenCounter:
    """Counts of ``processor``'s encoding of records (training: the whole conversation; prompt: up to the
    generation prompt), checked against ``max_length`` as ``encode_record`` / ``encode_prompt`` check them."""

    def __init__(self, processor, max_length: int):
        self.processor, self.max_length = processor, max_length
        self._placeholders: np.ndarray | None = None
        self._per_size: dict[tuple[int, int], int] = {}
        self.exact_by_text = True          # set False by verify() where the sum disagrees with the processor

    @property
    def placeholders(self) -> np.ndarray:
        """The token ids the template writes for an image part before the processor expands it (LLaVA's
        ``<image>``, Gemma 3's ``<start_of_image>``): the added (special) tokens of a one-image turn that a
        text-only turn lacks."""
        if self._placeholders is None:
            def ids(content):
                return self.processor.tokenizer.apply_chat_template(
                    [{"role": "user", "content": content}], chat_template=self.processor.chat_template,
                    tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
            text = [{"type": "text", "text": "Describe."}]
            added = np.array(list(self.processor.tokenizer.added_tokens_decoder), dtype=np.int64)  # special tokens
            self._placeholders = np.intersect1d(np.setdiff1d(ids([{"type": "image"}, *text]), ids(text)), added)
            if not len(self._placeholders):     # a template that writes nothing for an image: the model's token
                self._placeholders = np.array([image_token_id(self.processor)])
        return self._placeholders

    def image_tokens(self, size: tuple[int, int]) -> int:
        """Tokens the processor adds to a text for one image of ``size``, beyond its placeholder."""
        if size not in self._per_size:
            from PIL import Image

            conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
            text = self.processor.tokenizer.apply_chat_template(conv, chat_template=self.processor.chat_template,
                                                                tokenize=True, add_generation_prompt=True,
                                                                return_dict=True)["input_ids"]
            conv[0]["content"][0]["image"] = Image.new("RGB", size)
            full = self.processor.apply_chat_template(conv, tokenize=True, add_generation_prompt=True,
                                                      return_dict=True, return_tensors="pt")["input_ids"]
            self._per_size[size] = int(full.shape[-1]) - len(text)
        return self._per_size[size]

    def count(self, records: Sequence[dict], *, prompt: bool, path: str | None = None, progress=None) -> np.ndarray:
        """(N,) int32 token counts of ``records``; the first problem found is an ``EncodingError`` naming
        ``path``, the record and the field. ``progress(n)`` is called after each chunk."""
        out = np.zeros(len(records), dtype=np.int32)
        for start in range(0, len(records), CHUNK):
            part = records[start:start + CHUNK]
            try:
                out[start:start + len(part)] = (self._by_text(part, prompt) if self.exact_by_text
                                                else self._by_processor(part, prompt))
            except EncodingError as e:
                raise EncodingError(e.reason, path=path, record_id=e.record_id, field=e.field) from None
            if progress is not None:
                progress(len(part))
        return out

    def verify(self, records: Sequence[dict], *, prompt: bool, sample: int = 4) -> bool:
        """Encode ``sample`` records spread over ``records`` in full and compare their lengths with the counts;
        on a difference, count by the processor from now on (``exact_by_text`` False). Returns whether the
        counts by text were exact."""
        if not self.exact_by_text or not records:
            return self.exact_by_text
        picks = sorted({round(i * (len(records) - 1) / max(1, sample - 1)) for i in range(sample)})
        chosen = [records[i] for i in picks]
        try:
            full = [e.input_ids.numel() for e in encode_many(self.processor, chosen, 1 << 30, prompt=prompt)]
        except EncodingError:
            return True         # the record is bad: count() names it
        if full != list(self._by_text(chosen, prompt, check=False)):
            self.exact_by_text = False
        return self.exact_by_text

    def _by_text(self, records: Sequence[dict], prompt: bool, check: bool = True) -> list[int]:
        tok = self.processor.tokenizer
        convs = [_text_conversation(r, -1 if prompt else None) for r in records]
        kwargs = {"add_generation_prompt": True} if prompt else {"return_assistant_tokens_mask": True}
        if not prompt and not has_generation_markers(self.processor.chat_template):
            raise EncodingError("the chat template has no {% generation %} markers, so assistant tokens cannot be "
                                "masked (set model.chat_template: llava15, or a .jinja file with those markers)",
                                record_id=records[0]["id"])
        out = tok.apply_chat_template(convs, chat_template=self.processor.chat_template, tokenize=True,
                                      return_dict=True, **kwargs)
        counts = []
        for i, record in enumerate(records):
            ids = np.asarray(out["input_ids"][i])
            images = record.get("images", [])
            n = len(ids) + sum(self.image_tokens(image_size(p, record_id=record["id"], field=f"images[{k}]"))
                               for k, p in enumerate(images))
            if check:
                mask = None if prompt else np.asarray(out["assistant_masks"][i], dtype=bool)
                self._check(record, n, ids, mask)
            counts.append(n)
        return counts

    def _by_processor(self, records: Sequence[dict], prompt: bool) -> list[int]:
        return [e.input_ids.numel() for e in encode_many(self.processor, records, self.max_length, prompt=prompt)]

    def _check(self, record: dict, n: int, ids: np.ndarray, mask: np.ndarray | None) -> None:
        """``encoding._check``'s checks, on the unexpanded text and the expanded count."""
        rid = record["id"]
        if n > self.max_length:
            raise EncodingError(f"{n} tokens (images expanded) exceed model.max_length={self.max_length}; "
                                "truncating would cut the answer or image tokens. Shorten the sample or raise "
                                "model.max_length", record_id=rid, field="messages")
        is_image = np.isin(ids, self.placeholders)
        if record.get("images") and not is_image.any():
            raise EncodingError("the record has images but the encoded text has no image tokens", record_id=rid,
                                field="images")
        if mask is not None:
            if mask.shape != ids.shape or not mask.any():
                raise EncodingError("no assistant tokens to learn from (empty assistant mask)", record_id=rid,
                                    field="messages")
            if (mask & is_image).any():
                raise EncodingError("assistant mask covers image tokens: the chat template is inconsistent",
                                    record_id=rid, field="messages")


def counted(records: Sequence[dict], counter: TokenCounter, *, prompt: bool) -> np.ndarray:
    """(N,) int32 token counts of ``records``: their table's where it has them (``RecordTable.lengths``, -1
    for records added without one), the others counted by ``counter``."""
    lengths = getattr(records, "lengths", None)
    lengths = np.full(len(records), -1, dtype=np.int32) if lengths is None else np.array(lengths)
    todo = np.flatnonzero(lengths < 0)
    if len(todo):
        lengths[todo] = counter.count([records[int(i)] for i in todo], prompt=prompt)
    return lengths


__all__ = ["TokenCounter", "counted", "image_size"]
