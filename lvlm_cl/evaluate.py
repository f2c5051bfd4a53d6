"""Score a trained run's stage (or every stage) on any canonical data file.

    python scripts/evaluate.py --run runs/seq5 --data test.jsonl --metric vqa                 # last stage
    python scripts/evaluate.py --run runs/seq5 --stage 1 --data test.jsonl --metric vqa --output out/
    python scripts/evaluate.py --run runs/seq5 --all-stages --data test.jsonl --metric vqa --export coin
    python scripts/evaluate.py --run runs/seq5 --rescore --metric token_f1        # no generation
    accelerate launch scripts/evaluate.py --run runs/seq5 --data test.jsonl --metric vqa   # sharded

Writes, in ``--output`` (default ``<run>/evaluations/<data file stem>``):
- ``predictions-stage-<k>-<task>.jsonl``: ``id, prompt, prediction, answer, correct`` per record;
- ``coin-answers-stage-<k>-<task>.jsonl`` with ``--export coin``: CoIN's answer format
  (``question_id, prompt, text, answer_id, model_id``), for CoIN's own scorers;
- ``scores.json``: the score (percent) per stage evaluated; ``scores.md`` the same as a table.

``--rescore --metric M`` scores the run's own predictions (written after every stage) again with another
metric, without generating: ``<run>/evaluations/rescore-<M>/`` holds the matrix, the CL metrics and the
format errors under that metric.

Generation is the training run's: batched greedy decoding with the run's ``max_new_tokens`` (overridable),
so on a run's own test split the score equals the number the run wrote in ``metrics.json``. Under
``accelerate launch`` with several processes every process takes every n-th record, and the predictions
are gathered (``lvlm_cl.distributed``), and the main process writes the files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from lvlm_cl.data.records import user_text
from lvlm_cl.evaluation import SCORERS, write_predictions
from lvlm_cl.io import atomic_write_json, atomic_write_text, under


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a training run folder")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--stage", type=int, default=None, help="0-based task after which the stage was saved")
    which.add_argument("--all-stages", action="store_true", help="every trained stage (a row per stage)")
    p.add_argument("--data", type=Path, default=None, help="canonical JSONL file to score on")
    p.add_argument("--rescore", action="store_true",
                   help="score the run's own predictions (every stage, every task) again with --metric, without "
                        "generating: writes <run>/evaluations/rescore-<metric>/ (or --output)")
    p.add_argument("--image-root", type=Path, default=None, help="folder image paths are relative to")
    p.add_argument("--metric", required=True, help=f"one of {sorted(SCORERS)}")
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--export", choices=["coin"], default=None, help="also write answers in CoIN's format")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's trainer.eval_batch_size")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's trainer.max_new_tokens")
    p.add_argument("--max-samples", type=int, default=None, help="score only the first N records")
    judge = p.add_argument_group("--metric judge (default: the run's recipe's judge section)")
    judge.add_argument("--judge-model", default=None, help="the judge model's name")
    judge.add_argument("--judge-endpoint", default=None, help="an OpenAI-compatible base URL (vllm serve ...)")
    judge.add_argument("--judge-local-model-dir", default=None, help="or a local Hugging Face model directory")
    judge.add_argument("--judge-api-key-env", default=None, help="the environment variable holding the API key")
    judge.add_argument("--judge-cache", type=Path, default=None, help="default: <run>/judge_cache.jsonl")
    args = p.parse_args(argv)
    if (args.data is None) != args.rescore:
        p.error("give --data (generate and score) or --rescore (score the run's predictions again), one of them")
    if args.metric not in SCORERS:
        p.error(f"--metric {args.metric!r} does not exist; choose one of {sorted(SCORERS)}")
    if args.metric != "judge" and any(v is not None for k, v in vars(args).items() if k.startswith("judge_")):
        p.error("the --judge-* options go with --metric judge")
    return args


def stages_of(run: Path, stage: int | None, all_stages: bool) -> list[int]:
    from lvlm_cl.stage import read_run, stage_index

    _, state = read_run(run)
    return list(range(state.trained)) if all_stages else [stage_index(run, state, stage)]


def coin_rows(records: list[dict], predictions: list[str], model_id: str) -> list[dict]:
    """CoIN / LLaVA answer files: ``question_id, prompt, text, answer_id, model_id`` (answer_id is a stable
    hash here, where LLaVA draws a random shortuuid)."""
    rows = []
    for r, p in zip(records, predictions):
        answer_id = hashlib.sha1(f"{model_id}/{r['id']}/{p}".encode()).hexdigest()[:22]
        rows.append({"question_id": r["id"], "prompt": user_text(r), "text": p, "answer_id": answer_id,
                     "model_id": model_id})
    return rows


def judge_settings(args, run: Path, section):
    """The judge of ``--metric judge``: the --judge-* options, else the run's recipe's ``judge`` section."""
    from lvlm_cl.checkpoint import JUDGE_CACHE
    from lvlm_cl.config import ConfigError, JudgeConfig
    from lvlm_cl.evaluation.judge import settings_from

    given = {k[len("judge_"):]: v for k, v in vars(args).items() if k.startswith("judge_") and v is not None}
    if given:
        section = JudgeConfig(**{k: str(v) for k, v in given.items()})
    if section is None:
        raise ConfigError("--metric judge: give --judge-model and --judge-endpoint (or --judge-local-model-dir), or "
                          "a run whose recipe has a judge section")
    return settings_from(section, run / JUDGE_CACHE)      # JudgeSettings checks the model and the one backend


def evaluate(args) -> dict:
    from accelerate import Accelerator

    from lvlm_cl.data.lengths import TokenCounter
    from lvlm_cl.data.records import load_table
    from lvlm_cl.evaluation.pipeline import score_records
    from lvlm_cl.models import autocast_for
    from lvlm_cl.stage import load_stage

    accelerator = Accelerator()
    stages = stages_of(args.run, args.stage, args.all_stages)
    records = load_table(args.data, image_root=args.image_root)
    if args.max_samples:
        records = records[:args.max_samples]
    out = args.output or args.run / "evaluations" / args.data.stem
    scores: dict[str, float] = {}
    stage = load_stage(args.run, stages[0], device=accelerator.device)   # built once; later stages are restored into it
    model = stage.model
    tr = stage.cfg.trainer
    judge = judge_settings(args, args.run, stage.cfg.judge) if args.metric == "judge" else None
    # Every prompt counted (image headers read, nothing decoded) before any generation: a bad record stops
    # here, named; the counts order the batches.
    records.lengths = TokenCounter(stage.processor, stage.cfg.model.max_length).count(records, prompt=True,
                                                                                     path=str(args.data))
    for k in stages:
        if k != stage.index:
            stage.restore(k)
        with autocast_for(model):
            scored = score_records(model, stage.processor, records, args.metric, accelerator=accelerator,
                                   max_length=stage.cfg.model.max_length, num_workers=tr.num_workers,
                                   batch_size=args.batch_size or tr.eval_batch_size,
                                   max_new_tokens=args.max_new_tokens or tr.max_new_tokens,
                                   desc=f"stage {k} ({stage.task.name})", progress=accelerator.is_main_process,
                                   judge=judge)
        if accelerator.is_main_process:
            label = f"stage-{k}-{stage.task.name}"
            scores[label] = scored.percent
            write_predictions(under(out, f"predictions-{label}.jsonl"), scored.rows(records))
            if args.export == "coin":
                rows = coin_rows(records, scored.predictions, f"{args.run.name}/{label}")
                atomic_write_text(under(out, f"coin-answers-{label}.jsonl"), "".join(json.dumps(x) + "\n" for x in rows))
            print(f"[evaluate] {args.data.name} after {label}: {args.metric} = {scores[label]:.2f}", flush=True)
    if accelerator.is_main_process:
        result = {"run": str(args.run), "data": str(args.data), "metric": args.metric, "records": len(records),
                  "scores": scores}
        atomic_write_json(out / "scores.json", result)
        atomic_write_text(out / "scores.md", "\n".join(
            [f"# {args.data.name} ({len(records)} records, {args.metric})", "", "| stage | score |", "|---|---|"]
            + [f"| {label} | {s:.2f} |" for label, s in scores.items()]) + "\n")
        print(f"[evaluate] wrote {out}", flush=True)
        return result
    return {}


def rescore(run: Path, metric: str, output: Path | None = None, judge=None) -> dict:
    """The run's accuracy matrix again, from the predictions it wrote after every stage (``predictions/``),
    scored with ``metric`` through the evaluation pipeline's scoring: ``metrics.json``, ``report.md`` and
    the heatmaps in ``output`` (default ``<run>/evaluations/rescore-<metric>``). Nothing is generated."""
    from lvlm_cl.checkpoint import CheckpointError, prediction_stage
    from lvlm_cl.evaluation import write_report
    from lvlm_cl.evaluation.pipeline import score_predictions
    from lvlm_cl.stage import read_run

    _, state = read_run(run)
    tasks = state.tasks
    formats: dict[str, dict] = {"format_errors": {}, "wrong_format_share": {}}

    def row(stage: str, label: str) -> list[float]:
        """The stage's scores, one per task; its format figures into ``formats`` under ``label``."""
        scores = []
        for task in tasks:
            path = under(run, "predictions", stage, f"{task}.jsonl")
            if not path.is_file():
                raise CheckpointError(f"{path}: missing: the run did not write this stage's predictions")
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            scored = score_predictions(metric, [str(r["prediction"]) for r in rows], [str(r["answer"]) for r in rows],
                                       questions=[str(r.get("prompt", "")) for r in rows] if judge else None,
                                       judge=judge)
            scores.append(scored.percent)
            for key, value in scored.format_figures().items():
                formats[key].setdefault(label, {})[task] = value
        return scores

    initial = row(prediction_stage(), "before training") if (run / "predictions" / prediction_stage()).is_dir() \
        else None
    rows = [row(prediction_stage(i, tasks[i]), tasks[i]) for i in range(state.trained)]
    out = output or under(run, "evaluations", f"rescore-{metric}")
    record = write_report(out, tasks, rows, initial, extra={"metric": metric, **formats})
    print(f"[evaluate] {run} rescored with {metric}: " + " ".join(
        f"{k}={v:.2f}" for k, v in record["metrics"].items() if v is not None) + f"; wrote {out}", flush=True)
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    from lvlm_cl.errors import report, user_errors

    try:
        if args.rescore:
            judge = None
            if args.metric == "judge":
                from lvlm_cl.stage import read_run

                judge = judge_settings(args, args.run, read_run(args.run)[0].judge)
            rescore(args.run, args.metric, args.output, judge)
            return 0
        evaluate(args)
    except user_errors() as e:
        return report(e)
    except KeyboardInterrupt:
        print("evaluate: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
