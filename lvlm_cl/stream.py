"""The task stream of a recipe: a built-in benchmark or the user's files, loaded and validated up front."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lvlm_cl import benchmarks
from lvlm_cl.data.records import load_table


@dataclass(frozen=True)
class Task:
    """One task of the stream, as every hook sees it."""

    index: int                 # 0-based position in the stream
    name: str
    metric: str
    # Canonical records (dicts) with absolute image paths: a sequence (a ``RecordTable`` in a run: indexing and
    # iterating give fresh dicts; ``records + more`` gives a new table).
    train_records: Sequence[dict]
    test_records: Sequence[dict]


def task_files(cfg, cache: Path) -> list[tuple[str, str, str, str, str | None]]:
    """(name, train path, eval path, metric, image_root) for every task, in stream order."""
    if cfg.benchmark is None:
        return [(t.name, t.train, t.eval, t.metric, t.image_root) for t in cfg.tasks]
    b = cfg.benchmark
    specs = benchmarks.materialize(b.name, cache / "benchmarks", seed=b.seed, image_size=cfg.model.tiny.image_size,
                                   train_size=b.train_size, test_size=b.test_size)
    by_name = {s.name: s for s in specs}
    if b.tasks is not None:
        unknown = [n for n in b.tasks if n not in by_name]
        if unknown:
            raise ValueError(f"benchmark.tasks: {unknown[0]!r} is not a task of {b.name!r}; tasks: {list(by_name)}")
        specs = [by_name[n] for n in b.tasks]
    return [(s.name, str(s.train), str(s.test), s.metric, None) for s in specs]


def build_stream(cfg, cache: Path, digest=None) -> tuple[list[Task], list[str]]:
    """Every task's records, read and validated (the format; images are checked by their headers when the
    run counts tokens, ``lengths.TokenCounter``), into compact ``RecordTable``s; and the task files read, in
    order. ``digest`` (a ``hashlib`` object) is updated with the files' bytes as they are read: the run's data
    fingerprint, without a second read."""
    stream, files = [], []
    for index, (name, train, test, metric, image_root) in enumerate(task_files(cfg, cache)):
        files += [train, test]
        # The recipe's task name wins: records may come from a file converted under another name.
        train_records = load_table(train, image_root=image_root, task=name, digest=digest)
        test_records = load_table(test, image_root=image_root, task=name, digest=digest)
        stream.append(Task(index, name, metric, train_records, test_records))
    return stream, files
