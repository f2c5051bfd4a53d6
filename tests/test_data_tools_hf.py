"""``convert --from hf``: save_to_disk folders and parquet files, image columns written out as PNG files."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from data_tools.cli import main
from conftest import IMG, read_jsonl, text

datasets = pytest.importorskip("datasets")


def png_bytes(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def chat_dataset(with_corrupt: bool = False):
    """A TRL-style vision dataset (as HuggingFaceH4/llava-instruct-mix-vsft): messages + a list of images."""
    rows = {
        "id": ["r0", "r1", "r2"],
        "images": [[Image.new("RGB", (8, 8), "red")],
                   [{"bytes": png_bytes("blue"), "path": None}, {"bytes": png_bytes("green"), "path": None}],
                   []],
        "messages": [
            [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Colour?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
            [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "image", "text": None},
                                          {"type": "text", "text": "Colours?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "blue, green"}]}],
            [{"role": "user", "content": [{"type": "text", "text": "2+2?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "4"}]}],
        ],
    }
    if with_corrupt:  # r0: a good image, then a corrupt one
        rows["images"][0] = [{"bytes": png_bytes("red"), "path": None}, {"bytes": png_bytes("red")[:40], "path": None}]
        rows["messages"][0][0]["content"].insert(0, {"type": "image", "text": None})
    features = datasets.Features({
        "id": datasets.Value("string"),
        "images": datasets.List(datasets.Image()),
        "messages": datasets.List({"role": datasets.Value("string"),
                                   "content": datasets.List({"type": datasets.Value("string"),
                                                             "text": datasets.Value("string")})}),
    })
    return datasets.Dataset.from_dict(rows, features=features)


def test_save_to_disk_chat_dataset_writes_png_images(tmp_path: Path, capsys):
    ds_dir = tmp_path / "vsft"
    datasets.DatasetDict({"train": chat_dataset(), "test": chat_dataset()}).save_to_disk(str(ds_dir))
    out = tmp_path / "data" / "vsft.jsonl"
    # Two splits: the user must choose one.
    assert main(["convert", "--from", "hf", str(ds_dir), "--output", str(out)]) == 2
    assert "--split" in capsys.readouterr().err
    assert main(["convert", "--from", "hf", str(ds_dir), "--split", "train", "--output", str(out)]) == 0
    recs = read_jsonl(out)
    assert [r["id"] for r in recs] == ["r0", "r1", "r2"] and all(r["task"] == "vsft" for r in recs)
    assert recs[0]["images"] == ["images/vsft/r0_0.png"]
    assert recs[1]["images"] == ["images/vsft/r1_0.png", "images/vsft/r1_1.png"]
    assert recs[1]["messages"][0]["content"] == [IMG, IMG, text("Colours?")]
    assert recs[2]["images"] == [] and recs[2]["messages"][1]["content"] == [text("4")]
    with Image.open(out.parent / recs[1]["images"][1]) as im:
        assert im.format == "PNG" and im.getpixel((0, 0)) == (0, 128, 0)


def test_corrupt_image_bytes_reject_the_row(tmp_path: Path, capsys):
    ds_dir = tmp_path / "vsft"
    chat_dataset(with_corrupt=True).save_to_disk(str(ds_dir))
    out = tmp_path / "out.jsonl"
    assert main(["convert", "--from", "hf", str(ds_dir), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{ds_dir}, row 0, record 'r0', field 'images[1]': image cannot be decoded" in err
    assert main(["convert", "--from", "hf", str(ds_dir), "--output", str(out), "--skip-invalid"]) == 0
    assert [r["id"] for r in read_jsonl(out)] == ["r1", "r2"]
    reject = read_jsonl(tmp_path / "out.rejects.jsonl")[0]
    assert reject["id"] == "r0" and reject["record"]["images"][1] == {"bytes": "<40 bytes>", "path": None}
    # The rejected row's good image is not left behind; the kept rows' images are there.
    assert not (tmp_path / "images" / "vsft" / "r0_0.png").exists()
    assert (tmp_path / "images" / "vsft" / "r1_0.png").is_file()


def test_parquet_vqa_table_with_image_column(tmp_path: Path):
    ds = datasets.Dataset.from_dict(
        {"q": ["Colour?", "Shape?"], "a": ["red", "square"],
         "picture": [Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")]},
        features=datasets.Features({"q": datasets.Value("string"), "a": datasets.Value("string"),
                                    "picture": datasets.Image()}))
    pq_dir = tmp_path / "shapes"
    pq_dir.mkdir()
    ds.to_parquet(str(pq_dir / "train-00000.parquet"))
    out = tmp_path / "shapes.jsonl"
    assert main(["convert", "--from", "hf", str(pq_dir), "--question-column", "q", "--answer-column", "a",
                 "--image-column", "picture", "--output", str(out)]) == 0
    recs = read_jsonl(out)
    assert [r["id"] for r in recs] == ["shapes-0", "shapes-1"]
    assert recs[1] == {"id": "shapes-1", "task": "shapes", "images": ["images/shapes/shapes-1_0.png"],
                       "messages": [{"role": "user", "content": [IMG, text("Shape?")]},
                                    {"role": "assistant", "content": [text("square")]}]}
    with Image.open(tmp_path / recs[1]["images"][0]) as im:
        assert im.getpixel((0, 0)) == (0, 0, 255)


def test_llava_style_rows_and_unknown_columns(tmp_path: Path, capsys):
    ds = datasets.Dataset.from_dict({
        "id": [5], "image": [Image.new("RGB", (8, 8), "red")],
        "conversations": [[{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]]},
        features=datasets.Features({"id": datasets.Value("int64"), "image": datasets.Image(),
                                    "conversations": datasets.List({"from": datasets.Value("string"),
                                                                    "value": datasets.Value("string")})}))
    pq = tmp_path / "llava_rows.parquet"
    ds.to_parquet(str(pq))
    out = tmp_path / "o.jsonl"
    assert main(["convert", "--from", "hf", str(pq), "--output", str(out)]) == 0
    rec = read_jsonl(out)[0]
    assert rec["id"] == "5" and rec["images"] == ["images/llava_rows/5_0.png"]
    assert rec["messages"][0]["content"] == [IMG, text("Colour?")]
    assert main(["convert", "--from", "hf", str(pq), "--messages-column", "turns", "--output", str(out)]) == 2
    assert "no messages column 'turns'; columns are ['id', 'image', 'conversations']" in capsys.readouterr().err
