"""Data at scale: the training process's peak memory, its time to the first optimizer step and its samples/s
on a generated task of 2k, 20k and 100k records with 336-px images; and the padding of the batches with
and without ``trainer.group_by_length``.

    python scripts/benchmark_data.py [--sizes 2000 20000 100000] [--steps 40] [--baseline-repo DIR] \
        [--baseline-sizes 2000] [--output docs/benchmarks_data.json]

The task: ``N`` training records (and 64 test records) in the canonical format, each with one 336 x 336
JPEG (a pool of 2,000 distinct generated images, referenced in turn: what matters is that every record's
image is read, decoded and processed at 336 px), a question of 4 to 60 words and an answer of one to three
words (70%) or of 20 to 60 words (30%), as instruction data mixes short VQA answers with paragraphs. The
model is the built-in tiny LLaVA with LLaVA-1.5's image shape (``model.tiny.image_size=336``: each image's
``pixel_values`` are 3 x 336 x 336 float32, 1.35 MB, as LLaVA-1.5-7B's; patches of 84 px keep the vision
tower cheap, 16 image tokens), trained with ``finetune`` for ``--steps`` steps of batch 16, evaluated on the
64 test records after the task.

Each size runs ``lvlm_cl/train.py`` in a child process of its own (the data generated once and cached under
``--work``), which reports:
- peak RSS: the training process's own (``ru_maxrss``), and the largest of its DataLoader workers;
- time to the first optimizer step: from the child's start (imports included) to the first call of the
  optimizer's ``step`` (found by wrapping ``torch.optim.AdamW.step``, so any version of the loop is timed the
  same way);
- samples/s: samples per optimizer step times the steps after the first, over the time between the first
  and the last step (the steady state, encoding included).

``--baseline-repo DIR`` runs the same children against another checkout of lvlm-cl (``git worktree add DIR
<commit>``) at ``--baseline-sizes``, for the before/after of a change; a checkout that keeps every encoded
image in memory needs 1.35 MB per record, so give it sizes that fit.

Padding: for the generated task (the largest size) and for every task of ``seq5``, the share of the
batches' token positions that are padding over one epoch of batch 16, in the random order and grouped by
length (the same ``StepBatchOrder`` the loop uses, lengths from ``TokenCounter``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POOL = 2000
WORDS = ("red green blue small large round square shape colour image picture object left right top bottom "
         "what which where how many is are the a of in on near far bright dark striped plain").split()


def generate(folder: Path, n: int, n_test: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """The task's files under ``folder`` (written once; an existing complete pair is reused)."""
    from PIL import Image, ImageDraw

    train, test = folder / f"task-{n}.train.jsonl", folder / f"task-{n}.test.jsonl"
    if train.is_file() and test.is_file():
        return train, test
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for k in range(POOL):
        path = images / f"{k:05d}.jpg"
        if not path.is_file():
            im = Image.new("RGB", (336, 336), tuple(rng.randrange(256) for _ in range(3)))
            draw = ImageDraw.Draw(im)
            for _ in range(6):
                x, y = rng.randrange(300), rng.randrange(300)
                draw.ellipse((x, y, x + rng.randrange(10, 120), y + rng.randrange(10, 120)),
                             fill=tuple(rng.randrange(256) for _ in range(3)))
            im.save(path, quality=90)

    def words(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    def record(i, split):
        answer = words(rng.randint(1, 3)) if rng.random() < 0.7 else words(rng.randint(20, 60))
        return {"id": f"{split}-{i}", "task": "", "images": [f"images/{i % POOL:05d}.jpg"],
                "messages": [{"role": "user", "content": [{"type": "image"},
                                                          {"type": "text", "text": words(rng.randint(4, 60)) + "?"}]},
                             {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}
    for path, count, split in ((train, n, "train"), (test, n_test, "test")):
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for i in range(count):
                f.write(json.dumps(record(i, split)) + "\n")
        os.replace(tmp, path)
    return train, test


def recipe(folder: Path, n: int, train: Path, test: Path, out: Path, steps: int) -> Path:
    import yaml

    path = folder / f"recipe-{n}.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(out), "report_to": [], "eval_before_training": False,
        "model": {"path": "builtin:tiny-llava-random", "max_length": 512,
                  "tiny": {"image_size": 336, "patch_size": 84}},
        "tasks": [{"name": "generated", "train": str(train), "eval": str(test), "metric": "exact_match"}],
        "methods": ["finetune"],
        "trainer": {"steps_per_task": steps, "epochs_per_task": None, "batch_size": 16, "eval_batch_size": 16,
                    "max_new_tokens": 4, "log_every": steps, "save_every": 0}}))
    return path


def child(args) -> int:
    """One training run in this process, timed through the optimizer's ``step``; the result as JSON."""
    started = time.perf_counter()
    sys.path.insert(0, str(args.repo))
    os.chdir(args.repo)
    import torch

    calls: list[float] = []
    step = torch.optim.AdamW.step

    def timed(self, *a, **k):
        out = step(self, *a, **k)
        calls.append(time.perf_counter())
        return out
    torch.optim.AdamW.step = timed
    from lvlm_cl.train import main

    code = main([str(args.recipe), "--overwrite"])
    batch = 16
    result = {"exit_code": code, "first_step_seconds": calls[0] - started if calls else None,
              "samples_per_second": (batch * (len(calls) - 1) / (calls[-1] - calls[0])) if len(calls) > 1 else None,
              "steps": len(calls), "total_seconds": time.perf_counter() - started,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "peak_worker_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    Path(args.result).write_text(json.dumps(result))
    return code


def padding_fraction(lengths, batch: int = 16, grouped: bool = False, seed: int = 0) -> float:
    """Padding share of the token positions over one epoch of ``StepBatchOrder`` batches."""
    from lvlm_cl.data.dataset import StepBatchOrder

    n = len(lengths)
    order = StepBatchOrder(n, batch, max(1, n // batch), seed=seed, lengths=lengths if grouped else None)
    real = total = 0
    for b in order:
        sizes = [int(lengths[i]) for i in b]
        real += sum(sizes)
        total += max(sizes) * len(sizes)
    return 1 - real / total


def paddings(train: Path) -> dict:
    """Padding with and without grouping: the generated task and seq5's five tasks."""
    sys.path.insert(0, str(ROOT))
    from lvlm_cl.config import cache_dir, load_recipe
    from lvlm_cl.data.lengths import TokenCounter
    from lvlm_cl.data.records import load_table
    from lvlm_cl.models import load_processor
    from lvlm_cl.models.tiny import TinyLlavaSize, build_tiny_processor
    from lvlm_cl.stream import build_stream

    out = {}
    processor = build_tiny_processor(TinyLlavaSize(image_size=336, patch_size=84))
    table = load_table(train)
    lengths = TokenCounter(processor, 512).count(table, prompt=False)
    out[f"generated ({len(table)} records)"] = lengths
    cfg = load_recipe(ROOT / "recipes" / "seq5.yaml")
    stream, _ = build_stream(cfg, cache_dir(cfg))
    seq5 = load_processor(cfg.model.path, cfg.model.chat_template)
    counter = TokenCounter(seq5, cfg.model.max_length)
    for task in stream:
        out[f"seq5 {task.name}"] = counter.count(task.train_records, prompt=False)
    return {name: {"records": len(ls), "mean_tokens": float(sum(ls) / len(ls)), "max_tokens": int(max(ls)),
                   "padding_random": padding_fraction(ls), "padding_grouped": padding_fraction(ls, grouped=True)}
            for name, ls in out.items()}


def run_size(repo: Path, work: Path, n: int, steps: int) -> dict:
    train, test = generate(work, n)
    with tempfile.TemporaryDirectory(prefix="benchmark_data_") as tmp:
        path = recipe(Path(tmp), n, train, test, Path(tmp) / "run", steps)
        result = Path(tmp) / "result.json"
        env = {**os.environ, "LVLM_CL_CACHE": os.environ.get("LVLM_CL_CACHE", str(ROOT / ".cache" / "lvlm_cl"))}
        proc = subprocess.run([sys.executable, __file__, "--child", "--repo", str(repo), "--recipe", str(path),
                               "--result", str(result)], env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not result.is_file():
            return {"records": n, "status": "failed", "exit_code": proc.returncode, "stderr": proc.stderr[-2000:]}
        return {"records": n, "status": "ok", **json.loads(result.read_text())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 100000])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "benchmark_data")
    parser.add_argument("--baseline-repo", type=Path, default=None)
    parser.add_argument("--baseline-sizes", type=int, nargs="+", default=[2000])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks_data.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--repo", type=Path, default=ROOT, help=argparse.SUPPRESS)
    parser.add_argument("--recipe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    sys.path.insert(0, str(ROOT))
    from lvlm_cl.io import atomic_write_json

    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    contestants = [("this checkout", ROOT, args.sizes)]
    if args.baseline_repo is not None:
        contestants.append((f"baseline {args.baseline_repo}", args.baseline_repo.resolve(), args.baseline_sizes))
    for name, repo, sizes in contestants:
        for n in sizes:
            row = {"code": name, **run_size(repo, args.work, n, args.steps)}
            rows.append(row)
            print(f"[benchmark] {name}, {n} records: " + (
                f"peak RSS {row['peak_rss_mib']:.0f} MiB (workers {row['peak_worker_rss_mib']:.0f} MiB), first step "
                f"after {row['first_step_seconds']:.1f} s, {row['samples_per_second']:.1f} samples/s"
                if row["status"] == "ok" else f"failed: {row['stderr'][-500:]}"), flush=True)
    pads = paddings(generate(args.work, max(args.sizes))[0])
    for name, p in pads.items():
        print(f"[benchmark] padding, {name}: {100 * p['padding_random']:.1f}% random, "
              f"{100 * p['padding_grouped']:.1f}% grouped by length", flush=True)
    result = {"cpu": f"{os.cpu_count()} cores", "steps": args.steps, "batch_size": 16, "runs": rows,
              "padding": pads}
    atomic_write_json(args.output, result)
    ok = [r for r in rows if r["code"] == "this checkout" and r["status"] == "ok"]
    if len(ok) >= 2:
        print(f"[benchmark] peak RSS at {ok[-1]['records']} records / at {ok[0]['records']}: "
              f"{ok[-1]['peak_rss_mib'] / ok[0]['peak_rss_mib']:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
