"""recipes/ucit_llava15_7b.yaml and recipes/mllm_dcl_llava15_7b.yaml cannot rot: each recipe's structure (its
tasks in order with their metrics, captioning scored with CIDEr over the test set, numbers with a tolerance,
LoRA with the projector, bf16) runs end to end on the tiny model, with only sizes overridden and tiny stand-in
data, in each task's answer style, written where the recipe expects the converted files."""

import json
from pathlib import Path

import pytest

from conftest import SMALL_MODEL, TINY_RUN, run_recipe_command, write_stand_in_data
from lvlm_cl.config import load_recipe

ROOT = Path(__file__).resolve().parent.parent
COLOURS = ["red", "green", "blue"]           # the stand-in images' colours, in turn
RECIPES = {
    "ucit_llava15_7b.yaml": [("imagenet_r", "contains"), ("arxivqa", "multiple_choice"),
                             ("vizwiz_caption", "cider"), ("iconqa", "vqa"), ("clevr_math", "numeric"),
                             ("flickr30k", "cider")],
    "mllm_dcl_llava15_7b.yaml": [("remote_sensing", "vqa"), ("medical", "vqa"), ("driving", "vqa"),
                                 ("science", "vqa"), ("finance", "vqa")],
}


def question_answer(task, colour: str, i: int, split: str) -> tuple[str, str]:
    """A question in the style of the task's metric and its answer in the form that metric scores (a test
    caption carries two references, ``|``-separated)."""
    metric, names = task.metric, COLOURS
    if metric == "multiple_choice":
        options = " ".join(f"{letter}. {c}" for letter, c in zip("ABC", names))
        return f"Which color is shown?\n{options}\nAnswer with the option's letter.", "ABC"[names.index(colour)]
    if metric == "cider":
        one = f"a plain {colour} square"
        return "Describe the image in one sentence.", one if split == "train" else f"{one}|a square that is {colour}"
    if metric == "numeric":
        return "How many colored squares are there? Answer with a number.", str(1 + names.index(colour))
    return f"What color is this image? Answer the question using a single word or phrase. ({i})", colour


@pytest.mark.slow
@pytest.mark.parametrize("recipe_name", list(RECIPES))
def test_the_recipe_runs_its_tasks_on_the_tiny_model(tmp_path, recipe_name):
    recipe = ROOT / "recipes" / recipe_name
    cfg = load_recipe(recipe)
    assert [(t.name, t.metric) for t in cfg.tasks] == RECIPES[recipe_name]
    assert cfg.model.lora.modules_to_save == ["multi_modal_projector"] and cfg.trainer.mixed_precision == "bf16"

    write_stand_in_data(cfg, tmp_path, question_answer, n_train=3, n_test=3)
    out = tmp_path / "run"
    sizes = [*SMALL_MODEL, *TINY_RUN, "model.path=builtin:tiny-llava-random", "trainer.batch_size=3",
             "trainer.eval_batch_size=3", "trainer.num_workers=0"]
    metrics = run_recipe_command(recipe, tmp_path, out, sizes)
    names = [name for name, _ in RECIPES[recipe_name]]
    assert metrics["tasks"] == names and metrics["num_completed"] == len(names)
    assert all(len(row) == len(names) for row in metrics["matrix"]) and metrics["initial"] is not None
    assert set(metrics["format_errors"]) == {"before training", *names}
    # A caption task's cell is CIDEr over its test set, against both references of every test sample.
    from lvlm_cl.evaluation.scorers import corpus_score

    last = f"after-{len(names) - 1:02d}-{names[-1]}"
    for column, (name, metric) in enumerate(RECIPES[recipe_name]):
        rows = [json.loads(line) for line in (out / "predictions" / last / f"{name}.jsonl").read_text().splitlines()]
        if metric == "cider":
            assert all(r["correct"] is None and "|" in r["answer"] for r in rows)
            expected = corpus_score("cider", [r["prediction"] for r in rows],
                                    [r["answer"].split("|") for r in rows])
            assert metrics["matrix"][-1][column] == pytest.approx(expected)
        else:
            assert metrics["matrix"][-1][column] == pytest.approx(100 * sum(r["correct"] for r in rows) / len(rows))
