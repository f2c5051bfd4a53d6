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
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lvlm_cl.config import load_recipe  # noqa: E402
from lvlm_cl.io import atomic_write_json, atomic_write_text  # noqa: E402

NOTES_MARKER = "<!-- notes: everything below this line is kept when the tables above are regenerated -->"
COLUMNS = ["recipe", "methods", "MFT", "MFN", "MAA", "BWT", "forgetting", "routing", "trainable", "memory",
           "peak RSS", "wall", "commit"]


def run_recipe(recipe: Path, out: Path, overrides: list[str], rerun: bool) -> dict:
    """Train (or resume) one recipe in a child process; returns its timing record."""
    timing_file = out / "compare_timing.json"
    if not rerun and _finished(out) and timing_file.is_file():
        return json.loads(timing_file.read_text())
    cmd = [sys.executable, str(ROOT / "lvlm_cl" / "train.py"), str(recipe), f"output_dir={out}", *overrides]
    if rerun:
        cmd.append("--overwrite")
    resumed = (out / "run_state.json").is_file() and not rerun
    print(f"[compare] {' '.join(cmd)}", flush=True)
    started = time.time()
    child = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.time() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"[compare] {recipe} failed (exit {code}); fix it and run the same command again to resume")
    # ru_maxrss is in KiB on Linux. A resumed run's wall time covers only what was left: say so.
    record = {"wall_seconds": round(wall, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "resumed": resumed,
              "commit": _commit()}
    atomic_write_json(timing_file, record)
    return record


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
    m = json.loads(metrics.read_text())
    return m["num_completed"] == len(m["tasks"])


def summarize(recipe: Path, out: Path, timing: dict) -> dict:
    cfg = load_recipe(recipe)
    m = json.loads((out / "metrics.json").read_text())
    routing = m.get("routing_accuracy") or {}
    last = routing.get(m["tasks"][-1]) if routing else None
    memory = m.get("memory_records") or {}
    train_records = sum(_count(out, t) for t in m["tasks"])
    bank = memory.get(m["tasks"][-1]) if memory else 0
    methods = [s.name if not s.args else f"{s.name}({', '.join(f'{k}={v}' for k, v in s.args.items())})"
               for s in cfg.methods] or ["finetune"]
    return {
        "recipe": recipe.name, "methods": " + ".join(methods), **m["metrics"],
        "routing": None if last is None else sum(last.values()) / len(last),
        "trainable": max((m.get("trainable_parameters") or {0: 0}).values()),
        "memory_records": bank, "memory_percent": 100.0 * bank / train_records if train_records else None,
        "per_task_final": {t: v["final"] for t, v in m["per_task"].items()},
        "train_seconds": sum((m.get("train_seconds") or {}).values()),
        "eval_seconds": sum((m.get("eval_seconds") or {}).values()),
        **timing,
    }


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


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    from lvlm_cl.io import atomic_save

    fig = Figure(figsize=(8, 0.45 * len(rows) + 1.5))
    ax = fig.add_subplot()
    names = [r["recipe"].removesuffix(".yaml") for r in rows]
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [r["MFT"] for r in rows], height=0.4, label="MFT (just trained)")
    ax.barh([i - 0.2 for i in y], [r["MFN"] for r in rows], height=0.4, label="MFN (after the last task)")
    ax.set_yticks(list(y), labels=names)
    ax.set_xlim(0, 100)
    ax.set_xlabel("mean score (%)")
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_save(path, lambda p: fig.savefig(p, format="png", dpi=120))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+", type=Path)
    parser.add_argument("--runs", type=Path, default=Path("runs/compare"), help="folder for the runs")
    parser.add_argument("--output", type=Path, default=Path("docs/results.md"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every recipe (repeatable)")
    parser.add_argument("--rerun", action="store_true", help="retrain runs that already finished")
    parser.add_argument("--keep", action="store_true",
                        help="keep the existing table's rows of recipes not given here (add to the table)")
    args = parser.parse_args(argv)
    for recipe in args.recipes:          # every recipe must load before hours are spent on the first
        load_recipe(recipe, args.overrides)
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
