"""Reading inputs as text: JSON record by record, keeping the line each record starts on (for error messages).

A ``.json`` file holding a list (LLaVA, LLaMA-Factory) and a JSON-lines file are both accepted, whatever
their extension. In a JSON-lines file a line that is not valid JSON (or not UTF-8) becomes a rejectable item;
in a JSON list a syntax error stops the reading (the rest of the file cannot be located). Every reader of
``data_tools`` decodes through here, so text that is not UTF-8 is an error naming its file and line.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any, Iterator

from lvlm_cl.data.records import RecordError

from data_tools.conversion import SourceItem

_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
              (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def check_not_utf16(path: Path, head: bytes) -> None:
    """A file saved as UTF-16 (Windows' "Unicode") or UTF-32 is named as such rather than read as garbage."""
    for bom, name in _WIDE_BOMS:
        if head.startswith(bom):
            raise RecordError(f"the file is {name} text (it starts with a {name} byte order mark); "
                              f"save it as UTF-8", path=path)
    if b"\0" in head[:2]:  # text never starts with NUL; UTF-16 without a byte order mark does
        raise RecordError("the file looks like UTF-16 text (NUL bytes at its start); save it as UTF-8", path=path)


def decode(data: bytes, *, path: Path | None = None, line: int = 1) -> str:
    """UTF-8 bytes (starting on ``line``) as text, else a ``RecordError`` naming the line of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        column = e.start - data.rfind(b"\n", 0, e.start) - 1
        raise RecordError(f"not UTF-8 text (byte {column} of the line: {e.reason}); save the file as UTF-8",
                          path=path, line=line + data.count(b"\n", 0, e.start)) from None


def loads(text: str) -> Any:
    """``json.loads``; nesting too deep for Python's parser is a ``JSONDecodeError`` too, not a RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text, 0) from None


def json_lines(data: bytes) -> Iterator[tuple[int, Any, RecordError | None]]:
    """``(line, value, None)`` for every non-blank line of JSON-lines bytes; a line that is not UTF-8 or not
    JSON gives ``(line, its text, problem)`` instead of stopping the reading. Lines end at ``\\n`` only (as
    ``lvlm_cl`` reads them: U+2028 inside a JSON string is not a line break)."""
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = decode(raw)
        except RecordError as e:
            yield lineno, raw.decode("utf-8", "backslashreplace"), RecordError(e.reason)
            continue
        if not text.strip():
            continue
        try:
            value = loads(text)
        except json.JSONDecodeError as e:
            yield lineno, text, RecordError(f"invalid JSON: {e.msg} (column {e.colno})")
        else:
            yield lineno, value, None


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
        except RecursionError:
            raise RecordError("invalid JSON: nested too deeply", path=path, line=line_at(i)) from None
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
    data = path.read_bytes()
    check_not_utf16(path, data)
    data = data.removeprefix(codecs.BOM_UTF8)
    start = len(data) - len(data.lstrip(b" \t\r\n"))
    if data[start:start + 1] == b"[":
        yield from _json_list(path, decode(data, path=path), start)
        return
    if data[start:start + 1] == b"{" and b"\n" in data.strip():
        try:  # a single pretty-printed object
            obj = loads(decode(data))
        except (RecordError, json.JSONDecodeError):
            pass
        else:
            yield SourceItem(raw=obj, index=0, where=str(path), line=data.count(b"\n", 0, start) + 1)
            return
    for index, (lineno, raw, error) in enumerate(json_lines(data)):
        yield SourceItem(raw=raw, index=index, where=str(path), line=lineno, error=error)
