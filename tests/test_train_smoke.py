"""End to end: a two-task run on the tiny model writes consistent files, and resumes."""

import json

import pytest
from PIL import Image

from conftest import SMALL_MODEL, write_recipe
from lvlm_cl.config import load_recipe
from lvlm_cl.evaluation import cl_metrics
from lvlm_cl.train import main, run

pytestmark = pytest.mark.slow


def test_two_task_run_writes_consistent_results(tmp_path, colour_tasks):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, out, steps_per_task=25)
    assert main([str(recipe), *SMALL_MODEL]) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"] == ["colour", "warmth"] and metrics["num_completed"] == 2
    matrix, initial = metrics["matrix"], metrics["initial"]
    assert len(matrix) == 2 and all(len(r) == 2 for r in matrix) and len(initial) == 2
    # The metrics in the file are the metrics of the matrix in the file.
    expected = cl_metrics(matrix, initial)
    for key, value in expected.items():
        assert metrics["metrics"][key] == pytest.approx(value), key

    # Each matrix cell is the mean of the `correct` column of its predictions file.
    for t, stage in enumerate(["after-00-colour", "after-01-warmth"]):
        for i, task in enumerate(["colour", "warmth"]):
            rows = [json.loads(l) for l in (out / "predictions" / stage / f"{task}.jsonl").read_text().splitlines()]
            assert len(rows) == 12 and {"id", "prompt", "prediction", "answer", "correct"} <= set(rows[0])
            assert matrix[t][i] == pytest.approx(100 * sum(r["correct"] for r in rows) / len(rows))
    before = [json.loads(l) for l in (out / "predictions" / "before" / "colour.jsonl").read_text().splitlines()]
    assert initial[0] == pytest.approx(100 * sum(r["correct"] for r in before) / len(before))

    report = (out / "report.md").read_text()
    assert "colour" in report and "BWT" in report
    with Image.open(out / "accuracy_matrix.png") as im:
        assert im.size[0] > 100
    # Format against content: per stage and task, the share of predictions with a wrong format is the mean of
    # the predictions file's format_ok column, and the share of the wrong ones follows from the same file.
    formats, shares = metrics["format_errors"], metrics["wrong_format_share"]
    assert list(formats) == ["before training", "colour", "warmth"] == list(shares)
    for stage, folder in [("colour", "after-00-colour"), ("warmth", "after-01-warmth")]:
        for task in ["colour", "warmth"]:
            rows = [json.loads(l) for l in (out / "predictions" / folder / f"{task}.jsonl").read_text().splitlines()]
            assert formats[stage][task] == pytest.approx(100 * sum(not r["format_ok"] for r in rows) / len(rows), abs=0.01)
            wrong = [r for r in rows if r["correct"] < 1]
            assert shares[stage][task] == (None if not wrong else
                                           pytest.approx(100 * sum(not r["format_ok"] for r in wrong) / len(wrong),
                                                         abs=0.01))
    assert "## Format errors" in report and "## Wrong answers: format or content" in report
    with Image.open(out / "format_matrix.png") as im:
        assert im.size[0] > 100
    for k, name in enumerate(["colour", "warmth"]):
        ck = out / "checkpoints" / f"task-{k:02d}-{name}"
        assert (ck / "meta.json").is_file() and (ck / "trainable.safetensors").stat().st_size > 0
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["trainer"]["steps_per_task"] == 25 and resolved["model"]["tiny"]["text_hidden"] == 64
    assert (out / "base_model" / "config.json").is_file()
    assert json.loads((out / "versions.json").read_text())["torch"]


def test_learns_the_first_task_and_forgets_it_with_plain_finetuning(tmp_path, colour_tasks):
    # The loop really trains: colour is learnt, then warmth's answers overwrite it.
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, out, steps_per_task=60, lr=1e-3)
    model, _, state = run(load_recipe(recipe, SMALL_MODEL), progress=False)
    assert state.rows[0][0] == 100.0            # colour right after training on it
    assert state.rows[1][1] == 100.0            # warmth right after training on it
    assert state.rows[1][0] < 50.0              # colour forgotten by plain fine-tuning


def test_rerun_resumes_without_retraining_and_refuses_another_recipe(tmp_path, colour_tasks, capsys):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, out, steps_per_task=5)
    main([str(recipe), *SMALL_MODEL])
    first = (out / "metrics.json").read_text()
    stamp = (out / "checkpoints" / "task-01-warmth" / "meta.json").stat().st_mtime_ns
    main([str(recipe), *SMALL_MODEL])
    assert (out / "metrics.json").read_text() == first
    assert (out / "checkpoints" / "task-01-warmth" / "meta.json").stat().st_mtime_ns == stamp

    capsys.readouterr()
    assert main([str(recipe), *SMALL_MODEL, "trainer.lr=0.001"]) == 2
    assert "holds a different run (keys differ: ['trainer'])" in capsys.readouterr().err
    assert main([str(recipe), *SMALL_MODEL, "trainer.lr=0.001", "--overwrite"]) == 0


def test_overwrite_starts_over_and_changed_data_is_refused(tmp_path, colour_tasks, capsys):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, out, steps_per_task=2)
    main([str(recipe), *SMALL_MODEL])
    marker = out / "checkpoints" / "stale.txt"
    marker.write_text("from the first run")
    main([str(recipe), *SMALL_MODEL, "--overwrite"])              # same recipe, but told to start over
    assert not marker.exists() and (out / "metrics.json").is_file()

    train_file = colour_tasks["warmth"][0]                        # the same recipe on changed data
    lines = train_file.read_text().splitlines()
    train_file.write_text("\n".join(lines[:-1]) + "\n")
    capsys.readouterr()
    assert main([str(recipe), *SMALL_MODEL]) == 2
    assert "task files changed" in capsys.readouterr().err


def test_a_task_with_nothing_to_train_is_refused(tmp_path, colour_tasks):
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, tmp_path / "run", steps_per_task=1)
    frozen = ["model.freeze_vision_tower=true", "model.freeze_projector=true", "model.freeze_language_model=true"]
    with pytest.raises(ValueError, match="task 'colour': nothing trains"):
        run(load_recipe(recipe, [*SMALL_MODEL, *frozen]), progress=False)


def test_the_run_records_trainable_parameters_and_memory_per_task(tmp_path, colour_tasks):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, out, steps_per_task=1)
    frozen = ["model.freeze_vision_tower=true", "model.freeze_projector=true", "model.freeze_language_model=true"]
    run(load_recipe(recipe, [*SMALL_MODEL, *frozen, "methods=[{name: task_prompts, length: 4},"
                                                     " {name: replay, memory_per_task: 5}]"]), progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    # Only the task's prompt (4 x 64) trains once the model is frozen (prototype keys are fitted, not trained).
    assert metrics["trainable_parameters"] == {"colour": 4 * 64, "warmth": 4 * 64}
    assert metrics["memory_records"] == {"colour": 5, "warmth": 10}
    meta = json.loads((out / "checkpoints" / "task-01-warmth" / "meta.json").read_text())
    assert meta["task_records"] == 48 and meta["train_samples"] > 48    # replayed records come on top


def test_a_run_started_before_a_schema_key_existed_resumes(tmp_path, colour_tasks):
    """A run folder written by an earlier lvlm-cl (its config.json lacks keys added to the schema since, at their
    defaults) resumes without retraining; a key that really differs is still refused."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, out, steps_per_task=2)
    assert main([str(recipe), *SMALL_MODEL]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "min_pixels" in config["model"] and "judge" in config
    del config["model"]["min_pixels"], config["model"]["max_pixels"], config["judge"]
    (out / "config.json").write_text(json.dumps(config))
    first = (out / "metrics.json").read_text()
    stamp = (out / "checkpoints" / "task-01-warmth" / "meta.json").stat().st_mtime_ns
    assert main([str(recipe), *SMALL_MODEL]) == 0
    assert (out / "metrics.json").read_text() == first
    assert (out / "checkpoints" / "task-01-warmth" / "meta.json").stat().st_mtime_ns == stamp
    config["model"]["max_length"] = 999
    (out / "config.json").write_text(json.dumps(config))
    assert main([str(recipe), *SMALL_MODEL]) == 2
