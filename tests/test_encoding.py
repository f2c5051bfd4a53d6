"""Encoding through the chat template: golden strings, assistant-only labels, loud failures."""

import pytest
import torch
from PIL import Image

from conftest import record
from lvlm_cl.data.encoding import (IGNORE_INDEX, EncodingError, collate_prompts, collate_train, count_tokens,
                                   encode_prompt, encode_record, image_token_id)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (0, 200, 0)).save(path)
    return str(path)


def decode(processor, ids):
    return processor.tokenizer.decode(ids, skip_special_tokens=False)


def test_golden_rendering_and_labels(tiny_processor, image):
    enc = encode_record(tiny_processor, record("1", image, "What color?", "green"), max_length=256)
    img = image_token_id(tiny_processor)
    text = decode(tiny_processor, enc.input_ids[enc.input_ids != img])
    assert text == "<s>USER: \nWhat color? ASSISTANT: green</s>"
    # 32x32 image, 8x8 patches, CLS dropped ("default" strategy): 16 image tokens, contiguous.
    positions = (enc.input_ids == img).nonzero().flatten().tolist()
    assert len(positions) == 16 and positions == list(range(positions[0], positions[0] + 16))
    labelled = enc.labels[enc.labels != IGNORE_INDEX]
    assert decode(tiny_processor, labelled) == " green</s>"
    # Labels are a suffix of the sequence here (single turn), and image tokens are never labelled.
    assert (enc.labels[: -len(labelled)] == IGNORE_INDEX).all()
    assert (enc.labels[enc.input_ids == img] == IGNORE_INDEX).all()
    assert enc.pixel_values.shape == (1, 3, 32, 32)


def test_multi_turn_labels_every_assistant_turn_only(tiny_processor, image):
    rec = record("2", image, "What color?", "green")
    rec["messages"] = ([{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}] + rec["messages"]
                       + [{"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}])
    enc = encode_record(tiny_processor, rec, max_length=256)
    mask = enc.labels != IGNORE_INDEX
    # Two labelled spans, one per assistant turn.
    starts = int((mask[1:] & ~mask[:-1]).sum()) + int(mask[0])
    assert starts == 2
    assert decode(tiny_processor, enc.labels[mask]) == " green</s> yes</s>"
    text = decode(tiny_processor, enc.input_ids[enc.input_ids != image_token_id(tiny_processor)])
    assert text == "<s>Be brief. USER: \nWhat color? ASSISTANT: green</s>USER: Sure? ASSISTANT: yes</s>"


def test_prompt_stops_at_generation_prompt(tiny_processor, image):
    enc = encode_prompt(tiny_processor, record("3", image, "What color?", "green"), max_length=256)
    text = decode(tiny_processor, enc.input_ids[enc.input_ids != image_token_id(tiny_processor)])
    assert text == "<s>USER: \nWhat color? ASSISTANT:"
    assert enc.labels.numel() == 0


def test_over_long_sample_raises_naming_record(tiny_processor, image):
    rec = record("long-one", image, "word " * 300, "x")
    with pytest.raises(EncodingError, match=r"record 'long-one'.*exceed model.max_length=64"):
        encode_record(tiny_processor, rec, max_length=64)
    assert count_tokens(tiny_processor, rec) > 300


def test_template_without_generation_markers_raises(tiny_processor, image):
    import copy

    processor = copy.deepcopy(tiny_processor)
    processor.chat_template = processor.chat_template.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    with pytest.raises(EncodingError, match="generation"):
        encode_record(processor, record("4", image, "q", "a"), max_length=256)


def test_collators_pad_on_the_right_side(tiny_processor, image):
    a = encode_record(tiny_processor, record("a", image, "What color?", "green"), 256)
    b = encode_record(tiny_processor, record("b", image, "What color is this image, please?", "green"), 256)
    pad = tiny_processor.tokenizer.pad_token_id
    batch = collate_train([a, b], pad)
    n = max(a.input_ids.numel(), b.input_ids.numel())
    assert batch["input_ids"].shape == (2, n) and batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["attention_mask"][0].sum() == a.input_ids.numel()
    assert (batch["labels"][0, a.input_ids.numel():] == IGNORE_INDEX).all()   # right padding, ignored
    pa, pb = encode_prompt(tiny_processor, record("a", image, "What color?", "g"), 256), \
        encode_prompt(tiny_processor, record("b", image, "What color is this image, please?", "g"), 256)
    prompts = collate_prompts([pa, pb], pad)
    m = max(pa.input_ids.numel(), pb.input_ids.numel())
    assert pa.input_ids.numel() < m                                          # the fixture makes them differ
    lead = m - pa.input_ids.numel()                                           # left padding: ends align
    assert (prompts["input_ids"][0, :lead] == pad).all() and (prompts["attention_mask"][0, :lead] == 0).all()
    assert torch.equal(prompts["input_ids"][0, lead:], pa.input_ids) and (prompts["attention_mask"][0, lead:] == 1).all()
    assert torch.equal(prompts["input_ids"][1], pb.input_ids)


def test_any_utf8_text_encodes_without_unknown_tokens(tiny_processor):
    tok = tiny_processor.tokenizer
    text = "héllo ✓ 中文 🙂 \t tabs"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == text


def _mixed_records(image, other):
    multi = record("multi", image, "What color?", "green")
    multi["messages"] = ([{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}] + multi["messages"]
                         + [{"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
                            {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}])
    return [record("a", image, "What color?", "green"), record("text-only", None, "Say hi.", "hi there"), multi,
            record("b", other, "Which color is the square in this picture, please?", "red")]


@pytest.mark.parametrize("family", ["llava", "gemma3", "qwen2.5-vl"])
@pytest.mark.parametrize("prompt", [False, True])
def test_encoding_many_records_in_one_call_equals_one_call_each(tmp_path, image, family, prompt, monkeypatch):
    import lvlm_cl.data.encoding as encoding
    from lvlm_cl.data.encoding import encode_many
    from lvlm_cl.models.tiny import TinyLlavaSize, build_tiny_processor
    from lvlm_cl.models.tiny_gemma3 import build_tiny_gemma3_processor
    from lvlm_cl.models.tiny_qwen25vl import build_tiny_qwen25vl_processor

    size = TinyLlavaSize(text_hidden=64, vision_hidden=64, text_intermediate=128)
    build = {"llava": build_tiny_processor, "gemma3": build_tiny_gemma3_processor,
             "qwen2.5-vl": build_tiny_qwen25vl_processor}[family]
    processor = build(size)
    other = tmp_path / "b.png"
    Image.new("RGB", (48, 20), (200, 0, 0)).save(other)
    records = _mixed_records(image, str(other))
    one = encode_prompt if prompt else encode_record
    expected = [one(processor, r, 256) for r in records]
    for name in ("encode_prompt", "encode_record"):       # the batched path, not the one-by-one fallback
        monkeypatch.setattr(encoding, name, lambda *a, **k: pytest.fail("fell back to one call per record"))
    got = encode_many(processor, records, 256, prompt=prompt)
    assert len(got) == len(records)
    assert len({e.input_ids.numel() for e in expected}) > 1            # padding had to be cut away
    for e, g in zip(expected, got):
        assert torch.equal(e.input_ids, g.input_ids) and torch.equal(e.labels, g.labels)
        assert (e.pixel_values is None) == (g.pixel_values is None)
        if e.pixel_values is not None:
            assert torch.equal(e.pixel_values, g.pixel_values)
        for key in ("image_grid_thw", "mm_token_type_ids"):     # Qwen's (None for the other families)
            a, b = getattr(e, key), getattr(g, key)
            assert (a is None and b is None) or torch.equal(a, b), key


def test_encoding_many_names_the_bad_record(tiny_processor, image):
    from lvlm_cl.data.encoding import encode_many

    records = [record("ok", image, "q", "a"), record("long-one", image, "word " * 300, "x"), record("ok2", image, "q", "a")]
    with pytest.raises(EncodingError, match=r"record 'long-one'.*exceed model.max_length=64"):
        encode_many(tiny_processor, records, 64, prompt=False)
