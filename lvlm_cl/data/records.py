"""The canonical record: one JSON object per line, the only data format the trainer reads.

    {"id": "digits-train-00017", "task": "digits",
     "images": ["images/00017.png"],
     "messages": [
        {"role": "system", "content": [{"type": "text", "text": "..."}]},          # optional, first
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "7"}]}]}

Rules (each broken rule is a ``RecordError`` naming the file, the line, the record id and the field):
- ``id`` is a non-empty string (``int`` ids from LLaVA files are cast by the converters, not here);
- ``task`` is a string (may be empty when the recipe assigns the task);
- ``images`` is a list of relative (or absolute) paths, resolved against the JSONL file's folder
  unless an ``image_root`` is given; the number of ``{"type": "image"}`` parts equals ``len(images)``;
- ``messages``: an optional ``system`` turn first, then ``user`` and ``assistant`` strictly alternating,
  starting with ``user`` and ending with ``assistant``; images only in user turns; no empty turn.

Records are kept as plain dicts (they are what the memory bank stores and what the converters emit).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from lvlm_cl.errors import UserError

ROLES = ("system", "user", "assistant")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class RecordError(ValueError, UserError):
    """A record breaks the canonical format. The message names file, line, id and field."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, line: int | None = None,
                 record_id: str | None = None, field: str | None = None):
        self.path = None if path is None else str(path)
        self.line = line
        self.record_id = record_id
        self.field = field
        self.reason = message
        where = []
        if self.path is not None:
            where.append(f"{self.path}" + (f":{line}" if line is not None else ""))
        elif line is not None:
            where.append(f"line {line}")
        if record_id is not None:
            where.append(f"record {record_id!r}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__((", ".join(where) + ": " if where else "") + message)


@dataclass(frozen=True)
class Problem:
    field: str
    message: str


def record_problems(record: Any) -> list[Problem]:
    """Every structural problem of one record (no file system access). Empty list = valid."""
    if not isinstance(record, dict):
        return [Problem("", f"expected a JSON object, got {type(record).__name__}")]
    problems: list[Problem] = []
    rid = record.get("id")
    if not isinstance(rid, str) or not rid:
        problems.append(Problem("id", f"expected a non-empty string, got {rid!r}"))
    task = record.get("task", "")
    if not isinstance(task, str):
        problems.append(Problem("task", f"expected a string, got {type(task).__name__}"))
    images = record.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        problems.append(Problem("images", "expected a list of non-empty path strings"))
        images = []
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        problems.append(Problem("messages", "expected a non-empty list of turns"))
        return problems
    n_image_parts = 0
    expected = "user"
    for t, turn in enumerate(messages):
        fld = f"messages[{t}]"
        if not isinstance(turn, dict):
            problems.append(Problem(fld, "expected an object with 'role' and 'content'"))
            continue
        role = turn.get("role")
        if role not in ROLES:
            problems.append(Problem(f"{fld}.role", f"expected one of {list(ROLES)}, got {role!r}"))
            continue
        if role == "system":
            if t != 0:
                problems.append(Problem(f"{fld}.role", "a system turn may only come first"))
        elif role != expected:
            problems.append(Problem(f"{fld}.role", f"roles must alternate user/assistant; expected {expected!r}, got {role!r}"))
        else:
            expected = "assistant" if role == "user" else "user"
        content = turn.get("content")
        if not isinstance(content, list) or not content:
            problems.append(Problem(f"{fld}.content", "expected a non-empty list of parts"))
            continue
        has_text = False
        for p, part in enumerate(content):
            pf = f"{fld}.content[{p}]"
            if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
                problems.append(Problem(pf, "expected {'type': 'text', 'text': ...} or {'type': 'image'}"))
                continue
            if part["type"] == "image":
                n_image_parts += 1
                if role != "user":
                    problems.append(Problem(pf, f"images may only appear in user turns, not {role!r}"))
            else:
                text = part.get("text")
                if not isinstance(text, str):
                    problems.append(Problem(f"{pf}.text", "expected a string"))
                elif text.strip():
                    has_text = True
        if role == "assistant" and not has_text:
            problems.append(Problem(f"{fld}.content", "assistant turn has no text"))
        if role == "user" and not has_text and not any(
                isinstance(x, dict) and x.get("type") == "image" for x in content):
            problems.append(Problem(f"{fld}.content", "user turn is empty"))
    last_role = messages[-1].get("role") if isinstance(messages[-1], dict) else None
    if last_role != "assistant":
        problems.append(Problem("messages", "the conversation must end with an assistant turn"))
    if n_image_parts != len(images):
        problems.append(Problem("images", f"{len(images)} image path(s) but {n_image_parts} image placeholder(s) in messages"))
    return problems + surrogate_problems(record)


def surrogate_problems(obj: Any) -> list[Problem]:
    """A problem for every string (and key) of ``obj`` holding a lone surrogate: ``json.loads`` accepts
    ``"\\ud800"``, but such text is not valid Unicode and cannot be written as UTF-8 (nor tokenized)."""
    problems: list[Problem] = []
    todo = [("", obj)]
    while todo:  # not recursive: any nesting json.loads accepts is walked
        name, value = todo.pop()
        if isinstance(value, str):
            if m := LONE_SURROGATE.search(value):
                problems.append(Problem(name, f"lone surrogate {m.group()!r} at character {m.start()}: not valid "
                                              f"Unicode text (an unpaired \\u escape?); it cannot be written as UTF-8"))
        elif isinstance(value, dict):
            for k, v in reversed(value.items()):
                key = f"{name}.{k}" if name else str(k)
                todo += [(key, v), (key, k)]
        elif isinstance(value, list):
            todo += reversed([(f"{name}[{i}]", v) for i, v in enumerate(value)])
    return problems


def check_record(record: Any, *, path=None, line=None) -> dict:
    """Return the record if valid, else raise a ``RecordError`` for its first problem."""
    problems = record_problems(record)
    if problems:
        rid = record.get("id") if isinstance(record, dict) else None
        raise RecordError(problems[0].message, path=path, line=line,
                          record_id=None if rid is None else str(rid), field=problems[0].field or None)
    return record


def iter_jsonl(path: str | os.PathLike, digest=None) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, parsed_object)``; blank lines are skipped; bad JSON or text that is not UTF-8
    raises a RecordError. ``digest`` (a ``hashlib`` object) is updated with the file's bytes as they are read,
    so a fingerprint of the data costs no second read."""
    path = Path(path)
    if not path.is_file():
        raise RecordError("file not found", path=path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if digest is not None:
                digest.update(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecordError(f"not UTF-8 text (byte {e.start}: {e.reason}); save the file as UTF-8", path=path,
                                  line=lineno) from None
            if not text.strip():
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as e:
                raise RecordError(f"invalid JSON: {e.msg} (column {e.colno})", path=path, line=lineno) from None
            except RecursionError:
                raise RecordError("invalid JSON: nested too deeply", path=path, line=lineno) from None


def resolve_image(record_path: str | os.PathLike, image: str, image_root: str | os.PathLike | None = None) -> Path:
    base = Path(image_root) if image_root is not None else Path(record_path).parent
    p = Path(image)
    return p if p.is_absolute() else base / p


def check_image(path: Path, *, record_path=None, line=None, record_id=None, field="images") -> None:
    """The image exists, opens and decodes completely (a truncated file fails here, not mid-training)."""
    from PIL import Image

    if not path.is_file():
        raise RecordError(f"image not found: {path}", path=record_path, line=line, record_id=record_id, field=field)
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # PIL raises several types for unreadable/truncated data
        raise RecordError(f"image cannot be read ({type(e).__name__}: {e}): {path}", path=record_path, line=line,
                          record_id=record_id, field=field) from None


def load_records(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                 check_images: bool = False, task: str | None = None) -> list[dict]:
    """Read and validate a canonical JSONL file.

    Image paths are returned absolute (resolved against ``image_root`` or the file's folder), so records
    can be moved into a memory bank or mixed across files. ``task`` fills records whose task is empty.
    An empty file is an error: a task with no samples is always a mistake in a recipe.
    """
    return list(_validated(path, image_root=image_root, check_images=check_images, task=task))


def load_table(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None, task: str | None = None,
               digest=None) -> "RecordTable":
    """``load_records`` into a ``RecordTable`` (compact; no list of dicts is built), with ``task`` set on every
    record (the recipe's name wins over the file's). ``digest`` is updated with the file's bytes."""
    def named(records):
        for rec in records:
            if task is not None:
                rec["task"] = task
            yield rec
    try:
        return RecordTable(named(_validated(path, image_root=image_root, task=task, digest=digest)))
    except RecordError as e:
        if e.path is not None:
            raise
        raise RecordError(e.reason, path=path, record_id=e.record_id, field=e.field) from None


def _validated(path, *, image_root=None, check_images: bool = False, task: str | None = None,
               digest=None) -> Iterator[dict]:
    seen: dict[str, int] = {}
    empty = True
    for lineno, obj in iter_jsonl(path, digest):
        rec = check_record(obj, path=path, line=lineno)
        if rec["id"] in seen:
            raise RecordError(f"duplicate id (first seen on line {seen[rec['id']]})", path=path, line=lineno,
                              record_id=rec["id"], field="id")
        seen[rec["id"]] = lineno
        rec = dict(rec)
        rec["images"] = [str(resolve_image(path, im, image_root)) for im in rec.get("images", [])]
        if check_images:
            for k, im in enumerate(rec["images"]):
                check_image(Path(im), record_path=path, line=lineno, record_id=rec["id"], field=f"images[{k}]")
        if task is not None and not rec.get("task"):
            rec["task"] = task
        empty = False
        yield rec
    if empty:
        raise RecordError("no records (the file is empty)", path=path)


def _encoded(record: dict) -> bytes:
    try:
        return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        raise RecordError("holds a lone surrogate (half of a UTF-16 pair), which is not a character",
                          record_id=record.get("id")) from None


class RecordTable(Sequence):
    """Records kept as one buffer of their JSON texts and an array of offsets: a few hundred bytes a record
    instead of a tree of Python objects, and nothing a DataLoader worker's reads copy page by page (a list
    of dicts shared with forked workers is copied into each of them as it is read). Indexing parses one
    record (a fresh dict each time: change a record by building a new table). Slices and ``+`` give tables.

    ``lengths`` (optional, int32, one per record): the records' token counts as the run uses them (training
    encodings, or prompts for a test split), filled by the start's check and carried by slices and ``+``
    (-1 for records added without them).
    """

    def __init__(self, records: Iterable[dict] = (), *, _buffer: bytes | None = None, _offsets=None, lengths=None):
        import numpy as np

        if _buffer is None:
            parts = [_encoded(r) for r in records]
            _offsets = np.zeros(len(parts) + 1, dtype=np.int64)
            np.cumsum([len(x) for x in parts], out=_offsets[1:])
            _buffer = b"".join(parts)
        self._buffer, self._offsets = _buffer, _offsets
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(range(*index.indices(len(self))))
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"record {index} of {n}")
        return json.loads(self._buffer[self._offsets[index]:self._offsets[index + 1]])

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def take(self, indices) -> "RecordTable":
        """The records at ``indices`` (and their lengths), as a new table."""
        import numpy as np

        idx = np.asarray(list(indices), dtype=np.int64)
        if idx.size == len(self) and (idx == np.arange(len(self))).all():
            return self
        starts, ends = self._offsets[idx], self._offsets[idx + 1]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(ends - starts, out=offsets[1:])
        buffer = b"".join(self._buffer[a:b] for a, b in zip(starts.tolist(), ends.tolist()))
        lengths = None if self.lengths is None else self.lengths[idx]
        return RecordTable(_buffer=buffer, _offsets=offsets, lengths=lengths)

    def __add__(self, other):
        import numpy as np

        other = other if isinstance(other, RecordTable) else RecordTable(other)
        offsets = np.concatenate([self._offsets, other._offsets[1:] + self._offsets[-1]])
        lengths = None
        if self.lengths is not None or other.lengths is not None:      # -1 where a side's are not counted
            lengths = np.concatenate([t.lengths if t.lengths is not None else np.full(len(t), -1, dtype=np.int32)
                                      for t in (self, other)])
        return RecordTable(_buffer=self._buffer + other._buffer, _offsets=offsets, lengths=lengths)

    def __radd__(self, other):
        return RecordTable(other) + self

    def __eq__(self, other):
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        return f"RecordTable({len(self)} records, {len(self._buffer)} bytes)"


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Write records atomically (temporary file in the same folder, then rename)."""
    from lvlm_cl.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def user_text(record: dict) -> str:
    """The text of the first user turn (the instruction), used for routing and reports."""
    for turn in record["messages"]:
        if turn["role"] == "user":
            return " ".join(p["text"] for p in turn["content"] if p["type"] == "text").strip()
    return ""


def final_answer(record: dict) -> str:
    """The text of the last assistant turn: the reference answer for evaluation."""
    turn = record["messages"][-1]
    return " ".join(p["text"] for p in turn["content"] if p["type"] == "text").strip()
