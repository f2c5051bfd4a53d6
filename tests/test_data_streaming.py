"""Data at scale: token counts from the text and image headers (no pixel decoded) equal the processor's,
records kept compact, batches encoded in DataLoader workers and not kept, batches grouped by length."""

import hashlib
import json
import pickle
import signal
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SMALL_MODEL, record, write_recipe
from lvlm_cl.data.dataset import Collator, StepBatchOrder, check_batch, quiet_worker
from lvlm_cl.data.encoding import EncodingError, encode_prompt, encode_record
from lvlm_cl.data.lengths import TokenCounter
from lvlm_cl.data.records import RecordError, RecordTable, load_table


def processor_of(family):
    from lvlm_cl.models.tiny import TinyLlavaSize, build_tiny_processor
    from lvlm_cl.models.tiny_gemma3 import build_tiny_gemma3_processor
    from lvlm_cl.models.tiny_qwen25vl import build_tiny_qwen25vl_processor

    size = TinyLlavaSize(text_hidden=64, vision_hidden=64, text_intermediate=128)
    build = {"llava": build_tiny_processor, "gemma3": build_tiny_gemma3_processor,
             "qwen2.5-vl": build_tiny_qwen25vl_processor}[family]
    return build(size)


def varied_records(tmp_path) -> list[dict]:
    """Images of several sizes and modes, multi-image and text-only records, a system turn, several turns."""
    paths = []
    for k, (size, mode) in enumerate([((32, 32), "RGB"), ((97, 13), "L"), ((300, 200), "RGBA"), ((5, 640), "RGB")]):
        path = tmp_path / f"img{k}.png"
        Image.new(mode, size).save(path)
        paths.append(str(path))
    two = record("two-images", paths[0], "Compare them.", "the same")
    two["images"].append(paths[2])
    two["messages"][0]["content"].insert(1, {"type": "image"})
    multi = record("multi-turn", paths[1], "What is it?", "a bar")
    multi["messages"] = ([{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]}]
                         + multi["messages"] + [{"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
                                                {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}])
    return [record("small", paths[0], "What colour?", "black"), record("text", None, "Say hi.", "hi there"), two,
            multi, record("tall", paths[3], "Is it tall? Explain in words. " * 3, "yes, very"),
            record("wide", paths[2], "Which?", "none")]


@pytest.mark.parametrize("family", ["llava", "gemma3", "qwen2.5-vl"])
@pytest.mark.parametrize("prompt", [False, True])
def test_counts_from_the_text_and_headers_equal_the_processors_without_decoding_an_image(tmp_path, family, prompt,
                                                                                        monkeypatch):
    processor = processor_of(family)
    records = varied_records(tmp_path)
    one = encode_prompt if prompt else encode_record
    expected = [one(processor, r, 4096).input_ids.numel() for r in records]
    from PIL import ImageFile

    # From here on no image may be decoded: only headers are read (the per-size probe uses blank images).
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("an image was decoded"))
    counter = TokenCounter(processor, 4096)
    assert counter.count(records, prompt=prompt).tolist() == expected
    assert counter.exact_by_text


def test_a_processor_the_text_count_gets_wrong_is_counted_by_the_processor(tmp_path):
    processor = processor_of("llava")
    records = varied_records(tmp_path)
    expected = [encode_record(processor, r, 4096).input_ids.numel() for r in records]
    counter = TokenCounter(processor, 4096)
    counter.image_tokens = lambda size: 3           # as if the text around an image tokenized differently
    assert not counter.verify(records, prompt=False) and not counter.exact_by_text
    assert counter.count(records, prompt=False).tolist() == expected


@pytest.mark.parametrize("problem, message, field", [
    ("missing", "image not found", "images[0]"),
    ("garbage", "cannot be read", "images[0]"),
    ("truncated", "image cannot be read (truncated: the JPEG file ends before its end marker)", "images[0]"),
    ("long", "exceed model.max_length=64", "messages"),
    ("no-image-token", "has images but the encoded text has no image tokens", "images"),
])
def test_a_bad_record_is_named_with_its_file_and_field(tmp_path, problem, message, field):
    good = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(good)
    bad = record("bad", str(good), "q", "a")
    if problem == "missing":
        bad["images"] = [str(tmp_path / "nowhere.png")]
    elif problem == "garbage":
        (tmp_path / "garbage.png").write_bytes(b"not an image at all")
        bad["images"] = [str(tmp_path / "garbage.png")]
    elif problem == "truncated":            # a download cut short: the header is whole, the end is missing
        import random

        rnd = random.Random(0)
        noisy = Image.frombytes("RGB", (200, 200), bytes(rnd.randrange(256) for _ in range(200 * 200 * 3)))
        noisy.save(tmp_path / "cut.jpg", quality=95)
        data = (tmp_path / "cut.jpg").read_bytes()
        (tmp_path / "cut.jpg").write_bytes(data[:len(data) * 2 // 3])
        bad["images"] = [str(tmp_path / "cut.jpg")]
    elif problem == "long":
        bad["messages"][0]["content"][1]["text"] = "word " * 300
    else:
        bad["messages"][0]["content"] = [{"type": "text", "text": "q"}]
    records = [record("ok", str(good), "q", "a"), bad]
    with pytest.raises(EncodingError) as e:
        TokenCounter(processor_of("llava"), 64).count(records, prompt=False, path="data/t.train.jsonl")
    assert str(e.value).startswith(f"data/t.train.jsonl, record 'bad', field '{field}': ")
    assert message in str(e.value)


def test_an_empty_answer_is_found_before_training(tmp_path):
    # the record validator refuses an answer with no text when the file is read ...
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(record("blank", None, "q", "  ")) + "\n")
    with pytest.raises(RecordError, match="record 'blank', field 'messages.1..content': assistant turn has no text"):
        load_table(path)
    # ... and a template that renders no assistant tokens is found by the count, from the text
    processor = processor_of("llava")
    template = processor.chat_template.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    assert template != processor.chat_template
    processor.chat_template = template + "{% if false %}{% generation %}{% endgeneration %}{% endif %}"
    with pytest.raises(EncodingError, match="record 'ok', field 'messages': no assistant tokens"):
        TokenCounter(processor, 256).count([record("ok", None, "q", "a")], prompt=False)


def test_a_record_table_is_compact_sliceable_addable_and_carries_lengths(tmp_path):
    records = [record(f"r{i}", f"/img/{i}.png", "What colour is the image? é", "red") for i in range(200)]
    table = RecordTable(records)
    assert len(table) == 200 and table[5] == records[5] and table[-1] == records[-1] and list(table) == records
    with pytest.raises(IndexError):
        table[200]
    table[0]["id"] = "changed"                            # a fresh dict each time
    assert table[0]["id"] == "r0"
    table.lengths = np.arange(200, dtype=np.int32)
    assert table[10:20].lengths.tolist() == list(range(10, 20)) and list(table[10:20]) == records[10:20]
    assert table[::50].lengths.tolist() == [0, 50, 100, 150]
    both = table[:3] + [records[7]]                      # a method adding plain records: -1 = not counted
    assert list(both) == records[:3] + [records[7]] and both.lengths.tolist() == [0, 1, 2, -1]
    assert list([records[9]] + table[:1]) == [records[9], records[0]]
    assert pickle.loads(pickle.dumps(table)) == table   # workers started by spawn get it whole
    import sys

    as_dicts = sys.getsizeof(records) + sum(_deep_size(r) for r in records)
    assert len(table._buffer) + table._offsets.nbytes < as_dicts / 3


def _deep_size(obj) -> int:
    import sys

    if isinstance(obj, dict):
        return sys.getsizeof(obj) + sum(_deep_size(k) + _deep_size(v) for k, v in obj.items())
    if isinstance(obj, list):
        return sys.getsizeof(obj) + sum(_deep_size(v) for v in obj)
    return sys.getsizeof(obj)


def test_a_table_loads_with_the_fingerprint_of_its_bytes_and_names_text_that_is_not_utf8(tmp_path):
    from lvlm_cl.checkpoint import data_fingerprint

    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(record(f"r{i}", None, "q", "a", task="")) + "\n" for i in range(3)) + "\n")
    digest = hashlib.sha256()
    table = load_table(path, task="colour", digest=digest)
    assert [r["task"] for r in table] == ["colour"] * 3
    assert digest.hexdigest()[:16] == data_fingerprint([str(path)])   # resumed runs keep their fingerprint
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps(record("x", None, "caf\u00e9", "a"), ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(RecordError, match=r"latin1.jsonl:1: not UTF-8 text \(byte \d+: invalid"):
        load_table(bad)
    deep = tmp_path / "deep.jsonl"
    deep.write_text(json.dumps(record("ok", None, "q", "a")) + "\n" + "[" * 100_000 + "\n")
    with pytest.raises(RecordError, match=r"deep.jsonl:2: invalid JSON: nested too deeply"):
        load_table(deep)


def test_the_collator_encodes_in_the_worker_and_hands_errors_back_as_one_sentence(tmp_path):
    processor = processor_of("llava")
    good = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(good)
    records = [record("a", str(good), "q", "red", task="colour"), record("b", None, "q", "blue", task="warmth")]
    batch = check_batch(Collator(processor, 256, task_index={"colour": 0, "warmth": 1})(records))
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 1
    assert batch["cl_task_ids"].tolist() == [0, 1]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    records[1] = record("b", str(tmp_path / "broken.png"), "q", "blue", task="warmth")
    loader = torch.utils.data.DataLoader(records, batch_size=2, num_workers=1,
                                         collate_fn=Collator(processor, 256, files={"warmth": "w.train.jsonl"}))
    out = next(iter(loader))
    assert "error" in out
    with pytest.raises(EncodingError, match=r"^w.train.jsonl, record 'b', field 'images\[0\]': image cannot be read"):
        check_batch(out)


def padding(order, lengths) -> float:
    real = total = 0
    for batch in order:
        sizes = [lengths[i] for i in batch]
        real += sum(sizes)
        total += max(sizes) * len(sizes)
    return 1 - real / total


def test_grouping_by_length_cuts_padding_and_keeps_every_sample_once_per_epoch():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(20, 40, 500), rng.integers(200, 600, 500)])   # short VQA, long answers
    plain = StepBatchOrder(1000, 16, 125, seed=3)
    grouped = StepBatchOrder(1000, 16, 125, seed=3, lengths=lengths)
    assert padding(plain, lengths) > 0.4 and padding(grouped, lengths) < 0.08
    assert sorted(i for b in grouped for i in b) == sorted(list(range(1000)) * 2)     # 125 x 16 = two epochs
    assert list(grouped) == list(StepBatchOrder(1000, 16, 125, seed=3, lengths=lengths))   # a function of the seed
    assert list(grouped) != list(StepBatchOrder(1000, 16, 125, seed=4, lengths=lengths))
    firsts = [max(lengths[i] for i in b) for b in list(grouped)[:10]]
    assert firsts != sorted(firsts, reverse=True)                         # the batches' order is shuffled


@pytest.mark.slow
def test_workers_and_grouping_train_what_the_recipe_says(tmp_path, colour_tasks):
    """Encoding in two worker processes gives the run of encoding in the training process exactly; grouping
    by length changes the batches, and a grouped run resumed after a kill is the same as one that never
    stopped (tests/test_resume.py covers the kill itself)."""
    from lvlm_cl.config import load_recipe
    from lvlm_cl.train import run

    def train(name, *overrides):
        out = tmp_path / name
        recipe = write_recipe(tmp_path / f"{name}.yaml", colour_tasks, out, steps_per_task=4, log_every=1)
        run(load_recipe(recipe, [*SMALL_MODEL, "trainer.eval_max_samples=4", "methods=[task_prompts]",
                                 *overrides]), progress=False)
        return json.loads((out / "metrics.json").read_text())

    inline, workers = train("inline", "trainer.num_workers=0"), train("workers", "trainer.num_workers=2")
    assert workers["train_loss"] == inline["train_loss"] and workers["matrix"] == inline["matrix"]
    assert workers["routing_accuracy"] == inline["routing_accuracy"]
    kept = train("kept", "trainer.keep_encodings=true")          # encoded once, kept: the same run
    assert kept["train_loss"] == inline["train_loss"] and kept["matrix"] == inline["matrix"]
    grouped = train("grouped", "trainer.num_workers=0", "trainer.group_by_length=true")
    assert grouped["num_completed"] == 2


def test_a_dataloader_worker_ends_quietly_when_its_training_process_stops_and_keeps_other_tracebacks(capsys):
    """``quiet_worker`` (every DataLoader worker's init): SIGTERM takes its default action in the worker, not
    the run's inherited handler, and a lost connection to the training process (resource_sharer handing
    over a batch while the run exits on SIGTERM: a truncated traceback under the run's one-line exit, 1 in 4
    tries before) prints nothing; any other error keeps its traceback."""
    handler, hook = signal.getsignal(signal.SIGTERM), sys.excepthook
    signal.signal(signal.SIGTERM, lambda *_: None)       # what a worker inherits: the run's handler
    try:
        quiet_worker(0)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        for error in (ConnectionResetError("peer gone"), BrokenPipeError("closed"), EOFError()):
            sys.excepthook(type(error), error, None)
        assert capsys.readouterr().err == ""
        sys.excepthook(ValueError, ValueError("a real bug"), None)
        assert "ValueError: a real bug" in capsys.readouterr().err
    finally:
        signal.signal(signal.SIGTERM, handler)
        sys.excepthook = hook
