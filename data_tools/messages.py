"""TRL / OpenAI ``messages`` format (huggingface/trl: docs/source/dataset_formats.md, "Vision datasets").

    {"images": ["img/cat.png"],
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                  {"role": "assistant", "content": "A cat."}]}

``content`` is a string (``<image>`` tokens in it are honoured, as in LLaVA) or a list of parts:
``{"type": "text", "text": ...}``, ``{"type": "image"}`` (optionally with the image inline under ``image``,
``path`` or ``url``) and OpenAI's ``{"type": "image_url", "image_url": {"url": ...}}`` (local paths,
``file://`` and base64 ``data:`` URLs). Images come either all from the ``images`` list or all inline.

    python -m data_tools convert --from messages data/vsft.jsonl --output data/mytask.jsonl
"""

from __future__ import annotations

from typing import Any

from lvlm_cl.data.records import ROLES, RecordError

from data_tools.conversion import Context, SourceFields, image_field_names
from data_tools.llava import image_list
from data_tools.turns import place_images, record_id, text_to_parts

INLINE_KEYS = ("image", "path", "url")


def _inline_source(part: dict) -> Any:
    if part["type"] == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    for key in INLINE_KEYS:
        if part.get(key) is not None:
            return part[key]
    return None


def _content_parts(content: Any, *, field: str, role: str, inline: list) -> list[dict]:
    """Canonical parts of one turn; inline image sources are appended to ``inline`` as (value, field)."""
    if isinstance(content, str):
        return text_to_parts(content, field=field, images_allowed=role == "user")
    if not isinstance(content, list):
        raise RecordError(f"expected a string or a list of parts, got {type(content).__name__}", field=field)
    parts = []
    for p, part in enumerate(content):
        pf = f"{field}[{p}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise RecordError("expected a string", field=f"{pf}.text")
            parts.append({"type": "text", "text": part["text"]})
        elif kind in ("image", "image_url"):
            source = _inline_source(part)
            if source is not None:
                inline.append((source, pf))
            parts.append({"type": "image"})
        else:
            raise RecordError("expected {'type': 'text', 'text': ...}, {'type': 'image'} or {'type': 'image_url'}",
                              field=pf)
    return parts


def messages_to_record(raw: Any, index: int, ctx: Context, *, messages_key: str = "messages",
                       images_key: str = "images", id_key: str = "id") -> tuple[dict, SourceFields]:
    if not isinstance(raw, dict):
        raise RecordError(f"expected a JSON object with {messages_key!r}, got {type(raw).__name__}")
    rid = record_id(raw.get(id_key), index, ctx.task, field=id_key)
    try:
        turns = raw.get(messages_key)
        if not isinstance(turns, list) or not turns:
            raise RecordError(f"expected a non-empty list of turns (keys present: {sorted(raw)})", field=messages_key)
        messages, inline = [], []
        for t, turn in enumerate(turns):
            tf = f"{messages_key}[{t}]"
            if not isinstance(turn, dict):
                raise RecordError("expected an object with 'role' and 'content'", field=tf)
            role = turn.get("role")
            if role not in ROLES:
                raise RecordError(f"expected one of {list(ROLES)}, got {role!r}", field=f"{tf}.role")
            parts = _content_parts(turn.get("content"), field=f"{tf}.content", role=role, inline=inline)
            messages.append({"role": role, "content": parts or [{"type": "text", "text": ""}]})
        images_value = raw.get(images_key)
        listed = image_list(images_value, field=images_key)
        if listed and inline:
            raise RecordError(f"images given both in {images_key!r} and inline in the messages; use one",
                              field=images_key)
        if inline:
            n_parts = sum(1 for m in messages for p in m["content"] if p["type"] == "image")
            if n_parts != len(inline):
                raise RecordError(f"{n_parts} image part(s) but only {len(inline)} with an image source; "
                                  f"give every image part its source, or list the images in {images_key!r}",
                                  field=messages_key)
            sources = inline
        else:
            place_images(messages, len(listed), field=messages_key, images_field=images_key)
            sources = list(zip(listed, image_field_names(images_key, images_value)))
        refs = [ctx.image_ref(v, field=f) for v, f in sources]
    except RecordError as e:
        raise RecordError(e.reason, field=e.field, record_id=rid) from None
    fields = SourceFields(id=id_key, messages=messages_key, turns=[f"{messages_key}[{t}]" for t in range(len(turns))],
                          content_is_list=True, images=images_key, image_fields=[f for _, f in sources])
    return {"id": rid, "task": ctx.task, "images": refs, "messages": messages}, fields
