"""Evaluation speed: lvlm-cl's batched generation against one-sample-at-a-time generation (the way the
LLaVA and CoIN evaluation scripts run: one prompt, one ``generate`` call), on the same model and data.

    python scripts/benchmark_eval.py [--recipe recipes/seq5.yaml] [--rounds 3] [--output docs/benchmarks_eval.json]

The model is the recipe's (the pretrained tiny base for seq5) and the data its tasks' test prompts. The two
ways alternate (A, B, A, B, ...) so that machine noise hits both; medians of the rounds and their ratio
are printed and written. The predictions of the two ways are compared and must be identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    import torch

    from lvlm_cl.config import cache_dir, load_recipe
    from lvlm_cl.data.dataset import EncodingCache
    from lvlm_cl.data.stream import build_stream
    from lvlm_cl.evaluation.generate import generate_answers
    from lvlm_cl.io import atomic_write_json
    from lvlm_cl.models import load_model_dir, resolve_model_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/seq5.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-task", type=int, default=50, help="test prompts per task")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks_eval.json"))
    args = parser.parse_args(argv)

    torch.set_num_threads(torch.get_num_threads())
    cfg = load_recipe(args.recipe)
    cache = cache_dir(cfg)
    model, processor = load_model_dir(resolve_model_dir(cfg.model, cfg.seed, cache), cfg.model)
    model.eval()
    stream, _ = build_stream(cfg, cache)
    records = [r for t in stream for r in t.test_records[:args.per_task]]
    encodings = EncodingCache(processor, cfg.model.max_length)
    for r in records:                               # encoded once, outside the timings (both ways use them)
        encodings.prompt(r)
    tr = cfg.trainer

    def batched():
        return generate_answers(model, processor, records, encodings, batch_size=tr.eval_batch_size,
                                max_new_tokens=tr.max_new_tokens, progress=False)

    def one_by_one():
        return [generate_answers(model, processor, [r], encodings, batch_size=1, max_new_tokens=tr.max_new_tokens,
                                 progress=False)[0] for r in records]

    times = {"batched": [], "one_by_one": []}
    answers = {}
    for k in range(args.rounds):
        for name, fn in (("batched", batched), ("one_by_one", one_by_one)):
            start = time.perf_counter()
            answers[name] = fn()
            times[name].append(time.perf_counter() - start)
            print(f"[benchmark] round {k + 1} {name}: {times[name][-1]:.2f} s", flush=True)
    differ = [r["id"] for r, a, b in zip(records, answers["batched"], answers["one_by_one"]) if a != b]
    med = {name: statistics.median(t) for name, t in times.items()}
    result = {"recipe": args.recipe, "prompts": len(records), "batch_size": tr.eval_batch_size,
              "max_new_tokens": tr.max_new_tokens, "threads": torch.get_num_threads(), "rounds": args.rounds,
              "seconds": times, "median_seconds": med, "speedup": med["one_by_one"] / med["batched"],
              "prompts_per_second": {n: len(records) / s for n, s in med.items()},
              "identical_predictions": not differ, "differing_ids": differ[:20]}
    atomic_write_json(args.output, result)
    print(f"[benchmark] {len(records)} prompts: batched {med['batched']:.2f} s, one by one {med['one_by_one']:.2f} s "
          f"(median of {args.rounds}): {result['speedup']:.1f}x; identical predictions: {not differ} "
          f"({len(differ)} differ)")
    return 0 if not differ else 1


if __name__ == "__main__":
    sys.exit(main())
