"""The one evaluation pipeline: generate answers to a task's prompts, gather them, score them, and the rows of
the predictions file. The training loop (every task after every stage), ``scripts/evaluate.py`` and the tests
all score through ``score_records``, so a number means the same wherever it was computed.

With an ``accelerator`` of several processes each process generates every n-th record and the predictions are
gathered on every process (``distributed.shard``/``unshard``); under DeepSpeed ZeRO-3 every process keeps
stepping until all are done (``synced_gpus``). Without one (``None``) it runs in this process alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from lvlm_cl.data.records import final_answer, user_text
from lvlm_cl.distributed import from_main, shard, unshard, zero_stage
from lvlm_cl.evaluation.formats import BINARY_METRICS, format_flags
from lvlm_cl.evaluation.generate import generate_answers
from lvlm_cl.evaluation.scorers import corpus_score, is_corpus_metric, is_judge_metric, score_many


@dataclass
class Scored:
    """A task's records scored: the model's predictions, the references, each sample's score (None where the
    metric has no per-sample value: ``cider``), the task's value in percent (CIDEr: its own scale x 100), and
    whether each prediction's format is right (``evaluation.formats``: the task's answer ``kind``)."""

    predictions: list[str]
    answers: list[str]
    scores: list[float | None]
    percent: float
    kind: str
    formats: list[bool]
    binary: bool                  # per-sample scores are right (1) or wrong (0)

    @property
    def format_errors(self) -> float:
        """Percent of the predictions whose format is wrong."""
        return 100.0 * self.formats.count(False) / len(self.formats) if self.formats else 0.0

    @property
    def wrong_format_share(self) -> float | None:
        """Of the wrong predictions, the percent whose format is wrong (the rest have the right format and the
        wrong content); None for a graded metric or when nothing is wrong."""
        if not self.binary:
            return None
        wrong = [ok for ok, s in zip(self.formats, self.scores) if s is not None and s < 1.0]
        return 100.0 * wrong.count(False) / len(wrong) if wrong else None

    def format_figures(self) -> dict[str, float | None]:
        """What ``metrics.json`` keeps of the formats for one task and stage, rounded to 0.01:
        ``format_errors`` and ``wrong_format_share``."""
        share = self.wrong_format_share
        return {"format_errors": round(self.format_errors, 2),
                "wrong_format_share": None if share is None else round(share, 2)}

    def rows(self, records: Sequence[dict]) -> Iterator[dict]:
        """The predictions file's rows (``write_predictions``): ``id, prompt, prediction, answer, correct``,
        then ``format_ok``."""
        for r, p, a, s, ok in zip(records, self.predictions, self.answers, self.scores, self.formats):
            yield {"id": r["id"], "prompt": user_text(r), "prediction": p, "answer": a, "correct": s, "format_ok": ok}


def score_records(model, processor, records: Sequence[dict], metric: str, *, max_length: int, batch_size: int,
                  max_new_tokens: int, accelerator=None, desc: str = "evaluate", progress: bool = True,
                  num_workers: int = 0, device: torch.device | str | None = None,
                  observe: Callable[[dict, list[int]], None] | None = None, keep: dict | None = None,
                  judge=None) -> Scored:
    """Generate the model's answer to every record's prompt (greedy, batched: ``generate_answers``) and score
    it with ``metric`` against the record's final answer. The caller sets the precision (autocast) and the
    model's state; ``observe`` and ``keep`` are ``generate_answers``'. ``judge``: the ``JudgeSettings`` of a
    task scored with ``metric: judge`` (asked by the main process only). Every process gets the whole result."""
    several = accelerator is not None and accelerator.num_processes > 1
    mine = shard(records, accelerator) if several else records
    local = generate_answers(model, processor, mine, max_length=max_length, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, desc=desc, progress=progress,
                             synced_gpus=several and zero_stage(accelerator) == 3,
                             device=device if device is not None or accelerator is None else accelerator.device,
                             num_workers=num_workers, observe=observe, keep=keep)
    predictions = unshard(local, len(records), accelerator) if several else local
    answers = [final_answer(r) for r in records]
    if is_judge_metric(metric):
        questions = [user_text(r) for r in records]
        return from_main(lambda: score_predictions(metric, predictions, answers, questions=questions, judge=judge),
                         accelerator)
    return score_predictions(metric, predictions, answers)


def score_predictions(metric: str, predictions: list[str], answers: list[str], *,
                      questions: Sequence[str] | None = None, judge=None) -> Scored:
    """Each sample's score and the task's value: the mean of the samples' scores, or, for a corpus metric
    (``bleu``, ``cider``: statistics pooled over the test set), ``scorers.corpus_score``, a sample's
    references being its answer's ``|``-separated alternatives (a test file's several reference captions).
    ``judge`` (``metric: judge``): the ``JudgeSettings`` that give each sample's verdict, from its question."""
    kind, formats = format_flags(metric, predictions, answers)
    if is_judge_metric(metric):
        if judge is None or questions is None:
            raise ValueError("metric 'judge' needs the judge's settings and each sample's question")
        from lvlm_cl.evaluation.judge import judge_many

        verdicts = judge_many(judge, questions, predictions, answers)
        return Scored(predictions, answers, verdicts, 100.0 * sum(verdicts) / len(verdicts) if verdicts else 0.0,
                      kind, formats, True)
    binary = metric in BINARY_METRICS
    if not is_corpus_metric(metric):
        scores = score_many(metric, predictions, answers)
        return Scored(predictions, answers, scores, 100.0 * sum(scores) / len(scores) if scores else 0.0,
                      kind, formats, binary)
    per_sample = metric != "cider"          # CIDEr's document frequencies are the test set's: no value alone
    scores = score_many(metric, predictions, answers) if per_sample else [None] * len(predictions)
    references = [[alt.strip() for alt in a.split("|")] for a in answers]
    return Scored(predictions, answers, scores, corpus_score(metric, predictions, references), kind, formats, binary)


__all__ = ["Scored", "score_predictions", "score_records"]
