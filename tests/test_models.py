"""Model sources take one path: built-in or local directory, frozen parts, LoRA, the cached pretrained base."""

import importlib.util
import json

import pytest
import torch

from conftest import SMALL_MODEL, write_recipe
from lvlm_cl.config import LoraSettings, ModelConfig, load_recipe
from lvlm_cl.models import ModelError, apply_training_setup, load_model_dir, parts, resolve_model_dir
from lvlm_cl.models.tiny import TinyLlavaSize, build_tiny_llava, save_model_dir

SMALL = TinyLlavaSize(text_hidden=64, vision_hidden=64, text_intermediate=128)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model, processor = build_tiny_llava(SMALL, seed=0)
    return save_model_dir(model, processor, tmp_path_factory.mktemp("m") / "tiny")


def test_builtin_is_deterministic_for_a_seed():
    a, _ = build_tiny_llava(SMALL, seed=3)
    b, _ = build_tiny_llava(SMALL, seed=3)
    c, _ = build_tiny_llava(SMALL, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_local_directory_loads_through_from_pretrained(tiny_dir):
    model, processor = load_model_dir(tiny_dir, ModelConfig(path=str(tiny_dir)))
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert processor.tokenizer.padding_side == "left"
    again, _ = build_tiny_llava(SMALL, seed=0)
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)   # the saved weights, not new ones


def test_local_directory_errors_say_what_to_do(tmp_path, tiny_dir):
    cfg = ModelConfig(path=str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="is not a directory"):
        resolve_model_dir(cfg, 0, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_dir(ModelConfig(path=str(tmp_path / "empty")), 0, tmp_path)
    with pytest.raises(ModelError, match="unknown built-in"):
        resolve_model_dir(ModelConfig(path="builtin:huge"), 0, tmp_path)
    # A template without {% generation %} markers (as some hub processors ship) is refused unless replaced.
    cfg_file = tiny_dir / "chat_template.jinja"
    original = cfg_file.read_text()
    try:
        cfg_file.write_text(original.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", ""))
        with pytest.raises(ModelError, match="model.chat_template: llava15"):
            load_model_dir(tiny_dir, ModelConfig(path=str(tiny_dir)))
        _, processor = load_model_dir(tiny_dir, ModelConfig(path=str(tiny_dir), chat_template="llava15"))
        assert "generation" in processor.chat_template
    finally:
        cfg_file.write_text(original)


def test_freezing_follows_the_recipe(tiny_dir):
    model, _ = load_model_dir(tiny_dir)
    model = apply_training_setup(model, ModelConfig(freeze_vision_tower=True, freeze_projector=False,
                                                    freeze_language_model=True))
    p = parts(model)
    assert not any(x.requires_grad for x in p["vision_tower"].parameters())
    assert all(x.requires_grad for x in p["projector"].parameters())
    assert not any(x.requires_grad for x in p["language_model"].parameters())


def test_lora_through_peft_trains_only_adapters_and_saved_modules(tiny_dir):
    model, _ = load_model_dir(tiny_dir)
    model = apply_training_setup(model, ModelConfig(lora=LoraSettings(r=4, modules_to_save=["multi_modal_projector"])))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    assert any("language_model" in n and "lora_A" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    with pytest.raises(ModelError, match="matches no module"):
        apply_training_setup(load_model_dir(tiny_dir)[0], ModelConfig(lora=LoraSettings(target_modules="nothing.*")))


@pytest.mark.slow
def test_lora_run_trains_and_checkpoints_adapters(tmp_path, colour_tasks):
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, tmp_path / "run", steps_per_task=3)
    model, _, state = __import__("lvlm_cl.train", fromlist=["run"]).run(
        load_recipe(recipe, [*SMALL_MODEL, "model.lora.r=4"]), progress=False)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "checkpoints" / "task-01-warmth" / "trainable.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    assert len(state.rows) == 2


@pytest.mark.slow
def test_pretrained_base_is_built_once_and_cached(tmp_path):
    cfg = load_recipe(_seq_recipe(tmp_path),
                      [*SMALL_MODEL[2:], "model.path=builtin:tiny-llava",
                       "model.pretrain_recipe=tests/fixtures/pretrain_micro.yaml"])
    cache = tmp_path / "cache"
    from lvlm_cl.train import pretrained_base

    first = resolve_model_dir(cfg.model, cfg.seed, cache, pretrained=pretrained_base)
    summary = json.loads((first / "pretrain_summary.json").read_text())
    assert summary["tasks"] == ["caption", "instruct"] and (first / "config.json").is_file()
    stamp = (first / "config.json").stat().st_mtime_ns
    assert resolve_model_dir(cfg.model, cfg.seed, cache, pretrained=pretrained_base) == first
    assert (first / "config.json").stat().st_mtime_ns == stamp                     # reused, not rebuilt
    model, processor = load_model_dir(first, cfg.model)
    assert model.config.text_config.hidden_size == 64                               # the recipe's sizes


def _seq_recipe(tmp_path):
    path = tmp_path / "seq.yaml"
    path.write_text("output_dir: out\nbenchmark: seq5\nreport_to: []\n")
    return path


def test_the_attention_kernel_is_a_recipe_setting(tiny_dir, tmp_path):
    """model.attn_implementation picks transformers' kernel; eager and SDPA compute the same logits on a
    left-padded batch with an image, and a kernel that cannot load here is refused naming the key."""
    from conftest import colour_stream, prompt_batch

    stream = colour_stream(tmp_path / "data")
    logits = {}
    for kernel in ("eager", "sdpa"):
        model, processor = load_model_dir(tiny_dir, ModelConfig(attn_implementation=kernel))
        assert model.config.get_text_config()._attn_implementation == kernel
        batch = prompt_batch(processor, stream[0].test_records[:1] + stream[1].test_records[:1])
        assert (batch["attention_mask"] == 0).any()                     # padding is in play
        with torch.no_grad():
            logits[kernel] = model.eval()(**batch).logits
    real = batch["attention_mask"].bool()            # padding positions' outputs are undefined, and differ
    torch.testing.assert_close(logits["eager"][real], logits["sdpa"][real], rtol=1e-4, atol=1e-4)
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ModelError, match="model.attn_implementation 'flash_attention_2'"):
            load_model_dir(tiny_dir, ModelConfig(attn_implementation="flash_attention_2"))
