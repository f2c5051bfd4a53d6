"""LLaVA format (haotian-liu/LLaVA: docs/Finetune_Custom_Data.md), both directions.

    [{"id": 17, "image": "coco/000017.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat is on the table?"},
                        {"from": "gpt", "value": "A cup."}]}]

``id`` may be an int or a str (cast to str); ``image`` a string, a list, or absent (text-only);
``from`` is ``human``, ``gpt`` or ``system``. Each ``<image>`` in a human turn becomes an image part at that
place; a record with images and no ``<image>`` gets them first in its first human turn (as LLaVA does).

    python -m data_tools convert --from llava data/llava.json --output data/mytask.jsonl
    python -m data_tools export --to llava data/mytask.jsonl --output data/mytask.llava.json
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lvlm_cl.data.records import RecordError, load_records
from lvlm_cl.io import atomic_write_json, atomic_write_text

from data_tools.conversion import Context, SourceFields, image_field_names, path_for_output
from data_tools.turns import parts_to_text, place_images, record_id, string_turns
from data_tools.validate import check_file

LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
CANONICAL_TO_LLAVA = {v: k for k, v in LLAVA_ROLES.items()}


def image_list(value: Any, *, field: str) -> list:
    """LLaVA's ``image``: absent, one value, or a list of values."""
    if value is None:
        return []
    if isinstance(value, list):
        if not value:
            return []
        return value
    if isinstance(value, str) and value == "":
        raise RecordError("expected an image path, got an empty string (omit the key for text-only records)",
                          field=field)
    return [value]


def llava_to_record(raw: Any, index: int, ctx: Context, *, conversations_key: str = "conversations",
                    image_key: str = "image", id_key: str = "id") -> tuple[dict, SourceFields]:
    if not isinstance(raw, dict):
        raise RecordError(f"expected a JSON object with {conversations_key!r}, got {type(raw).__name__}")
    rid = record_id(raw.get(id_key), index, ctx.task, field=id_key)
    if image_key not in raw and "images" in raw and image_key == "image":
        image_key = "images"  # LLaVA-OneVision style files
    images_value = raw.get(image_key)
    images = image_list(images_value, field=image_key)
    image_fields = image_field_names(image_key, images_value)
    if conversations_key not in raw:
        raise RecordError(f"missing; expected a list of {{'from', 'value'}} turns (keys present: {sorted(raw)})",
                          field=conversations_key, record_id=rid)
    try:
        messages = string_turns(raw[conversations_key], field=conversations_key, role_key="from",
                                content_key="value", roles=LLAVA_ROLES)
        place_images(messages, len(images), field=conversations_key, images_field=image_key)
        refs = [ctx.image_ref(v, field=f) for v, f in zip(images, image_fields)]
    except RecordError as e:
        raise RecordError(e.reason, field=e.field, record_id=rid) from None
    fields = SourceFields(id=id_key, messages=conversations_key,
                          turns=[f"{conversations_key}[{t}]" for t in range(len(messages))],
                          role_key="from", content_key="value", images=image_key, image_fields=image_fields)
    return {"id": rid, "task": ctx.task, "images": refs, "messages": messages}, fields


# ---------------------------------------------------------------- export

def record_to_llava(record: dict, image_base: str | os.PathLike) -> dict:
    """One canonical record (image paths absolute, as ``load_records`` gives them) as a LLaVA record."""
    out: dict[str, Any] = {"id": record["id"]}
    images = [path_for_output(p, image_base) for p in record.get("images", [])]
    if len(images) == 1:
        out["image"] = images[0]
    elif images:
        out["image"] = images
    out["conversations"] = [{"from": CANONICAL_TO_LLAVA[m["role"]], "value": parts_to_text(m["content"])}
                            for m in record["messages"]]
    return out


def export_llava(path: str | os.PathLike, output: str | os.PathLike,
                 image_root: str | os.PathLike | None = None) -> list[dict]:
    """Write a canonical JSONL file as LLaVA JSON (a list; JSON lines when ``output`` ends in ``.jsonl``).

    Image paths are written relative to ``image_root`` (default: the output file's folder) when the image
    lies under it, else absolute.
    """
    check_file(path)
    records = load_records(path)
    base = Path(image_root) if image_root is not None else Path(os.path.abspath(output)).parent
    out = [record_to_llava(r, base) for r in records]
    if str(output).endswith(".jsonl"):
        atomic_write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    else:
        atomic_write_json(output, out)
    return out
