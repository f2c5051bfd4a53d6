"""``metric: judge`` in a recipe and in scripts/evaluate.py: a task scored by a judge model behind an
OpenAI-compatible endpoint (a stub server on loopback), its verdicts cached in the run folder so that
scoring again asks nothing."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import SMALL_MODEL, read_jsonl, write_recipe
from lvlm_cl.config import ConfigError, load_recipe
from test_judge import StubJudge, stub  # noqa: F401  (the stub server fixture)


def judged_recipe(tmp_path, colour_tasks, url: str | None):
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, tmp_path / "run", steps_per_task=3)
    data = yaml.safe_load(recipe.read_text())
    data["tasks"][1]["metric"] = "judge"
    if url is not None:
        data["judge"] = {"model": "stub-judge", "endpoint": url, "max_workers": 2}
    recipe.write_text(yaml.safe_dump(data))
    return recipe


def test_a_judged_task_needs_a_judge_section(tmp_path, colour_tasks):
    with pytest.raises(ConfigError, match=r"tasks\[1\]\.metric': 'judge' needs a 'judge' section"):
        load_recipe(judged_recipe(tmp_path, colour_tasks, None))
    recipe = judged_recipe(tmp_path, colour_tasks, "http://127.0.0.1:9/v1")
    with pytest.raises(ConfigError, match=r"judge.retries' must be from 0 to 100"):
        load_recipe(recipe, ["judge.retries=-1"])
    with pytest.raises(ConfigError, match="exactly one of 'endpoint'"):
        load_recipe(recipe, ["judge.local_model_dir=/x"])


@pytest.mark.slow
def test_a_run_scores_a_task_with_the_judge_and_rescoring_asks_nothing_again(tmp_path, colour_tasks, stub):
    from lvlm_cl import evaluate
    from lvlm_cl.train import run

    out = tmp_path / "run"
    run(load_recipe(judged_recipe(tmp_path, colour_tasks, stub.url), SMALL_MODEL), progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    asked = stub.requests
    assert asked > 0 and (out / "judge_cache.jsonl").is_file()
    # Each cell of the judged column is the share of "yes": the stub says yes when the prediction is the answer.
    for t, stage in enumerate(["after-00-colour", "after-01-warmth"]):
        rows = read_jsonl(out / "predictions" / stage / "warmth.jsonl")
        verdicts = [StubJudge.reply(f"Reference answer: {r['answer']}\nCandidate answer: {r['prediction']}") == "Yes."
                    for r in rows]
        assert [r["correct"] for r in rows] == [float(v) for v in verdicts]
        assert metrics["matrix"][t][1] == pytest.approx(100 * sum(verdicts) / len(verdicts))
    # The judge saw each sample's question.
    assert any("warm or cold" in body["messages"][0]["content"] for body in stub.bodies)
    # Scoring the run's predictions again with the judge (every task: the colour task's predictions are new to
    # it): the judged column comes from the cache, and a second rescoring asks nothing at all.
    assert evaluate.main(["--run", str(out), "--rescore", "--metric", "judge", "--output", str(tmp_path / "j")]) == 0
    again = json.loads((tmp_path / "j" / "metrics.json").read_text())
    assert [row[1] for row in again["matrix"]] == [row[1] for row in metrics["matrix"]]
    distinct = {(r["prompt"], r["answer"], r["prediction"]) for stage in ("before", "after-00-colour", "after-01-warmth")
                for r in read_jsonl(out / "predictions" / stage / "colour.jsonl")}
    assert stub.requests == asked + len(distinct)
    assert evaluate.main(["--run", str(out), "--rescore", "--metric", "judge", "--output", str(tmp_path / "k")]) == 0
    assert stub.requests == asked + len(distinct)
