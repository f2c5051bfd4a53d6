"""Property tests: llava -> canonical -> llava gives back every record; split is a deterministic partition."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_tools.cli import main
from data_tools.turns import IMAGE_TOKEN, parts_to_text, text_to_parts
from lvlm_cl.data.records import record_problems

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any text but surrogates (not encodable in UTF-8 files); must say something and hold no <image> token.
chars = st.characters(exclude_categories=("Cs",))
any_text = st.text(chars, min_size=1, max_size=20).filter(lambda t: t.strip() and IMAGE_TOKEN not in t)
IMAGE_POOL = ["img/a.png", "img/b.png", "photos/c d.jpg", "deep/er/e.png"]


@st.composite
def human_parts(draw, allow_images: bool) -> list[str]:
    """A human turn as a list of pieces: texts and "<image>", never two texts in a row, some text."""
    pieces: list[str] = []
    for _ in range(draw(st.integers(1, 4))):
        if allow_images and draw(st.booleans()):
            pieces.append(IMAGE_TOKEN)
        elif not pieces or pieces[-1] == IMAGE_TOKEN:
            pieces.append(draw(any_text))
    if all(p == IMAGE_TOKEN for p in pieces):
        pieces.insert(draw(st.integers(0, len(pieces))), draw(any_text))
    return pieces


@st.composite
def llava_record(draw, rid) -> dict:
    """A record in LLaVA's usual shape: <image> separated from text by one newline (LLaVA's convention)."""
    conversations = []
    if draw(st.booleans()):
        conversations.append({"from": "system", "value": draw(any_text)})
    n_images = 0
    for _ in range(draw(st.integers(1, 3))):
        pieces = draw(human_parts(allow_images=True))
        n_images += pieces.count(IMAGE_TOKEN)
        conversations.append({"from": "human", "value": "\n".join(pieces)})
        conversations.append({"from": "gpt", "value": draw(any_text)})
    record = {"id": rid}
    if n_images == 1:
        record["image"] = draw(st.sampled_from(IMAGE_POOL))
    elif n_images > 1:
        record["image"] = draw(st.lists(st.sampled_from(IMAGE_POOL), min_size=n_images, max_size=n_images))
    record["conversations"] = conversations
    return record


ids = st.one_of(st.integers(0, 10**12), st.text(chars, min_size=1, max_size=12))
llava_files = st.lists(ids, min_size=1, max_size=6, unique_by=str).flatmap(
    lambda rids: st.tuples(*[llava_record(r) for r in rids]).map(list))


@SETTINGS
@given(records=llava_files)
def test_llava_canonical_llava_round_trip(records):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        src = folder / "in.json"
        src.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        canonical = folder / "task.jsonl"
        assert main(["convert", "--from", "llava", str(src), "--output", str(canonical), "--no-check-images"]) == 0
        lines = [json.loads(x) for x in canonical.read_text(encoding="utf-8").split("\n") if x]
        assert all(record_problems(r) == [] for r in lines)
        back = folder / "back.json"
        assert main(["export", "--to", "llava", str(canonical), "--output", str(back)]) == 0
        expected = [dict(r, id=str(r["id"])) for r in records]
        assert json.loads(back.read_text(encoding="utf-8")) == expected


parts_lists = st.lists(st.one_of(st.just("image"), any_text), min_size=1, max_size=6).filter(
    lambda xs: all(not (a != "image" and b != "image") for a, b in zip(xs, xs[1:])))


@SETTINGS
@given(pieces=parts_lists)
def test_parts_text_parts_is_identity(pieces):
    parts = [{"type": "image"} if p == "image" else {"type": "text", "text": p} for p in pieces]
    assert text_to_parts(parts_to_text(parts), field="f", images_allowed=True) == parts


@SETTINGS
@given(n=st.integers(2, 30), fraction=st.floats(0.01, 0.99), seed=st.integers(0, 3))
def test_split_is_a_deterministic_partition(n, fraction, seed):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = [{"id": f"r{i}", "task": "t", "images": [],
                 "messages": [{"role": "user", "content": [{"type": "text", "text": f"q{i}"}]},
                              {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]} for i in range(n)]
        path = folder / "t.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        sides = []
        for out in ("a", "b"):
            assert main(["split", str(path), "--eval-fraction", str(fraction), "--seed", str(seed),
                         "--output-dir", str(folder / out)]) == 0
            train = (folder / out / "t.train.jsonl").read_text().splitlines()
            evl = (folder / out / "t.eval.jsonl").read_text().splitlines()
            sides.append((train, evl))
        assert sides[0] == sides[1]
        train, evl = sides[0]
        assert sorted(train + evl) == sorted(json.dumps(r) for r in rows)  # each record exactly once, unchanged
        assert len(evl) == min(max(1, round(n * fraction)), n - 1)
