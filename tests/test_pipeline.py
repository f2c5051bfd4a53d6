"""The one evaluation pipeline's scoring (``evaluation.pipeline.score_predictions``): a task's value is the mean
of its samples' scores, or the corpus value for a corpus metric; the rows of the predictions file."""

from __future__ import annotations

import pytest

from lvlm_cl.evaluation.pipeline import score_predictions
from lvlm_cl.evaluation.scorers import corpus_score


def test_a_per_sample_metric_is_the_mean_of_its_samples():
    scored = score_predictions("exact_match", ["red", "blue", "red"], ["red", "red", "red"])
    assert scored.scores == [1.0, 0.0, 1.0] and scored.percent == pytest.approx(200 / 3)
    rows = list(scored.rows([{"id": str(i), "messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                                                         {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]}
                             for i in range(3)]))
    assert [(r["id"], r["prediction"], r["answer"], r["correct"]) for r in rows] == [
        ("0", "red", "red", 1.0), ("1", "blue", "red", 0.0), ("2", "red", "red", 1.0)]


def test_a_corpus_metric_pools_the_test_set():
    predictions = ["a man riding a horse on a beach", "two dogs play in the snow", "a red bus"]
    answers = ["a man rides a horse along the beach", "two dogs playing in snow", "a red double decker bus"]
    bleu = score_predictions("bleu", predictions, answers)
    assert bleu.percent == pytest.approx(corpus_score("bleu", predictions, [[a] for a in answers]))
    assert all(s is not None for s in bleu.scores)
    cider = score_predictions("cider", predictions, answers)
    assert cider.scores == [None, None, None]
    assert cider.percent == pytest.approx(corpus_score("cider", predictions, [[a] for a in answers])) and cider.percent > 0


def test_the_judge_is_refused_until_it_is_wired():
    with pytest.raises(ValueError, match="judge"):
        score_predictions("judge", ["yes"], ["yes"])


def test_a_recipe_task_scored_by_the_judge_is_refused_at_load(tmp_path, colour_tasks):
    """Not at the first evaluation, after a task has trained."""
    from conftest import write_recipe
    from lvlm_cl.config import ConfigError, load_recipe

    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, tmp_path / "out")
    recipe.write_text(recipe.read_text().replace("metric: exact_match", "metric: judge", 1))
    assert "metric: judge" in recipe.read_text()
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.metric': 'judge' is not available in recipes yet"):
        load_recipe(recipe)
    recipe.write_text(recipe.read_text().replace("metric: judge", "metric: cider", 1))
    assert load_recipe(recipe).tasks[0].metric == "cider"      # a corpus metric is scored by the pipeline
