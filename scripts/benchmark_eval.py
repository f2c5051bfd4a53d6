"""Evaluation speed: lvlm-cl's batched generation against one-sample-at-a-time generation (the way the
LLaVA and CoIN evaluation scripts run: one prompt, one ``generate`` call), on the same model and data.

    python scripts/benchmark_eval.py [--recipe recipes/seq5.yaml] [--rounds 3] [--per-task N] \
        [--batch-sizes 64 125 250] [--output docs/benchmarks_eval.json]

The model is the recipe's (the pretrained tiny base for seq5), or with ``--run DIR [--stage K]`` a trained
stage of a run with its methods (prompts, adapters, routing), as the loop evaluates after a task; the data
are the tasks' test prompts (all of them, or ``--per-task`` of each), evaluated task by task as the
training loop does after every task. One untimed pass first fills what the loop keeps between evaluations
(the routing methods' instruction features). The ways alternate within each round (one by one, then each
batch size) so that machine noise hits all; medians of the rounds and the ratios are printed and written.
Every way's predictions are compared with the one-by-one predictions and must be identical.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    import torch

    from lvlm_cl.config import cache_dir, load_recipe
    from lvlm_cl.evaluation.generate import generate_answers
    from lvlm_cl.io import atomic_write_json
    from lvlm_cl.models import load_model_dir, resolve_model_dir
    from lvlm_cl.stream import build_stream
    from lvlm_cl.train import pretrained_base

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/seq5.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-task", type=int, default=None, help="test prompts per task (default: all)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="batched generation's batch sizes (default: the recipe's trainer.eval_batch_size)")
    parser.add_argument("--run", type=Path, default=None, help="a run directory: time one of its trained stages")
    parser.add_argument("--stage", type=int, default=None, help="with --run: the 0-based task after which (default: last)")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks_eval.json"))
    args = parser.parse_args(argv)

    if args.run is not None:
        from lvlm_cl.stage import load_stage

        stage = load_stage(args.run, args.stage)
        model, processor, cfg, stream = stage.model, stage.processor, stage.cfg, stage.stream
    else:
        cfg = load_recipe(args.recipe)
        cache = cache_dir(cfg)
        model, processor = load_model_dir(resolve_model_dir(cfg.model, cfg.seed, cache, pretrained=pretrained_base), cfg.model)
        stream, _ = build_stream(cfg, cache)
    model.eval()
    per_task = [t.test_records[:args.per_task] for t in stream]
    records = [r for rs in per_task for r in rs]
    tr = cfg.trainer
    sizes = args.batch_sizes or [tr.eval_batch_size]

    def batched(size):
        return [a for rs in per_task for a in generate_answers(model, processor, rs, max_length=cfg.model.max_length,
                                                               batch_size=size, max_new_tokens=tr.max_new_tokens,
                                                               progress=False)]

    def one_by_one():
        return [generate_answers(model, processor, [r], max_length=cfg.model.max_length, batch_size=1,
                                 max_new_tokens=tr.max_new_tokens, progress=False)[0] for r in records]

    ways = {"one_by_one": one_by_one, **{f"batched_{b}": (lambda b=b: batched(b)) for b in sizes}}
    batched(sizes[0])                                 # untimed: a warm-up
    times = {name: [] for name in ways}
    answers = {}
    for k in range(args.rounds):
        for name, fn in ways.items():
            start = time.perf_counter()
            answers[name] = fn()
            times[name].append(time.perf_counter() - start)
            print(f"[benchmark] round {k + 1} {name}: {times[name][-1]:.2f} s", flush=True)
    differ = {name: [r["id"] for r, a, b in zip(records, answers[name], answers["one_by_one"]) if a != b]
              for name in ways if name != "one_by_one"}
    med = {name: statistics.median(t) for name, t in times.items()}
    result = {"recipe": args.recipe if args.run is None else str(args.run / "config.json"),
              "stage": None if args.run is None else stage.index, "methods": [m.name for m in cfg.methods] if args.run is not None else [],
              "prompts": len(records), "tasks": len(stream), "batch_sizes": sizes,
              "max_new_tokens": tr.max_new_tokens, "threads": torch.get_num_threads(), "rounds": args.rounds,
              "seconds": times, "median_seconds": med,
              "speedup": {n: med["one_by_one"] / s for n, s in med.items() if n != "one_by_one"},
              "prompts_per_second": {n: len(records) / s for n, s in med.items()},
              "identical_predictions": not any(differ.values()),
              "differing_ids": {n: d[:20] for n, d in differ.items() if d}}
    atomic_write_json(args.output, result)
    for n, speedup in result["speedup"].items():
        print(f"[benchmark] {len(records)} prompts, {n}: {med[n]:.2f} s against one by one {med['one_by_one']:.2f} s "
              f"(medians of {args.rounds}): {speedup:.1f}x; identical predictions: {not differ[n]} "
              f"({len(differ[n])} differ)")
    return 0 if result["identical_predictions"] else 1


if __name__ == "__main__":
    sys.exit(main())
