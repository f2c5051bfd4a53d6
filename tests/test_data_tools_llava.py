"""``convert --from llava``: edge cases of LLaVA files, error messages, rejects, image paths, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.cli import main
from lvlm_cl.data.records import load_records
from conftest import IMG, png, read_jsonl, text

REPO = Path(__file__).resolve().parents[1]


def truncated_png(path: Path) -> Path:
    png(path, "green")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def human(value):
    return {"from": "human", "value": value}


def gpt(value):
    return {"from": "gpt", "value": value}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    png(tmp_path / "data" / "img" / "a.png", "red")
    png(tmp_path / "data" / "img" / "b.png", "blue")
    return tmp_path / "data"


EDGE_CASES = [
    {"id": 7, "image": "img/a.png", "conversations": [human("<image>\nWhat colour?"), gpt("red")]},
    {"id": "multi", "image": ["img/a.png", "img/b.png"],
     "conversations": [human("Compare\n<image>\nwith\n<image>"), gpt("red vs blue")]},
    {"id": "text", "conversations": [human("Say hi."), gpt("hi")]},
    {"id": "sys", "image": "img/b.png",
     "conversations": [{"from": "system", "value": "Answer in one word."}, human("What colour is it?\n<image>"),
                       gpt("blue"), human("Sure?"), gpt("yes")]},
    {"id": "notoken", "image": ["img/a.png", "img/b.png"], "conversations": [human("Which is red?"), gpt("first")]},
]

EXPECTED_MESSAGES = {
    "7": [{"role": "user", "content": [IMG, text("What colour?")]}, {"role": "assistant", "content": [text("red")]}],
    "multi": [{"role": "user", "content": [text("Compare"), IMG, text("with"), IMG]},
              {"role": "assistant", "content": [text("red vs blue")]}],
    "text": [{"role": "user", "content": [text("Say hi.")]}, {"role": "assistant", "content": [text("hi")]}],
    "sys": [{"role": "system", "content": [text("Answer in one word.")]},
            {"role": "user", "content": [text("What colour is it?"), IMG]},
            {"role": "assistant", "content": [text("blue")]},
            {"role": "user", "content": [text("Sure?")]}, {"role": "assistant", "content": [text("yes")]}],
    # No <image> token: LLaVA puts the images first in the first human turn.
    "notoken": [{"role": "user", "content": [IMG, IMG, text("Which is red?")]},
                {"role": "assistant", "content": [text("first")]}],
}


@pytest.mark.parametrize("as_jsonl", [False, True])
def test_llava_edge_cases_convert_to_canonical_records(data_dir: Path, as_jsonl: bool, capsys):
    src = data_dir / ("llava.jsonl" if as_jsonl else "llava.json")
    if as_jsonl:
        src.write_text("".join(json.dumps(r) + "\n" for r in EDGE_CASES))
    else:
        src.write_text(json.dumps(EDGE_CASES, indent=2))
    out = data_dir / "mytask.jsonl"
    assert main(["convert", "--from", "llava", str(src), "--output", str(out)]) == 0
    assert "converted 5 record(s)" in capsys.readouterr().out
    records = read_jsonl(out)
    assert [r["id"] for r in records] == ["7", "multi", "text", "sys", "notoken"]  # int id cast, order kept
    assert all(r["task"] == "llava" for r in records)  # the input file's stem
    assert {r["id"]: r["messages"] for r in records} == EXPECTED_MESSAGES
    images = {r["id"]: r["images"] for r in records}
    assert images == {"7": ["img/a.png"], "multi": ["img/a.png", "img/b.png"], "text": [],
                      "sys": ["img/b.png"], "notoken": ["img/a.png", "img/b.png"]}
    # The file plugs straight into the loader the trainer uses, images included.
    loaded = load_records(out, check_images=True)
    assert Path(loaded[0]["images"][0]) == data_dir / "img" / "a.png"


def test_image_paths_relative_under_output_folder_else_absolute(tmp_path: Path):
    png(tmp_path / "shared" / "img" / "a.png")
    src = tmp_path / "in" / "llava.json"
    src.parent.mkdir()
    src.write_text(json.dumps([{"id": 1, "image": "img/a.png", "conversations": [human("<image>\nq"), gpt("a")]}]))
    # --image-root says where the relative paths start; the output lies elsewhere -> absolute path.
    out = tmp_path / "out" / "t.jsonl"
    assert main(["convert", "--from", "llava", str(src), "--image-root", str(tmp_path / "shared"),
                 "--output", str(out), "--task", "colours"]) == 0
    rec = read_jsonl(out)[0]
    assert rec["task"] == "colours"
    assert rec["images"] == [str(tmp_path / "shared" / "img" / "a.png")]
    # Output next to the images -> relative to the output's folder.
    out2 = tmp_path / "shared" / "t.jsonl"
    assert main(["convert", "--from", "llava", str(src), "--image-root", str(tmp_path / "shared"),
                 "--output", str(out2)]) == 0
    assert read_jsonl(out2)[0]["images"] == ["img/a.png"]


def write_llava(data_dir: Path, records: list[dict], name: str = "bad.json") -> Path:
    src = data_dir / name
    src.write_text(json.dumps(records, indent=2))
    return src


def convert_error(data_dir: Path, records: list[dict], capsys, *extra: str) -> str:
    src = write_llava(data_dir, records)
    out = data_dir / "out.jsonl"
    assert main(["convert", "--from", "llava", str(src), "--output", str(out), *extra]) == 2
    assert not out.exists()  # nothing half-written
    err = capsys.readouterr().err
    assert err.startswith("lvlm_cl: error: ") and str(src) in err
    return err


GOOD = {"id": 1, "image": "img/a.png", "conversations": [human("<image>\nq"), gpt("a")]}


@pytest.mark.parametrize("bad, line, rid, field, message", [
    ({"id": 2, "image": "img/missing.png", "conversations": [human("<image>\nq"), gpt("a")]},
     "img/missing.png", "2", "image", "image not found"),
    ({"id": 2, "image": "img/a.png", "conversations": [human("<image>\n<image>\nq"), gpt("a")]},
     None, "2", "conversations", "2 <image> placeholder(s) but 1 image(s)"),
    ({"id": 2, "image": ["img/a.png", "img/b.png", "img/a.png"], "conversations": [human("<image>\nq\n<image>"), gpt("a")]},
     None, "2", "conversations", "2 <image> placeholder(s) but 3 image(s)"),
    ({"id": 2, "conversations": [human("<image>\nq"), gpt("a")]},
     None, "2", "conversations", "1 <image> placeholder(s) but 0 image(s)"),
    ({"id": 2, "conversations": [gpt("a"), human("q")]},
     None, "2", "conversations[0].from", "expected 'user', got 'assistant'"),
    ({"id": 2, "conversations": [human("q"), human("q2"), gpt("a")]},
     None, "2", "conversations[1].from", "expected 'assistant', got 'user'"),
    ({"id": 2, "conversations": [human("q"), gpt("  ")]},
     None, "2", "conversations[1].value", "assistant turn has no text"),
    ({"id": 2, "conversations": [human(""), gpt("a")]},
     None, "2", "conversations[0].value", "user turn is empty"),
    ({"id": 2, "conversations": [{"from": "user", "value": "q"}, gpt("a")]},
     None, "2", "conversations[0].from", "expected one of ['human', 'gpt', 'system']"),
    ({"id": 2, "conversations": [human("q"), gpt("<image>")]},
     None, "2", "conversations[1].value", "may only appear in user turns"),
    ({"id": 2.5, "conversations": [human("q"), gpt("a")]},
     None, "2.5", "id", "expected a non-empty string or an integer"),
    ({"id": 1, "conversations": [human("q"), gpt("a")]},
     None, "1", "id", "duplicate id"),
])
def test_invalid_record_stops_with_file_line_id_field(data_dir, capsys, bad, line, rid, field, message):
    err = convert_error(data_dir, [GOOD, bad], capsys)
    # The second record starts on the line after the first one's closing brace.
    src_line = 1 + json.dumps([GOOD], indent=2).count("\n")
    assert f"bad.json:{src_line}, record {rid!r}, field {field!r}: " in err
    assert message in err
    if line:
        assert line in err


def test_corrupt_image_is_an_error(data_dir, capsys):
    truncated_png(data_dir / "img" / "cut.png")
    err = convert_error(data_dir, [{"id": "c", "image": "img/cut.png",
                                    "conversations": [human("<image>\nq"), gpt("a")]}], capsys)
    assert "record 'c', field 'image'" in err and "cannot be read" in err and "cut.png" in err
    # --no-check-images skips opening the files (the converter still writes the path).
    out = data_dir / "out.jsonl"
    assert main(["convert", "--from", "llava", str(data_dir / "bad.json"), "--output", str(out),
                 "--no-check-images"]) == 0
    assert read_jsonl(out)[0]["images"] == ["img/cut.png"]


def test_skip_invalid_writes_rejects_with_reasons(data_dir, capsys):
    truncated_png(data_dir / "img" / "cut.png")
    records = [GOOD,
               {"id": "missing", "image": "img/nope.png", "conversations": [human("<image>\nq"), gpt("a")]},
               {"id": "cut", "image": "img/cut.png", "conversations": [human("<image>\nq"), gpt("a")]},
               {"id": "order", "conversations": [gpt("a"), human("q")]},
               {"id": "ok2", "conversations": [human("q"), gpt("a")]}]
    src = write_llava(data_dir, records)
    out = data_dir / "out.jsonl"
    assert main(["convert", "--from", "llava", str(src), "--output", str(out), "--skip-invalid"]) == 0
    stdout = capsys.readouterr().out
    assert "converted 2 record(s)" in stdout and "rejected 3 invalid record(s)" in stdout
    assert [r["id"] for r in read_jsonl(out)] == ["1", "ok2"]
    rejects = read_jsonl(data_dir / "out.rejects.jsonl")
    assert [r["id"] for r in rejects] == ["missing", "cut", "order"]
    assert [r["record"] for r in rejects] == records[1:4]  # the original record, untouched
    assert all(r["source"] == str(src) and isinstance(r["line"], int) for r in rejects)
    assert "image not found" in rejects[0]["reasons"][0]
    assert "cannot be read" in rejects[1]["reasons"][0]
    # Every problem of the record is listed, not just the first.
    assert len(rejects[2]["reasons"]) == 2 and "conversations[0].from" in rejects[2]["reasons"][0]
    # A clean rerun removes the stale rejects file.
    write_llava(data_dir, [GOOD])
    assert main(["convert", "--from", "llava", str(src), "--output", str(out), "--skip-invalid"]) == 0
    assert "rejected 0 invalid record(s)" in capsys.readouterr().out
    assert not (data_dir / "out.rejects.jsonl").exists()


def test_all_records_invalid_is_an_error_even_with_skip(data_dir, capsys):
    src = write_llava(data_dir, [{"id": 1, "conversations": [gpt("a")]}])
    out = data_dir / "out.jsonl"
    assert main(["convert", "--from", "llava", str(src), "--output", str(out), "--skip-invalid"]) == 2
    assert "no valid records" in capsys.readouterr().err
    assert not out.exists() and len(read_jsonl(data_dir / "out.rejects.jsonl")) == 1


def test_json_syntax_error_names_the_line(data_dir, capsys):
    src = data_dir / "broken.json"
    src.write_text("[\n" + json.dumps(GOOD) + ',\n  {"id": 2 "conversations": []}\n]\n')
    assert main(["convert", "--from", "llava", str(src), "--output", str(data_dir / "o.jsonl")]) == 2
    assert f"{src}:3" in capsys.readouterr().err


def test_bad_jsonl_line_is_rejectable(data_dir, capsys):
    src = data_dir / "lines.jsonl"
    src.write_text(json.dumps(GOOD) + "\n{not json\n")
    out = data_dir / "o.jsonl"
    assert main(["convert", "--from", "llava", str(src), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{src}:2: invalid JSON" in err
    assert main(["convert", "--from", "llava", str(src), "--output", str(out), "--skip-invalid"]) == 0
    assert read_jsonl(data_dir / "o.rejects.jsonl")[0]["record"] == "{not json"


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_tools", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def test_exit_codes_through_the_module_entry_point(data_dir):
    good = write_llava(data_dir, [GOOD], "good.json")
    out = data_dir / "good.jsonl"
    ok = run_cli("convert", "--from", "llava", str(good), "--output", str(out))
    assert ok.returncode == 0, ok.stderr
    assert read_jsonl(out)[0]["id"] == "1"

    bad = write_llava(data_dir, [GOOD, {"id": 9, "image": "img/none.png",
                                        "conversations": [human("<image>\nq"), gpt("a")]}])
    res = run_cli("convert", "--from", "llava", str(bad), "--output", str(data_dir / "bad_out.jsonl"))
    assert res.returncode == 2
    assert res.stderr.startswith(f"lvlm_cl: error: {bad}:") and "record '9', field 'image'" in res.stderr

    usage = run_cli("convert", "--from", "yaml", str(good), "--output", str(out))
    assert usage.returncode == 2 and "invalid choice" in usage.stderr
    wrong_option = run_cli("convert", "--from", "llava", str(good), "--output", str(out), "--split", "train")
    assert wrong_option.returncode == 2 and "--split only applies to --from hf" in wrong_option.stderr
