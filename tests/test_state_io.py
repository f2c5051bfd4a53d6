"""Methods' state is written as safetensors + JSON and read back exactly, and nothing in a run folder is
unpickled: an older run's pickle is read through torch's restricted loader, and a payload is refused."""

import json
import math

import pytest
import torch

from lvlm_cl.checkpoint import CheckpointError, load_methods_state
from lvlm_cl.state_io import StateFormatError, load_state, save_state


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


STATE = {
    "replay": {"records": [{"id": "r1", "images": ["/x/1.png"], "messages": []}], "owners": ["colour"], "seen": 48},
    "ewc": {"anchors": [{"task": "colour", "fisher": {"w": torch.rand(3, 4)}, "params": {"w": torch.rand(3, 4)}}],
            "micro_steps": {"colour": 4}},
    "router": {"seen": {b"\x00\x01tokens": torch.rand(8), b"": torch.zeros(2, dtype=torch.bfloat16)},
               "by_task": {0: torch.arange(3), 1: torch.arange(2, dtype=torch.int32)}},
    "odd": {"tuple": (1, "a", None, True), "big": 2 ** 70, "neg": -5, "floats": [1.5, float("inf"), float("-inf"),
                                                                                    float("nan")],
            "__looks_like_a_tag__": {"__tensor__": "t0"}, "empty": {}, "nested": [[], [()], {"k": [b"\xff"]}]},
}


def test_every_kind_of_value_reads_back_exactly(tmp_path):
    shared = torch.rand(5)
    state = {**STATE, "aliases": [shared, shared[1:3]]}      # views of one storage are saved as copies
    save_state(tmp_path, "methods", state)
    back = load_state(tmp_path, "methods")
    assert same(state, back)
    text = (tmp_path / "methods.json").read_text()
    assert json.loads(text)["format"] == "lvlm-cl state 1" and "r1" in text     # the rest is readable JSON


def test_a_value_that_is_not_plain_data_is_refused_naming_where():
    class Custom:
        pass
    with pytest.raises(TypeError, match=r"methods\['replay'\]\['rng'\]: a Custom cannot be saved"):
        save_state("/nonexistent-never-written", "methods", {"replay": {"rng": Custom()}})


def test_damaged_or_foreign_files_are_named(tmp_path):
    save_state(tmp_path, "methods", STATE)
    (tmp_path / "methods.json").write_text('{"format": "something else"}')
    with pytest.raises(StateFormatError, match="not a state file written by lvlm-cl"):
        load_state(tmp_path, "methods")
    save_state(tmp_path, "methods", STATE)
    (tmp_path / "methods.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"is damaged: .*methods.safetensors cannot be read"):
        load_methods_state(tmp_path, "methods")


class Payload:
    """What a hostile run folder would hold: unpickling it runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_an_older_pickle_loads_only_through_the_restricted_loader_and_a_payload_never_runs(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    plain = {"replay": {"records": [{"id": "r1"}], "seen": 3}, "router": {"keys": torch.rand(2, 4)}}
    torch.save(plain, old / "methods.pt")                            # what lvlm-cl wrote before this format
    assert same(load_methods_state(old, "methods"), plain)
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    marker = tmp_path / "code-ran"
    torch.save({"replay": Payload(str(marker))}, hostile / "methods.pt")
    with pytest.raises(CheckpointError, match="it is not unpickled, since a pickle can run code"):
        load_methods_state(hostile, "methods")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="has no methods' state"):
        load_methods_state(tmp_path, "methods")
