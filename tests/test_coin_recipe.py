"""recipes/coin_llava15_7b.yaml and recipes/coin_qwen25vl_7b.yaml cannot rot: their structure (CoIN's eight
tasks in order with their metrics, LoRA with the projector in modules_to_save, the family's chat template,
bf16, gradient checkpointing, step checkpoints; Qwen's image-size range) runs end to end on the tiny model
of the recipe's family, with only sizes overridden and tiny stand-in data written where the recipe expects
CoIN's converted files."""

import json
from pathlib import Path

import pytest

from conftest import SMALL_MODEL, TINY_RUN, run_recipe_command, stage_scores, write_stand_in_data
from lvlm_cl.config import load_recipe
from lvlm_cl.stage import load_stage

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "coin_llava15_7b.yaml"
QWEN_RECIPE = ROOT / "recipes" / "coin_qwen25vl_7b.yaml"
COIN = ["scienceqa", "textvqa", "imagenet", "gqa", "vizwiz", "grounding", "vqav2", "ocrvqa"]
COLOURS = ["red", "green", "blue"]           # the stand-in images' colours, in turn


def question_answer(task_cfg, colour: str, i: int, split: str) -> tuple[str, str]:
    """A question in the task's CoIN style and its answer in the form the task's metric scores."""
    task, names = task_cfg.name, COLOURS
    if task == "scienceqa":
        options = " ".join(f"{letter}. {c}" for letter, c in zip("ABC", names))
        return f"Which color is shown?\n{options}\nAnswer with the option's letter from the given choices directly.", \
            "ABC"[names.index(colour)]
    if task == "grounding":
        return ("Please provide the bounding box coordinate of the region this sentence describes: the "
                f"{colour} area.", "[0.00, 0.00, 1.00, 1.00]")
    if task == "vizwiz" and i % 3 == 2:
        return "What is written on the label? When the question cannot be answered, answer unanswerable.", "unanswerable"
    return f"What color is this image? Answer the question using a single word or phrase. ({task})", colour


@pytest.mark.slow
def test_the_coin_recipe_runs_its_eight_tasks_on_the_tiny_model(tmp_path):
    cfg = load_recipe(RECIPE)
    assert [t.name for t in cfg.tasks] == COIN
    assert [t.metric for t in cfg.tasks] == ["multiple_choice", "vqa", "contains", "vqa", "vqa", "iou", "vqa", "vqa"]
    assert cfg.model.lora.r == 128 and cfg.model.lora.modules_to_save == ["multi_modal_projector"]
    assert cfg.model.gradient_checkpointing == "auto" and cfg.model.liger_kernel == "auto" and cfg.trainer.mixed_precision == "bf16"
    assert cfg.trainer.group_by_length and cfg.trainer.num_workers == 4

    write_stand_in_data(cfg, tmp_path, question_answer, n_train=4, n_test=2)
    out = tmp_path / "run"
    sizes = [*SMALL_MODEL, *TINY_RUN, "model.path=builtin:tiny-llava-random", "trainer.batch_size=2",
             "trainer.eval_batch_size=4", "trainer.save_every=1"]
    metrics = run_recipe(RECIPE, tmp_path, out, sizes)
    from safetensors.torch import load_file

    saved = load_file(str(out / "checkpoints" / "task-07-ocrvqa" / "trainable.safetensors"))
    assert any("multi_modal_projector" in n for n in saved) and any("lora_A" in n for n in saved)
    grounding = [json.loads(line) for line in (out / "predictions" / "after-07-ocrvqa" / "grounding.jsonl")
                 .read_text().splitlines()]
    assert [r["answer"] for r in grounding] == ["[0.00, 0.00, 1.00, 1.00]"] * 2
    assert_reload_scores_the_same(tmp_path, out, metrics)


@pytest.mark.slow
def test_the_qwen25vl_coin_recipe_runs_its_eight_tasks_on_the_tiny_qwen(tmp_path):
    cfg = load_recipe(QWEN_RECIPE)
    assert [t.name for t in cfg.tasks] == COIN
    assert [t.metric for t in cfg.tasks] == ["multiple_choice", "vqa", "contains", "vqa", "vqa", "iou", "vqa", "vqa"]
    assert cfg.model.chat_template == "qwen2_5_vl" and (cfg.model.min_pixels, cfg.model.max_pixels) == (3136, 451584)
    assert cfg.model.lora.r == 128 and cfg.model.lora.modules_to_save == ["merger"]
    assert cfg.model.gradient_checkpointing == "auto" and cfg.trainer.mixed_precision == "bf16"
    assert cfg.trainer.group_by_length

    write_stand_in_data(cfg, tmp_path, question_answer, n_train=4, n_test=2)
    out = tmp_path / "run"
    # The recipe's image-size range stays: the 32 x 32 stand-in images are grown to 64 x 64 (min_pixels).
    sizes = [*SMALL_MODEL, *TINY_RUN, "model.path=builtin:tiny-qwen2.5-vl-random", "trainer.batch_size=2",
             "trainer.eval_batch_size=4", "trainer.save_every=1"]
    metrics = run_recipe(QWEN_RECIPE, tmp_path, out, sizes)
    from safetensors.torch import load_file

    saved = load_file(str(out / "checkpoints" / "task-07-ocrvqa" / "trainable.safetensors"))
    assert any(".visual.merger." in n for n in saved) and any("lora_A" in n for n in saved)
    assert not any(".visual.blocks." in n for n in saved)                  # the vision tower stays frozen
    assert_reload_scores_the_same(tmp_path, out, metrics)


def run_recipe(recipe: Path, tmp_path: Path, out: Path, sizes: list[str]) -> dict:
    """The recipe run by its command line from ``tmp_path`` with ``sizes`` overridden; its metrics.json."""
    metrics = run_recipe_command(recipe, tmp_path, out, sizes)
    assert metrics["tasks"] == COIN and metrics["num_completed"] == 8
    assert len(metrics["matrix"]) == 8 and all(len(row) == 8 for row in metrics["matrix"])
    assert metrics["initial"] is not None and metrics["metrics"]["FWT"] is not None
    return metrics


def assert_reload_scores_the_same(tmp_path: Path, out: Path, metrics: dict) -> None:
    # The saved run reloads in one process and scores what the run scored.
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert stage_scores(load_stage(out)) == metrics["matrix"][-1]
    finally:
        os.chdir(cwd)
