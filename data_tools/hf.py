"""Hugging Face datasets on disk: a ``save_to_disk`` folder, or parquet files (a file or a folder of them).

Two row shapes are understood:
- chat rows: a messages column (``messages`` or ``conversations`` by default) holding TRL/OpenAI turns
  (``role``/``content``) or LLaVA turns (``from``/``value``), and an images column (``images`` or ``image``);
- VQA rows: question, answer and image columns, as for ``--from csv``.

Image values (the ``Image`` feature, PIL images, ``{"bytes", "path"}`` dicts) are decoded here, so a
corrupt image rejects its row instead of stopping the reading, and written as PNG files under
``<output folder>/images/<task>/<id>_<k>.png``. Only local files are read; nothing is downloaded.

    python -m data_tools convert --from hf data/my_saved_dataset --split train --output data/mytask.jsonl
    python -m data_tools convert --from hf data/vqa.parquet --question-column q --answer-column a --output out.jsonl
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from lvlm_cl.data.records import RecordError

from data_tools.conversion import Context, SourceItem
from data_tools.csv_table import QAColumns, qa_to_record
from data_tools.llava import llava_to_record
from data_tools.messages import messages_to_record

SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class HFOptions:
    split: str | None = None
    messages_column: str | None = None
    images_column: str | None = None
    question_column: str | None = None
    answer_column: str | None = None
    image_column: str | None = None
    id_column: str | None = None


def _no_decode(feature: Any) -> Any:
    """The same features with every ``Image`` left undecoded (``{"bytes", "path"}``)."""
    import datasets

    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    if isinstance(feature, datasets.List):
        return datasets.List(_no_decode(feature.feature), length=feature.length)
    if isinstance(feature, datasets.LargeList):
        return datasets.LargeList(_no_decode(feature.feature))
    if isinstance(feature, dict):
        return type(feature)({k: _no_decode(v) for k, v in feature.items()})
    return feature


def _load(path: Path, split: str | None, cache_dir: str):
    import datasets

    if path.is_dir() and any((path / m).exists() for m in SAVED_MARKERS):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split is None and len(ds) != 1:
                raise RecordError(f"the dataset has splits {sorted(ds)}; choose one with --split", path=path)
            split = split or next(iter(ds))
            if split not in ds:
                raise RecordError(f"no split {split!r}; splits are {sorted(ds)}", path=path)
            ds = ds[split]
        elif split is not None:
            raise RecordError("--split applies to a saved DatasetDict; this is a single Dataset", path=path)
        return ds
    if split is not None:
        raise RecordError("--split applies to a saved DatasetDict, not to parquet files", path=path)
    if path.is_file() and path.suffix == ".parquet":
        files = [path]
    elif path.is_dir():
        files = sorted(path.rglob("*.parquet"))
    else:
        raise RecordError("not found" if not path.exists() else
                          "expected a save_to_disk folder, a .parquet file or a folder of .parquet files", path=path)
    if not files:
        raise RecordError("no .parquet files and no save_to_disk dataset in this folder", path=path)
    return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", cache_dir=cache_dir)


def _row_converter(columns: list[str], path: Path, opts: HFOptions) -> Callable:
    qa_given = any(v is not None for v in (opts.question_column, opts.answer_column, opts.image_column))
    chat_column = opts.messages_column or next((c for c in ("messages", "conversations") if c in columns), None)
    if qa_given or (chat_column is None and {"question", "answer"} <= set(columns)):
        qa = QAColumns(question=opts.question_column or "question", answer=opts.answer_column or "answer",
                       image="image" if opts.image_column is None else opts.image_column, id=opts.id_column)
        qa = qa.check(columns, where=path, id_given=opts.id_column is not None)
        return lambda row, index, ctx: qa_to_record(row, index, ctx, columns=qa)
    if chat_column is None or chat_column not in columns:
        raise RecordError(f"no messages column {chat_column or 'messages'!r}; columns are {columns}; choose one with "
                          f"--messages-column, or --question-column/--answer-column/--image-column for VQA rows",
                          path=path)
    images_column = opts.images_column or next((c for c in ("images", "image") if c in columns), "images")
    if opts.images_column is not None and opts.images_column not in columns:
        raise RecordError(f"no images column {opts.images_column!r}; columns are {columns}", path=path)
    id_column = opts.id_column or "id"
    if opts.id_column is not None and opts.id_column not in columns:
        raise RecordError(f"no id column {opts.id_column!r}; columns are {columns}", path=path)

    def convert_row(row: dict, index: int, ctx: Context):
        turns = row.get(chat_column)
        first = turns[0] if isinstance(turns, list) and turns else None
        if isinstance(first, dict) and first.get("from") is not None and first.get("role") is None:
            return llava_to_record(row, index, ctx, conversations_key=chat_column, image_key=images_column,
                                   id_key=id_column)
        return messages_to_record(row, index, ctx, messages_key=chat_column, images_key=images_column,
                                  id_key=id_column)

    return convert_row


def open_hf(path: Path, opts: HFOptions) -> tuple[Callable, Iterator[SourceItem]]:
    """``(to_record, items)`` for a dataset on disk. The column layout is checked before any row is read."""
    import datasets

    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    cache = tempfile.TemporaryDirectory(prefix="data_tools_hf_")
    try:
        ds = _load(path, opts.split, cache.name)
        undecoded = datasets.Features(_no_decode(ds.features))
        if undecoded != ds.features:
            ds = ds.cast(undecoded)
        to_record = _row_converter(ds.column_names, path, opts)
    except BaseException:
        cache.cleanup()
        raise
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()

    def items() -> Iterator[SourceItem]:
        try:
            for index, row in enumerate(ds):
                yield SourceItem(raw=row, index=index, where=f"{path}, row {index}")
        finally:
            cache.cleanup()

    return to_record, items()
