"""A second model family: the tiny Gemma 3 (`builtin:tiny-gemma3-random`, a real
Gemma3ForConditionalGeneration built offline) is trained by the same loop, with LoRA and with the methods
that route inside the forward; each run reloads from its checkpoint and evaluates to the run's numbers.
(Routing, cached generation and forced routes on Gemma 3: tests/test_task_routing.py's `tiny_any`.)"""

import pytest
from conftest import SMALL_MODEL, assert_reloads_as_trained, write_recipe

from lvlm_cl.config import load_recipe
from lvlm_cl.train import run

GEMMA3 = [*SMALL_MODEL, "model.path=builtin:tiny-gemma3-random"]


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    ["methods=[finetune]"],
    ["methods=[{name: replay, memory_per_task: 4}]"],
    ["methods=[task_prompts, {name: replay, memory_per_task: 4}]"],
    ["model.freeze_language_model=true", "model.lora={r: 4, alpha: 8}", "methods=[task_prompts]"],
    ["model.freeze_language_model=true", "methods=[{name: task_lora, r: 2}]"],
], ids=["finetune", "replay", "task_prompts+replay", "lora+task_prompts", "task_lora"])
def test_gemma3_trains_saves_reloads_and_evaluates(tmp_path, colour_tasks, settings):
    from transformers import Gemma3ForConditionalGeneration

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, out, steps_per_task=3)
    model, _, state = run(load_recipe(recipe, [*GEMMA3, *settings]), progress=False)
    assert len(state.rows) == 2
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert isinstance(base, Gemma3ForConditionalGeneration)
    assert_reloads_as_trained(model, state, out)
