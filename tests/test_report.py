"""The files written after each task: metrics.json, report.md, accuracy_matrix.png, predictions."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from lvlm_cl.evaluation.metrics import cl_metrics
from lvlm_cl.evaluation.report import write_predictions, write_report

TASKS = ["sqa", "textvqa", "digits"]
ROWS = [
    [80.0, 12.5, 30.0],
    [85.0, 70.0, 20.0],
    [50.0, 65.0, 90.0],
]
INITIAL = [5.0, 8.0, 12.0]


def _read(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_metrics_json_matches_the_matrix(tmp_path):
    returned = write_report(tmp_path, TASKS, ROWS, INITIAL, extra={"routing_accuracy": 0.875})
    written = _read(tmp_path / "metrics.json")
    assert written == returned
    assert written["tasks"] == TASKS
    assert written["initial"] == INITIAL
    assert written["matrix"] == ROWS
    assert written["num_completed"] == 3
    assert written["metrics"] == pytest.approx(cl_metrics(ROWS, INITIAL))
    # BWT = ((50 - 80) + (65 - 70)) / 2 = -17.5
    assert written["metrics"]["BWT"] == pytest.approx(-17.5)
    assert written["per_task"]["sqa"] == {"final": 50.0, "just_trained": 80.0, "forgetting": 35.0}
    assert written["per_task"]["textvqa"] == {"final": 65.0, "just_trained": 70.0, "forgetting": 5.0}
    assert written["per_task"]["digits"] == {"final": 90.0, "just_trained": 90.0, "forgetting": None}
    assert written["routing_accuracy"] == 0.875


def test_partial_run_reports_only_trained_tasks(tmp_path):
    written = write_report(tmp_path, TASKS, ROWS[:2], INITIAL)
    assert written["num_completed"] == 2
    assert written["matrix"] == ROWS[:2]  # full-length rows, upper triangle kept
    assert list(written["per_task"]) == ["sqa", "textvqa"]
    # as a 2-task stream: final of sqa = A[1][0] = 85, forgetting = 80 - 85 = -5
    assert written["per_task"]["sqa"] == {"final": 85.0, "just_trained": 80.0, "forgetting": -5.0}
    # FWT = A[0][1] - init[1] = 12.5 - 8 = 4.5
    assert written["metrics"]["FWT"] == pytest.approx(4.5)
    assert _read(tmp_path / "metrics.json")["num_completed"] == 2


def test_unevaluated_cells_become_null(tmp_path):
    rows = [[80.0, None, float("nan")]]
    written = write_report(tmp_path, TASKS, rows, None)
    assert _read(tmp_path / "metrics.json")["matrix"] == [[80.0, None, None]]
    assert written["initial"] is None
    assert written["metrics"]["MFT"] == 80.0 and written["metrics"]["FWT"] is None
    assert "| after sqa | **80.0** | — | — |" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_report_md_holds_the_table_and_metrics(tmp_path):
    write_report(tmp_path, TASKS, ROWS[:2], INITIAL, extra={"routing_accuracy": 0.875,
                                                            "train_seconds": 12,
                                                            "timings": {"sqa": 3.0}})
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert text.startswith("# ")
    assert "|  | sqa | textvqa | digits |" in text
    assert "| before training | 5.0 | 8.0 | 12.0 |" in text
    assert "| after sqa | **80.0** | 12.5 | 30.0 |" in text
    assert "| after textvqa | 85.0 | **70.0** | 20.0 |" in text
    assert "after digits" not in text
    # MAA over 2 tasks = (80 + (85 + 70) / 2) / 2 = 78.75; BWT = 85 - 80 = 5
    assert "| MAA | 78.75 |" in text
    assert "| BWT | 5.00 |" in text
    for name in ("MFT", "MFN", "forgetting", "FWT"):
        assert f"| {name} |" in text
    assert "| routing_accuracy | 0.88 |" in text
    assert "| train_seconds | 12 |" in text
    assert "timings" not in text  # nested values live in metrics.json only


def test_png_is_a_real_image(tmp_path):
    write_report(tmp_path, TASKS, ROWS[:1], INITIAL)
    path = tmp_path / "accuracy_matrix.png"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width > 100 and height > 100


def test_before_training_only(tmp_path):
    written = write_report(tmp_path, TASKS, [], INITIAL)
    assert written["num_completed"] == 0
    assert written["per_task"] == {}
    assert all(value is None for value in written["metrics"].values())
    assert (tmp_path / "accuracy_matrix.png").stat().st_size > 0


def test_rewrite_replaces_files_and_leaves_no_temporaries(tmp_path):
    write_report(tmp_path, TASKS, ROWS[:1], INITIAL)
    write_report(tmp_path, TASKS, ROWS[:2], INITIAL)
    assert _read(tmp_path / "metrics.json")["num_completed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy_matrix.png", "metrics.json",
                                                          "report.md"]


@pytest.mark.parametrize("key", ["metrics", "matrix", "per_task", "tasks"])
def test_extra_key_clash_raises_and_writes_nothing(tmp_path, key):
    with pytest.raises(ValueError, match=key):
        write_report(tmp_path, TASKS, ROWS, INITIAL, extra={key: 1})
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("tasks, rows, initial, message", [
    (["a", "a", "b"], ROWS, INITIAL, "unique"),
    (TASKS, [], None, "nothing to report"),
    (TASKS[:2], ROWS, INITIAL, "3 matrix rows for a stream of 2"),
    (TASKS, ROWS, INITIAL[:2], "initial row"),
    (TASKS, [[None, 1.0, 2.0]], None, r"\[0\]\[0\]"),
])
def test_bad_inputs_raise(tmp_path, tasks, rows, initial, message):
    with pytest.raises(ValueError, match=message):
        write_report(tmp_path, tasks, rows, initial)


def test_write_predictions_jsonl(tmp_path):
    path = tmp_path / "preds" / "sqa.jsonl"
    rows = [
        {"answer": "A", "id": "q1", "prompt": "Which?", "prediction": "A.", "correct": 1.0,
         "task": "sqa"},
        {"id": "q2", "prompt": "Was ist das?", "prediction": "Käse", "answer": "B", "correct": 0.0},
    ]
    write_predictions(path, rows)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert list(json.loads(lines[0])) == ["id", "prompt", "prediction", "answer", "correct", "task"]
    assert "Käse" in lines[1]


def test_write_predictions_missing_field_raises(tmp_path):
    with pytest.raises(ValueError, match=r"row 0 .*'correct'"):
        write_predictions(tmp_path / "p.jsonl", [{"id": "q1", "prompt": "", "prediction": "",
                                                  "answer": ""}])
    assert not (tmp_path / "p.jsonl").exists()
