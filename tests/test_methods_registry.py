"""Every registered method trains two tiny tasks, saves, reloads from its checkpoint, and evaluates the
same as the run did."""

import pytest
import torch

from conftest import SMALL_MODEL, write_recipe
from lvlm_cl.checkpoint import CheckpointError
from lvlm_cl.config import load_recipe
from lvlm_cl.data.dataset import EncodingCache
from lvlm_cl.data.records import final_answer
from lvlm_cl.evaluation import score_many
from lvlm_cl.evaluation.generate import generate_answers
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

    stage = load_stage(out)
    assert stage.index == 1 and stage.task.name == "warmth" and [m.name for m in stage.methods] == [name]
    trained = dict(model.named_parameters())
    for n, p in stage.model.named_parameters():
        assert torch.equal(p, trained[n]), n                      # the checkpoint restores what trained

    cache = EncodingCache(stage.processor, stage.cfg.model.max_length)
    row = []
    for task in stage.stream:
        predictions = generate_answers(stage.model, stage.processor, task.test_records, cache, batch_size=16,
                                       max_new_tokens=stage.cfg.trainer.max_new_tokens, progress=False)
        scores = score_many(task.metric, predictions, [final_answer(r) for r in task.test_records])
        row.append(100.0 * sum(scores) / len(scores))
    assert row == state.rows[-1]                                     # evaluating the reload = the run's numbers


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
