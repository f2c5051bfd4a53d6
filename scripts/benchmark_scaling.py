"""How training and evaluation time grow with the number of tasks and with the memory bank's size.

    python scripts/benchmark_scaling.py [--tasks 2 5 10] [--bank 0 60 240 960] [--steps 30] \
        [--eval-samples 50] [--runs /tmp/scaling] [--output docs/benchmarks_scaling.json]

Streams of T tasks are seq5's five tasks cycled (the 6th task is digits again under the name
``digits-2``, and so on: the same data, since only the time is measured), with seq5's methods
(``task_prompts`` + ``replay``), ``--steps`` optimizer steps per task and ``--eval-samples`` test prompts
per task. Each run is one training process (``lvlm_cl/train.py``); its ``metrics.json`` gives the
training and evaluation seconds of every task. The growth exponent k of time ~ T^k is the slope of a
least-squares line through (log T, log seconds).

The memory bank runs are three seq5 tasks with ``replay`` keeping 0, 60, 240, 960 records per task
(``memory_per_task``) and the same steps per task: the last task's training time, the time to build its
training data (``before_task``) is inside it, and the bank's size on disk in the task checkpoint.

Evaluation after every task covers every task of the stream (the full accuracy matrix, T + T^2 task
evaluations with the row before training), so its total is expected to grow as T^2 and training as T.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def seq5_tasks(cache_root: str | None) -> list[dict]:
    """seq5's task files (materialized in the cache on first use)."""
    from lvlm_cl.config import BenchmarkConfig, RunConfig, cache_dir
    from lvlm_cl.stream import task_files

    cfg = RunConfig(output_dir="unused", benchmark=BenchmarkConfig(), cache_dir=cache_root or "")
    return [{"name": name, "train": str(train), "eval": str(test), "metric": metric,
             **({"image_root": str(root)} if root else {})}
            for name, train, test, metric, root in task_files(cfg, cache_dir(cfg))]


def write_recipe(path: Path, tasks: list[dict], count: int, methods: list[dict], args) -> Path:
    import yaml

    stream = []
    for i in range(count):
        base = tasks[i % len(tasks)]
        name = base["name"] if i < len(tasks) else f"{base['name']}-{i // len(tasks) + 1}"
        stream.append({**base, "name": name})
    recipe = {"output_dir": "unused", "seed": 0,
              "model": {"path": "builtin:tiny-llava", "freeze_vision_tower": False},
              "tasks": stream, "methods": methods, "report_to": [],
              "trainer": {"steps_per_task": args.steps, "epochs_per_task": None, "lr": 3.0e-4, "batch_size": 32,
                          "eval_batch_size": 125, "max_new_tokens": 20, "eval_max_samples": args.eval_samples,
                          "save_every": 0}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def tasks_row(out: Path, count: int, timing: dict) -> dict:
    """The timings of a run of ``count`` tasks, from its metrics.json and the process's wall time and RSS."""
    m = json.loads((out / "metrics.json").read_text())
    train, evals = m["train_seconds"], m["eval_seconds"]
    return {"tasks": count, "train_seconds": sum(train.values()), "eval_seconds": sum(evals.values()),
            "eval_seconds_per_stage": list(evals.values()), "wall_seconds": timing["wall_seconds"],
            "peak_rss_mib": timing["peak_rss_mib"]}


def bank_row(out: Path, per_task: int) -> dict:
    """The last task of a memory-bank run: its bank size, training and evaluation seconds, and the size of
    the methods' state in its task checkpoint (the bank's records)."""
    m = json.loads((out / "metrics.json").read_text())
    last = m["tasks"][-1]
    state_files = sorted((out / "checkpoints").glob(f"task-{len(m['tasks']) - 1:02d}-*/methods*"))
    if not state_files:
        raise FileNotFoundError(f"{out / 'checkpoints'}: no methods state of the last task")
    return {"memory_per_task": per_task, "bank_records": m.get("memory_records", {}).get(last, 0),
            "last_task_train_seconds": m["train_seconds"][last], "last_task_eval_seconds": m["eval_seconds"][last],
            "methods_state_bytes": sum(f.stat().st_size for f in state_files)}


def exponent(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main(argv=None) -> int:
    from compare_methods import run_recipe

    from lvlm_cl.io import atomic_write_json, atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--bank", type=int, nargs="+", default=[0, 60, 240, 960])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-samples", type=int, default=50)
    parser.add_argument("--runs", type=Path, default=Path("/tmp/lvlm_cl_scaling"))
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks_scaling.json"))
    args = parser.parse_args(argv)
    tasks = seq5_tasks(args.cache_dir)
    overrides = [f"cache_dir={args.cache_dir}"] if args.cache_dir else []
    seq5_methods = [{"name": "task_prompts", "length": 8},
                    {"name": "replay", "memory_fraction": 0.05, "selection": "task_balanced", "replay_ratio": 0.2}]

    by_tasks = []
    for count in args.tasks:
        out = args.runs / f"tasks-{count}"
        recipe = write_recipe(args.runs / f"tasks-{count}.yaml", tasks, count, seq5_methods, args)
        timing = run_recipe(recipe, out, overrides, rerun=False)
        by_tasks.append(tasks_row(out, count, timing))
        print(f"[scaling] {count} tasks: train {by_tasks[-1]['train_seconds']:.1f} s, "
              f"eval {by_tasks[-1]['eval_seconds']:.1f} s", flush=True)

    by_bank = []
    for per_task in args.bank:
        out = args.runs / f"bank-{per_task}"
        methods = [{"name": "task_prompts", "length": 8}]
        if per_task:
            methods.append({"name": "replay", "memory_per_task": per_task, "selection": "task_balanced",
                            "replay_ratio": 0.2})
        recipe = write_recipe(args.runs / f"bank-{per_task}.yaml", tasks, 3, methods, args)
        run_recipe(recipe, out, overrides, rerun=False)
        by_bank.append(bank_row(out, per_task))
        print(f"[scaling] bank {per_task}/task: last task train {by_bank[-1]['last_task_train_seconds']:.1f} s",
              flush=True)

    xs = [r["tasks"] for r in by_tasks]
    result = {"steps_per_task": args.steps, "eval_samples": args.eval_samples, "by_tasks": by_tasks,
              "by_bank": by_bank,
              "exponents": {"train": exponent(xs, [r["train_seconds"] for r in by_tasks]),
                            "eval": exponent(xs, [r["eval_seconds"] for r in by_tasks])} if len(xs) > 1 else {}}
    atomic_write_json(args.output, result)
    command = "python scripts/benchmark_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"    {command.strip()}", "", "| tasks | training (s) | evaluation (s) | wall (s) | peak RSS |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['tasks']} | {r['train_seconds']:.1f} | {r['eval_seconds']:.1f} | {r['wall_seconds']:.1f} | "
              f"{r['peak_rss_mib']:.0f} MiB |" for r in by_tasks]
    if result["exponents"]:
        lines += ["", f"Growth exponents (time ~ T^k): training k = {result['exponents']['train']:.2f}, "
                  f"evaluation k = {result['exponents']['eval']:.2f}."]
    lines += ["", "| bank records per task | bank at the last task | last task's training (s) | "
              "last task's evaluation (s) | methods' state on disk |", "|---|---|---|---|---|"]
    lines += [f"| {r['memory_per_task']} | {r['bank_records']} | {r['last_task_train_seconds']:.1f} | "
              f"{r['last_task_eval_seconds']:.1f} | {r['methods_state_bytes'] / 1024:.0f} KiB |" for r in by_bank]
    table = "\n".join(lines) + "\n"
    atomic_write_text(args.output.with_suffix(".md"), table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
