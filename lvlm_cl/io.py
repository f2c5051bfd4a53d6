"""Atomic file writes: every file a run writes goes through here (temporary file, fsync, rename)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from lvlm_cl.errors import UserError


class PathEscapeError(ValueError, UserError):
    """A file name (a task's, a stage's, a state's) that would put a file outside the folder it belongs in."""


def under(root: str | os.PathLike, *parts: str) -> Path:
    """``root / parts``, refused (``PathEscapeError``) unless it stays inside ``root`` once resolved: no ``..``,
    no absolute part, no symbolic link pointing out. Every path a run builds from a name goes through here."""
    root = Path(root)
    path = root.joinpath(*parts)
    top, resolved = root.resolve(), path.resolve()
    if resolved == top or top not in resolved.parents:
        raise PathEscapeError(f"{path}: the name {'/'.join(map(str, parts))!r} leads outside {root}")
    return path


def _atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the final file follows the umask like open() would
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return _atomic(path, write)


def atomic_write_lines(path: str | os.PathLike, lines) -> Path:
    """Write the strings of the iterable ``lines`` (each without its newline) as they come: nothing is
    held in memory, and the file appears whole or not at all."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
    return _atomic(path, write)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_save(path: str | os.PathLike, save: Callable[[str], None]) -> Path:
    """Atomic write through a saver that takes a file name (``torch.save``, ``fig.savefig`` ...)."""
    return _atomic(path, save)


def _old_twin(final_dir: Path) -> Path:
    return final_dir.with_name(f".{final_dir.name}.old")


def complete_dir(final_dir: str | os.PathLike, marker: str) -> Path | None:
    """The folder ``atomic_replace_dir`` put at ``final_dir`` when it holds ``marker`` (the file written
    last); else its previous version, when a kill came between the two renames of a replacement; else None."""
    for folder in (Path(final_dir), _old_twin(Path(final_dir))):
        if (folder / marker).is_file():
            return folder
    return None


def atomic_replace_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> Path:
    """Move a fully written folder into place; an older folder of that name is removed after the move."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    old = None
    if final_dir.exists():
        old = _old_twin(final_dir)
        if old.exists():
            shutil.rmtree(old)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final_dir
