"""Continual-learning metrics from an accuracy matrix (REFERENCE §2; docs/metrics.md).

``A[t][i]`` is the score (a percentage, 0-100) on task ``i`` after training through task ``t``,
0-based, ``T`` tasks. The upper triangle (``i > t``: tasks not trained yet) may be missing (``None``
or NaN); the lower triangle and the diagonal may not. ``A_init[i]`` is the score on task ``i``
before any training.

======================  ===============================================================  ==========
key                     formula                                                          terms
======================  ===============================================================  ==========
``MFT``                 mean_i A[i][i]                                                   T
``MFN``                 mean_i A[T-1][i]                                                 T
``MAA``                 mean_t ( mean_{i<=t} A[t][i] )                                   T, t+1
``BWT``                 1/(T-1) * sum_{i<T-1} ( A[T-1][i] - A[i][i] )                    T-1
``forgetting``          mean_{i<T-1} ( max_{i<=t<T-1} A[t][i] - A[T-1][i] )              T-1
``FWT``                 mean_{i>=1} ( A[i-1][i] - A_init[i] )                            T-1
======================  ===============================================================  ==========

``BWT`` and ``forgetting`` are ``None`` when ``T == 1``; ``FWT`` is ``None`` when ``T == 1``, when
no ``A_init`` is given, or when a cell it needs was not evaluated.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

METRIC_KEYS = ("MFT", "MFN", "MAA", "BWT", "forgetting", "FWT")


def _as_matrix(matrix: Sequence[Sequence[float | None]]) -> np.ndarray:
    """A validated float array: square, with every cell on or below the diagonal a finite number."""
    rows = [list(row) for row in matrix]
    size = len(rows)
    if size == 0:
        raise ValueError("the accuracy matrix is empty; it needs one row per trained task")
    for t, row in enumerate(rows):
        if len(row) != size:
            raise ValueError(
                f"the accuracy matrix must be square (T x T); row {t} has {len(row)} entries, "
                f"expected {size}")
    array = np.array([[np.nan if value is None else value for value in row] for row in rows],
                     dtype=float)
    for t in range(size):
        for i in range(t + 1):
            if not np.isfinite(array[t, i]):
                raise ValueError(
                    f"accuracy matrix cell [{t}][{i}] (task {i} after training through task {t}) is "
                    f"{array[t, i]}; every cell on or below the diagonal must be a number")
    return array


def _as_initial(initial: Sequence[float | None] | None, size: int) -> np.ndarray | None:
    if initial is None:
        return None
    if len(initial) != size:
        raise ValueError(f"the initial row has {len(initial)} entries; expected one per task ({size})")
    return np.array([np.nan if value is None else value for value in initial], dtype=float)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def _forgetting_per_task(a: np.ndarray) -> list[float | None]:
    last = a.shape[0] - 1
    # Rows before task i was trained are not knowledge that could be forgotten, so t starts at i.
    return [float(a[i:last, i].max() - a[last, i]) for i in range(last)] + [None]


def per_task_forgetting(matrix: Sequence[Sequence[float | None]]) -> list[float | None]:
    """Forgetting of each task: ``max_{i<=t<T-1} A[t][i] - A[T-1][i]``; ``None`` for the last task.

    Positive means the task's score dropped from its best before the last task to the end.
    """
    return _forgetting_per_task(_as_matrix(matrix))


def cl_metrics(matrix: Sequence[Sequence[float | None]],
               initial: Sequence[float | None] | None = None) -> dict[str, float | None]:
    """The six continual-learning metrics of a full ``T x T`` matrix.

    With ``A = matrix``, ``A_init = initial`` and T tasks (denominators in brackets):

    - ``MFT`` = mean_i A[i][i]                                             [T]
    - ``MFN`` = mean_i A[T-1][i]                                           [T]
    - ``MAA`` = mean_t ( mean_{i<=t} A[t][i] )                             [T outer, t+1 inner]
    - ``BWT`` = 1/(T-1) * sum_{i<T-1} ( A[T-1][i] - A[i][i] )              [T-1]
    - ``forgetting`` = mean_{i<T-1} ( max_{i<=t<T-1} A[t][i] - A[T-1][i] ) [T-1]
    - ``FWT`` = mean_{i>=1} ( A[i-1][i] - A_init[i] )                      [T-1]

    Returns a dict with exactly those keys; values are floats, or ``None`` where undefined
    (``BWT``, ``forgetting`` and ``FWT`` for ``T == 1``; ``FWT`` without ``initial`` or with an
    unevaluated ``A[i-1][i]`` / ``A_init[i]``). Raises ``ValueError`` for a non-square matrix, a
    missing or NaN cell on or below the diagonal, or an ``initial`` of the wrong length.
    """
    a = _as_matrix(matrix)
    a_init = _as_initial(initial, a.shape[0])
    size = a.shape[0]
    last = size - 1
    metrics: dict[str, float | None] = {
        "MFT": _mean([a[i, i] for i in range(size)]),
        "MFN": _mean([a[last, i] for i in range(size)]),
        "MAA": _mean([_mean([a[t, i] for i in range(t + 1)]) for t in range(size)]),
        "BWT": None,
        "forgetting": None,
        "FWT": None,
    }
    if size == 1:
        return metrics
    metrics["BWT"] = _mean([a[last, i] - a[i, i] for i in range(last)])
    metrics["forgetting"] = _mean(_forgetting_per_task(a)[:last])
    if a_init is not None:
        transfers = [a[i - 1, i] - a_init[i] for i in range(1, size)]
        if all(math.isfinite(value) for value in transfers):
            metrics["FWT"] = _mean(transfers)
    return metrics


def _as_rows(matrix_rows: Sequence[Sequence[float | None]], num_tasks: int) -> list[list[float | None]]:
    rows = [list(row) for row in matrix_rows]
    if len(rows) > num_tasks:
        raise ValueError(f"{len(rows)} matrix rows for a stream of {num_tasks} tasks")
    for t, row in enumerate(rows):
        if len(row) != num_tasks:
            raise ValueError(
                f"matrix row {t} has {len(row)} entries; every row scores all {num_tasks} tasks")
    return rows


def cl_metrics_partial(matrix_rows: Sequence[Sequence[float | None]],
                       initial: Sequence[float | None] | None,
                       num_tasks: int) -> dict[str, float | None]:
    """The metrics of a run that has trained ``k = len(matrix_rows)`` of ``num_tasks`` tasks.

    Each row has ``num_tasks`` entries (the upper triangle included). The metrics are those of the
    ``k x k`` top-left block, as if the stream had ``k`` tasks; ``initial`` (length ``num_tasks``)
    is cut to its first ``k`` entries. ``k == 0`` gives every metric ``None``.
    """
    rows = _as_rows(matrix_rows, num_tasks)
    if initial is not None and len(initial) != num_tasks:
        raise ValueError(f"the initial row has {len(initial)} entries; expected one per task ({num_tasks})")
    k = len(rows)
    if k == 0:
        return dict.fromkeys(METRIC_KEYS)
    block = [row[:k] for row in rows]
    return cl_metrics(block, None if initial is None else list(initial)[:k])
