"""The performance benchmark scripts run on a tiny model, and their arithmetic is right. (Their numbers are
measured by running them by hand, never here: docs/benchmarks.md.)"""

import sys
from pathlib import Path

import pytest

from conftest import SMALL_MODEL, write_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import benchmark_efficiency  # noqa: E402
import benchmark_scaling  # noqa: E402
import benchmark_train  # noqa: E402


def test_growth_exponent_is_the_log_log_slope():
    assert benchmark_scaling.exponent([2, 5, 10], [3 * 2 ** 2, 3 * 5 ** 2, 3 * 10 ** 2]) == pytest.approx(2.0)
    assert benchmark_scaling.exponent([2, 4], [7.0, 14.0]) == pytest.approx(1.0)


def test_scaling_streams_cycle_the_tasks_under_new_names(tmp_path, colour_tasks):
    from types import SimpleNamespace

    from lvlm_cl.config import load_recipe

    tasks = [{"name": n, "train": str(tr), "eval": str(te), "metric": "exact_match"} for n, (tr, te) in colour_tasks.items()]
    args = SimpleNamespace(steps=3, eval_samples=4)
    path = benchmark_scaling.write_recipe(tmp_path / "r.yaml", tasks, 5, [{"name": "replay", "memory_per_task": 2}], args)
    cfg = load_recipe(path, [f"output_dir={tmp_path / 'out'}"])
    assert [t.name for t in cfg.tasks] == ["colour", "warmth", "colour-2", "warmth-2", "colour-3"]
    assert cfg.tasks[4].train == str(colour_tasks["colour"][0])
    assert cfg.trainer.steps_per_task == 3 and cfg.trainer.eval_max_samples == 4


def test_operator_groups():
    assert benchmark_efficiency.group_of("aten::addmm") == "matmul"
    assert benchmark_efficiency.group_of("aten::_scaled_dot_product_attention_math") == "attention"
    assert benchmark_efficiency.group_of("aten::_fused_adamw_") == "optimizer"
    assert benchmark_efficiency.group_of("aten::gelu") == "other operators"


def test_peak_matmul_is_measured_per_size():
    peak = benchmark_efficiency.peak_matmul_flops(sizes=(64, 128), repeats=2, min_seconds=0.01)
    assert set(peak["flops_by_size"]) == {64, 128}
    assert peak["peak_flops"] == max(peak["flops_by_size"].values()) > 0


@pytest.mark.slow
def test_training_benchmark_loops_run_the_same_batches(tmp_path, colour_tasks):
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, tmp_path / "out", batch_size=4)
    ctx = benchmark_train.prepare(str(recipe), 2, SMALL_MODEL)
    batches = list(benchmark_train.batches(ctx))
    assert len(batches) == 2 and all(b["input_ids"].shape[0] == 4 for b in batches)
    assert benchmark_train.plain_loop(ctx) > 0
    assert benchmark_train.plain_loop(ctx, fused=True) > 0
    assert benchmark_train.plain_loop(ctx, fused=True, answer_logits=True) > 0
    assert benchmark_train.lvlm_cl_loop(ctx, "finetune") > 0
    # The count covers the forward and the backward, which costs about twice the forward (gradients of
    # the inputs and of the weights; the first layers need no input gradient, hence a little under 3x).
    import copy

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(ctx.base)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        for b in batches:
            model(**b)
    forward = counter.get_total_flops()
    assert 2.5 * forward < benchmark_efficiency.model_flops(ctx, full_logits=True) <= 3 * forward
    assert benchmark_efficiency.model_flops(ctx) < benchmark_efficiency.model_flops(ctx, full_logits=True)
    assert 0 <= benchmark_efficiency.padding(ctx) < 1


@pytest.mark.slow
def test_evaluation_benchmark_times_a_trained_stage_with_its_routing(tmp_path, colour_tasks):
    import json

    import benchmark_eval
    from lvlm_cl.config import load_recipe
    from lvlm_cl.train import run

    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, tmp_path / "run", steps_per_task=2)
    run(load_recipe(recipe, [*SMALL_MODEL, "methods=[task_prompts]"]), progress=False)
    out = tmp_path / "eval.json"
    assert benchmark_eval.main(["--run", str(tmp_path / "run"), "--stage", "0", "--rounds", "1", "--per-task", "4",
                                "--batch-sizes", "3", "8", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["stage"] == 0 and result["methods"] == ["task_prompts"] and result["prompts"] == 8
    assert result["identical_predictions"] and set(result["speedup"]) == {"batched_3", "batched_8"}


@pytest.mark.slow
def test_scaling_rows_are_read_from_a_real_run(tmp_path, colour_tasks):
    from lvlm_cl.config import load_recipe
    from lvlm_cl.train import run

    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, tmp_path / "run", steps_per_task=2)
    run(load_recipe(recipe, [*SMALL_MODEL, "methods=[{name: replay, memory_per_task: 3}]"]), progress=False)
    row = benchmark_scaling.tasks_row(tmp_path / "run", 2, {"wall_seconds": 9.0, "peak_rss_mib": 100.0})
    assert row["tasks"] == 2 and len(row["eval_seconds_per_stage"]) == 2
    assert row["train_seconds"] > 0 and row["eval_seconds"] == pytest.approx(sum(row["eval_seconds_per_stage"]))
    bank = benchmark_scaling.bank_row(tmp_path / "run", 3)
    assert bank["bank_records"] == 6 and bank["methods_state_bytes"] > 0 and bank["last_task_train_seconds"] > 0


@pytest.mark.slow
def test_data_benchmark_measures_a_generated_task_and_the_padding(tmp_path):
    import json
    import subprocess

    out = tmp_path / "data.json"
    proc = subprocess.run([sys.executable, "scripts/benchmark_data.py", "--sizes", "40", "--steps", "3", "--work",
                           str(tmp_path / "work"), "--output", str(out)], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    run, = result["runs"]
    assert run["status"] == "ok" and run["records"] == 40 and run["steps"] == 3
    assert run["first_step_seconds"] > 0 and run["samples_per_second"] > 0 and run["peak_rss_mib"] > 100
    lines = (tmp_path / "work" / "task-40.train.jsonl").read_text().splitlines()
    assert len(lines) == 40 and json.loads(lines[0])["images"][0].endswith(".jpg")
    pad = result["padding"]
    assert set(pad) == {"generated (40 records)", *(f"seq5 {t}" for t in ("digits", "scienceqa", "vqa", "ocr",
                                                                          "grounding"))}
    for p in pad.values():
        assert 0 <= p["padding_grouped"] <= p["padding_random"] < 1
