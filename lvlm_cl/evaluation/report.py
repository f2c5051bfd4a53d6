"""The files a run writes after each task: metrics.json, report.md, accuracy_matrix.png, format_matrix.png,
predictions.

Every file is written atomically (``lvlm_cl.io``), so a crash mid-write leaves the previous version.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

from lvlm_cl.evaluation.metrics import METRIC_KEYS, cl_metrics_partial, per_task_forgetting
from lvlm_cl.io import atomic_save, atomic_write_json, atomic_write_lines, atomic_write_text

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
MATRIX_PLOT_FILE = "accuracy_matrix.png"
FORMAT_PLOT_FILE = "format_matrix.png"
PREDICTION_FIELDS = ("id", "prompt", "prediction", "answer", "correct")

METRIC_DEFINITIONS = MappingProxyType({
    "MFT": "mean fine-tuned: score on each task right after training on it, `mean_i A[i][i]`",
    "MFN": "mean final: score on every task after the last task, `mean_i A[T-1][i]`",
    "MAA": "mean average accuracy: `mean_t (mean_{i<=t} A[t][i])`, the average over seen tasks at each step",
    "BWT": "backward transfer: `1/(T-1) sum_{i<T-1} (A[T-1][i] - A[i][i])`; negative means forgetting",
    "forgetting": "`mean_{i<T-1} (max_{i<=t<T-1} A[t][i] - A[T-1][i])`, drop from the best earlier score",
    "FWT": "forward transfer: `mean_{i>=1} (A[i-1][i] - A_init[i])`, gain on a task before training on it",
})


def _json_number(value: float | None) -> float | None:
    # JSON has no NaN; an unevaluated cell is null.
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _validate(task_names: Sequence[str], matrix_rows: Sequence[Sequence[float | None]],
              initial: Sequence[float | None] | None) -> None:
    if len(set(task_names)) != len(task_names):
        raise ValueError(f"task names must be unique: {list(task_names)}")
    if len(matrix_rows) == 0 and initial is None:
        raise ValueError("nothing to report: no matrix rows and no initial row")
    # Row lengths, row count and the lower triangle are checked by cl_metrics_partial.


def _per_task(task_names: Sequence[str], rows: list[list[float | None]]) -> dict[str, dict]:
    k = len(rows)
    if k == 0:
        return {}
    forgetting = per_task_forgetting([row[:k] for row in rows])
    return {
        task_names[i]: {
            "final": _json_number(rows[k - 1][i]),
            "just_trained": _json_number(rows[i][i]),
            "forgetting": forgetting[i],
        }
        for i in range(k)
    }


def _format_cell(value: float | None, decimals: int = 1) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.{decimals}f}"


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _render_markdown(record: Mapping[str, Any], extra: Mapping[str, Any]) -> str:
    tasks = record["tasks"]
    rows = record["matrix"]
    k = record["num_completed"]
    lines = [
        "# Continual-learning report",
        "",
        f"Tasks trained: {k} of {len(tasks)} ({', '.join(tasks[:k]) or 'none yet'}).",
        "",
        "## Accuracy matrix",
        "",
        "Each row holds the score (%) on every task after training through the task named in the "
        "row. In a row, the cell in bold is the task just trained; cells left of it are earlier "
        "tasks (forgetting shows there), cells right of it are tasks not trained yet (forward "
        "transfer).",
        "",
    ]
    table_rows = []
    if record["initial"] is not None:
        table_rows.append(["before training"] + [_format_cell(v) for v in record["initial"]])
    for t, row in enumerate(rows):
        cells = [_format_cell(v) for v in row]
        cells[t] = f"**{cells[t]}**"
        table_rows.append([f"after {_escape(tasks[t])}"] + cells)
    lines += _markdown_table([""] + [_escape(name) for name in tasks], table_rows)

    lines += ["", f"## Metrics (over the {k} tasks trained so far)", ""]
    metric_rows = [[name, _format_cell(record["metrics"][name], 2), METRIC_DEFINITIONS[name]]
                   for name in METRIC_KEYS]
    lines += _markdown_table(["metric", "value", "definition"], metric_rows)
    if any(record["metrics"][name] is None for name in METRIC_KEYS):
        lines += ["", "—: undefined for this many tasks, or the cells it needs were not evaluated."]

    routing = extra.get("routing_accuracy")
    if isinstance(routing, Mapping) and routing:
        lines += ["", "## Routing accuracy", "",
                  "Percent of each task's test samples that the method's task keys route to that task, after "
                  "each task (tasks not trained yet have no key).", ""]
        lines += _markdown_table([""] + [_escape(name) for name in tasks], [
            [f"after {_escape(stage)}"] + [_format_cell(per_task.get(name), 1) if name in per_task else ""
                                           for name in tasks]
            for stage, per_task in routing.items()])

    for key, title, text in (
            ("format_errors", "Format errors",
             "Percent of each task's predictions whose format is wrong: not an answer of the task's kind (empty, no "
             "option letter, no number, no box) or another task's format (docs/metrics.md). A later task's "
             "answer style taking over shows here, apart from forgotten knowledge."),
            ("wrong_format_share", "Wrong answers: format or content",
             "Of each task's wrong predictions, the percent whose format is wrong; the rest have the right format "
             "and the wrong content (—: nothing wrong, or a graded metric).")):
        table = extra.get(key)
        if isinstance(table, Mapping) and table:
            lines += ["", f"## {title}", "", text, ""]
            lines += _markdown_table([""] + [_escape(name) for name in tasks], [
                [_escape(stage if stage == "before training" else f"after {stage}")]
                + [_format_cell(per_task.get(name), 1) for name in tasks]
                for stage, per_task in table.items()])

    scalars = [(key, value) for key, value in extra.items()
               if isinstance(value, (bool, int, float, str)) or value is None]
    if scalars:
        lines += ["", "## Other", ""]
        lines += _markdown_table(["key", "value"], [
            [_escape(key), _format_cell(value, 2) if isinstance(value, float) else _escape(str(value))]
            for key, value in scalars])
    return "\n".join(lines) + "\n"


def _save_heatmap(path: Path, tasks: Sequence[str], initial: Sequence[float | None] | None,
                  rows: Sequence[Sequence[float | None]], *, title: str = "Accuracy matrix",
                  label: str = "score (%)", stages: Sequence[str] | None = None, colormap: str = "viridis") -> None:
    # Imported here so that importing lvlm_cl.evaluation stays cheap; Figure without pyplot never
    # touches the global backend.
    import numpy as np
    from matplotlib.figure import Figure

    labels = list(stages) if stages is not None else \
        (["before training"] if initial is not None else []) + [f"after {t}" for t in tasks[:len(rows)]]
    data = [list(initial)] if initial is not None else []
    data += [list(row) for row in rows]
    values = np.array([[np.nan if v is None else v for v in row] for row in data], dtype=float)

    width = 2.5 + 0.9 * len(tasks)
    height = 1.5 + 0.5 * len(labels)
    fig = Figure(figsize=(width, height))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), vmin=0, vmax=100, cmap=colormap, aspect="auto")
    ax.set_xticks(range(len(tasks)), labels=list(tasks), rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels=labels)
    ax.set_xlabel("evaluated on")
    for r, row in enumerate(values):
        for c, value in enumerate(row):
            if math.isfinite(value):
                # viridis and magma are dark below the middle: light text there.
                ax.text(c, r, f"{value:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if value < 50 else "black")
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(title)
    fig.tight_layout()
    atomic_save(path, lambda p: fig.savefig(p, format="png", dpi=120))


def write_report(out_dir: str | os.PathLike, task_names: list[str],
                 matrix_rows: list[list[float | None]], initial: list[float | None] | None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write metrics.json, report.md and accuracy_matrix.png (and format_matrix.png when ``extra`` holds
    ``format_errors``) into ``out_dir``; return the JSON dict.

    ``matrix_rows`` are the rows completed so far (``k <= T``), each with one score per task in
    ``task_names`` (upper triangle included; ``None`` where not evaluated). ``initial`` is the row
    before any training, or ``None``. ``extra`` entries (routing accuracy, timings ...) are added at
    the top level of metrics.json; a key that clashes with a built-in one raises ``ValueError``.

    metrics.json: ``tasks``, ``initial``, ``matrix``, ``num_completed``, ``metrics`` (see
    :func:`cl_metrics_partial`), ``per_task`` (``{task: {final, just_trained, forgetting}}`` for each
    task trained so far; ``final`` is the score in the latest row), then ``extra``.
    """
    extra = dict(extra or {})
    _validate(task_names, matrix_rows, initial)
    rows = [list(row) for row in matrix_rows]
    metrics = cl_metrics_partial(rows, initial, len(task_names))
    record: dict[str, Any] = {
        "tasks": list(task_names),
        "initial": None if initial is None else [_json_number(v) for v in initial],
        "matrix": [[_json_number(v) for v in row] for row in rows],
        "num_completed": len(rows),
        "metrics": metrics,
        "per_task": _per_task(task_names, rows),
    }
    clashes = sorted(set(extra) & set(record))
    if clashes:
        raise ValueError(f"extra keys {clashes} clash with built-in metrics.json keys; rename them")
    record.update(extra)

    out_dir = Path(out_dir)
    markdown = _render_markdown(record, extra)
    atomic_write_json(out_dir / METRICS_FILE, record)
    atomic_write_text(out_dir / REPORT_FILE, markdown)
    _save_heatmap(out_dir / MATRIX_PLOT_FILE, task_names, initial, rows)
    formats = extra.get("format_errors")
    if isinstance(formats, Mapping) and formats:
        _save_heatmap(out_dir / FORMAT_PLOT_FILE, task_names, None,
                      [[per_task.get(name) for name in task_names] for per_task in formats.values()],
                      title="Format errors", label="predictions with a wrong format (%)",
                      stages=[s if s == "before training" else f"after {s}" for s in formats], colormap="magma")
    return record


def write_predictions(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write one JSON object per line: ``id, prompt, prediction, answer, correct`` first, then any
    other keys of the row. Rows are written as they come (a generator is not held in memory). A row missing
    a required field raises ``ValueError`` naming it (and nothing is written)."""
    def lines():
        for index, row in enumerate(rows):
            missing = [name for name in PREDICTION_FIELDS if name not in row]
            if missing:
                raise ValueError(f"prediction row {index} (id {row.get('id')!r}) lacks {missing}; "
                                 f"every row needs {list(PREDICTION_FIELDS)}")
            ordered = {name: row[name] for name in PREDICTION_FIELDS}
            ordered.update((key, value) for key, value in row.items() if key not in ordered)
            yield json.dumps(ordered, ensure_ascii=False)
    return atomic_write_lines(path, lines())
