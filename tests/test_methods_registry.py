"""Every registered method trains two tiny tasks, saves, reloads from its checkpoint, and evaluates the
same as the run did."""

import pytest
from conftest import SMALL_MODEL, assert_reloads_as_trained, write_recipe

from lvlm_cl.checkpoint import CheckpointError
from lvlm_cl.config import load_recipe
from lvlm_cl.methods import available
from lvlm_cl.stage import load_stage
from lvlm_cl.train import run


@pytest.mark.slow
@pytest.mark.parametrize("name", available())
def test_method_trains_saves_reloads_and_evaluates(tmp_path, colour_tasks, name):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, out, steps_per_task=3)
    model, _, state = run(load_recipe(recipe, [*SMALL_MODEL, f"methods=[{name}]"]), progress=False)
    assert len(state.rows) == 2

    stage = assert_reloads_as_trained(model, state, out)
    assert stage.index == 1 and stage.task.name == "warmth" and [m.name for m in stage.methods] == [name]


@pytest.mark.slow
def test_the_seed_method_with_adapters_and_output_residuals_reloads_as_trained(tmp_path, colour_tasks):
    """task_prompts' per-task adapters and output residuals (adapter_head) are saved with every task and
    restored by load_stage: the reloaded run has the trained parameters and scores the same."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, out, steps_per_task=3)
    methods = "methods=[{name: task_prompts, length: 2, adapter_r: 2, adapter_head: true}]"
    model, _, state = run(load_recipe(recipe, [*SMALL_MODEL, methods, "trainer.lr=1e-2"]), progress=False)
    heads = [p for n, p in model.named_parameters() if "task_prompts_head.tasks." in n and n.endswith("lora_B")]
    assert len(heads) == 2 and all(bool(p.any()) for p in heads)      # both tasks' residuals trained
    assert_reloads_as_trained(model, state, out)


def test_load_stage_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="not a run folder"):
        load_stage(tmp_path)


@pytest.mark.slow
def test_load_stage_refuses_a_stage_that_was_not_trained(tmp_path, colour_tasks):
    out = tmp_path / "run"
    run(load_recipe(write_recipe(tmp_path / "r.yaml", colour_tasks, out, steps_per_task=2), SMALL_MODEL),
        progress=False)
    first = load_stage(out, index=0)
    assert first.task.name == "colour"
    with pytest.raises(CheckpointError, match=r"stage 5 does not exist; trained stages are 0\.\.1"):
        load_stage(out, index=5)


@pytest.mark.parametrize("name", [n for n in available() if n not in ("finetune", "multitask")])  # no settings
def test_no_numeric_setting_of_any_method_takes_nan_infinity_or_a_negative_seed(name):
    """Every number a method takes is finite, and every seed an integer in a generator's range: for each
    method, each of its numeric settings is tried with NaN, +inf and -inf (and seeds with -1 and 2**40)."""
    import math

    from lvlm_cl.config import MethodSpec
    from lvlm_cl.methods import _lookup, check_methods

    numeric = {k: v for k, v in _lookup(name).defaults.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric, f"{name} has no numeric setting to try"
    for key in numeric:
        bad = [math.nan, math.inf, -math.inf] + ([-1, 2 ** 40] if key == "seed" else [])
        for value in bad:
            with pytest.raises(ValueError, match=f"method '{name}': .*{key}"):
                check_methods([MethodSpec(name, {key: value})])
