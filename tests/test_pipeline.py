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


def test_the_judge_needs_its_settings_and_the_questions():
    with pytest.raises(ValueError, match="needs the judge's settings and each sample's question"):
        score_predictions("judge", ["yes"], ["yes"])


def test_a_recipe_task_scored_by_the_judge_without_a_judge_is_refused_at_load(tmp_path, colour_tasks):
    """Not at the first evaluation, after a task has trained."""
    from conftest import write_recipe
    from lvlm_cl.config import ConfigError, load_recipe

    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, tmp_path / "out")
    recipe.write_text(recipe.read_text().replace("metric: exact_match", "metric: judge", 1))
    assert "metric: judge" in recipe.read_text()
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.metric': 'judge' needs a 'judge' section"):
        load_recipe(recipe)
    recipe.write_text(recipe.read_text().replace("metric: judge", "metric: cider", 1))
    assert load_recipe(recipe).tasks[0].metric == "cider"      # a corpus metric is scored by the pipeline


@pytest.mark.parametrize("metric, references, kind", [
    ("multiple_choice", ["B"], "letter"),
    ("iou", ["[0.1, 0.1, 0.5, 0.5]"], "box"),
    ("numeric", ["4"], "number"),
    ("exact_match", ["A", "C", "(D)"], "letter"),
    ("vqa", ["3", "12", "1,000"], "number"),
    ("exact_match", ["[0.1, 0.2, 0.3, 0.4]"], "box"),
    ("vqa", ["red", "2", "blue|navy"], "text"),
])
def test_a_tasks_answer_kind_comes_from_its_metric_or_its_references(metric, references, kind):
    from lvlm_cl.evaluation.formats import answer_kind

    assert answer_kind(metric, references) == kind


@pytest.mark.parametrize("kind, prediction, ok", [
    ("letter", "B. because the sky is blue", True), ("letter", "the sky", False), ("letter", "", False),
    ("number", "There are 4 of them.", True), ("number", "several", False), ("number", "four", True),
    ("box", "[0.1, 0.2, 0.3, 0.4]", True), ("box", "top left", False),
    ("text", "a red square", True), ("text", "   ", False),
    ("text", "[0.1, 0.2, 0.3, 0.4]", False), ("text", "B.", False),   # another task's format
])
def test_a_prediction_is_well_formed_when_it_is_an_answer_of_the_tasks_kind(kind, prediction, ok):
    from lvlm_cl.evaluation.formats import well_formed

    assert well_formed(kind, prediction) is ok


def test_wrong_answers_split_into_format_and_content():
    # A grounding task: two right boxes, one wrong box (content), one caption where a box belongs (format).
    references = ["[0.1, 0.1, 0.5, 0.5]"] * 4
    predictions = ["[0.1, 0.1, 0.5, 0.5]", "[0.12, 0.1, 0.5, 0.5]", "[0.6, 0.6, 0.9, 0.9]", "a red square"]
    scored = score_predictions("iou", predictions, references)
    assert scored.kind == "box" and scored.formats == [True, True, True, False]
    assert scored.scores == [1.0, 1.0, 0.0, 0.0]
    assert scored.format_errors == 25.0 and scored.wrong_format_share == 50.0
    assert [r["format_ok"] for r in scored.rows([{"id": str(i), "messages": []} for i in range(4)])] == scored.formats
    # A graded metric has no wrong answers to split; nothing wrong gives no share either.
    assert score_predictions("token_f1", ["a red bus"], ["a red bus"]).wrong_format_share is None
    assert score_predictions("iou", predictions[:1], references[:1]).wrong_format_share is None


def test_a_test_files_several_reference_captions_are_the_corpus_metrics_references():
    predictions = ["a man riding a horse on a beach", "two dogs play in the snow"]
    answers = ["a man rides a horse along the beach | a person on a horse by the sea", "two dogs playing in snow"]
    scored = score_predictions("cider", predictions, answers)
    assert scored.percent == pytest.approx(corpus_score("cider", predictions, [
        ["a man rides a horse along the beach", "a person on a horse by the sea"], ["two dogs playing in snow"]]))
