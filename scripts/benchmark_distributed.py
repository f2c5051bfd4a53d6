"""Per-process memory for parameters, gradients and optimizer state under DDP, ZeRO-2 and ZeRO-3.

    python scripts/benchmark_distributed.py --output docs/distributed_memory.md

For each launch config (recipes/accelerate/ddp.yaml, zero2.yaml, zero3.yaml; 2 processes) and each model
size (the built-in tiny LLaVA and a larger config of the same family), a worker process per rank builds
the model, trains it in full for 3 steps with AdamW through ``accelerator.prepare``, and measures on
itself, in bytes:
- parameters: what the process holds of every parameter (a ZeRO-3 shard is ``p.ds_tensor``);
- gradients: the buffer the process keeps its gradients in after a backward pass, before the optimizer
  step: DDP ``p.grad`` (whole); ZeRO-2 the storage behind the optimizer's ``averaged_gradients`` (the
  process's partition, in a flat buffer) and ZeRO-3 its ``grad_partitions_flat_buffer`` (the process's
  partition; ``contiguous_gradients`` as in recipes/accelerate/). DeepSpeed has no public accessor for them: these attribute names are those of
  deepspeed 0.19 and the script fails loudly if they are gone;
- left by forward + backward: every byte the first forward and backward pass leave allocated (torch's
  profiler, ``profile_memory``: allocations minus frees in that window): the gradients plus whatever
  buffers the launch mode adds (under DDP it equals ``p.grad``; under ZeRO-3 DeepSpeed's gathering and
  communication buffers come on top);
- optimizer state: the tensors in the inner torch optimizer's state (Adam's two moments, over the whole
  model with DDP, over the process's flat partition under ZeRO);
- peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lvlm_cl.models.tiny import BENCHMARK_SIZES as SIZES  # noqa: E402

MODES = ["ddp", "zero2", "zero3"]


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def worker(size_name: str, out: Path) -> None:
    import torch
    from PIL import Image

    from lvlm_cl.config import TrainerConfig
    from lvlm_cl.data.encoding import collate_train, encode_record
    from lvlm_cl.distributed import make_accelerator, zero_stage
    from lvlm_cl.models.tiny import TinyLlavaSize, build_tiny_llava

    class Cfg:
        trainer = TrainerConfig(batch_size=4, grad_accum=1)
        report_to: list = []

    torch.manual_seed(0)
    size = TinyLlavaSize(**SIZES[size_name])
    model, processor = build_tiny_llava(size, seed=0)   # built whole, before DeepSpeed's config is active
    accelerator = make_accelerator(Cfg, tempfile.mkdtemp())
    model.train()
    img = Path(tempfile.mkdtemp()) / "x.png"
    Image.new("RGB", (size.image_size, size.image_size), (200, 30, 30)).save(img)
    record = {"id": "x", "images": [str(img)], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the image?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]}
    batch = collate_train([encode_record(processor, record, 512)] * 4, processor.tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    deepspeed = zero_stage(accelerator) > 0
    grads, left = 0, 0
    for step in range(3):
        if step == 0:   # what the first forward and backward leave allocated: gradients and their buffers
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                loss = wrapped(**batch).loss
                # DeepSpeed's engine directly: accelerate's backward would also take the optimizer step.
                wrapped.backward(loss) if deepspeed else accelerator.backward(loss)
            left = sum(e.self_cpu_memory_usage for e in prof.events())
            stage = zero_stage(accelerator)
            if stage == 0:
                grads = sum(_tensor_bytes(p.grad) for p in model.parameters() if p.grad is not None)
            else:
                name = "averaged_gradients" if stage in (1, 2) else "grad_partitions_flat_buffer"
                held = getattr(wrapped.optimizer, name, None)
                if held is None or (isinstance(held, dict) and not held):
                    raise SystemExit(f"DeepSpeed's ZeRO-{stage} optimizer holds no {name} (another deepspeed version?)")
                tensors = [t for ts in held.values() for t in ts] if isinstance(held, dict) else [held]
                grads = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
            if deepspeed:
                wrapped.step()
            else:
                optimizer.step()
                optimizer.zero_grad()
            continue
        loss = wrapped(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    params = sum(_tensor_bytes(p.ds_tensor) if hasattr(p, "ds_tensor") else _tensor_bytes(p)
                 for p in model.parameters())
    torch_opt = optimizer.optimizer
    while not isinstance(torch_opt, torch.optim.Optimizer) or hasattr(torch_opt, "optimizer"):
        torch_opt = torch_opt.optimizer
    opt_state = sum(_tensor_bytes(v) for state in torch_opt.state.values() for v in state.values()
                    if torch.is_tensor(v) and v.dim() > 0)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    result = {"rank": accelerator.process_index, "world": accelerator.num_processes, "zero": zero_stage(accelerator),
              "model_parameters": total, "parameters_bytes": params, "gradients_bytes": grads,
              "left_by_forward_backward_bytes": left,
              "optimizer_state_bytes": opt_state,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "loss": float(loss.detach())}
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.stem}.rank{accelerator.process_index}.json").write_text(json.dumps(result))


def mib(b: int) -> str:
    return f"{b / 2**20:.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("docs/distributed_memory.md"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="tiny (default)", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.size, args.result)
        return 0
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for size in SIZES:
        for mode in MODES:
            result = tmp / f"{mode}-{size.split()[0]}.json"
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--config_file",
                   f"recipes/accelerate/{mode}.yaml", "scripts/benchmark_distributed.py", "--worker", "--size", size,
                   "--result", str(result)]
            print(f"[benchmark] {mode} {size}", flush=True)
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{mode} {size} failed:\n{proc.stderr[-4000:]}")
            for rank in range(2):
                r = json.loads((tmp / f"{result.stem}.rank{rank}.json").read_text())
                rows.append({"size": size, "mode": mode, **r})
    lines = ["# Per-process memory under DDP, ZeRO-2 and ZeRO-3", "",
             "Written by `python scripts/benchmark_distributed.py` (2 processes on CPU through gloo, full "
             "fine-tuning in fp32, AdamW, 3 steps; see the script's docstring for what each column counts: "
             "gradients are the buffer each process keeps them in). "
             "MiB per process.", "",
             "| model | parameters | launch | rank | parameters | gradients | left by forward + backward "
             "| optimizer state | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['model_parameters']:,} | {r['mode']} | {r['rank']} | "
                     f"{mib(r['parameters_bytes'])} | "
                     f"{mib(r['gradients_bytes'])} | {mib(r['left_by_forward_backward_bytes'])} | "
                     f"{mib(r['optimizer_state_bytes'])} "
                     f"| {mib(r['peak_rss_bytes'])} |")
    from lvlm_cl.io import atomic_write_json, atomic_write_text

    atomic_write_text(args.output, "\n".join(lines) + "\n")
    atomic_write_json(args.output.with_suffix(".json"), rows)
    print(f"[benchmark] wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
