"""Run a set of recipes one after another and write one comparison table.

    python scripts/compare_methods.py recipes/seq5*.yaml --runs runs/compare --output docs/results.md

Each recipe trains in its own process (``lvlm_cl/train.py <recipe> output_dir=<runs>/<recipe name>``), alone,
so wall times compare; its peak resident memory comes from the operating system (``os.wait4``). A run
that already finished in ``--runs`` is read, not retrained (``--rerun`` retrains); an interrupted one
resumes. The table has, per recipe: MFT, MFN, MAA, BWT, forgetting (``metrics.json``), the mean routing
accuracy after the last task (methods that route), the most parameters trained in one task, the memory
bank's size, peak memory, wall time and the commit of the code that ran it. Extra ``key=value``
overrides (``--set``) apply to every recipe.

``--keep`` adds to an existing table instead of replacing it: the rows of ``<output>.json`` whose recipe
is not on the command line are kept as they are (with the commit that measured them, "earlier" when it was
not recorded), and the rows of the recipes given are run and replaced or appended.

Variance (``--seeds``, ``--orders``): every recipe runs once per seed and per task order, and each metric and each
task's final score is given as mean ± standard deviation over the runs, the runs' own values kept:

    python scripts/compare_methods.py recipes/seq5.yaml recipes/seq5_replay.yaml --seeds 0 1 2 --orders 2 \\
        --runs runs/spread

Runs = recipes x seeds x orders, one at a time (seed by seed, so an interrupted comparison has about as many runs
of every recipe), each in its own folder ``<runs>/<recipe stem>/seed-<s>/order-<i>-<j>-...`` (the recipe's tasks,
numbered from 0 in the recipe's order, in the order the run trains them). ``<runs>/comparison.md`` (or
``--output``), ``.json`` and ``.png`` are rewritten after every run from all the runs of the command that have
finished. The same command again skips the finished runs, resumes the half-finished one and runs the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lvlm_cl.config import cache_dir, load_recipe  # noqa: E402
from lvlm_cl.io import atomic_write_json, atomic_write_text  # noqa: E402
from lvlm_cl.stream import task_files  # noqa: E402

NOTES_MARKER = "<!-- notes: everything below this line is kept when the tables above are regenerated -->"
COLUMNS = ["recipe", "methods", "MFT", "MFN", "MAA", "BWT", "forgetting", "routing", "trainable", "memory",
           "peak RSS", "wall", "commit"]
METRICS = ["MFT", "MFN", "MAA", "BWT", "forgetting", "FWT"]
SEEDS_HELP = ("train every recipe once per seed (default: the recipe's own seed, one run). The seed replaces the "
              "recipe's top-level `seed`: it seeds every task's batch order, the global random generator at the start "
              "of every task (LoRA initialisations of task_lora, olora and dual_modality; dropout) and the initial "
              "weights of a builtin:*-random model. It leaves alone the data (benchmark.seed), the pretrained tiny "
              "base (builtin:tiny-llava, built by its own recipe) and the methods' own `seed` settings (replay's "
              "choice of records, the initialisation of task_prompts' prompts and of moelora's and cross_modal_moe's "
              "experts, the k-means routing keys), which keep the recipe's values")


def run_recipe(recipe: Path, out: Path, overrides: list[str], rerun: bool) -> dict:
    """Train (or resume) one recipe in a child process; returns its timing record."""
    timing_file = out / "compare_timing.json"
    if not rerun and not _finished(out):
        report_from_state(out)
    if not rerun and _finished(out) and timing_file.is_file():
        return json.loads(timing_file.read_text())
    if rerun:
        timing_file.unlink(missing_ok=True)     # not a file of the run: train.py --overwrite refuses such a folder
    cmd = [sys.executable, str(ROOT / "lvlm_cl" / "train.py"), str(recipe), f"output_dir={out}", *overrides]
    if rerun:
        cmd.append("--overwrite")
    resumed = (out / "run_state.json").is_file() and not rerun
    print(f"[compare] {' '.join(cmd)}", flush=True)
    started = time.time()
    child = subprocess.Popen(cmd, cwd=ROOT)
    try:
        _, status, usage = os.wait4(child.pid, 0)
    except KeyboardInterrupt:
        _stop(child)
        print(f"[compare] interrupted; {out} stopped at its last checkpoint: run the same command again to finish "
              "what is left", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    wall = time.time() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"[compare] {recipe} failed (exit {code}); fix it and run the same command again to resume")
    # ru_maxrss is in KiB on Linux. A resumed run's wall time covers only what was left: say so.
    record = {"wall_seconds": round(wall, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "resumed": resumed,
              "commit": _commit()}
    atomic_write_json(timing_file, record)
    return record


def _stop(child: subprocess.Popen) -> None:
    """After Ctrl-C: wait for the training process to stop (a terminal sends it the same SIGINT, and it stops
    within a step, its files whole), so that its run folder is free when the command runs again."""
    try:
        child.wait(timeout=60)
    except subprocess.TimeoutExpired:       # the interrupt reached this process only
        child.send_signal(signal.SIGINT)
        child.wait()


def report_from_state(out: Path) -> bool:
    """Write a run's metrics.json (and report) again from its run_state.json when every task was trained and
    evaluated but metrics.json is missing or older (removed, damaged): the run is finished, and train.py, with
    nothing left to train, would not write it. Whether it did."""
    from lvlm_cl.checkpoint import CheckpointError, RunState
    from lvlm_cl.evaluation import write_report

    try:
        state = RunState.load(out)
    except CheckpointError:
        return False                        # train.py says what is wrong with it
    if state is None or state.trained != len(state.tasks) or len(state.rows) != len(state.tasks):
        return False
    write_report(out, state.tasks, state.rows, state.initial, extra=state.extra or None)   # as train.py does
    return True


def _commit() -> str | None:
    """The short commit of the code that runs the recipes ("+" when the tree has uncommitted changes)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+" if dirty else "")


def _shown(path: Path) -> str:
    """``path`` as the table's command names it: relative to the repository when inside it (a run from a git
    worktree elsewhere names the same file as one from the checkout)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _table_command(path: Path) -> str | None:
    """The first command an existing table names (rows written before commands were kept per row)."""
    if not path.is_file():
        return None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("python scripts/compare_methods.py"):
            return line.strip()
    return None


def _finished(out: Path) -> bool:
    metrics = out / "metrics.json"
    if not metrics.is_file():
        return False
    try:
        m = json.loads(metrics.read_text())
    except json.JSONDecodeError:
        return False
    return m["num_completed"] == len(m["tasks"])


def summarize(recipe: Path, out: Path, timing: dict) -> dict:
    cfg = load_recipe(recipe)
    m = json.loads((out / "metrics.json").read_text())
    routing = m.get("routing_accuracy") or {}
    last = routing.get(m["tasks"][-1]) if routing else None
    memory = m.get("memory_records") or {}
    train_records = sum(_count(out, t) for t in m["tasks"])
    bank = memory.get(m["tasks"][-1]) if memory else 0
    return {
        "recipe": recipe.name, "methods": _methods(cfg), **m["metrics"],
        "routing": None if last is None else sum(last.values()) / len(last),
        "trainable": max((m.get("trainable_parameters") or {0: 0}).values()),
        "memory_records": bank, "memory_percent": 100.0 * bank / train_records if train_records else None,
        "per_task_final": {t: v["final"] for t, v in m["per_task"].items()},
        "train_seconds": sum((m.get("train_seconds") or {}).values()),
        "eval_seconds": sum((m.get("eval_seconds") or {}).values()),
        **timing,
    }


def _methods(cfg) -> str:
    return " + ".join([s.name if not s.args else f"{s.name}({', '.join(f'{k}={v}' for k, v in s.args.items())})"
                       for s in cfg.methods] or ["finetune"])


def _count(out: Path, task: str) -> int:
    """The task's own training records (replayed ones not counted), from its checkpoint's meta."""
    metas = sorted((out / "checkpoints").glob(f"task-*-{task}/meta.json"))
    if not metas:
        return 0
    meta = json.loads(metas[0].read_text())
    return meta["task_records"]


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(rows: list[dict], commands: list[str]) -> str:
    lines = ["# Results: every method on seq5", "",
             "The tables are written by `scripts/compare_methods.py` (regenerate them, do not edit them); the "
             "notes after them are kept. " + ("Command:" if len(commands) == 1 else
                                              "Commands (the later ones added rows with `--keep`):"), "",
             *(f"    {c}" for c in commands), "",
             "One process per recipe, run one after another on the same machine (2 CPU cores, no GPU), seed 0. "
             "Metrics as in `docs/metrics.md` (percent; BWT and forgetting in points). *routing*: mean routing "
             "accuracy over the tasks after the last task, for methods that route by task keys. *trainable*: the "
             "most parameters trained in one task. *memory*: records in the replay bank at the end, and their "
             "share of all training records. *peak RSS*: the training process's peak resident memory. *wall*: "
             "the process's wall time (training, evaluation after every task, reports). *commit*: the code that "
             "ran the row (rows of an earlier command are kept by `--keep`; \"earlier\": not recorded).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        memory = "—" if not r["memory_records"] else f"{r['memory_records']} ({r['memory_percent']:.1f}%)"
        cells = [r["recipe"], r["methods"], _fmt(r["MFT"]), _fmt(r["MFN"]), _fmt(r["MAA"]), _fmt(r["BWT"]),
                 _fmt(r["forgetting"]), _fmt(r["routing"], 1), f"{r['trainable']:,}", memory,
                 f"{r['peak_rss_mib']:.0f} MiB", f"{r['wall_seconds']:.0f} s" + (" (resumed)" if r["resumed"] else ""),
                 r.get("commit") or "earlier"]
        lines.append("| " + " | ".join(cells) + " |")
    tasks = list(rows[0]["per_task_final"]) if rows else []
    lines += ["", "## Final score per task (after the last task)", "",
              "| recipe | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for r in rows:
        lines.append(f"| {r['recipe']} | " + " | ".join(_fmt(r["per_task_final"].get(t), 1) for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, errors: dict[str, list[float]] | None = None) -> None:
    """MFT and MFN per recipe; ``errors`` (``{"MFT": [...], "MFN": [...]}``, one per row): error bars."""
    from matplotlib.figure import Figure

    from lvlm_cl.io import atomic_save

    errors = errors or {}
    fig = Figure(figsize=(8, 0.45 * len(rows) + 1.5))
    ax = fig.add_subplot()
    names = [r["recipe"].removesuffix(".yaml") for r in rows]
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [r["MFT"] for r in rows], height=0.4, label="MFT (just trained)",
            xerr=errors.get("MFT"), capsize=3)
    ax.barh([i - 0.2 for i in y], [r["MFN"] for r in rows], height=0.4, label="MFN (after the last task)",
            xerr=errors.get("MFN"), capsize=3)
    ax.set_yticks(list(y), labels=names)
    ax.set_xlim(0, 100)
    ax.set_xlabel("mean score (%)")
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_save(path, lambda p: fig.savefig(p, format="png", dpi=120))


# ----------------------------------------------------------------------------- variance: seeds x orders


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One run of a comparison: a recipe with a seed and a task order (``order``: its index among the drawn
    orders, None for the recipe's own), trained in ``folder`` with ``overrides``."""

    recipe: Path
    seed: int
    order: int | None
    tasks: tuple[str, ...]          # in the order this run trains them
    recipe_tasks: tuple[str, ...]   # in the recipe's order
    folder: Path
    overrides: tuple[str, ...]


def draw_orders(num_tasks: int, k: int, seed: int) -> list[list[int]]:
    """``k`` different task orders (permutations of ``range(num_tasks)``) from numpy's generator seeded with
    ``seed``: the same ones for every recipe and seed of a comparison (and every recipe of as many tasks)."""
    import numpy as np

    if k > math.factorial(num_tasks):
        raise SystemExit(f"[compare] --orders {k}: {num_tasks} tasks have only {math.factorial(num_tasks)} orders")
    rng, orders = np.random.default_rng(seed), []
    while len(orders) < k:
        order = [int(i) for i in rng.permutation(num_tasks)]
        if order not in orders:
            orders.append(order)
    return orders


def task_names(cfg) -> list[str]:
    """The recipe's tasks in its order (a built-in benchmark's are generated into the cache, as the run would)."""
    if cfg.benchmark is None:
        return [t.name for t in cfg.tasks]
    if cfg.benchmark.tasks is not None:
        return list(cfg.benchmark.tasks)
    return [name for name, *_ in task_files(cfg, cache_dir(cfg))]


def plan(recipes: list[Path], seeds: list[int] | None, orders: int, order_seed: int, runs: Path,
         overrides: list[str]) -> list[PlannedRun]:
    """Every run of the comparison, seed by seed, order by order, recipe by recipe; each run's recipe loaded
    (validated) with its own overrides before the first one starts."""
    planned = []
    for r, recipe in enumerate(recipes):
        cfg = load_recipe(recipe, overrides)
        names = task_names(cfg)
        drawn = draw_orders(len(names), orders, order_seed) if orders else [None]
        for s, seed in enumerate([cfg.seed] if seeds is None else seeds):
            for k, order in enumerate(drawn):
                # The order is always written out, the recipe's own too: a drawn order that happens to be the
                # recipe's is then the same run (folder and config), whichever command made it.
                index = order or list(range(len(names)))
                if cfg.benchmark is not None:       # the whole mapping: `benchmark: seq5` is a name, not a mapping
                    bench = {**dataclasses.asdict(cfg.benchmark), "tasks": [names[i] for i in index]}
                    extra = [f"seed={seed}", "benchmark=" + json.dumps(bench)]
                else:
                    extra = [f"seed={seed}", "tasks=" + json.dumps([dataclasses.asdict(cfg.tasks[i]) for i in index])]
                leaf = "order-" + "-".join(map(str, index))
                if len(leaf) > 100:                     # very long streams: a short, stable name
                    leaf = "order-" + hashlib.sha256(leaf.encode()).hexdigest()[:12]
                run = PlannedRun(recipe, seed, None if order is None else k, tuple(names[i] for i in index),
                                 tuple(names), runs / recipe.stem / f"seed-{seed}" / leaf, (*overrides, *extra))
                load_recipe(recipe, list(run.overrides))
                planned.append(((s, k, r), run))
    folders = [run.folder for _, run in planned]
    if len(set(folders)) != len(folders):
        raise SystemExit("[compare] two recipes of the same file name would share run folders: rename one")
    return [run for _, run in sorted(planned, key=lambda pair: pair[0])]


def run_all(planned: list[PlannedRun], rerun: bool, write) -> None:
    """Train what is not finished, one run at a time; ``write()`` after every run rewrites the comparison."""
    for i, run in enumerate(planned, 1):
        out = run.folder.resolve()
        name = f"[compare] run {i}/{len(planned)}: {run.recipe.name} seed {run.seed}" + \
            ("" if run.order is None else f" order {run.order}")
        if not rerun and (_finished(out) or report_from_state(out)):
            print(f"{name}: finished, read from {run.folder}", flush=True)
        else:
            print(f"{name} in {run.folder}", flush=True)
            run_recipe(run.recipe.resolve(), out, list(run.overrides), rerun)
        write()


def spread(values: list) -> dict:
    """Mean, sample standard deviation (n - 1 in the denominator) and n of the values that are not None: mean
    None for none, std None for fewer than two."""
    xs = [v for v in values if v is not None]
    return {"mean": statistics.fmean(xs) if xs else None, "std": statistics.stdev(xs) if len(xs) > 1 else None,
            "n": len(xs), "values": values}


def summarize_spread(recipe: Path, cfg, planned: list[PlannedRun]) -> dict:
    """One recipe's entry of comparison.json, from the runs of ``planned`` that finished: every metric and every
    task's final score (matched by name: the orders differ) as ``spread``, and the runs themselves."""
    runs = []
    for run in planned:
        if not _finished(run.folder):
            continue
        m = json.loads((run.folder / "metrics.json").read_text())
        timing_file = run.folder / "compare_timing.json"
        timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
        runs.append({"seed": run.seed, "order": run.order, "tasks": m["tasks"], "folder": _shown(run.folder),
                     "metrics": {k: m["metrics"].get(k) for k in METRICS},
                     "per_task_final": {t: v["final"] for t, v in m["per_task"].items()},
                     **{k: timing.get(k) for k in ("wall_seconds", "peak_rss_mib", "resumed", "commit")}})
    tasks = list(planned[0].recipe_tasks)
    return {"recipe": recipe.name, "methods": _methods(cfg), "planned": len(planned), "n": len(runs),
            "metrics": {k: spread([r["metrics"][k] for r in runs]) for k in METRICS},
            "per_task_final": {t: spread([r["per_task_final"].get(t) for r in runs]) for t in tasks},
            "runs": runs}


def _cell(stat: dict, digits: int = 2) -> str:
    if not stat["n"]:
        return "—"
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f} ({stat['n']})"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f} ({stat['n']})"


def spread_markdown(summary: dict) -> str:
    entries = summary["recipes"]
    seeds = "the recipe's own seed" if summary["seeds"] is None else "seeds " + ", ".join(map(str, summary["seeds"]))
    orders = ("the recipe's task order" if not summary["orders"] else
              f"{summary['orders']} task orders drawn with --order-seed {summary['order_seed']}, the same for every "
              "recipe and seed")
    lines = ["# Comparison: mean ± standard deviation over runs", "",
             "Written by `scripts/compare_methods.py` (the same command again finishes an interrupted comparison and "
             "rewrites the tables; do not edit them); the notes after them are kept. Command:", "",
             f"    {summary['command']}", "",
             f"Each recipe trained once per seed and task order ({seeds}; {orders}), one run at a time. A cell "
             "is `mean ± std (n)`: the mean over the n runs that finished and their sample standard deviation "
             "(n − 1 in the denominator); one run gives its value alone, none gives —. *runs*: finished of "
             "planned. Metrics as in `docs/metrics.md` (percent; BWT, forgetting and FWT in points). The seed is "
             "the recipe's `seed` (batch order, per-task random state, a random model's initial weights); the data "
             "and the methods' own `seed` settings stay as the recipe sets them.", "",
             "| recipe | methods | runs | " + " | ".join(METRICS) + " |", "|" + "---|" * (len(METRICS) + 3)]
    for e in entries:
        lines.append(f"| {e['recipe']} | {e['methods']} | {e['n']}/{e['planned']} | "
                     + " | ".join(_cell(e["metrics"][k]) for k in METRICS) + " |")
    if summary["orders"]:
        lines += ["", "## Task orders", ""]
        shown = {}
        for e in entries:
            for r in e["runs"]:
                shown.setdefault((r["order"], tuple(r["tasks"])), None)
        lines += [f"- order {k}: " + " → ".join(tasks) for k, tasks in sorted(shown)]
    tasks = list(dict.fromkeys(t for e in entries for t in e["per_task_final"]))
    lines += ["", "## Final score per task (after the last task, matched by name)", "",
              "| recipe | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for e in entries:
        lines.append(f"| {e['recipe']} | " + " | ".join(_cell(e["per_task_final"][t], 1) if t in e["per_task_final"]
                                                        else "—" for t in tasks) + " |")
    lines += ["", "## Runs", "", "| recipe | seed | order | " + " | ".join(METRICS) + " | wall | folder |",
              "|" + "---|" * (len(METRICS) + 5)]
    for e in entries:
        for r in e["runs"]:
            wall = "—" if r["wall_seconds"] is None else \
                f"{r['wall_seconds']:.0f} s" + (" (resumed)" if r["resumed"] else "")
            lines.append(f"| {e['recipe']} | {r['seed']} | {'recipe' if r['order'] is None else r['order']} | "
                         + " | ".join(_fmt(r["metrics"][k]) for k in METRICS) + f" | {wall} | {r['folder']} |")
    return "\n".join(lines) + "\n"


def write_spread(output: Path, summary: dict) -> None:
    """comparison.md (notes below the marker kept), .json and .png (MFT and MFN, error bars: one std)."""
    notes = ""
    if output.is_file() and NOTES_MARKER in output.read_text(encoding="utf-8"):
        notes = output.read_text(encoding="utf-8").split(NOTES_MARKER, 1)[1]
    atomic_write_json(output.with_suffix(".json"), summary)
    atomic_write_text(output, spread_markdown(summary) + "\n" + NOTES_MARKER + notes)
    done = [e for e in summary["recipes"] if e["n"]]
    if done:
        plot([{"recipe": e["recipe"], **{k: e["metrics"][k]["mean"] for k in ("MFT", "MFN")}} for e in done],
             output.with_suffix(".png"), {k: [e["metrics"][k]["std"] or 0.0 for e in done] for k in ("MFT", "MFN")})


def compare_spread(args) -> int:
    """``--seeds`` / ``--orders``: every recipe x seed x order, then mean ± std."""
    if args.keep:
        raise SystemExit("[compare] --keep adds rows to a table of single runs; it does not apply with --seeds or "
                         "--orders")
    if args.orders < 0:
        raise SystemExit(f"[compare] --orders {args.orders}: give 0 (the recipe's order) or more")
    if args.seeds is not None and any(o.split("=", 1)[0].strip() == "seed" for o in args.overrides):
        raise SystemExit("[compare] give the seeds with --seeds, not --set seed=...")
    if args.seeds is not None:
        args.seeds = list(dict.fromkeys(args.seeds))
    output = args.output or args.runs / "comparison.md"
    planned = plan(args.recipes, args.seeds, args.orders, args.order_seed, args.runs, args.overrides)
    command = "python scripts/compare_methods.py " + " ".join(str(r) for r in args.recipes) + \
        "".join(f" --set {o}" for o in args.overrides) + \
        ("" if args.seeds is None else " --seeds " + " ".join(map(str, args.seeds))) + \
        (f" --orders {args.orders} --order-seed {args.order_seed}" if args.orders else "") + \
        f" --runs {_shown(args.runs)}" + (f" --output {_shown(args.output)}" if args.output else "")
    configs = {recipe: load_recipe(recipe, args.overrides) for recipe in args.recipes}

    def write():
        entries = [summarize_spread(recipe, cfg, [r for r in planned if r.recipe == recipe])
                   for recipe, cfg in configs.items()]
        write_spread(output, {"command": command, "seeds": args.seeds, "orders": args.orders,
                              "order_seed": args.order_seed if args.orders else None, "recipes": entries})

    run_all(planned, args.rerun, write)
    print(f"[compare] wrote {output}, {output.with_suffix('.json')} and {output.with_suffix('.png')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+", type=Path)
    parser.add_argument("--runs", type=Path, default=Path("runs/compare"), help="folder for the runs")
    parser.add_argument("--output", type=Path, default=None,
                        help="the table (and its .json and .png); default docs/results.md, with --seeds or --orders "
                             "<runs>/comparison.md")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every recipe (repeatable)")
    parser.add_argument("--rerun", action="store_true", help="retrain runs that already finished")
    parser.add_argument("--keep", action="store_true",
                        help="keep the existing table's rows of recipes not given here (add to the table)")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="SEED", help=SEEDS_HELP)
    parser.add_argument("--orders", type=int, default=0, metavar="K",
                        help="train every recipe (and seed) on K different task orders drawn with --order-seed, the "
                             "same K for every recipe (default 0: the recipe's order)")
    parser.add_argument("--order-seed", type=int, default=0, help="seed of the generator that draws the task orders")
    args = parser.parse_args(argv)
    for recipe in args.recipes:          # every recipe must load before hours are spent on the first
        load_recipe(recipe, args.overrides)
    if args.seeds is not None or args.orders:
        return compare_spread(args)
    args.output = args.output or Path("docs/results.md")
    rows = []
    for recipe in args.recipes:
        out = args.runs / recipe.stem
        timing = run_recipe(recipe.resolve(), out.resolve(), args.overrides, args.rerun)
        rows.append(summarize(recipe, out, timing))
        print(f"[compare] {recipe.name}: MFT={rows[-1]['MFT']:.2f} MFN={rows[-1]['MFN']:.2f} "
              f"BWT={rows[-1]['BWT']:.2f} wall={timing['wall_seconds']:.0f}s", flush=True)
    command = "python scripts/compare_methods.py " + " ".join(str(r) for r in args.recipes) + \
        "".join(f" --set {o}" for o in args.overrides) + (" --keep" if args.keep else "") + f" --output {_shown(args.output)}"
    for r in rows:
        r["command"] = command
    kept_from = args.output.with_suffix(".json")
    if args.keep and kept_from.is_file():
        ran = {r["recipe"]: r for r in rows}
        earlier = _table_command(args.output)
        old = [{"command": earlier, **r} for r in json.loads(kept_from.read_text())]
        rows = [ran.pop(r["recipe"], r) for r in old] + list(ran.values())
    notes = ""
    if args.output.is_file() and NOTES_MARKER in args.output.read_text(encoding="utf-8"):
        notes = args.output.read_text(encoding="utf-8").split(NOTES_MARKER, 1)[1]   # hand-written analysis kept
    commands = list(dict.fromkeys(r["command"] for r in rows if r.get("command")))
    atomic_write_text(args.output, markdown(rows, commands) + "\n" + NOTES_MARKER + notes)
    atomic_write_json(args.output.with_suffix(".json"), rows)
    plot(rows, args.output.with_suffix(".png"))
    print(f"[compare] wrote {args.output}, {args.output.with_suffix('.json')} and {args.output.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
