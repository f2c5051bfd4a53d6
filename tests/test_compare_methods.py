"""scripts/compare_methods.py on two tiny recipes: a table, then a row added with --keep."""

import json
import sys
from pathlib import Path

import pytest
import yaml

from conftest import SMALL_MODEL, write_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import compare_methods  # noqa: E402


def _recipe(tmp_path, colour_tasks, name, methods):
    path = write_recipe(tmp_path / f"{name}.yaml", colour_tasks, tmp_path / "unused", steps_per_task=2)
    recipe = yaml.safe_load(path.read_text())
    recipe["methods"] = methods
    recipe["model"] = {"path": "builtin:tiny-llava-random", "freeze_vision_tower": False,
                       "tiny": {"text_hidden": 64, "vision_hidden": 64, "text_intermediate": 128}}
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_a_table_then_a_row_added_with_keep(tmp_path, colour_tasks):
    assert SMALL_MODEL[0] == "model.path=builtin:tiny-llava-random"    # the recipes above use the same model
    a = _recipe(tmp_path, colour_tasks, "a_finetune", [])
    b = _recipe(tmp_path, colour_tasks, "b_replay", [{"name": "replay", "memory_per_task": 4}])
    out = tmp_path / "results.md"
    runs = tmp_path / "runs"
    assert compare_methods.main([str(a), "--runs", str(runs), "--output", str(out)]) == 0
    first = json.loads(out.with_suffix(".json").read_text())
    assert [r["recipe"] for r in first] == ["a_finetune.yaml"]
    out.write_text(out.read_text() + "A hand-written note.\n")         # below the marker: kept

    assert compare_methods.main([str(b), "--runs", str(runs), "--output", str(out), "--keep"]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["recipe"] for r in rows] == ["a_finetune.yaml", "b_replay.yaml"]
    assert rows[0]["MFN"] == first[0]["MFN"] and rows[0]["commit"] == first[0]["commit"]   # kept as it was
    assert rows[1]["memory_records"] == 8                                  # 4 per task, two tasks
    text = out.read_text()
    assert f"compare_methods.py {a} --runs" not in text                   # --runs is not part of the command
    assert f"compare_methods.py {a} --output {out}" in text and f"compare_methods.py {b} --keep --output {out}" in text
    assert "| a_finetune.yaml |" in text and "| b_replay.yaml |" in text and "A hand-written note." in text


def test_the_command_names_an_output_inside_the_repository_relative_to_it(tmp_path):
    inside = compare_methods.ROOT / "docs" / "results.md"
    assert compare_methods._shown(inside) == "docs/results.md"
    assert compare_methods._shown(tmp_path / "r.md") == str(tmp_path / "r.md")
