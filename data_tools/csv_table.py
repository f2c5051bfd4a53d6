"""VQA-style tables: one row per sample with image, question and answer columns (CSV, or TSV by extension).

    id,image,question,answer
    q1,images/cat.png,What animal is this?,cat

The question becomes the user turn with the image first (or where an ``<image>`` token in it says), the
answer the assistant turn. An empty image cell makes a text-only record. Column names are options:
``--image-column image --question-column question --answer-column answer --id-column id`` (an absent
``id`` column gives ids ``<task>-<row>``; ``--image-column ''`` for a table without images).

    python -m data_tools convert --from csv data/vqa.csv --output data/vqa.jsonl
"""

from __future__ import annotations

import codecs
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from lvlm_cl.data.records import RecordError

from data_tools.conversion import Context, SourceFields, SourceItem
from data_tools.sources import check_not_utf16, decode
from data_tools.turns import place_images, record_id, text_to_parts

# A cell holds a whole answer or an inline image, often more than the csv module's default 128 KiB limit.
csv.field_size_limit(2**31 - 1)  # the largest value every platform's C long takes


@dataclass
class QAColumns:
    question: str = "question"
    answer: str = "answer"
    image: str = "image"      # "" = no image column
    id: str | None = None     # None = "id" when present, else generated ids

    def check(self, available: list[str], *, where: str | Path, id_given: bool) -> "QAColumns":
        """Fail early, naming the file and the columns it has, when a needed column is absent."""
        needed = [("question", self.question), ("answer", self.answer)]
        if self.image:
            needed.append(("image", self.image))
        if id_given and self.id:
            needed.append(("id", self.id))
        for what, name in needed:
            if name not in available:
                hint = " (or --image-column '' for a table without images)" if what == "image" else ""
                raise RecordError(f"no {what} column {name!r}; columns are {available}; "
                                  f"choose one with --{what}-column NAME{hint}", path=where)
        id_col = self.id if id_given else ("id" if "id" in available else None)
        return QAColumns(self.question, self.answer, self.image, id_col)


def qa_to_record(row: dict, index: int, ctx: Context, *, columns: QAColumns) -> tuple[dict, SourceFields]:
    rid = record_id(row.get(columns.id) if columns.id else None, index, ctx.task, field=columns.id or "id")
    try:
        question, answer = row.get(columns.question), row.get(columns.answer)
        for name, value in ((columns.question, question), (columns.answer, answer)):
            if not isinstance(value, str):
                raise RecordError(f"expected text, got {value!r}", field=name)
        image = row.get(columns.image) if columns.image else None
        has_image = image is not None and not (isinstance(image, str) and not image.strip())
        messages = [{"role": "user", "content": text_to_parts(question, field=columns.question, images_allowed=True)},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        place_images(messages, int(has_image), field=columns.question, images_field=columns.image)
        refs = [ctx.image_ref(image, field=columns.image)] if has_image else []
    except RecordError as e:
        raise RecordError(e.reason, field=e.field, record_id=rid) from None
    fields = SourceFields(id=columns.id or "id", messages=columns.question, turns=[columns.question, columns.answer],
                          role_key=None, content_key=None, images=columns.image, image_fields=[columns.image])
    return {"id": rid, "task": ctx.task, "images": refs, "messages": messages}, fields


def _text_lines(path: Path, f: BinaryIO) -> Iterator[str]:
    """The lines of ``f`` as text for ``csv.reader`` (ends kept; ``\\r``, ``\\n`` and ``\\r\\n`` end a line, as
    with ``newline=""``), decoded one by one so that bytes that are not UTF-8 are reported with their line."""
    lineno = 0
    for chunk in f:
        if lineno == 0:
            check_not_utf16(path, chunk)
            chunk = chunk.removeprefix(codecs.BOM_UTF8)
        for raw in chunk.splitlines(keepends=True):
            lineno += 1
            yield decode(raw, path=path, line=lineno)


def _csv_error(path: Path, e: csv.Error, line: int) -> RecordError:
    return RecordError(f"unreadable table row: {e}", path=path, line=line)


def iter_csv_items(path: Path, columns: QAColumns, *, id_given: bool) -> tuple[QAColumns, Iterator[SourceItem]]:
    """Check the header now; rows are read lazily. Lines count from 1 and include the header."""
    if not path.is_file():
        raise RecordError("file not found", path=path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, "rb") as f:
        reader = csv.reader(_text_lines(path, f), delimiter=delimiter)
        try:
            header = next(reader, None)
        except csv.Error as e:
            raise _csv_error(path, e, reader.line_num) from None
    if not header:
        raise RecordError("no header row; expected column names on the first line", path=path)
    columns = columns.check(header, where=path, id_given=id_given)

    def items() -> Iterator[SourceItem]:
        with open(path, "rb") as f:
            reader = csv.DictReader(_text_lines(path, f), delimiter=delimiter)
            start = 2
            try:
                for index, row in enumerate(reader):
                    item = SourceItem(raw=row, index=index, where=str(path), line=start)
                    if None in row:  # more cells than header columns
                        item.raw = {k: v for k, v in row.items() if k is not None} | {"<extra cells>": row[None]}
                        item.error = RecordError(f"{len(header) + len(row[None])} cells but {len(header)} columns")
                    yield item
                    start = reader.line_num + 1
            except csv.Error as e:  # DictReader's own line_num is the last row read well
                raise _csv_error(path, e, reader.reader.line_num) from None

    return columns, items()
