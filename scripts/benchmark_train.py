"""Training throughput: lvlm-cl's loop (``lvlm_cl.loop.train_task``) against a plain accelerate loop written
here, on the same model, data and batch size; and each method's cost against ``finetune`` in the same run.
The plain loop runs three times: with torch's default AdamW and the model's own loss (what a user writes);
with the fused AdamW that lvlm-cl uses by default (``trainer.optimizer``); and with that optimizer and
lvlm-cl's loss from the answer positions' logits only (``loop.language_modelling_loss``), which does the
same work as lvlm-cl's loop and so isolates the loop's own overhead.

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
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def prepare(recipe: str, steps: int, overrides: list[str] = ()) -> SimpleNamespace:
    """What every contestant shares: the recipe (for ``steps`` optimizer steps, no step checkpoints, no
    tracker), its base model, the first task's training records encoded once, one accelerator."""
    from lvlm_cl.config import cache_dir, load_recipe
    from lvlm_cl.data.encoding import encode_record
    from lvlm_cl.distributed import make_accelerator
    from lvlm_cl.models import load_model_dir, resolve_model_dir
    from lvlm_cl.stream import build_stream
    from lvlm_cl.train import pretrained_base

    cfg = load_recipe(recipe, ["report_to=[]", f"trainer.steps_per_task={steps}", "trainer.epochs_per_task=null",
                               "trainer.save_every=0", f"trainer.log_every={steps}", "trainer.num_workers=0",
                               *overrides])
    cache = cache_dir(cfg)
    base, processor = load_model_dir(resolve_model_dir(cfg.model, cfg.seed, cache, pretrained=pretrained_base), cfg.model)
    stream, _ = build_stream(cfg, cache)
    task = stream[0]
    records = list(task.train_records)
    encodings = {r["id"]: encode_record(processor, r, cfg.model.max_length) for r in records}
    return SimpleNamespace(cfg=cfg, base=base, processor=processor, stream=stream, task=task,
                           records=records, encodings=encodings, steps=steps,
                           accelerator=make_accelerator(cfg, tempfile.mkdtemp()))


def batches(ctx: SimpleNamespace):
    """The training batches of the plain loop: lvlm-cl's batch order and collation, the same for both loops."""
    import torch

    from lvlm_cl.data.dataset import StepBatchOrder
    from lvlm_cl.data.encoding import collate_train

    tr, records, pad = ctx.cfg.trainer, ctx.records, ctx.processor.tokenizer.pad_token_id
    order = StepBatchOrder(len(records), tr.batch_size, ctx.steps, seed=ctx.cfg.seed * 1000)
    return torch.utils.data.DataLoader(list(range(len(records))), batch_sampler=order,
                                       collate_fn=lambda idx: collate_train([ctx.encodings[records[i]["id"]] for i in idx], pad))


def plain_loop(ctx: SimpleNamespace, fused: bool = False, answer_logits: bool = False) -> float:
    """The loop a user would write with accelerate: the same batches, AdamW (torch's default implementation,
    or its fused kernel as lvlm-cl uses by default), the same clipping, the model's own loss (or, with
    ``answer_logits``, lvlm-cl's loss from the answer positions' logits only). Seconds from ``prepare`` to
    ``free_memory``."""
    import torch

    from lvlm_cl.models import apply_training_setup
    from lvlm_cl.loop import language_modelling_loss

    tr, accelerator = ctx.cfg.trainer, ctx.accelerator
    model = apply_training_setup(copy.deepcopy(ctx.base), ctx.cfg.model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tr.lr, weight_decay=tr.weight_decay, **({"fused": True} if fused else {}))
    loader = batches(ctx)
    start = time.perf_counter()
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    wrapped.train()
    for batch in loader:
        loss = language_modelling_loss(wrapped, batch)[1] if answer_logits else wrapped(**batch).loss
        accelerator.backward(loss)
        if tr.max_grad_norm:
            accelerator.clip_grad_norm_(params, tr.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
    accelerator.free_memory()
    return time.perf_counter() - start


def lvlm_cl_loop(ctx: SimpleNamespace, method_list: str) -> float:
    """lvlm-cl's ``train_task`` with the methods (comma-separated names, defaults) set up as a run does.
    Seconds from the call (``prepare``) to its return (``free_memory``)."""
    from lvlm_cl.config import MethodSpec
    from lvlm_cl.data.encoding import collate_train
    from lvlm_cl.methods import build_methods
    from lvlm_cl.models import apply_training_setup
    from lvlm_cl.loop import train_task

    model = apply_training_setup(copy.deepcopy(ctx.base), ctx.cfg.model)
    methods = build_methods([MethodSpec(n) for n in method_list.split(",")])
    for m in methods:
        m.setup(model, ctx.stream)
    data = ctx.records
    for m in methods:
        data = m.before_task(ctx.task, model, data)
    names = [t.name for t in ctx.stream]
    start = time.perf_counter()
    pad = ctx.processor.tokenizer.pad_token_id
    pre_encoded = lambda recs: collate_train([ctx.encodings[r["id"]] for r in recs], pad)  # noqa: E731
    train_task(ctx.accelerator, model, methods, ctx.task, data, pre_encoded, ctx.cfg, lambda *_: None, False, names,
               Path(tempfile.mkdtemp()))
    return time.perf_counter() - start


def main(argv=None) -> int:
    import torch

    from lvlm_cl.io import atomic_write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/seq5.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["finetune", "task_prompts,replay"],
                        help="method lists to time, comma-separated names (each with its defaults)")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks_train.json"))
    args = parser.parse_args(argv)

    ctx = prepare(args.recipe, args.steps)
    tr = ctx.cfg.trainer

    contestants = {"plain accelerate loop": lambda: plain_loop(ctx),
                   "plain accelerate loop, fused AdamW": lambda: plain_loop(ctx, fused=True),
                   "plain accelerate loop, fused AdamW, answer logits": lambda: plain_loop(ctx, True, True),
                   **{f"lvlm-cl [{m}]": (lambda m=m: lvlm_cl_loop(ctx, m)) for m in args.methods}}
    times = {name: [] for name in contestants}
    for k in range(args.rounds):
        for name, fn in contestants.items():
            times[name].append(fn())
            print(f"[benchmark] round {k + 1} {name}: {times[name][-1]:.2f} s", flush=True)
    samples = args.steps * tr.batch_size
    tokens = sum(int(b["attention_mask"].sum()) for b in batches(ctx))
    med = {n: statistics.median(t) for n, t in times.items()}
    finetune = med.get("lvlm-cl [finetune]")
    result = {"recipe": args.recipe, "task": ctx.task.name, "steps": args.steps, "batch_size": tr.batch_size,
              "threads": torch.get_num_threads(), "rounds": args.rounds, "seconds": times, "median_seconds": med,
              "samples_per_second": {n: samples / s for n, s in med.items()},
              "tokens_per_second": {n: tokens / s for n, s in med.items()},
              "throughput_vs_plain": {n: med["plain accelerate loop"] / s for n, s in med.items()},
              "throughput_vs_plain_fused": {n: med["plain accelerate loop, fused AdamW"] / s for n, s in med.items()},
              "throughput_vs_plain_same_work": {n: med["plain accelerate loop, fused AdamW, answer logits"] / s
                                                for n, s in med.items()},
              "overhead_vs_finetune": ({n: s / finetune - 1 for n, s in med.items() if n.startswith("lvlm-cl")}
                                       if finetune else {})}
    atomic_write_json(args.output, result)
    for n in med:
        print(f"[benchmark] {n}: {result['samples_per_second'][n]:.1f} samples/s, "
              f"{result['tokens_per_second'][n]:.0f} tokens/s, {result['throughput_vs_plain'][n]:.3f}x the plain loop, "
              f"{result['throughput_vs_plain_fused'][n]:.3f}x the plain loop with fused AdamW, "
              f"{result['throughput_vs_plain_same_work'][n]:.3f}x the plain loop doing the same work"
              + (f", {100 * result['overhead_vs_finetune'][n]:+.1f}% vs finetune" if n in result["overhead_vs_finetune"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
