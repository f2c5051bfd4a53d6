"""Training throughput: lvlm-cl's loop (``lvlm_cl.train.train_task``) against a plain accelerate loop written
here, on the same model, data and batch size; and each method's cost against ``finetune`` in the same run.

    python scripts/benchmark_train.py [--recipe recipes/seq5.yaml] [--steps 40] [--rounds 3] \
        [--methods finetune task_prompts,replay ...] [--output docs/benchmarks_train.json]

Every measurement trains a fresh copy of the recipe's base model for ``--steps`` optimizer steps on the
first task's training records (encoded once beforehand, for every contestant), timed from
``accelerator.prepare`` to ``accelerator.free_memory`` for both loops. The contestants alternate
within each round (plain, then each method list) so machine noise hits all; medians over rounds and the
ratios to the plain loop and to ``finetune`` are printed and written. Samples/s counts samples, tokens/s
the non-padding tokens of the batches.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    import torch

    from lvlm_cl.config import MethodSpec, cache_dir, load_recipe
    from lvlm_cl.data.dataset import EncodingCache, StepBatchOrder
    from lvlm_cl.data.encoding import collate_train
    from lvlm_cl.data.stream import build_stream
    from lvlm_cl.distributed import make_accelerator
    from lvlm_cl.io import atomic_write_json
    from lvlm_cl.methods import build_methods
    from lvlm_cl.models import apply_training_setup, load_model_dir, resolve_model_dir
    from lvlm_cl.train import train_task

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/seq5.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["finetune", "task_prompts,replay"],
                        help="method lists to time, comma-separated names (each with its defaults)")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks_train.json"))
    args = parser.parse_args(argv)

    cfg = load_recipe(args.recipe, ["report_to=[]", f"trainer.steps_per_task={args.steps}", "trainer.epochs_per_task=null",
                                    "trainer.save_every=0", f"trainer.log_every={args.steps}"])
    cache = cache_dir(cfg)
    base, processor = load_model_dir(resolve_model_dir(cfg.model, cfg.seed, cache), cfg.model)
    stream, _ = build_stream(cfg, cache)
    task = stream[0]
    records = task.train_records
    encodings = EncodingCache(processor, cfg.model.max_length)
    for r in records:
        encodings.train(r)
    accelerator = make_accelerator(cfg, tempfile.mkdtemp())
    tr = cfg.trainer
    pad = processor.tokenizer.pad_token_id
    names = [t.name for t in stream]

    def tokens_of(order_seed: int) -> int:
        order = StepBatchOrder(len(records), tr.batch_size, args.steps, seed=order_seed)
        return sum(int(collate_train([encodings.train(records[i]) for i in b], pad)["attention_mask"].sum())
                   for b in order)

    def plain() -> float:
        """The loop a user would write with accelerate: the same batches, AdamW, the same clipping."""
        model = apply_training_setup(copy.deepcopy(base), cfg.model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=tr.lr, weight_decay=tr.weight_decay)
        order = StepBatchOrder(len(records), tr.batch_size, args.steps, seed=cfg.seed * 1000)
        loader = torch.utils.data.DataLoader(list(range(len(records))), batch_sampler=order,
                                             collate_fn=lambda idx: collate_train([encodings.train(records[i]) for i in idx], pad))
        start = time.perf_counter()       # from prepare to release, as for lvlm-cl's train_task
        wrapped, optimizer = accelerator.prepare(model, optimizer)
        wrapped.train()
        for batch in loader:
            loss = wrapped(**batch).loss
            accelerator.backward(loss)
            if tr.max_grad_norm:
                accelerator.clip_grad_norm_(params, tr.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        accelerator.free_memory()
        return time.perf_counter() - start

    def lvlm_cl(method_list: str) -> float:
        model = apply_training_setup(copy.deepcopy(base), cfg.model)
        methods = build_methods([MethodSpec(n) for n in method_list.split(",")])
        for m in methods:
            m.setup(model, stream)
        data = records
        for m in methods:
            data = m.before_task(task, model, data)
        run_dir = Path(tempfile.mkdtemp())
        start = time.perf_counter()
        train_task(accelerator, model, methods, task, data, encodings, cfg, lambda *_: None, False, names, run_dir)
        return time.perf_counter() - start

    contestants = {"plain accelerate loop": plain, **{f"lvlm-cl [{m}]": (lambda m=m: lvlm_cl(m)) for m in args.methods}}
    times = {name: [] for name in contestants}
    for k in range(args.rounds):
        for name, fn in contestants.items():
            times[name].append(fn())
            print(f"[benchmark] round {k + 1} {name}: {times[name][-1]:.2f} s", flush=True)
    samples = args.steps * tr.batch_size
    tokens = tokens_of(cfg.seed * 1000)
    med = {n: statistics.median(t) for n, t in times.items()}
    finetune = med.get("lvlm-cl [finetune]")
    result = {"recipe": args.recipe, "task": task.name, "steps": args.steps, "batch_size": tr.batch_size,
              "threads": torch.get_num_threads(), "rounds": args.rounds, "seconds": times, "median_seconds": med,
              "samples_per_second": {n: samples / s for n, s in med.items()},
              "tokens_per_second": {n: tokens / s for n, s in med.items()},
              "throughput_vs_plain": {n: med["plain accelerate loop"] / s for n, s in med.items()},
              "overhead_vs_finetune": ({n: s / finetune - 1 for n, s in med.items() if n.startswith("lvlm-cl")}
                                       if finetune else {})}
    atomic_write_json(args.output, result)
    for n in med:
        print(f"[benchmark] {n}: {result['samples_per_second'][n]:.1f} samples/s, "
              f"{result['tokens_per_second'][n]:.0f} tokens/s, {result['throughput_vs_plain'][n]:.3f}x the plain loop"
              + (f", {100 * result['overhead_vs_finetune'][n]:+.1f}% vs finetune" if n in result["overhead_vs_finetune"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
