"""Bad input to ``python -m data_tools``: text that is not UTF-8, lone surrogates, deep nesting, huge CSV cells
and conversions that fail part-way end in one ``lvlm_cl: error: <file>[:<line>]...`` line and exit 2, never a traceback,
and lose nothing (rejects keep what was skipped; a failed conversion leaves no image behind)."""

from __future__ import annotations

import base64
import codecs
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from data_tools.cli import main
from conftest import read_jsonl, text

DEEP = "[" * 100_000


def llava(rid: str, answer: str = "red") -> dict:
    return {"id": rid, "conversations": [{"from": "human", "value": "What colour?"}, {"from": "gpt", "value": answer}]}


def chat(rid: str, answer: str = "red", image: str | None = None) -> dict:
    """A ``messages`` row; ``image`` is an inline image source (written as a PNG by the conversion)."""
    user = [{"type": "image", "image": image}, text("What colour?")] if image else "What colour?"
    return {"id": rid, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def canonical(rid: str, answer: str = "red") -> dict:
    return {"id": rid, "task": "t", "images": [],
            "messages": [{"role": "user", "content": [text("What colour?")]},
                         {"role": "assistant", "content": [text(answer)]}]}


def lines(*rows) -> bytes:
    """JSON lines; a ``bytes`` row is written as it is, a ``str`` row as UTF-8."""
    return b"".join((r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()) + b"\n"
                    for r in rows)


def json_list(*rows) -> bytes:
    """A JSON list with row k on line k + 1."""
    return b"[\n" + lines(*rows).rstrip(b"\n").replace(b"\n", b",\n") + b"\n]\n"


def latin1(row: dict) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode("latin-1")


def utf16(data: bytes) -> bytes:
    return data.decode().encode("utf-16")  # with its byte order mark, as Windows' "Unicode" saves


def utf16_be(data: bytes) -> bytes:
    return codecs.BOM_UTF16_BE + data.decode().encode("utf-16-be")


def with_surrogate(row: dict) -> dict:
    """``row`` with its last answer ending in ``\\ud800`` (json.loads accepts the escape; UTF-8 cannot hold it)."""
    row = json.loads(json.dumps(row))
    turn = (row.get("conversations") or row["messages"])[-1]
    if "value" in turn:
        turn["value"] += "\ud800"
    elif isinstance(turn["content"], str):
        turn["content"] += "\ud800"
    else:
        turn["content"][-1]["text"] += "\ud800"
    return row


CSV_HEADER = b"id,question,answer\n"
SHAREGPT = ["convert", "--from", "sharegpt", "dataset_info.json", "--dataset", "d", "--output", "out.jsonl"]
LLAVA = ["convert", "--from", "llava", "in.json", "--output", "out.jsonl"]
MESSAGES = ["convert", "--from", "messages", "in.jsonl", "--output", "out.jsonl"]
CSV = ["convert", "--from", "csv", "in.csv", "--image-column", "", "--output", "out.jsonl"]
CANONICAL_BAD_LINE2 = {  # data.jsonl whose line 2 is bad, for split / stats / export
    "latin1": (lines(canonical("a"), latin1(canonical("b", "café"))), "data.jsonl:2: not UTF-8 text"),
    "surrogate": (lines(canonical("a"), with_surrogate(canonical("b"))),
                  "data.jsonl:2, record 'b', field 'messages[1].content[0].text': lone surrogate '\\ud800'"),
    "deep": (lines(canonical("a"), DEEP), "data.jsonl:2: invalid JSON: nested too deeply"),
    "utf16": (utf16(lines(canonical("a"), canonical("b"))), "data.jsonl: the file is UTF-16 text"),
}
COMMANDS = {"split": ["split", "data.jsonl", "--eval-fraction", "0.5"], "stats": ["stats", "data.jsonl"],
            "export": ["export", "--to", "llava", "data.jsonl", "--output", "out.json"],
            "validate": ["validate", "data.jsonl"]}

# (files to write, command, how the one error line starts)
CASES = {
    "llava-latin1": ({"in.json": json_list(llava("a"), latin1(llava("b", "café")))}, LLAVA,
                     f"in.json:3: not UTF-8 text (byte {latin1(llava('b', 'café')).index(0xE9)} of the line: "
                     f"invalid continuation byte); save the file as UTF-8"),
    "llava-utf16": ({"in.json": utf16(json_list(llava("a")))}, LLAVA,
                    "in.json: the file is UTF-16 text (it starts with a UTF-16 byte order mark); save it as UTF-8"),
    "messages-latin1-line": ({"in.jsonl": lines(chat("a"), latin1(chat("b", "café")), chat("c"))}, MESSAGES,
                             "in.jsonl:2: not UTF-8 text"),
    "messages-utf16-be": ({"in.jsonl": utf16_be(lines(chat("a")))}, MESSAGES, "in.jsonl: the file is UTF-16 text"),
    "messages-utf16-le-no-bom": ({"in.jsonl": lines(chat("a")).decode().encode("utf-16-le")}, MESSAGES,
                                 "in.jsonl: the file looks like UTF-16 text"),
    "csv-latin1": ({"in.csv": CSV_HEADER + b"a,q,red\nb,q,caf\xe9\n"}, CSV, "in.csv:3: not UTF-8 text"),
    "csv-utf16": ({"in.csv": utf16(CSV_HEADER + b"a,q,red\n")}, CSV, "in.csv: the file is UTF-16 text"),
    "sharegpt-info-latin1": ({"dataset_info.json": b'{\n "d": {"file_name": "d.json", "formatting": "sharegpt",\n'
                                                   b'       "description": "caf\xe9"}\n}\n'}, SHAREGPT,
                             "dataset_info.json:3: not UTF-8 text"),
    "sharegpt-info-utf16": ({"dataset_info.json": utf16(b'{"d": {"file_name": "d.json"}}')}, SHAREGPT,
                            "dataset_info.json: the file is UTF-16 text"),
    "llava-surrogate": ({"in.json": json_list(llava("a"), with_surrogate(llava("b")))}, LLAVA,
                        "in.json:3, record 'b', field 'conversations[1].value': "
                        "lone surrogate '\\ud800' at character 3"),
    "messages-surrogate": ({"in.jsonl": lines(chat("a"), with_surrogate(chat("b")))}, MESSAGES,
                           "in.jsonl:2, record 'b', field 'messages[1].content[0].text': lone surrogate"),
    "surrogate-in-id": ({"in.jsonl": lines(chat("a\udc80"))}, MESSAGES,
                        "in.jsonl:1, record 'a\\udc80', field 'id': lone surrogate '\\udc80' at character 1"),
    "llava-deep-list": ({"in.json": DEEP.encode()}, LLAVA, "in.json:1: invalid JSON: nested too deeply"),
    "llava-deep-item": ({"in.json": json_list(llava("a"), DEEP)}, LLAVA, "in.json:3: invalid JSON: nested too deeply"),
    "messages-deep-line": ({"in.jsonl": lines(chat("a"), DEEP)}, MESSAGES,
                           "in.jsonl:2: invalid JSON: nested too deeply"),
    "sharegpt-info-deep": ({"dataset_info.json": DEEP.encode()}, SHAREGPT,
                           "dataset_info.json:1: invalid JSON: nested too deeply"),
    "validate-utf16": ({"data.jsonl": CANONICAL_BAD_LINE2["utf16"][0]}, COMMANDS["validate"],
                       CANONICAL_BAD_LINE2["utf16"][1]),
    **{f"{command}-{bad}": ({"data.jsonl": data}, COMMANDS[command], start)
       for command in ("split", "stats", "export") for bad, (data, start) in CANONICAL_BAD_LINE2.items()},
}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("lvlm_cl: error: "), err
    return err.rstrip("\n")


@pytest.mark.parametrize("files, argv, start", CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_error_line(tmp_path: Path, monkeypatch, capsys, files, argv, start):
    monkeypatch.chdir(tmp_path)
    for name, data in files.items():
        Path(name).write_bytes(data)
    assert main(argv) == 2
    assert one_error_line(capsys).startswith(f"lvlm_cl: error: {start}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # a failed command writes nothing


@pytest.mark.parametrize("bad, problem", [
    (latin1(canonical("b", "café")),
     f"data.jsonl:2: not UTF-8 text (byte {latin1(canonical('b', 'café')).index(0xE9)} of the line"),
    (with_surrogate(canonical("b")),
     "data.jsonl:2, record 'b', field 'messages[1].content[0].text': lone surrogate '\\ud800' at character 3"),
    (DEEP, "data.jsonl:2: invalid JSON: nested too deeply"),
], ids=["latin1", "surrogate", "deep"])
def test_validate_reports_the_bad_line_and_goes_on(tmp_path: Path, capsys, bad, problem):
    path = tmp_path / "data.jsonl"
    path.write_bytes(lines(canonical("a"), bad, canonical("c"), {"id": "d"}))
    assert main(["validate", str(path), "--no-check-images"]) == 1
    out, err = capsys.readouterr()
    assert err == ""
    reported = out.splitlines()
    assert reported[0].startswith(f"{tmp_path}/{problem}")
    assert reported[1].startswith(f"{path}:4, record 'd', field 'messages'")  # the lines after it are still checked
    assert reported[2] == f"{path}: 4 records, 2 problem(s) in 2 record(s)"


def test_skip_invalid_rejects_a_line_that_is_not_utf8(tmp_path: Path, capsys):
    src = tmp_path / "in.jsonl"
    bad = latin1(chat("b", "café"))
    src.write_bytes(lines(chat("a"), bad, chat("c", "blue")))
    out = tmp_path / "out.jsonl"
    assert main(["convert", "--from", "messages", str(src), "--output", str(out), "--skip-invalid"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"rejected 1 invalid record(s): see {tmp_path}/out.rejects.jsonl"
    assert [(r["id"], r["messages"][1]["content"]) for r in read_jsonl(out)] == [("a", [text("red")]),
                                                                                 ("c", [text("blue")])]
    [reject] = read_jsonl(tmp_path / "out.rejects.jsonl")
    assert reject["line"] == 2
    assert reject["reasons"][0].startswith(f"not UTF-8 text (byte {bad.index(0xE9)} of the line")
    assert '"content": "caf\\xe9"' in reject["record"]  # the line itself, its bad byte shown as \xe9


def test_skip_invalid_rejects_a_lone_surrogate_and_keeps_it(tmp_path: Path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(lines(chat("a"), with_surrogate(chat("b"))))
    out = tmp_path / "out.jsonl"
    assert main(["convert", "--from", "messages", str(src), "--output", str(out), "--skip-invalid"]) == 0
    assert [r["id"] for r in read_jsonl(out)] == ["a"]
    [reject] = read_jsonl(tmp_path / "out.rejects.jsonl")  # valid UTF-8, the surrogate \u-escaped
    assert reject["record"]["messages"][1]["content"] == "red\ud800"
    assert reject["reasons"] == ["field 'messages[1].content[0].text': lone surrogate '\\ud800' at character 3: "
                                 "not valid Unicode text (an unpaired \\u escape?); it cannot be written as UTF-8"]


def test_csv_cells_larger_than_the_csv_module_default(tmp_path: Path):
    answer = "x" * 200_000  # the csv module stops at 131072 characters by default
    src = tmp_path / "in.csv"
    src.write_text(f"id,question,answer\na,What is it?,{answer}\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["convert", "--from", "csv", str(src), "--image-column", "", "--output", str(out)]) == 0
    assert read_jsonl(out)[0]["messages"][1]["content"] == [text(answer)]


def test_csv_error_names_file_and_line(tmp_path: Path, capsys):
    src = tmp_path / "in.csv"
    src.write_text("id,question,answer\na,q,red\nb,q,a longer answer\n", encoding="utf-8")

    limit = csv.field_size_limit(10)
    try:
        assert main(["convert", "--from", "csv", str(src), "--image-column", "", "--output",
                     str(tmp_path / "out.jsonl")]) == 2
    finally:
        csv.field_size_limit(limit)
    assert one_error_line(capsys) == f"lvlm_cl: error: {src}:3: unreadable table row: field larger than field limit (10)"


def test_csv_with_classic_mac_line_ends_and_a_utf8_bom(tmp_path: Path):
    src = tmp_path / "in.csv"
    src.write_bytes(codecs.BOM_UTF8 + b'id,question,answer\ra,"two\rlines",red\rb,q,caf\xc3\xa9\r')
    out = tmp_path / "out.jsonl"
    assert main(["convert", "--from", "csv", str(src), "--image-column", "", "--output", str(out)]) == 0
    assert [(r["id"], r["messages"][0]["content"], r["messages"][1]["content"]) for r in read_jsonl(out)] == [
        ("a", [text("two\rlines")], [text("red")]), ("b", [text("q")], [text("café")])]


def png_url(colour: str) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("failure", ["invalid record", "syntax error", "output not writable"])
def test_failed_conversion_leaves_no_image(tmp_path: Path, capsys, failure):
    """Images of records converted before the failure are removed; files that were there stay as they were."""
    images = tmp_path / "images" / "in"
    images.mkdir(parents=True)
    Image.new("RGB", (8, 8), "blue").save(images / "a_0.png")  # from an earlier run: replaced only on success
    (images / "other.png").write_bytes(b"not ours")
    before = {p: p.read_bytes() for p in images.iterdir()}
    rows = [chat("a", image=png_url("red")), chat("b", image=png_url("green"))]
    src, out = tmp_path / "in.json", tmp_path / "out.jsonl"
    if failure == "invalid record":
        src.write_bytes(json_list(*rows, {"id": "c", "messages": []}))
    elif failure == "syntax error":
        src.write_bytes(json_list(*rows).replace(b"\n]", b"\n}"))
    else:
        src.write_bytes(json_list(*rows))
        out.mkdir()  # the JSONL cannot replace a folder: the failure comes after the images were moved in place
    assert main(["convert", "--from", "messages", str(src), "--output", str(out)]) == 2
    assert one_error_line(capsys).startswith(f"lvlm_cl: error: {out}:" if out.is_dir() else f"lvlm_cl: error: {src}:4")
    assert {p: p.read_bytes() for p in images.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "in.json"] + (["out.jsonl"] * out.is_dir())

    if out.is_dir():
        out.rmdir()
    src.write_bytes(json_list(*rows))  # the same conversion, now fine: images in place, nothing staged left
    assert main(["convert", "--from", "messages", str(src), "--output", str(out)]) == 0
    assert [r["images"] for r in read_jsonl(out)] == [["images/in/a_0.png"], ["images/in/b_0.png"]]
    with Image.open(images / "a_0.png") as im:
        assert im.getpixel((0, 0)) == (255, 0, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "in.json", "out.jsonl"]
    assert sorted(p.name for p in images.iterdir()) == ["a_0.png", "b_0.png", "other.png"]
