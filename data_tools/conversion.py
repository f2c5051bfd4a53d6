"""The conversion driver shared by every converter: input records -> canonical records or rejects.

A converter is two things: a reader that yields ``SourceItem`` (the original record and where it came from)
and a function ``to_record(raw, index, ctx) -> (record, SourceFields)`` that raises ``RecordError`` (without
a location; the driver adds file, line and id). The driver then

1. turns image references into output paths (``ImageFile``: relative to the output folder when the image lies
   under it, else absolute; ``ImageData``: a PNG written under ``<output folder>/images/<task>/``),
2. checks the record with ``record_problems`` (lone surrogates included; fields translated back to the input's
   names), duplicate ids, and the images (exist, open, not truncated: ``check_image``),
3. stops at the first invalid record, or with ``skip_invalid`` sends it to ``OUT.rejects.jsonl`` with reasons,
4. writes the output atomically; the PNG files it wrote appear only when it succeeds (``ImageWriter``).
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from lvlm_cl.data.records import LONE_SURROGATE, Problem, RecordError, check_image, record_problems, write_jsonl
from lvlm_cl.io import atomic_save, atomic_write_text


@dataclass(frozen=True)
class ImageFile:
    """An image that already lies on disk (absolute path)."""
    path: Path


@dataclass(frozen=True)
class ImageData:
    """Image content (encoded bytes or a PIL image) to be written out as a PNG file."""
    data: Any


@dataclass
class SourceItem:
    raw: Any                    # the original record, kept for the rejects file
    index: int                  # 0-based position in the input
    where: str                  # the input, as errors name it
    line: int | None = None     # line in the input file, when it has lines
    error: RecordError | None = None  # the item could not even be read (bad JSON line)


@dataclass
class SourceFields:
    """How canonical field names map back to the input's, so errors name what the user wrote."""
    id: str = "id"
    messages: str = "messages"
    turns: list[str] = field(default_factory=list)   # input path of each canonical turn
    role_key: str | None = "role"                     # None: the turn path itself names the role
    content_key: str | None = "content"
    content_is_list: bool = False                     # keep ".content[p]..." suffixes
    whole_turns: frozenset[int] = frozenset()         # turns whose path is a plain text field (a system column)
    images: str = "images"
    image_fields: list[str] = field(default_factory=list)

    def translate(self, canonical: str) -> str:
        m = re.fullmatch(r"messages\[(\d+)\](?:\.(role|content))?(.*)", canonical)
        if m and int(m.group(1)) < len(self.turns):
            name = self.turns[int(m.group(1))]
            if int(m.group(1)) in self.whole_turns:
                return name
            if m.group(2) == "role":
                return f"{name}.{self.role_key}" if self.role_key else name
            if m.group(2) == "content":
                if not self.content_key:
                    return name
                return f"{name}.{self.content_key}" + (m.group(3) if self.content_is_list else "")
            return name + m.group(3)
        if canonical == "messages":
            return self.messages
        if canonical == "id":
            return self.id
        m = re.fullmatch(r"images\[(\d+)\]", canonical)
        if m and int(m.group(1)) < len(self.image_fields):
            return self.image_fields[int(m.group(1))]
        if canonical == "images":
            return self.images
        return canonical


def image_field_names(name: str, value: Any) -> list[str]:
    """``["image"]`` for a single image value, ``["images[0]", ...]`` for a list."""
    if isinstance(value, list):
        return [f"{name}[{k}]" for k in range(len(value))]
    return [name]


@dataclass
class Context:
    """What a converter needs to know about the conversion as a whole."""
    input_path: Path
    output_path: Path
    task: str
    image_root: Path
    check_images: bool = True

    @property
    def output_dir(self) -> Path:
        return Path(os.path.abspath(self.output_path)).parent

    def image_ref(self, value: Any, *, field: str) -> ImageFile | ImageData:
        """An input image reference: a path (relative to ``image_root``), a ``file://`` or ``data:`` URL,
        encoded bytes, a ``{"bytes", "path"}`` dict (Hugging Face ``Image`` feature) or a PIL image."""
        if isinstance(value, dict) and ("bytes" in value or "path" in value):
            value = value["bytes"] if value.get("bytes") else value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return ImageData(bytes(value))
        if hasattr(value, "save") and hasattr(value, "mode"):  # a PIL image
            return ImageData(value)
        if not isinstance(value, str) or not value.strip():
            raise RecordError(f"expected an image path, got {value!r}", field=field)
        if value.startswith("data:"):
            header, _, payload = value.partition(",")
            if not header.endswith(";base64"):
                raise RecordError("expected a base64 data URL (data:image/...;base64,...)", field=field)
            try:
                return ImageData(base64.b64decode(payload, validate=True))
            except ValueError:
                raise RecordError("invalid base64 in data URL", field=field) from None
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", value):
            if not value.startswith("file://"):
                raise RecordError(f"remote images are not downloaded: {value}; download them and give local "
                                  f"paths (relative to --image-root)", field=field)
            value = value[len("file://"):]
        p = Path(value)
        return ImageFile(Path(os.path.abspath(p if p.is_absolute() else self.image_root / p)))


def path_for_output(path: str | os.PathLike, folder: str | os.PathLike) -> str:
    """``path`` relative to ``folder`` when it lies under it (POSIX separators), else absolute."""
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    if path.is_relative_to(folder):
        return path.relative_to(folder).as_posix()
    return str(path)


def rejects_path(output: str | os.PathLike) -> Path:
    """``OUT.jsonl`` -> ``OUT.rejects.jsonl``."""
    output = Path(output)
    stem = output.name[:-len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(stem + ".rejects.jsonl")


def safe_name(text: str) -> str:
    """A file-name-safe version of an id or task; a short hash keeps distinct ids distinct."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text)[:80] or "_"
    if cleaned != text:
        cleaned += "-" + hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return cleaned


def json_line(obj: Any) -> str:
    """``obj`` as one line of JSON; text with lone surrogates is written \\u-escaped (it reads back the same)."""
    line = json.dumps(obj, ensure_ascii=False)
    return json.dumps(obj) if LONE_SURROGATE.search(line) else line


def json_safe(obj: Any) -> Any:
    """The original record in a form JSON can hold (image bytes and PIL images are described, not dumped)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (bytes, bytearray)):
        return f"<{len(obj)} bytes>"
    if hasattr(obj, "save") and hasattr(obj, "size") and hasattr(obj, "mode"):
        return f"<image {obj.mode} {obj.size[0]}x{obj.size[1]}>"
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return repr(obj)


def write_png(data: Any, dest: Path) -> None:
    """Decode ``data`` (bytes or PIL image) completely and write it as PNG, atomically."""
    from PIL import Image

    im = Image.open(io.BytesIO(data)) if isinstance(data, (bytes, bytearray)) else data
    im.load()
    if im.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
        im = im.convert("RGB")
    atomic_save(dest, lambda tmp: im.save(tmp, format="PNG"))


class ImageWriter:
    """The PNG files of one conversion: written to a hidden folder in the output folder and moved to their
    names only when the conversion succeeds; ``rollback`` puts back what was there before."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.staging: Path | None = None
        self.files: dict[Path, Path] = {}                  # final name -> written file
        self.moved: list[tuple[Path, Path | None]] = []    # final name, the file it replaced (kept aside)
        self._names = itertools.count()

    def write(self, data: Any, dest: Path) -> None:
        if self.staging is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=".images-", dir=self.folder))
        tmp = self.staging / f"{next(self._names)}.png"
        write_png(data, tmp)
        self.files[dest] = tmp

    def drop(self, dest: Path) -> None:
        self.files.pop(dest).unlink(missing_ok=True)

    def commit(self) -> None:
        """Move the images to their names; a file found there is kept aside in the hidden folder until the end."""
        for dest, tmp in self.files.items():
            dest.parent.mkdir(parents=True, exist_ok=True)
            old = tmp.with_suffix(".old") if os.path.lexists(dest) else None
            if old is not None:
                os.replace(dest, old)
            self.moved.append((dest, old))
            os.replace(tmp, dest)

    def rollback(self) -> None:
        for dest, old in reversed(self.moved):
            if old is None:
                dest.unlink(missing_ok=True)
            else:
                os.replace(old, dest)

    def cleanup(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)


@dataclass
class ConversionResult:
    records: list[dict]
    rejected: int
    rejects_file: Path | None


ToRecord = Callable[[Any, int, Context], "tuple[dict, SourceFields]"]


def _finish(record: dict, fields: SourceFields, ctx: Context, seen: dict[str, str], loc: str,
            images: ImageWriter) -> list[Problem]:
    """Resolve image paths, check the record, write/check its images. Returns its problems (empty = ok)."""
    refs = record["images"]
    dests: list[Path | None] = []
    paths = []
    for k, ref in enumerate(refs):
        if isinstance(ref, ImageData):
            dest = ctx.output_dir / "images" / safe_name(ctx.task) / f"{safe_name(record['id'])}_{k}.png"
            dests.append(dest)
            paths.append(path_for_output(dest, ctx.output_dir))
        else:
            dests.append(None)
            paths.append(path_for_output(ref.path, ctx.output_dir))
    record["images"] = paths
    problems = [Problem(fields.translate(p.field), p.message)
                for p in record_problems(record)]
    if problems:
        return problems
    if record["id"] in seen:
        return [Problem(fields.translate("id"), f"duplicate id (first seen at {seen[record['id']]})")]
    written = []
    for k, (ref, dest) in enumerate(zip(refs, dests)):
        fld = fields.translate(f"images[{k}]")
        if dest is not None:
            try:
                images.write(ref.data, dest)
                written.append(dest)
            except Exception as e:  # PIL raises several types for undecodable data
                problems.append(Problem(fld, f"image cannot be decoded ({type(e).__name__}: {e})"))
        elif ctx.check_images:
            try:
                check_image(ref.path)
            except RecordError as e:
                problems.append(Problem(fld, e.reason))
    if problems:  # a rejected record leaves no image files behind
        for dest in written:
            images.drop(dest)
    else:
        seen[record["id"]] = loc
    return problems


def _reject_copy(raw: Any) -> Any:
    try:
        return json_safe(raw)
    except RecursionError:  # nesting that json.loads just accepted
        return "<nested too deeply to copy; see the input at this line>"


def _raw_id(raw: Any) -> str | None:
    return str(raw["id"]) if isinstance(raw, dict) and raw.get("id") not in (None, "") else None


def convert(items: Iterable[SourceItem], to_record: ToRecord, ctx: Context, *,
            skip_invalid: bool = False) -> ConversionResult:
    """Convert every item; write ``ctx.output_path`` (and the rejects file) atomically.

    Raises ``RecordError`` on the first invalid record unless ``skip_invalid``; raises as well when no
    record at all is valid (an empty task is always a mistake). A conversion that fails leaves no image.
    """
    images = ImageWriter(ctx.output_dir)
    try:
        return _convert(items, to_record, ctx, skip_invalid, images)
    except BaseException:
        images.rollback()
        raise
    finally:
        images.cleanup()


def _convert(items: Iterable[SourceItem], to_record: ToRecord, ctx: Context, skip_invalid: bool,
             images: ImageWriter) -> ConversionResult:
    records: list[dict] = []
    rejects: list[dict] = []
    seen: dict[str, str] = {}
    n_items = 0
    for item in items:
        n_items += 1
        loc = f"line {item.line}" if item.line is not None else item.where
        rid = _raw_id(item.raw)
        if item.error is not None:
            problems = [Problem(item.error.field or "", item.error.reason)]
        else:
            try:
                record, fields = to_record(item.raw, item.index, ctx)
            except RecordError as e:
                problems = [Problem(e.field or "", e.reason)]
                rid = e.record_id or rid
            else:
                rid = record["id"]
                problems = _finish(record, fields, ctx, seen, loc, images)
        if not problems:
            records.append(record)
            continue
        if not skip_invalid:
            first = problems[0]
            raise RecordError(first.message, path=item.where, line=item.line, record_id=rid,
                              field=first.field or None)
        rejects.append({"source": item.where, "line": item.line, "id": rid, "record": _reject_copy(item.raw),
                        "reasons": [(f"field {p.field!r}: " if p.field else "") + p.message for p in problems]})
    if n_items == 0:
        raise RecordError("no records (the input is empty)", path=ctx.input_path)
    rfile = rejects_path(ctx.output_path)
    if rejects:
        atomic_write_text(rfile, "".join(json_line(r) + "\n" for r in rejects))
    elif rfile.exists():  # a stale rejects file from an earlier run would describe records that are fine now
        rfile.unlink()
    if not records:
        raise RecordError(f"no valid records: all {len(rejects)} rejected, see {rfile}", path=ctx.input_path)
    images.commit()
    write_jsonl(ctx.output_path, records)
    return ConversionResult(records, len(rejects), rfile if rejects else None)
