"""``stats``: what is in a canonical JSONL file: records, tasks, images, rounds, answer and token lengths.

    python -m data_tools stats data/mytask.jsonl [--model tiny] [--json]
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

from lvlm_cl.data.records import load_records

from data_tools.tokens import TokenCounter
from data_tools.validate import check_file


def _spread(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _text(turn: dict) -> str:
    return " ".join(p["text"] for p in turn["content"] if p["type"] == "text").strip()


def file_stats(path: str | Path, *, image_root: str | Path | None = None,
               tokens: TokenCounter | None = None) -> dict:
    """Statistics of a valid canonical file (an invalid one raises ``RecordError``: run ``validate``)."""
    check_file(path)
    records = load_records(path, image_root=image_root)
    answers = [_text(m) for r in records for m in r["messages"] if m["role"] == "assistant"]
    per_record = Counter(len(r.get("images", [])) for r in records)
    stats = {
        "file": str(path),
        "records": len(records),
        "tasks": dict(sorted(Counter(r.get("task") or "(none)" for r in records).items())),
        "images": sum(len(r.get("images", [])) for r in records),
        "images_per_record": {str(k): per_record[k] for k in sorted(per_record)},
        "text_only": per_record.get(0, 0),
        "with_system_prompt": sum(1 for r in records if r["messages"][0]["role"] == "system"),
        "rounds_per_record": _spread([sum(1 for m in r["messages"] if m["role"] == "assistant") for r in records]),
        "answer_chars": _spread([len(a) for a in answers]),
        "answer_words": _spread([len(a.split()) for a in answers]),
    }
    if tokens is not None:
        lengths = [tokens.count(r) for r in records]
        stats["tokens"] = _spread(lengths)
        stats["max_length"] = tokens.max_length
        stats["over_max_length"] = sum(1 for n in lengths if n > tokens.max_length)
    return stats


def _fmt(spread: dict | None) -> str:
    if spread is None:
        return "-"
    return ", ".join(f"{k} {v:g}" for k, v in spread.items())


def format_stats(stats: dict) -> str:
    rows = [
        ("file", stats["file"]),
        ("records", str(stats["records"])),
        ("tasks", ", ".join(f"{t}: {n}" for t, n in stats["tasks"].items())),
        ("images", str(stats["images"])),
        ("images per record", ", ".join(f"{k} image(s): {n}" for k, n in stats["images_per_record"].items())),
        ("text-only records", str(stats["text_only"])),
        ("with system prompt", str(stats["with_system_prompt"])),
        ("rounds per record", _fmt(stats["rounds_per_record"])),
        ("answer chars", _fmt(stats["answer_chars"])),
        ("answer words", _fmt(stats["answer_words"])),
    ]
    if "tokens" in stats:
        rows.append(("tokens", _fmt(stats["tokens"])))
        rows.append(("over max length", f"{stats['over_max_length']} (max length {stats['max_length']})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
