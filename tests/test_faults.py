"""Bad input stops `lvlm_cl/train.py` with exit code 2 and one message naming what is wrong and where (file,
line or record id, key), before any training time is spent; a loss that turns NaN stops the task; two runs
with the same seed give the same metrics.json, and a run stores its seed, resolved config and versions."""

import json
from pathlib import Path

import pytest

from conftest import SMALL_MODEL, write_recipe
from lvlm_cl.train import main

BASE = [*SMALL_MODEL, "trainer.steps_per_task=2", "trainer.eval_max_samples=4"]


def train(recipe: Path, capsys, *overrides: str) -> tuple[int, str]:
    code = main([str(recipe), *BASE, *overrides])
    return code, capsys.readouterr().err


@pytest.fixture
def setup(tmp_path, colour_tasks):
    out = tmp_path / "run"
    return write_recipe(tmp_path / "r.yaml", colour_tasks, out), colour_tasks, out


def nothing_trained(out: Path) -> bool:
    return not (out / "checkpoints").exists() and not (out / "metrics.json").exists()


def rewrite(path: Path, edit) -> None:
    """Apply ``edit`` to the file's list of JSON records and write them back."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    edit(records)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize("override, expected", [
    ("trainer.bogus=1", "r.yaml: unknown key 'trainer.bogus'; allowed here: "),
    ("trainer.lr=fast", "r.yaml: key 'trainer.lr': expected a number, got 'fast'"),
    ("trainer.batch_size=0", "key 'trainer.batch_size' must be at least 1"),
    ("tasks[0].metric=accuracy_of_vibes", "tasks[0].metric"),
    ("methods=[{name: replay, budget: 3}]", "method 'replay' has no setting 'budget'"),
    ("model.path=/nonexistent/llava", "model.path: /nonexistent/llava is not a directory"),
])
def test_recipe_and_model_errors_name_the_key(setup, capsys, override, expected):
    recipe, _, out = setup
    if override.startswith("tasks[0]"):                 # a list item is edited in the file itself
        import yaml

        data = yaml.safe_load(recipe.read_text())
        data["tasks"][0]["metric"] = "accuracy_of_vibes"
        recipe.write_text(yaml.safe_dump(data))
        override = "seed=0"
    code, err = train(recipe, capsys, override)
    assert code == 2 and expected in err, err
    assert err.startswith("lvlm_cl: error: ") and "Traceback" not in err
    assert nothing_trained(out)


def test_task_file_problems_name_the_file_line_record_and_field(setup, capsys):
    recipe, tasks, out = setup
    train_file, test_file = tasks["warmth"]                     # the second task: found before the first trains

    original = train_file.read_text()
    train_file.unlink()
    code, err = train(recipe, capsys)
    assert code == 2 and f"{train_file}: file not found" in err

    train_file.write_text("\n\n")
    code, err = train(recipe, capsys)
    assert code == 2 and f"{train_file}: no records (the file is empty)" in err

    lines = original.splitlines()
    train_file.write_text("\n".join(lines[:2] + ['{"id": "broken", "messages": [}'] + lines[2:]) + "\n")
    code, err = train(recipe, capsys)
    assert code == 2 and f"{train_file}:3: invalid JSON" in err

    train_file.write_text(original)
    rewrite(train_file, lambda rs: rs[4]["messages"].reverse())          # assistant first, then user
    code, err = train(recipe, capsys)
    assert code == 2 and f"{train_file}:5" in err and "record 'warmth-train-4'" in err
    assert "field 'messages[0].role'" in err and "roles must alternate" in err
    assert nothing_trained(out)


def test_image_problems_name_the_record(setup, capsys):
    recipe, tasks, out = setup
    test_file = tasks["colour"][1]
    records = [json.loads(line) for line in test_file.read_text().splitlines()]
    image = test_file.parent / records[2]["images"][0]
    data = image.read_bytes()

    image.unlink()
    code, err = train(recipe, capsys)
    assert code == 2 and str(test_file) in err and "record 'colour-test-2'" in err and "image not found" in err
    assert "field 'images[0]'" in err

    image.write_bytes(data[: len(data) // 2])                            # a truncated PNG
    code, err = train(recipe, capsys)
    assert code == 2 and "record 'colour-test-2'" in err and "image cannot be read (truncated" in err
    assert nothing_trained(out)         # found from the file's end marker, before training, nothing decoded


def test_a_sample_too_long_for_max_length_is_refused_before_training(setup, capsys):
    recipe, tasks, out = setup
    train_file = tasks["warmth"][0]

    def lengthen(rs):
        rs[7]["messages"][0]["content"][1]["text"] = "Is this color warm or cold? " * 200
    rewrite(train_file, lengthen)
    code, err = train(recipe, capsys)
    assert code == 2 and str(train_file) in err and "record 'warmth-train-7'" in err
    assert "exceed model.max_length=" in err and "truncating would cut the answer or image tokens" in err
    assert nothing_trained(out)                          # found up front, not when the second task reaches it


def test_a_loss_that_becomes_nan_stops_the_task_and_keeps_no_half_trained_task(setup, capsys):
    recipe, _, out = setup
    code, err = train(recipe, capsys, "trainer.lr=1e30", "trainer.max_grad_norm=null", "trainer.steps_per_task=6")
    assert code == 2 and "task 'colour': loss became nan" in err and "Lower trainer.lr" in err
    state = json.loads((out / "run_state.json").read_text())
    assert state["trained"] == 0 and not (out / "checkpoints" / "task-00-colour").exists()


def test_two_runs_with_the_same_seed_are_identical_and_store_what_made_them(tmp_path, colour_tasks, capsys):
    runs = []
    for name in ("a", "b"):
        recipe = write_recipe(tmp_path / f"{name}.yaml", colour_tasks, tmp_path / name)
        assert main([str(recipe), *BASE, "seed=3", "methods=[{name: replay, memory_per_task: 4}]"]) == 0
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        for key in ("train_seconds", "eval_seconds"):
            metrics.pop(key)
        runs.append(metrics)
    assert runs[0] == runs[1]
    assert runs[0]["train_loss"]["colour"]                # the per-step losses are compared too
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    versions = json.loads((tmp_path / "a" / "versions.json").read_text())
    assert config["seed"] == 3 and config["trainer"]["steps_per_task"] == 2
    assert all(versions[k] for k in ("python", "torch", "transformers", "peft", "accelerate"))
