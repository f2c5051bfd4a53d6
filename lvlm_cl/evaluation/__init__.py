"""Evaluation: per-sample scorers, continual-learning metrics, and the report files of a run."""

from lvlm_cl.evaluation.metrics import METRIC_KEYS, cl_metrics, cl_metrics_partial, per_task_forgetting
from lvlm_cl.evaluation.report import write_predictions, write_report
from lvlm_cl.evaluation.scorers import (
    SCORERS,
    box_iou,
    check_metric,
    get_scorer,
    parse_box,
    parse_option_letter,
    score,
    score_many,
    vqa_normalize,
)

__all__ = [
    "METRIC_KEYS", "SCORERS", "box_iou", "check_metric", "cl_metrics", "cl_metrics_partial",
    "get_scorer", "parse_box", "parse_option_letter", "per_task_forgetting", "score", "score_many",
    "vqa_normalize", "write_predictions", "write_report",
]
