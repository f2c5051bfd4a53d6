"""``convert --from sharegpt / messages / csv``: each format's shapes, options and error messages."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from data_tools.cli import main
from conftest import IMG, png, read_jsonl, text


@pytest.fixture
def root(tmp_path: Path) -> Path:
    png(tmp_path / "img" / "a.png", "red")
    png(tmp_path / "img" / "b.png", "blue")
    return tmp_path


def convert(*args: str) -> int:
    return main(["convert", *args])


# ---------------------------------------------------------------- sharegpt (LLaMA-Factory)

def test_sharegpt_defaults_system_column_and_multi_image(root: Path):
    data = [
        {"conversations": [{"from": "human", "value": "<image>Who is this?"}, {"from": "gpt", "value": "A cat."}],
         "system": "Be brief.", "images": ["img/a.png"]},
        {"conversations": [{"from": "human", "value": "<image><image>Same colour?"}, {"from": "gpt", "value": "No."},
                           {"from": "human", "value": "Which is blue?"}, {"from": "gpt", "value": "The second."}],
         "images": ["img/a.png", "img/b.png"]},
        {"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi"}]},
    ]
    src = root / "mllm_demo.json"
    src.write_text(json.dumps(data))
    out = root / "out.jsonl"
    assert convert("--from", "sharegpt", str(src), "--output", str(out)) == 0
    recs = read_jsonl(out)
    assert [r["id"] for r in recs] == ["mllm_demo-0", "mllm_demo-1", "mllm_demo-2"]  # generated from task + index
    assert recs[0]["messages"] == [{"role": "system", "content": [text("Be brief.")]},
                                   {"role": "user", "content": [IMG, text("Who is this?")]},
                                   {"role": "assistant", "content": [text("A cat.")]}]
    assert recs[1]["messages"][0]["content"] == [IMG, IMG, text("Same colour?")]
    assert recs[1]["images"] == ["img/a.png", "img/b.png"] and len(recs[1]["messages"]) == 4
    assert recs[2]["images"] == []


def test_sharegpt_dataset_info_columns_and_tags(root: Path, capsys):
    data = [{"msgs": [{"role": "system", "content": "You see images."},
                      {"role": "user", "content": "<image>What colour?"},
                      {"role": "assistant", "content": "red"}], "pics": ["img/a.png"]}]
    (root / "data").mkdir()
    (root / "data" / "colours.json").write_text(json.dumps(data))
    info = {"colours": {"file_name": "data/colours.json", "formatting": "sharegpt",
                        "columns": {"messages": "msgs", "images": "pics"},
                        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                 "assistant_tag": "assistant", "system_tag": "system"}},
            "other": {"file_name": "alpaca.json"}}
    (root / "dataset_info.json").write_text(json.dumps(info))
    out = root / "out.jsonl"
    # Images are relative to dataset_info.json's folder (LLaMA-Factory's media_dir), not the data file's.
    assert convert("--from", "sharegpt", str(root / "dataset_info.json"), "--dataset", "colours",
                   "--output", str(out)) == 0
    rec = read_jsonl(out)[0]
    assert rec["task"] == "colours" and rec["images"] == ["img/a.png"]
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"]
    assert rec["messages"][1]["content"] == [IMG, text("What colour?")]
    # The same through the data file + --dataset-info: the entry is found by its file_name.
    out2 = root / "out2.jsonl"
    assert convert("--from", "sharegpt", str(root / "data" / "colours.json"), "--dataset-info",
                   str(root / "dataset_info.json"), "--output", str(out2)) == 0
    assert read_jsonl(out2) == read_jsonl(out)
    # An alpaca entry is refused with the reason.
    assert convert("--from", "sharegpt", str(root / "dataset_info.json"), "--dataset", "other",
                   "--output", str(out)) == 2
    assert "only 'sharegpt' is supported" in capsys.readouterr().err


def test_sharegpt_errors_name_the_input_fields(root: Path, capsys):
    src = root / "bad.json"
    src.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"}]},
        {"conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}],
         "images": ["img/a.png", "img/b.png"]},
        {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                           {"from": "gpt", "value": "a"}], "system": "also s"},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}], "system": "s"},
    ], indent=1))
    out = root / "out.jsonl"
    assert convert("--from", "sharegpt", str(src), "--output", str(out), "--skip-invalid") == 2  # all invalid
    reasons = [r["reasons"][0] for r in read_jsonl(root / "out.rejects.jsonl")]
    assert "field 'conversations[1].from': tool-use turns" in reasons[0]
    assert "field 'conversations': 1 <image> placeholder(s) but 2 image(s) in 'images'" in reasons[1]
    assert "field 'system': a system prompt in both" in reasons[2]
    # The system column became turn 0, yet the error names the input's turn 1.
    assert reasons[3] == "field 'conversations[1].value': assistant turn has no text"
    capsys.readouterr()


# ---------------------------------------------------------------- messages (TRL / OpenAI)

def data_url(color: str) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_messages_string_list_and_inline_content(root: Path):
    rows = [
        {"id": "trl", "images": ["img/a.png"],
         "messages": [{"role": "user", "content": [IMG, text("What colour?")]},
                      {"role": "assistant", "content": [text("red")]}]},
        {"id": "str", "images": ["img/b.png"],
         "messages": [{"role": "system", "content": "Short answers."},
                      {"role": "user", "content": "What colour?"},  # no placeholder: image goes first
                      {"role": "assistant", "content": "blue"}]},
        {"id": "inline", "messages": [
            {"role": "user", "content": [{"type": "image", "path": "img/a.png"}, text("and"),
                                         {"type": "image_url", "image_url": {"url": data_url("green")}}]},
            {"role": "assistant", "content": "red and green"}]},
        {"id": "textonly", "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    ]
    src = root / "vsft.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "out.jsonl"
    assert convert("--from", "messages", str(src), "--output", str(out)) == 0
    recs = {r["id"]: r for r in read_jsonl(out)}
    assert recs["trl"]["messages"][0]["content"] == [IMG, text("What colour?")]
    assert recs["str"]["messages"] == [{"role": "system", "content": [text("Short answers.")]},
                                       {"role": "user", "content": [IMG, text("What colour?")]},
                                       {"role": "assistant", "content": [text("blue")]}]
    inline = recs["inline"]
    assert inline["messages"][0]["content"] == [IMG, text("and"), IMG]
    assert inline["images"][0] == "img/a.png"
    # The data URL is decoded and written as a PNG under images/<task>/.
    assert inline["images"][1] == "images/vsft/inline_1.png"
    with Image.open(root / inline["images"][1]) as im:
        assert im.getpixel((0, 0)) == (0, 128, 0)
    assert recs["textonly"]["images"] == []


@pytest.mark.parametrize("row, field, message", [
    ({"images": ["img/a.png"], "messages": [{"role": "user", "content": [{"type": "image", "path": "img/b.png"}]},
                                            {"role": "assistant", "content": "x"}]},
     "images", "both in 'images' and inline"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "url": "https://x.org/a.png"}]},
                   {"role": "assistant", "content": "x"}]},
     "messages[0].content[0]", "remote images are not downloaded"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "expected one of"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}, {"role": "assistant", "content": "x"}]},
     "messages[0].content[0]", "expected {'type': 'text'"),
    ({"images": ["img/a.png", "img/b.png"],
      "messages": [{"role": "user", "content": [IMG, text("q")]}, {"role": "assistant", "content": "x"}]},
     "messages", "1 <image> placeholder(s) but 2 image(s)"),
])
def test_messages_errors(root: Path, capsys, row, field, message):
    src = root / "m.jsonl"
    src.write_text(json.dumps(row) + "\n")
    assert convert("--from", "messages", str(src), "--output", str(root / "o.jsonl")) == 2
    err = capsys.readouterr().err
    assert f"{src}:1, record 'm-0', field {field!r}: " in err and message in err


# ---------------------------------------------------------------- csv / tsv tables

def write_table(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_csv_default_columns(root: Path):
    src = write_table(root / "vqa.csv", ["id", "image", "question", "answer", "extra"],
                      [["q1", "img/a.png", "What colour?", "red", "x"],
                       ["q2", "", "Multi-line,\nquoted question?", "yes", ""],
                       ["q3", "img/b.png", "Look:\n<image>\nwhich colour?", "blue", ""]])
    out = root / "vqa.jsonl"
    assert convert("--from", "csv", str(src), "--output", str(out)) == 0
    recs = read_jsonl(out)
    assert recs[0] == {"id": "q1", "task": "vqa", "images": ["img/a.png"],
                       "messages": [{"role": "user", "content": [IMG, text("What colour?")]},
                                    {"role": "assistant", "content": [text("red")]}]}
    assert recs[1]["images"] == [] and recs[1]["messages"][0]["content"] == [text("Multi-line,\nquoted question?")]
    assert recs[2]["messages"][0]["content"] == [text("Look:"), IMG, text("which colour?")]


def test_tsv_with_custom_column_names_and_line_numbers(root: Path, capsys):
    src = write_table(root / "t.tsv", ["qid", "img", "q", "a"],
                      [["1", "img/a.png", "colour?", "red"], ["2", "img/nope.png", "colour?", "blue"]], "\t")
    args = ["--from", "csv", str(src), "--output", str(root / "t.jsonl"), "--id-column", "qid",
            "--image-column", "img", "--question-column", "q", "--answer-column", "a"]
    assert convert(*args) == 2
    assert f"{src}:3, record '2', field 'img': image not found" in capsys.readouterr().err
    assert convert(*args, "--skip-invalid") == 0
    assert [r["id"] for r in read_jsonl(root / "t.jsonl")] == ["1"]


def test_csv_missing_column_lists_what_exists(root: Path, capsys):
    src = write_table(root / "t.csv", ["picture", "question", "answer"], [["img/a.png", "q", "a"]])
    assert convert("--from", "csv", str(src), "--output", str(root / "o.jsonl")) == 2
    err = capsys.readouterr().err
    assert "no image column 'image'" in err and "'picture'" in err and "--image-column" in err
    # A table without images says so explicitly.
    src2 = write_table(root / "t2.csv", ["question", "answer"], [["2+2?", "4"]])
    assert convert("--from", "csv", str(src2), "--output", str(root / "o2.jsonl"), "--image-column", "") == 0
    assert read_jsonl(root / "o2.jsonl")[0]["id"] == "t2-0"
