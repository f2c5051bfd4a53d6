"""scripts/compare_methods.py on two tiny recipes: a table, then a row added with --keep; and mean ± std over
seeds and task orders (--seeds, --orders), resumed after an interruption."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import SMALL_MODEL, write_colour_tasks, write_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import compare_methods  # noqa: E402


def _recipe(tmp_path, colour_tasks, name, methods, **trainer):
    path = write_recipe(tmp_path / f"{name}.yaml", colour_tasks, tmp_path / "unused",
                        **{"steps_per_task": 2, **trainer})
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


# ----------------------------------------------------------------------------- --seeds and --orders


def _drawn_orders(num_tasks: int, k: int, seed: int) -> list[list[int]]:
    """What --orders k --order-seed seed must use: the first k different permutations numpy's generator draws."""
    rng, orders = np.random.default_rng(seed), []
    while len(orders) < k:
        order = rng.permutation(num_tasks).tolist()
        if order not in orders:
            orders.append(order)
    return orders


def _own(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def _check_spread(entry: dict) -> None:
    """Every statistic of a recipe's entry is numpy's on its runs' own metrics.json values (tasks by name)."""
    own = [_own(Path(r["folder"])) for r in entry["runs"]]
    stats = [(entry["metrics"][k], [m["metrics"][k] for m in own]) for k in compare_methods.METRICS]
    stats += [(entry["per_task_final"][t], [m["per_task"][t]["final"] for m in own]) for t in entry["per_task_final"]]
    for stat, values in stats:
        assert stat["values"] == values and stat["n"] == len(values)
        assert stat["mean"] == pytest.approx(np.mean(values))
        assert stat["std"] == (pytest.approx(np.std(values, ddof=1)) if len(values) > 1 else None)


@pytest.fixture
def fake_training(monkeypatch):
    """``run_recipe`` replaced by a stand-in that writes, without training, the metrics.json of a run whose scores
    depend on the recipe, the seed and the task order; the folders it was started on are listed, and it stops with
    Ctrl-C's exit when a folder of ``interrupt_at`` comes."""
    from lvlm_cl.config import load_recipe
    from lvlm_cl.evaluation import write_report

    started, interrupt_at = [], set()

    def run_recipe(recipe, out, overrides, rerun):
        started.append(out)
        if out in interrupt_at:
            interrupt_at.discard(out)
            raise SystemExit(130)
        cfg = load_recipe(recipe, overrides)
        names = [t.name for t in cfg.tasks]
        base = {"colour": 40.0, "warmth": 70.0}
        bonus = 7.0 * ((cfg.seed * 5 + 3 * len(recipe.name)) % 4) + (5.0 if names[0] == "warmth" else 0.0)
        rows = [[base[n] + bonus - 20.0 * (t > i) for i, n in enumerate(names)] for t in range(len(names))]
        write_report(out, names, rows, [10.0 + cfg.seed] * len(names))
        return {"wall_seconds": 1.0, "peak_rss_mib": 100.0, "resumed": False, "commit": None}

    monkeypatch.setattr(compare_methods, "run_recipe", run_recipe)
    return started, interrupt_at


def test_spread_over_seeds_and_orders_is_numpys_and_an_interrupted_comparison_finishes(tmp_path, colour_tasks,
                                                                                        fake_training):
    started, interrupt_at = fake_training
    a = _recipe(tmp_path, colour_tasks, "a_finetune", [])
    b = _recipe(tmp_path, colour_tasks, "b_replay", [{"name": "replay", "memory_per_task": 4}])
    runs = tmp_path / "runs"
    command = [str(a), str(b), "--runs", str(runs), "--seeds", "0", "1", "2", "--orders", "2", "--order-seed", "5"]
    orders = _drawn_orders(2, 2, 5)
    # recipes x seeds x orders, seed by seed: the fourth run is Ctrl-C'd
    grid = [runs.resolve() / r / f"seed-{s}" / ("order-" + "-".join(map(str, o)))
            for s in (0, 1, 2) for o in orders for r in ("a_finetune", "b_replay")]
    interrupt_at.add(grid[3])
    with pytest.raises(SystemExit):
        compare_methods.main(command)
    assert started == grid[:4]
    partial = json.loads((runs / "comparison.json").read_text())
    assert [(e["n"], e["planned"]) for e in partial["recipes"]] == [(2, 6), (1, 6)]   # what finished, kept

    started.clear()
    assert compare_methods.main(command) == 0          # the same command: only what is left
    assert started == grid[3:]
    summary = json.loads((runs / "comparison.json").read_text())
    assert summary["seeds"] == [0, 1, 2] and summary["orders"] == 2 and summary["order_seed"] == 5
    for entry in summary["recipes"]:
        assert entry["n"] == entry["planned"] == 6
        assert [(r["seed"], r["order"]) for r in entry["runs"]] == [(s, k) for s in (0, 1, 2) for k in (0, 1)]
        assert [r["tasks"] for r in entry["runs"]] == [[["colour", "warmth"][i] for i in o] for o in orders] * 3
        assert list(entry["per_task_final"]) == ["colour", "warmth"]       # the recipe's order, matched by name
        _check_spread(entry)
        assert entry["metrics"]["MFN"]["std"] > 0
    text = (runs / "comparison.md").read_text()
    a_row = summary["recipes"][0]["metrics"]["MFN"]
    assert f"{a_row['mean']:.2f} ± {a_row['std']:.2f} (6)" in text and "| a_finetune.yaml | finetune | 6/6 |" in text
    assert (runs / "comparison.png").is_file()


def test_a_spread_of_one_run_or_none():
    assert compare_methods.spread([]) == {"mean": None, "std": None, "n": 0, "values": []}
    assert compare_methods.spread([3.0, None]) == {"mean": 3.0, "std": None, "n": 1, "values": [3.0, None]}
    assert compare_methods.spread([1.0, 2.0, 4.0])["std"] == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1))
    assert compare_methods._cell(compare_methods.spread([])) == "—"
    assert compare_methods._cell(compare_methods.spread([3.0])) == "3.00 (1)"


@pytest.fixture
def in_process_training(monkeypatch):
    """``run_recipe`` trains in this process, with the command line it gives train.py (no second interpreter to
    start: seconds a run); the folders it was started on are listed."""
    from lvlm_cl import train

    started = []

    def run_recipe(recipe, out, overrides, rerun):
        started.append(out)
        assert train.main([str(recipe), f"output_dir={out}", *overrides, *(["--overwrite"] if rerun else [])]) == 0
        return {"wall_seconds": 1.0, "peak_rss_mib": 100.0, "resumed": False, "commit": None}

    monkeypatch.setattr(compare_methods, "run_recipe", run_recipe)
    return started


@pytest.mark.slow
def test_seeds_and_orders_on_the_tiny_model_and_what_a_second_command_runs(tmp_path, in_process_training, capsys):
    from lvlm_cl.evaluation import write_report

    started = in_process_training
    tasks = write_colour_tasks(tmp_path / "data", n_train=8, n_test=4)
    a = _recipe(tmp_path, tasks, "a_finetune", [], batch_size=4, num_workers=0, lr=3e-3)
    runs = tmp_path / "runs"
    seed0, seed1 = (runs.resolve() / "a_finetune" / f"seed-{s}" / "order-0-1" for s in (0, 1))

    # --seeds 0 1: two runs, each with its seed; the summary is numpy's on their metrics.json
    seeds = [str(a), "--runs", str(runs), "--seeds", "0", "1"]
    assert compare_methods.main(seeds) == 0
    assert started == [seed0, seed1]
    assert [json.loads((f / "config.json").read_text())["seed"] for f in started] == [0, 1]
    assert _own(seed0)["train_loss"] != _own(seed1)["train_loss"]           # the seed changed the training
    (entry,) = json.loads((runs / "comparison.json").read_text())["recipes"]
    assert entry["n"] == 2 and [r["seed"] for r in entry["runs"]] == [0, 1]
    _check_spread(entry)
    assert "| a_finetune.yaml | finetune | 2/2 |" in (runs / "comparison.md").read_text()

    # --orders 2: the generator's two orders, in folders of their own; the recipe's order is seed 0's run above
    started.clear()
    out = tmp_path / "orders.md"
    assert compare_methods.main([str(a), "--runs", str(runs), "--seeds", "0", "--orders", "2",
                                 "--output", str(out)]) == 0
    orders = _drawn_orders(2, 2, 0)
    folders = [seed0.parent / ("order-" + "-".join(map(str, o))) for o in orders]
    assert len(set(folders)) == 2 and started == [f for f in folders if f != seed0]
    (entry,) = json.loads(out.with_suffix(".json").read_text())["recipes"]
    assert [r["tasks"] for r in entry["runs"]] == [[["colour", "warmth"][i] for i in o] for o in orders]
    assert [_own(f)["tasks"] for f in folders] == [r["tasks"] for r in entry["runs"]]
    _check_spread(entry)                               # per task: matched by name across the two orders

    # seed 0 stopped after its first task (as Ctrl-C leaves it): the same command resumes it, and only it
    state = json.loads((seed0 / "run_state.json").read_text())
    finished = _own(seed0)
    state["trained"], state["rows"] = 1, state["rows"][:1]
    (seed0 / "run_state.json").write_text(json.dumps(state))
    write_report(seed0, state["tasks"], state["rows"], state["initial"], extra=state["extra"])
    untouched = (seed1 / "metrics.json").stat().st_mtime_ns
    started.clear()
    capsys.readouterr()
    assert compare_methods.main(seeds) == 0
    assert started == [seed0] and "resuming after task 1/2" in capsys.readouterr().out
    assert _own(seed0)["matrix"] == finished["matrix"] and _own(seed0)["num_completed"] == 2
    assert (seed1 / "metrics.json").stat().st_mtime_ns == untouched      # finished: read, not trained

    # a finished run whose metrics.json is gone: written again from its run state, nothing trained
    (seed1 / "metrics.json").unlink()
    started.clear()
    assert compare_methods.main(seeds) == 0
    assert started == [] and _own(seed1)["num_completed"] == 2
    (entry,) = json.loads((runs / "comparison.json").read_text())["recipes"]
    assert entry["n"] == 2
    _check_spread(entry)
