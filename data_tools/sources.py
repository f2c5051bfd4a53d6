"""Reading JSON inputs record by record, keeping the line each record starts on (for error messages).

A ``.json`` file holding a list (LLaVA, LLaMA-Factory) and a JSON-lines file are both accepted, whatever
their extension. In a JSON-lines file a line that is not valid JSON becomes a rejectable item; in a JSON
list a syntax error stops the reading (the rest of the file cannot be located).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from lvlm_cl.data.records import RecordError

from data_tools.conversion import SourceItem


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _json_list(path: Path, text: str, start: int) -> Iterator[SourceItem]:
    decoder = json.JSONDecoder()
    i, line, counted, index = start + 1, 1, 0, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    i = _skip_ws(text, i)
    if i < len(text) and text[i] == "]":
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise RecordError(f"invalid JSON: {e.msg}", path=path, line=line_at(e.pos)) from None
        yield SourceItem(raw=obj, index=index, where=str(path), line=line_at(i))
        index += 1
        i = _skip_ws(text, end)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
            continue
        if i < len(text) and text[i] == "]":
            break
        raise RecordError("invalid JSON: expected ',' or ']' after a record", path=path, line=line_at(min(i, len(text))))
    if _skip_ws(text, i + 1) != len(text):
        raise RecordError("invalid JSON: extra data after the closing ']'", path=path, line=line_at(i))


def iter_json_items(path: str | Path) -> Iterator[SourceItem]:
    """Yield one ``SourceItem`` per record of a JSON list, a single JSON object, or a JSON-lines file."""
    path = Path(path)
    if not path.is_file():
        raise RecordError("file not found", path=path)
    text = path.read_text(encoding="utf-8-sig")
    start = _skip_ws(text, 0)
    if start < len(text) and text[start] == "[":
        yield from _json_list(path, text, start)
        return
    if start < len(text) and text[start] == "{" and "\n" in text.strip():
        try:  # a single pretty-printed object
            obj = json.loads(text)
        except json.JSONDecodeError:
            pass
        else:
            yield SourceItem(raw=obj, index=0, where=str(path), line=text.count("\n", 0, start) + 1)
            return
    index = 0
    for lineno, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            yield SourceItem(raw=raw, index=index, where=str(path), line=lineno,
                             error=RecordError(f"invalid JSON: {e.msg} (column {e.colno})"))
        else:
            yield SourceItem(raw=obj, index=index, where=str(path), line=lineno)
        index += 1
