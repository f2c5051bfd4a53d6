"""LLaMA-Factory ``sharegpt`` format (hiyouga/LLaMA-Factory: data/README.md).

    [{"conversations": [{"from": "human", "value": "<image>Who are they?"}, {"from": "gpt", "value": "..."}],
      "system": "optional system prompt", "images": ["mllm_demo_data/1.jpg"]}]

Column and role names come from the ``dataset_info.json`` entry (``columns``: messages, system, images;
``tags``: role_tag, content_tag, user_tag, assistant_tag, system_tag), with LLaMA-Factory's defaults.
Either give the data file, optionally with ``--dataset-info dataset_info.json [--dataset NAME]``, or give
``dataset_info.json`` itself with ``--dataset NAME``; its ``file_name`` is read from the same folder.

    python -m data_tools convert --from sharegpt data/dataset_info.json --dataset mllm_demo --output out.jsonl
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lvlm_cl.data.records import RecordError

from data_tools.conversion import Context, SourceFields, image_field_names
from data_tools.llava import image_list
from data_tools.sources import check_not_utf16, decode, loads
from data_tools.turns import place_images, record_id, string_turns

DEFAULT_COLUMNS = {"messages": "conversations", "system": "system", "images": "images", "tools": "tools",
                   "videos": "videos", "audios": "audios"}
DEFAULT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}


@dataclass
class ShareGPTSpec:
    """Where the data file is and what its columns and role tags are called."""
    data_file: Path
    columns: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_COLUMNS))
    tags: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TAGS))


def _entry_spec(info_path: Path, name: str, entry: Any) -> ShareGPTSpec:
    where = f"dataset {name!r}"
    if not isinstance(entry, dict):
        raise RecordError(f"{where}: expected an object", path=info_path)
    if entry.get("formatting", "alpaca") != "sharegpt":
        raise RecordError(f"{where}: formatting is {entry.get('formatting', 'alpaca (the default)')!r}; "
                          f"only 'sharegpt' is supported", path=info_path, field="formatting")
    if entry.get("ranking"):
        raise RecordError(f"{where}: preference (ranking) data cannot be used for instruction tuning",
                          path=info_path, field="ranking")
    if "file_name" not in entry:
        raise RecordError(f"{where}: only local datasets ('file_name') are supported, not hub or script URLs",
                          path=info_path, field="file_name")
    spec = ShareGPTSpec(info_path.parent / entry["file_name"])
    for key, defaults in (("columns", spec.columns), ("tags", spec.tags)):
        given = entry.get(key, {})
        if not isinstance(given, dict):
            raise RecordError(f"{where}: expected an object", path=info_path, field=key)
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise RecordError(f"{where}: unknown {key} {unknown}; known: {sorted(defaults)}", path=info_path,
                              field=key)
        defaults.update(given)
    return spec


def resolve_spec(input_path: Path, dataset_info: Path | None, dataset: str | None) -> ShareGPTSpec:
    """The data file and its column/tag names, from the command-line arguments."""
    info_path = dataset_info
    if info_path is None and input_path.name == "dataset_info.json":
        info_path = input_path
    if info_path is None:
        if dataset is not None:
            raise RecordError("--dataset needs a dataset_info.json (give it as INPUT or with --dataset-info)")
        return ShareGPTSpec(input_path)
    if not info_path.is_file():
        raise RecordError("file not found", path=info_path)
    data = info_path.read_bytes()
    check_not_utf16(info_path, data)
    try:
        info = loads(decode(data, path=info_path))
    except json.JSONDecodeError as e:
        raise RecordError(f"invalid JSON: {e.msg}", path=info_path, line=e.lineno) from None
    if not isinstance(info, dict):
        raise RecordError("expected an object mapping dataset names to entries", path=info_path)
    if dataset is None:
        if info_path != input_path:  # the entry whose file_name is INPUT
            matches = [n for n, e in info.items() if isinstance(e, dict)
                       and (info_path.parent / str(e.get("file_name", ""))).resolve() == input_path.resolve()]
        else:
            matches = [n for n, e in info.items() if isinstance(e, dict) and e.get("formatting") == "sharegpt"]
        if len(matches) != 1:
            raise RecordError(f"choose a dataset with --dataset NAME (entries: {sorted(info)})", path=info_path)
        dataset = matches[0]
    if dataset not in info:
        raise RecordError(f"no dataset {dataset!r}; entries: {sorted(info)}", path=info_path)
    spec = _entry_spec(info_path, dataset, info[dataset])
    if info_path != input_path and spec.data_file.resolve() != input_path.resolve():
        raise RecordError(f"dataset {dataset!r} names file {spec.data_file}, not the input {input_path}",
                          path=info_path, field="file_name")
    return spec


def sharegpt_to_record(raw: Any, index: int, ctx: Context, *, spec: ShareGPTSpec) -> tuple[dict, SourceFields]:
    cols, tags = spec.columns, spec.tags
    mkey = cols["messages"]
    if not isinstance(raw, dict):
        raise RecordError(f"expected a JSON object with {mkey!r}, got {type(raw).__name__}")
    rid = record_id(raw.get("id"), index, ctx.task)
    try:
        for unsupported in ("tools", "videos", "audios"):
            if raw.get(cols[unsupported]):
                raise RecordError(f"{unsupported} are not supported (image instruction data only)",
                                  field=cols[unsupported])
        if mkey not in raw:
            raise RecordError(f"missing; expected a list of turns (keys present: {sorted(raw)})", field=mkey)
        turns = raw[mkey]
        roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
        tool = "tool-use turns (observation / function_call) are not supported"
        messages = string_turns(turns, field=mkey, role_key=tags["role_tag"], content_key=tags["content_tag"],
                                roles=roles, unsupported={tags["observation_tag"]: tool, tags["function_tag"]: tool})
        turn_fields = [f"{mkey}[{t}]" for t in range(len(messages))]
        system = raw.get(cols["system"])
        if system not in (None, ""):
            if not isinstance(system, str):
                raise RecordError(f"expected a string, got {type(system).__name__}", field=cols["system"])
            if messages[0]["role"] == "system":
                raise RecordError(f"a system prompt in both {cols['system']!r} and the first turn; keep one",
                                  field=cols["system"])
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
            turn_fields.insert(0, cols["system"])
        ikey = cols["images"]
        images_value = raw.get(ikey)
        images = image_list(images_value, field=ikey)
        image_fields = image_field_names(ikey, images_value)
        place_images(messages, len(images), field=mkey, images_field=ikey)
        refs = [ctx.image_ref(v, field=f) for v, f in zip(images, image_fields)]
    except RecordError as e:
        raise RecordError(e.reason, field=e.field, record_id=rid) from None
    fields = SourceFields(messages=mkey, turns=turn_fields, role_key=tags["role_tag"],
                          content_key=tags["content_tag"], images=ikey, image_fields=image_fields,
                          whole_turns=frozenset({0}) if turn_fields[0] == cols["system"] else frozenset())
    return {"id": rid, "task": ctx.task, "images": refs, "messages": messages}, fields
