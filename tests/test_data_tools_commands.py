"""``validate``, ``split``, ``export`` and ``stats`` on canonical JSONL files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.cli import main
from conftest import IMG, png, read_jsonl, text

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def rec(rid: str, *, images=("img/a.png",), question="What colour?", answer="red", task="colours") -> dict:
    content = [IMG for _ in images] + [text(question)]
    return {"id": rid, "task": task, "images": list(images),
            "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": [text(answer)]}]}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_tools", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    png(tmp_path / "img" / "a.png", "red")
    png(tmp_path / "img" / "b.png", "blue")
    cut = png(tmp_path / "img" / "cut.png", "green")
    cut.write_bytes(cut.read_bytes()[: len(cut.read_bytes()) // 2])
    return tmp_path


# ---------------------------------------------------------------- validate

def test_validate_reports_every_problem_with_location(folder: Path, capsys):
    bad_order = rec("order")
    bad_order["messages"].reverse()
    placeholder = rec("placeholder", images=["img/a.png"])
    placeholder["messages"][0]["content"].append(IMG)
    empty_turn = rec("empty", images=[])
    empty_turn["messages"][1]["content"] = [text("")]
    path = write_jsonl(folder / "t.jsonl", [
        rec("ok"),                                     # 1
        rec("missing", images=["img/nope.png"]),       # 2
        rec("cut", images=["img/cut.png"]),            # 3
        placeholder,                                   # 4
        bad_order,                                     # 5
        empty_turn,                                    # 6
        rec("ok"),                                     # 7 duplicate id
        "{broken",                                     # 8
        rec("ok2", images=["img/b.png", "img/a.png"]),  # 9
    ])
    assert main(["validate", str(path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    expected = [
        f"{path}:2, record 'missing', field 'images[0]': image not found",
        f"{path}:3, record 'cut', field 'images[0]': image cannot be read",
        f"{path}:4, record 'placeholder', field 'images': 1 image path(s) but 2 image placeholder(s)",
        f"{path}:5, record 'order', field 'messages[0].role': roles must alternate",
        f"{path}:6, record 'empty', field 'messages[1].content': assistant turn has no text",
        f"{path}:7, record 'ok', field 'id': duplicate id (first seen on line 1)",
        f"{path}:8: invalid JSON",
    ]
    for prefix in expected:
        assert any(line.startswith(prefix) for line in lines), prefix
    assert not any(":1," in line or ":9," in line for line in lines)  # the valid records are not reported
    assert lines[-1] == f"{path}: 9 records, {len(lines) - 1} problem(s) in 7 record(s)"


def test_validate_clean_file_and_image_root(folder: Path, capsys):
    elsewhere = write_jsonl(folder / "sub" / "t.jsonl", [rec("a"), rec("b", images=[])])
    assert main(["validate", str(elsewhere)]) == 1  # img/ is not next to the file
    capsys.readouterr()
    assert main(["validate", str(elsewhere), "--image-root", str(folder)]) == 0
    assert capsys.readouterr().out.strip() == f"{elsewhere}: 2 records, no problems"
    res = run_cli("validate", str(elsewhere))
    assert res.returncode == 1 and "image not found" in res.stdout
    assert run_cli("validate", str(elsewhere), "--image-root", str(folder)).returncode == 0
    missing = run_cli("validate", str(folder / "nope.jsonl"))
    assert missing.returncode == 2 and missing.stderr == f"lvlm_cl: error: {folder / 'nope.jsonl'}: file not found\n"


def test_token_lengths_with_the_builtin_model(folder: Path, capsys):
    from data_tools.stats import file_stats
    from data_tools.tokens import load_token_counter
    from data_tools.validate import validate_file

    path = write_jsonl(folder / "t.jsonl", [rec("short"), rec("long", answer="word " * 400)])
    counter = load_token_counter("builtin:tiny-llava", max_length=300)
    report = validate_file(path, tokens=counter)
    assert [(p.line, p.record_id, p.field) for p in report.problems] == [(2, "long", "messages")]
    assert "more than the maximum length 300" in str(report.problems[0])
    stats = file_stats(path, tokens=counter)
    assert stats["max_length"] == 300 and stats["over_max_length"] == 1
    assert stats["tokens"]["min"] < 300 < stats["tokens"]["max"]
    # The long sample's count includes the expanded image tokens and the 400 answer words.
    assert stats["tokens"]["max"] - stats["tokens"]["min"] >= 400
    # Without --max-length the recipe default applies; an unknown model fails at once, naming it.
    assert load_token_counter("builtin:tiny-llava").max_length == 256
    assert main(["validate", str(path), "--model", str(folder / "no-model")]) == 2
    assert "expected a local model folder or a built-in name" in capsys.readouterr().err


# ---------------------------------------------------------------- split

def test_split_is_deterministic_and_a_partition(folder: Path, capsys):
    path = write_jsonl(folder / "data" / "colours.jsonl",
                       [rec(f"r{i}", images=["../img/a.png"]) for i in range(40)])
    assert main(["split", str(path), "--eval-fraction", "0.25", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "train: 30 record(s)" in out and "eval:  10 record(s)" in out
    train, evl = read_jsonl(folder / "data" / "colours.train.jsonl"), read_jsonl(folder / "data" / "colours.eval.jsonl")
    ids = [r["id"] for r in train] + [r["id"] for r in evl]
    assert sorted(ids) == sorted(f"r{i}" for i in range(40)) and len(set(ids)) == 40
    # Same seed -> same split, even with the lines shuffled; another seed -> another split.
    shuffled = write_jsonl(folder / "other" / "colours.jsonl", list(reversed(read_jsonl(path))))
    main(["split", str(shuffled), "--eval-fraction", "0.25", "--seed", "3"])
    assert {r["id"] for r in read_jsonl(folder / "other" / "colours.eval.jsonl")} == {r["id"] for r in evl}
    main(["split", str(path), "--eval-fraction", "0.25", "--seed", "4", "--output-dir", str(folder / "s4")])
    evl4 = read_jsonl(folder / "s4" / "colours.eval.jsonl")
    assert {r["id"] for r in evl4} != {r["id"] for r in evl}
    # Image paths follow the output folder; records are otherwise unchanged.
    assert evl4[0]["images"] == ["../img/a.png"] and train[0]["images"] == ["../img/a.png"]
    assert main(["validate", str(folder / "s4" / "colours.eval.jsonl")]) == 0


@pytest.mark.parametrize("fraction", ["0", "1", "1.5", "-0.1", "half"])
def test_split_rejects_bad_fractions(folder: Path, fraction: str):
    path = write_jsonl(folder / "t.jsonl", [rec("a"), rec("b")])
    res = run_cli("split", str(path), "--eval-fraction", fraction)
    assert res.returncode == 2 and "--eval-fraction" in res.stderr and "(0, 1)" in res.stderr
    assert not (folder / "t.train.jsonl").exists()


def test_split_keeps_one_record_each_side_and_needs_two(folder: Path, capsys):
    path = write_jsonl(folder / "t.jsonl", [rec("a"), rec("b"), rec("c")])
    assert main(["split", str(path), "--eval-fraction", "0.01"]) == 0
    assert len(read_jsonl(folder / "t.eval.jsonl")) == 1 and len(read_jsonl(folder / "t.train.jsonl")) == 2
    one = write_jsonl(folder / "one.jsonl", [rec("a")])
    assert main(["split", str(one), "--eval-fraction", "0.5"]) == 2
    assert "a split needs at least 2" in capsys.readouterr().err


# ---------------------------------------------------------------- export

def test_export_to_llava_json_and_jsonl(folder: Path, capsys):
    system = rec("sys", images=["img/a.png", "img/b.png"])
    system["messages"].insert(0, {"role": "system", "content": [text("Be brief.")]})
    path = write_jsonl(folder / "t.jsonl", [rec("one"), system, rec("txt", images=[])])
    out = folder / "export" / "t.json"
    assert main(["export", "--to", "llava", str(path), "--output", str(out), "--image-root", str(folder)]) == 0
    data = json.loads(out.read_text())
    assert data == [
        {"id": "one", "image": "img/a.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                              {"from": "gpt", "value": "red"}]},
        {"id": "sys", "image": ["img/a.png", "img/b.png"],
         "conversations": [{"from": "system", "value": "Be brief."},
                           {"from": "human", "value": "<image>\n<image>\nWhat colour?"},
                           {"from": "gpt", "value": "red"}]},
        {"id": "txt", "conversations": [{"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "red"}]},
    ]
    # Without --image-root, paths are relative to the output's folder when possible, else absolute.
    out2 = folder / "t.llava.jsonl"
    assert main(["export", "--to", "llava", str(path), "--output", str(out2)]) == 0
    assert read_jsonl(out2)[0]["image"] == "img/a.png"
    assert main(["export", "--to", "llava", str(path), "--output", str(out)]) == 0
    assert json.loads(out.read_text())[0]["image"] == str(folder / "img" / "a.png")
    # An invalid canonical file is not exported.
    capsys.readouterr()
    bad = write_jsonl(folder / "bad.jsonl", [{"id": "x", "messages": []}])
    assert main(["export", "--to", "llava", str(bad), "--output", str(folder / "bad.json")]) == 2
    assert "record 'x', field 'messages'" in capsys.readouterr().err and not (folder / "bad.json").exists()


# ---------------------------------------------------------------- stats

def test_stats_table_and_json(folder: Path, capsys):
    multi = rec("m", images=["img/a.png", "img/b.png"], answer="red and blue", task="pairs")
    multi["messages"] += [{"role": "user", "content": [text("Sure?")]},
                          {"role": "assistant", "content": [text("yes")]}]
    path = write_jsonl(folder / "t.jsonl", [rec("a"), rec("b", answer="dark red"), rec("t", images=[]), multi])
    assert main(["stats", str(path), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["records"] == 4 and stats["images"] == 4
    assert stats["tasks"] == {"colours": 3, "pairs": 1}
    assert stats["images_per_record"] == {"0": 1, "1": 2, "2": 1} and stats["text_only"] == 1
    assert stats["rounds_per_record"] == {"min": 1, "median": 1, "max": 2}
    # Answers: "red", "dark red", "red", "red and blue", "yes".
    assert stats["answer_chars"] == {"min": 3, "median": 3, "max": 12}
    assert stats["answer_words"] == {"min": 1, "median": 1, "max": 3}
    assert "tokens" not in stats
    assert main(["stats", str(path)]) == 0
    table = capsys.readouterr().out
    assert "records             4" in table and "colours: 3, pairs: 1" in table
    assert "answer words        min 1, median 1, max 3" in table
    # --max-length without a model is refused.
    assert main(["stats", str(path), "--max-length", "10"]) == 2
    assert "--max-length needs --model" in capsys.readouterr().err
