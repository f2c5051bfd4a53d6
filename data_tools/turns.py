"""Turn-level pieces shared by the converters: ``<image>`` tokens <-> image parts, ids, image placement.

LLaVA (and LLaMA-Factory) put an ``<image>`` token in the text of a user turn, usually as ``"<image>\\n..."``.
The canonical record holds an ``{"type": "image"}`` part at that position instead. The mapping is exact
for text that is separated from ``<image>`` by one newline (or starts/ends the turn):

    "<image>\\nWhat is it?"   <->  [image, text "What is it?"]
    "Compare\\n<image>\\nand\\n<image>"  <->  [text "Compare", image, text "and", image]
"""

from __future__ import annotations

from lvlm_cl.data.records import RecordError

IMAGE_TOKEN = "<image>"


def record_id(raw_id, index: int, task: str, *, field: str = "id") -> str:
    """The canonical id: LLaVA's int ids are cast to str; a missing id becomes ``<task>-<index>``."""
    if raw_id is None:
        return f"{task}-{index}"
    if isinstance(raw_id, bool) or not isinstance(raw_id, (int, str)) or raw_id == "":
        raise RecordError(f"expected a non-empty string or an integer, got {raw_id!r}", field=field)
    return str(raw_id)


def text_to_parts(text: str, *, field: str, images_allowed: bool) -> list[dict]:
    """Split a turn's text on ``<image>`` into canonical parts, dropping the newline next to each token.

    An empty text gives one empty text part, so the record check reports "empty turn" for it.
    """
    segments = text.split(IMAGE_TOKEN)
    last = len(segments) - 1
    if last and not images_allowed:
        raise RecordError(f"{IMAGE_TOKEN!r} may only appear in user turns", field=field)
    parts: list[dict] = []
    for i, segment in enumerate(segments):
        if i < last and segment.endswith("\n"):
            segment = segment[:-1]
        if i > 0 and segment.startswith("\n"):
            segment = segment[1:]
        if segment:
            parts.append({"type": "text", "text": segment})
        if i < last:
            parts.append({"type": "image"})
    return parts or [{"type": "text", "text": ""}]


def parts_to_text(parts: list[dict]) -> str:
    """The inverse of ``text_to_parts``: parts joined by newlines, image parts as ``<image>``."""
    return "\n".join(IMAGE_TOKEN if p["type"] == "image" else p["text"] for p in parts)


def string_turns(turns, *, field: str, role_key: str, content_key: str, roles: dict[str, str],
                 unsupported: dict[str, str] | None = None) -> list[dict]:
    """Canonical messages from turns whose content is a string (LLaVA, ShareGPT).

    ``roles`` maps the input's role names to canonical roles; ``unsupported`` maps role names that exist in
    the source format but have no canonical meaning (tool calls) to an explanation.
    """
    if not isinstance(turns, list) or not turns:
        raise RecordError("expected a non-empty list of turns", field=field)
    messages = []
    for t, turn in enumerate(turns):
        tf = f"{field}[{t}]"
        if not isinstance(turn, dict):
            raise RecordError(f"expected an object with {role_key!r} and {content_key!r}", field=tf)
        name = turn.get(role_key)
        if unsupported and name in unsupported:
            raise RecordError(unsupported[name], field=f"{tf}.{role_key}")
        if name not in roles:
            raise RecordError(f"expected one of {list(roles)}, got {name!r}", field=f"{tf}.{role_key}")
        text = turn.get(content_key)
        if not isinstance(text, str):
            raise RecordError(f"expected a string, got {type(text).__name__}", field=f"{tf}.{content_key}")
        role = roles[name]
        messages.append({"role": role, "content": text_to_parts(text, field=f"{tf}.{content_key}",
                                                                images_allowed=role == "user")})
    return messages


def place_images(messages: list[dict], n_images: int, *, field: str, images_field: str) -> None:
    """Check image parts against the image list; with no ``<image>`` at all, put the images first in the
    first user turn (what LLaVA does with such records)."""
    n_parts = sum(1 for m in messages for p in m["content"] if p.get("type") == "image")
    if n_parts == 0 and n_images:
        for m in messages:
            if m["role"] == "user":
                m["content"][:0] = [{"type": "image"} for _ in range(n_images)]
                return
        raise RecordError(f"{n_images} image(s) but no user turn to put them in", field=field)
    if n_parts != n_images:
        raise RecordError(f"{n_parts} {IMAGE_TOKEN} placeholder(s) but {n_images} image(s) in {images_field!r}; "
                          f"expected one placeholder per image (or none, to put all images first)", field=field)
