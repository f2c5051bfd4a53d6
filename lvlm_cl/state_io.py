"""Methods' state on disk without pickle: tensors in a safetensors file, everything else in JSON.

A run folder is something users share; loading it must never run code from it. ``torch.load`` with
``weights_only=False`` (a pickle) would, so a method's ``state_dict()`` is written as two files:
``NAME.safetensors`` (every tensor, under a generated key) and ``NAME.json`` (the structure, with each
tensor replaced by a reference to its key). Both read back exactly, types included: dicts with any
keys of the types below, lists, tuples, strings, bytes, ints (any size), floats (inf and nan too), bools,
None, and tensors (on the CPU). Anything else is a ``TypeError`` naming where it is: a method keeps its
state in these types.
"""

from __future__ import annotations

import base64
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from lvlm_cl.errors import UserError
from lvlm_cl.io import atomic_save, atomic_write_text, under


class StateFormatError(ValueError, UserError):
    """A state file that is not what ``save_state`` writes (damaged or hand-edited)."""


def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str):
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj if abs(obj) < 2 ** 53 else {"__int__": str(obj)}
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, bytes):
        return {"__bytes__": base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"__tuple__": items}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{where}[{k!r}]") for k, v in obj.items()}
        return {"__dict__": [[_encode(k, tensors, f"{where} key"), _encode(v, tensors, f"{where}[{k!r}]")]
                             for k, v in obj.items()]}
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be saved in a method's state (allowed: tensors, "
                    "dicts, lists, tuples, str, bytes, int, float, bool, None)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: str):
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (tag, value), = obj.items()
        if tag == "__tensor__":
            if value not in tensors:
                raise StateFormatError(f"{where}: tensor {value!r} is not in the safetensors file")
            return tensors[value]
        if tag == "__bytes__":
            return base64.b64decode(value)
        if tag == "__int__":
            return int(value)
        if tag == "__float__":
            return float(value)
        if tag == "__tuple__":
            return tuple(_decode(v, tensors, where) for v in value)
        if tag == "__dict__":
            return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in value}
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


def save_state(folder: str | os.PathLike, name: str, state: Any) -> None:
    """``state`` as ``folder/NAME.safetensors`` and ``folder/NAME.json`` (each written atomically)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors, name)
    # safetensors refuses tensors sharing memory: each is its own copy (states are small: prompts, keys, banks)
    atomic_save(under(folder, f"{name}.safetensors"), lambda tmp: save_file({k: v.clone() for k, v in tensors.items()}, tmp))
    atomic_write_text(under(folder, f"{name}.json"), json.dumps({"format": "lvlm-cl state 1", "state": structure}) + "\n")


def load_state(folder: str | os.PathLike, name: str) -> Any:
    """What ``save_state`` wrote, read without unpickling anything."""
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / f"{name}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateFormatError(f"{path} cannot be read: {e}") from None
    if not isinstance(data, dict) or data.get("format") != "lvlm-cl state 1":
        raise StateFormatError(f"{path} is not a state file written by lvlm-cl")
    try:
        tensors = load_file(str(folder / f"{name}.safetensors"))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise StateFormatError(f"{folder / (name + '.safetensors')} cannot be read: {e}") from None
    return _decode(data["state"], tensors, str(path))


def has_state(folder: str | os.PathLike, name: str) -> bool:
    return (Path(folder) / f"{name}.json").is_file()


__all__ = ["StateFormatError", "has_state", "load_state", "save_state"]
