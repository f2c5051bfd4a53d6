"""Continual-learning metrics against matrices worked out by hand."""

from __future__ import annotations

import math

import pytest

from lvlm_cl.evaluation.metrics import METRIC_KEYS, cl_metrics, cl_metrics_partial, per_task_forgetting

# A[t][i]: score on task i after training through task t. A[0][1] = 99 sits in the upper triangle
# (task 1 not trained yet): it must feed FWT and never forgetting.
MATRIX_3 = [
    [80.0, 99.0, 30.0],
    [85.0, 70.0, 20.0],
    [50.0, 65.0, 90.0],
]
INITIAL_3 = [5.0, 8.0, 12.0]


def test_three_tasks_by_hand():
    metrics = cl_metrics(MATRIX_3, INITIAL_3)
    assert set(metrics) == set(METRIC_KEYS)
    # MFT = (80 + 70 + 90) / 3 = 240 / 3 = 80
    assert metrics["MFT"] == pytest.approx(80.0)
    # MFN = (50 + 65 + 90) / 3 = 205 / 3 = 68.333...
    assert metrics["MFN"] == pytest.approx(205 / 3)
    # MAA = (80/1 + (85 + 70)/2 + (50 + 65 + 90)/3) / 3 = (80 + 77.5 + 68.333...) / 3 = 75.2777...
    assert metrics["MAA"] == pytest.approx((80 + 77.5 + 205 / 3) / 3)
    assert metrics["MAA"] == pytest.approx(75.27777, abs=1e-4)
    # BWT = 1/(3-1) * ((50 - 80) + (65 - 70)) = (-30 - 5) / 2 = -17.5
    assert metrics["BWT"] == pytest.approx(-17.5)
    # forgetting: task 0: max(A[0][0], A[1][0]) - A[2][0] = max(80, 85) - 50 = 35
    #             task 1: max(A[1][1]) - A[2][1] = 70 - 65 = 5   (A[0][1] = 99 is before training)
    #             mean over T-1 = 2 tasks: (35 + 5) / 2 = 20
    assert metrics["forgetting"] == pytest.approx(20.0)
    # FWT = ((A[0][1] - init[1]) + (A[1][2] - init[2])) / 2 = ((99 - 8) + (20 - 12)) / 2 = 99 / 2
    assert metrics["FWT"] == pytest.approx(49.5)


def test_three_tasks_per_task_forgetting():
    # see test_three_tasks_by_hand: 35 for task 0, 5 for task 1, the last task has none
    assert per_task_forgetting(MATRIX_3) == pytest.approx([35.0, 5.0, None])


def test_two_tasks_by_hand():
    matrix = [[60.0, 40.0],
              [30.0, 75.0]]
    metrics = cl_metrics(matrix, [10.0, 25.0])
    # MFT = (60 + 75) / 2 = 67.5
    assert metrics["MFT"] == pytest.approx(67.5)
    # MFN = (30 + 75) / 2 = 52.5
    assert metrics["MFN"] == pytest.approx(52.5)
    # MAA = (60 + (30 + 75) / 2) / 2 = (60 + 52.5) / 2 = 56.25
    assert metrics["MAA"] == pytest.approx(56.25)
    # BWT = 1/(2-1) * (30 - 60) = -30
    assert metrics["BWT"] == pytest.approx(-30.0)
    # forgetting = max(A[0][0]) - A[1][0] = 60 - 30 = 30
    assert metrics["forgetting"] == pytest.approx(30.0)
    # FWT = A[0][1] - init[1] = 40 - 25 = 15
    assert metrics["FWT"] == pytest.approx(15.0)


def test_forgetting_can_be_negative_when_the_last_task_helps():
    # BWT = (70 - 50) / 1 = 20; forgetting = 50 - 70 = -20
    metrics = cl_metrics([[50.0, 0.0], [70.0, 80.0]])
    assert metrics["BWT"] == pytest.approx(20.0)
    assert metrics["forgetting"] == pytest.approx(-20.0)


def test_single_task():
    metrics = cl_metrics([[42.0]], [7.0])
    assert metrics == {"MFT": 42.0, "MFN": 42.0, "MAA": 42.0, "BWT": None, "forgetting": None,
                       "FWT": None}
    assert per_task_forgetting([[42.0]]) == [None]


def test_fwt_is_none_without_initial_row_or_upper_triangle():
    assert cl_metrics(MATRIX_3)["FWT"] is None
    unevaluated = [[80.0, None, None],
                   [85.0, 70.0, float("nan")],
                   [50.0, 65.0, 90.0]]
    metrics = cl_metrics(unevaluated, INITIAL_3)
    assert metrics["FWT"] is None
    # the rest does not look above the diagonal: same as the full matrix
    assert metrics["MAA"] == pytest.approx(cl_metrics(MATRIX_3)["MAA"])
    assert metrics["forgetting"] == pytest.approx(20.0)


def test_all_values_are_plain_floats():
    for value in cl_metrics(MATRIX_3, INITIAL_3).values():
        assert type(value) is float


def test_partial_rows_are_the_top_left_block():
    rows = MATRIX_3[:2]
    metrics = cl_metrics_partial(rows, INITIAL_3, num_tasks=3)
    # as a 2-task stream [[80, 99], [85, 70]] with init [5, 8]:
    # MFT = (80 + 70)/2 = 75; MFN = (85 + 70)/2 = 77.5; MAA = (80 + 77.5)/2 = 78.75
    # BWT = 85 - 80 = 5; forgetting = 80 - 85 = -5; FWT = 99 - 8 = 91
    assert metrics == pytest.approx({"MFT": 75.0, "MFN": 77.5, "MAA": 78.75, "BWT": 5.0,
                                     "forgetting": -5.0, "FWT": 91.0})
    assert cl_metrics_partial(rows, INITIAL_3, 3) == cl_metrics([r[:2] for r in rows], INITIAL_3[:2])


def test_partial_with_all_rows_equals_full_and_with_none_is_empty():
    assert cl_metrics_partial(MATRIX_3, INITIAL_3, 3) == cl_metrics(MATRIX_3, INITIAL_3)
    assert cl_metrics_partial(MATRIX_3[:1], None, 3) == cl_metrics([[80.0]])
    assert cl_metrics_partial([], INITIAL_3, 3) == dict.fromkeys(METRIC_KEYS)


@pytest.mark.parametrize("matrix, message", [
    ([], "empty"),
    ([[1.0, 2.0], [3.0]], "square"),
    ([[1.0, 2.0]], "square"),
    ([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], "square"),
    ([[float("nan"), 2.0], [3.0, 4.0]], r"\[0\]\[0\]"),
    ([[1.0, 2.0], [None, 4.0]], r"\[1\]\[0\]"),
    ([[1.0, 2.0], [3.0, float("nan")]], r"\[1\]\[1\]"),
])
def test_bad_matrix_raises(matrix, message):
    with pytest.raises(ValueError, match=message):
        cl_metrics(matrix)


def test_bad_initial_raises():
    with pytest.raises(ValueError, match="initial row has 2 entries"):
        cl_metrics(MATRIX_3, [1.0, 2.0])
    with pytest.raises(ValueError, match="initial row has 2 entries"):
        cl_metrics_partial(MATRIX_3[:1], [1.0, 2.0], 3)


def test_bad_partial_rows_raise():
    with pytest.raises(ValueError, match="4 matrix rows for a stream of 3"):
        cl_metrics_partial(MATRIX_3 + [MATRIX_3[0]], None, 3)
    with pytest.raises(ValueError, match="row 1 has 2 entries"):
        cl_metrics_partial([[1.0, 2.0, 3.0], [1.0, 2.0]], None, 3)
    with pytest.raises(ValueError, match=r"\[1\]\[1\]"):
        cl_metrics_partial([[1.0, 2.0, 3.0], [1.0, math.nan, 3.0]], None, 3)
