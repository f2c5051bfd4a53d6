"""Machine efficiency of training: the model FLOP/s lvlm-cl's loop achieves against the peak matmul FLOP/s
torch reaches on this machine, measured in the same run; and a profile of where a training step's time goes.

    python scripts/benchmark_efficiency.py [--recipe recipes/seq5.yaml] [--steps 30] [--rounds 3] \
        [--sizes "tiny (default)" larger] [--output docs/benchmarks_efficiency.json]

- Peak: the median FLOP/s of square float32 matmuls (``torch.mm``, n = 256 ... 2048), the best size kept,
  with torch's default threads (2 on this machine), measured before and after the loop (the higher kept).
- Model FLOPs: counted by ``torch.utils.flop_counter.FlopCounterMode`` over the forward and backward of
  every batch the loop trains on (matmuls, convolutions and attention; the optimizer's element-wise
  updates are not counted, which is the usual "model FLOPs" convention), with the loop's loss (logits of the
  answer positions only); the count with every position's logits is reported beside it.
- Achieved: those FLOPs over the median wall time of ``train_task`` with ``finetune`` on the recipe's first
  task (``--steps`` steps, the same batches), timed as in ``benchmark_train.py``.
- Padding: the share of the batches' positions that are padding (computed, and counted in the FLOPs).
- Profile: ``torch.profiler`` over a run of the loop, self CPU time grouped into matmuls (forward and
  backward), attention, optimizer, element-wise and other operators, and the Python outside operators
  (data collation, hooks, the loop), plus the top operators.

Sizes: the recipe's model (the pretrained tiny base for seq5) and the larger configuration of the same
family (``lvlm_cl.models.tiny.BENCHMARK_SIZES``, randomly initialised: the speed does not depend on the
weights).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

GROUPS = {   # operator name fragments -> group (first match wins)
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"),
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention"),
    "convolution": ("convolution",),
    "optimizer": ("_foreach", "adamw", "AdamW", "Optimizer.step"),
}


def peak_matmul_flops(sizes=(256, 512, 1024, 2048), repeats: int = 7, min_seconds: float = 0.2) -> dict:
    """The median FLOP/s of ``torch.mm`` per size (each timing repeats the product for at least
    ``min_seconds``, so small sizes are not timer noise); the peak is the best size."""
    import torch

    best = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        start, calls = time.perf_counter(), 0
        while time.perf_counter() - start < min_seconds:    # warm-up, and how many calls fill min_seconds
            torch.mm(a, b)
            calls += 1
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                torch.mm(a, b)
            rates.append(2 * n ** 3 * calls / (time.perf_counter() - start))
        best[n] = statistics.median(rates)
    return {"flops_by_size": best, "peak_flops": max(best.values())}


def padding(ctx) -> float:
    """The share of the training batches' positions that are padding."""
    from benchmark_train import batches

    real = total = 0
    for batch in batches(ctx):
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].numel()
    return 1 - real / total


def model_flops(ctx, full_logits: bool = False) -> int:
    """Forward + backward FLOPs of every batch the loop trains on (a fresh copy of the model, no update), with
    the loop's loss (logits of the answer positions only) or, ``full_logits``, the model's own loss over
    every position."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    from benchmark_train import batches
    from lvlm_cl.models import apply_training_setup
    from lvlm_cl.loop import language_modelling_loss

    model = apply_training_setup(copy.deepcopy(ctx.base), ctx.cfg.model)
    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        for batch in batches(ctx):
            language_modelling_loss(model, batch, full_logits)[1].backward()
            model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def group_of(name: str) -> str:
    for group, fragments in GROUPS.items():
        if any(f in name for f in fragments):
            return group
    return "other operators"


def profile(ctx) -> dict:
    """Self CPU time per operator group over one run of the loop, as shares of the loop's wall time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from benchmark_train import lvlm_cl_loop

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = lvlm_cl_loop(ctx, "finetune")
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    groups: dict[str, float] = {}
    for e in events:
        if e.key.startswith("aten::") or any(f in e.key for fs in GROUPS.values() for f in fs):
            g = group_of(e.key)
            groups[g] = groups.get(g, 0.0) + e.self_cpu_time_total / 1e6
    operators = sum(groups.values())
    # threads run operators in parallel only inside an operator; the rest of the wall time is Python
    groups["Python outside operators (loop, collation, hooks)"] = max(0.0, wall - operators)
    top = sorted(((e.key, e.self_cpu_time_total / 1e6, e.count) for e in events), key=lambda t: -t[1])[:12]
    return {"wall_seconds": wall, "groups_seconds": groups,
            "top_operators": [{"name": n, "self_seconds": s, "calls": c} for n, s, c in top]}


def measure(recipe: str, size_name: str, steps: int, rounds: int) -> dict:
    import torch

    from benchmark_train import lvlm_cl_loop, prepare
    from lvlm_cl.models import count_parameters
    from lvlm_cl.models.tiny import BENCHMARK_SIZES

    overrides = []
    if BENCHMARK_SIZES[size_name]:
        overrides = ["model.path=builtin:tiny-llava-random",
                     *(f"model.tiny.{k}={v}" for k, v in BENCHMARK_SIZES[size_name].items())]
    ctx = prepare(recipe, steps, overrides)
    flops = model_flops(ctx)
    flops_full = model_flops(ctx, full_logits=True)
    peak_before = peak_matmul_flops()
    seconds = []
    for k in range(rounds):
        seconds.append(lvlm_cl_loop(ctx, "finetune"))
        print(f"[benchmark] {size_name} round {k + 1}: {seconds[-1]:.2f} s", flush=True)
    peak_after = peak_matmul_flops()
    peak = max(peak_before["peak_flops"], peak_after["peak_flops"])
    achieved = flops / statistics.median(seconds)
    prof = profile(ctx)
    return {"size": size_name, "parameters": count_parameters(ctx.base)[0], "steps": steps,
            "batch_size": ctx.cfg.trainer.batch_size, "threads": torch.get_num_threads(),
            "train_flops": flops, "train_flops_full_logits": flops_full, "seconds": seconds, "achieved_flops": achieved,
            "peak": {"before": peak_before, "after": peak_after}, "peak_flops": peak,
            "efficiency": achieved / peak, "padding_fraction": padding(ctx), "profile": prof}


def markdown(rows: list[dict], command: str) -> str:
    lines = [f"    {command}", "",
             "| model | parameters | FLOPs per step (fwd+bwd) | with every position's logits | achieved | peak matmul "
             "| efficiency | padding |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['parameters']:,} | {r['train_flops'] / r['steps'] / 1e9:.2f} G | "
                     f"{r['train_flops_full_logits'] / r['steps'] / 1e9:.2f} G | "
                     f"{r['achieved_flops'] / 1e9:.1f} GFLOP/s | {r['peak_flops'] / 1e9:.1f} GFLOP/s | "
                     f"{100 * r['efficiency']:.1f}% | {100 * r['padding_fraction']:.0f}% |")
    lines += ["", "Where the time of one run of the loop goes (self CPU time under `torch.profiler`, which "
              "slows small operators; shares of that run's wall time):", "",
              "| group | " + " | ".join(r["size"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    groups = list(dict.fromkeys(g for r in rows for g in r["profile"]["groups_seconds"]))
    for g in groups:
        cells = [f"{100 * r['profile']['groups_seconds'].get(g, 0.0) / r['profile']['wall_seconds']:.0f}%" for r in rows]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from lvlm_cl.io import atomic_write_json, atomic_write_text
    from lvlm_cl.models.tiny import BENCHMARK_SIZES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/seq5.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", default=list(BENCHMARK_SIZES), choices=list(BENCHMARK_SIZES))
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks_efficiency.json"))
    args = parser.parse_args(argv)
    rows = [measure(args.recipe, size, args.steps, args.rounds) for size in args.sizes]
    atomic_write_json(args.output, {"recipe": args.recipe, "rows": rows})
    command = "python scripts/benchmark_efficiency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown(rows, command.strip())
    atomic_write_text(args.output.with_suffix(".md"), table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
