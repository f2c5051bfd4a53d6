"""``split``: a deterministic train/eval split of a canonical JSONL file.

A record goes to eval when its hash ``sha256(seed, id)`` ranks among the lowest ``round(n * fraction)``
(at least one record on each side). The split depends only on the seed and the set of ids, not on the
line order or the Python version. Records are written unchanged, except that relative image paths are
rewritten for ``--output-dir`` when it is not the input's folder (with ``--image-root`` they stay as they
are: they are relative to that root wherever the file lies).

    python -m data_tools split data/mytask.jsonl --eval-fraction 0.1 --seed 0
    # -> data/mytask.train.jsonl, data/mytask.eval.jsonl
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from lvlm_cl.data.records import RecordError, iter_jsonl, load_records, write_jsonl

from data_tools.validate import check_file


@dataclass
class SplitResult:
    train_path: Path
    eval_path: Path
    n_train: int
    n_eval: int


def split_names(path: Path, output_dir: Path | None) -> tuple[Path, Path]:
    stem = path.name[:-len(".jsonl")] if path.name.endswith(".jsonl") else path.stem
    folder = output_dir if output_dir is not None else path.parent
    return folder / f"{stem}.train.jsonl", folder / f"{stem}.eval.jsonl"


def _rank_key(seed: int, record_id: str) -> str:
    return hashlib.sha256(f"{seed}\0{record_id}".encode("utf-8")).hexdigest()


def split_file(path: str | Path, eval_fraction: float, seed: int = 0, *, output_dir: str | Path | None = None,
               image_root: str | Path | None = None) -> SplitResult:
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    path = Path(path)
    check_file(path)
    resolved = load_records(path, image_root=image_root)  # validated; image paths made absolute
    records = [obj for _, obj in iter_jsonl(path)]        # the same records, as written
    if len(records) < 2:
        raise RecordError(f"{len(records)} record(s): a split needs at least 2", path=path)
    n_eval = min(max(1, round(len(records) * eval_fraction)), len(records) - 1)
    ranked = sorted(range(len(records)), key=lambda i: _rank_key(seed, records[i]["id"]))
    eval_indices = set(ranked[:n_eval])
    train_path, eval_path = split_names(path, Path(output_dir) if output_dir is not None else None)
    folder = train_path.parent
    if image_root is None:
        for r, res in zip(records, resolved):
            if "images" in r:
                r["images"] = [given if os.path.isabs(given) else Path(os.path.relpath(p, folder)).as_posix()
                               for given, p in zip(r["images"], res["images"])]
    write_jsonl(train_path, [r for i, r in enumerate(records) if i not in eval_indices])
    write_jsonl(eval_path, [r for i, r in enumerate(records) if i in eval_indices])
    return SplitResult(train_path, eval_path, len(records) - n_eval, n_eval)
