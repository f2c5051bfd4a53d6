"""Training throughput of LLaVA-1.5-7B with LoRA on one GPU: a plain transformers + peft loop written here
against lvlm-cl's own loop (``lvlm_cl.loop.train_task``), side by side in one run, with nothing to download.

    python scripts/benchmark_gpu.py [--size 7b] [--batch-sizes 8 16] [--gradient-checkpointing both] \
        [--steps 10] [--warmup 3] [--rounds 3] [--device cuda] [--liger] [--output docs/benchmarks_gpu.json]

The workload is LLaVA-1.5-7B's architecture built from its configuration with random weights, directly on
the device in bf16 (the speed does not depend on the weights): CLIP ViT-L/14 at 336 px (576 image tokens
from the second-to-last layer, CLS dropped), a two-layer GELU projector, and a Llama-2-7B-shaped language
model (vocabulary 32064). What trains and how comes from ``recipes/coin_llava15_7b.yaml``, for both loops:
LoRA r=128, alpha=256, dropout 0.05 on the language model's q, k, v, o, gate, up and down projections, the
projector trained in full (``modules_to_save``), bf16 autocast, fused AdamW at a constant lr 2e-4,
gradients clipped at norm 1.0. Records are generated: 710 tokens each (576 image tokens, random text token
ids, random pixel values), the last 24 of them an answer whose labels are real (-100 elsewhere); every
record has the same length, so the batches carry no padding. ``--size tiny`` is the same architecture a
few layers deep and a few dozen wide (16 image tokens, 64 per record), for the CPU test.

The contestants, both on the same records in the same batch order (``StepBatchOrder``, ``collate_train``,
pinned host memory on a GPU), each measurement a fresh model from the same seed:

- plain transformers + peft: ``get_peft_model``, ``activation_checkpointing_enable`` (non-reentrant; the
  name transformers 5 gives ``gradient_checkpointing_enable``), and per step ``model(**batch).loss`` under
  ``torch.autocast`` (logits at every position), ``backward``, clipping, ``optimizer.step``.
- lvlm-cl: the model set up by ``lvlm_cl.models.apply_training_setup`` from the recipe's model section, then
  ``train_task`` itself with the recipe's trainer section and methods (``finetune``): accelerate's bf16,
  the loss from the answer positions' logits only (``loop.language_modelling_loss``), the scheduler,
  whatever checks the loop makes. The real loop rather than ``language_modelling_loss`` in a copy of the
  plain one, so that what its step costs beyond the model is measured too. It is timed by one more entry
  in its method list (``StepClock``), through the ``after_step`` hook every method gets.

- with ``--liger``, a third: lvlm-cl's loop with liger-kernel's fused RMSNorm, SwiGLU and rotary embedding
  (``model.liger_kernel: true``, ``lvlm_cl.models.kernels``). liger-kernel patches the transformers modules of
  the whole process, so this contestant runs in a child process of the script right after the other two,
  with the same settings and rounds, its MFU against the matmul peak measured in that process. It needs a
  CUDA device and ``pip install -e ".[gpu]"``.

Both loops are timed the same way: the device is synchronised after step ``--warmup`` and after step
``--warmup + --steps``, and s/step is that interval over ``--steps``; nothing else synchronises in the
plain loop. Within each round every setting runs both contestants (the order reversed every other round)
so machine noise hits both; the medians over rounds are reported.

- tokens/s: the non-padding tokens of a batch over s/step.
- MFU: model FLOPs per step over s/step, over a bf16 matmul peak measured on the device in the same run
  (median FLOP/s of repeated square ``torch.mm`` of size 8192 on a GPU, 1024 on a CPU, synchronised;
  measured before and after the rounds, the higher kept). Model FLOPs are counted by
  ``torch.utils.flop_counter.FlopCounterMode`` over the forward and backward of one record with each
  loop's own loss and without gradient checkpointing (its recomputation is not model work), times the
  batch size (every record has the same length). The frozen base weights get no weight gradients and the
  frozen vision tower no backward at all, so the backward costs about one forward of the language model,
  not two; attention is counted in full (the causal mask is not halved), as ``FlopCounterMode`` does (it
  has no formula for torch's CPU attention kernel, so a CPU run counts no attention). Each
  loop is credited with the FLOPs it does: lvlm-cl's loss skips the vocabulary projection at the
  non-answer positions.
- peak memory: ``torch.cuda.max_memory_allocated``, reset before each measurement (the model build
  included), the highest over rounds. On a CPU it is null per setting; the process's peak RSS is written
  once (``process_peak_rss_mib``), and it covers the whole run.
- A setting that runs out of GPU memory is recorded as "oom" and not run again in later rounds.
- The first step's loss of each loop: both train the same function on the same first batch, so the two
  agree up to bf16 rounding (``initial_loss_relative_difference``).
"""

from __future__ import annotations

import argparse
import gc
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lvlm_cl.methods.base import Method  # noqa: E402

RECIPE = ROOT / "recipes" / "coin_llava15_7b.yaml"
PLAIN, LVLM_CL, LIGER = "plain transformers + peft", "lvlm-cl", "lvlm-cl + liger-kernel"
# LLaVA-1.5's tokenizer: <s>, </s>, <image>, <pad>; a vocabulary padded to 32064.
BOS_ID, EOS_ID, IMAGE_TOKEN_ID, PAD_ID, VOCAB = 1, 2, 32000, 32001, 32064


@dataclass(frozen=True)
class Size:
    vision: dict            # CLIPVisionConfig
    text: dict              # LlamaConfig
    tokens: int             # per record, image tokens included
    answer_tokens: int      # at the end of each record, with real labels

    @property
    def image_tokens(self) -> int:
        return (self.vision["image_size"] // self.vision["patch_size"]) ** 2


SIZES = {
    "7b": Size(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=336, patch_size=14),
               text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32),
               tokens=710, answer_tokens=24),
    "tiny": Size(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=56, patch_size=14),
                 text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4),
                 tokens=64, answer_tokens=8),
}


def build_model(size: Size, device: torch.device, seed: int = 0):
    """LLaVA-1.5's architecture at ``size`` with random weights, created on ``device`` in bf16 (no float32
    copy anywhere); the same weights for the same seed."""
    from transformers import AutoModelForImageTextToText, CLIPVisionConfig, LlamaConfig, LlavaConfig

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**size.vision, projection_dim=768, layer_norm_eps=1e-5),
        text_config=LlamaConfig(**size.text, vocab_size=VOCAB, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                                tie_word_embeddings=False),
        image_token_id=IMAGE_TOKEN_ID, image_seq_length=size.image_tokens, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default")
    config.pad_token_id = PAD_ID
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            return AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)


def make_records(size: Size, n: int, seed: int = 0) -> list:
    """``n`` encoded training records (``Encoded``, what lvlm-cl's encoder returns): BOS, a few prompt tokens,
    the image's tokens, random question tokens, then the answer (its last token EOS), labelled."""
    from lvlm_cl.data.encoding import IGNORE_INDEX, Encoded

    g = torch.Generator().manual_seed(seed)
    side = size.vision["image_size"]
    question = size.tokens - size.image_tokens - size.answer_tokens - 4
    if question < 1:
        raise ValueError(f"{size.tokens} tokens per record leave no room for a question")
    records = []
    for _ in range(n):
        def text(k):
            return torch.randint(3, IMAGE_TOKEN_ID, (k,), generator=g)

        ids = torch.cat([torch.tensor([BOS_ID]), text(3), torch.full((size.image_tokens,), IMAGE_TOKEN_ID),
                         text(question), text(size.answer_tokens - 1), torch.tensor([EOS_ID])])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[-size.answer_tokens:] = ids[-size.answer_tokens:]
        records.append(Encoded(ids, labels, torch.randn(1, 3, side, side, generator=g)))
    return records


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class StepClock(Method):
    """Not a continual-learning method: an entry in lvlm-cl's method list that clocks optimizer steps
    ``marks`` (synchronised) and keeps the first and the last micro-step's loss (on the device, read later)."""

    name = "step_clock"

    def __init__(self, device: torch.device, marks: tuple[int, ...]):
        super().__init__()
        self.device, self.marks, self.step, self.times = device, set(marks), 0, []
        self.first_loss = self.last_loss = None

    def loss(self, model, batch, outputs, task):
        self.last_loss = outputs.loss.detach()
        if self.first_loss is None:
            self.first_loss = self.last_loss
        return None

    def after_step(self, model, task):
        self.step += 1
        if self.step in self.marks:
            self.times.append(clock(self.device))


def setting_config(batch_size: int, checkpointing: bool, total_steps: int, out: str):
    """The CoIN recipe for one setting: its model and trainer sections, this batch size and checkpointing,
    ``total_steps`` steps at a constant learning rate (the plain loop has no scheduler, and a warm-up from 0
    would leave lvlm-cl's first steps without an update), no step checkpoints, no tracker."""
    from lvlm_cl.config import load_recipe

    return load_recipe(RECIPE, [f"output_dir={out}", "report_to=[]", f"trainer.batch_size={batch_size}",
                                f"trainer.steps_per_task={total_steps}", "trainer.epochs_per_task=null",
                                "trainer.lr_schedule=constant", "trainer.warmup_steps=0", "trainer.save_every=0",
                                f"model.gradient_checkpointing={str(checkpointing).lower()}", "trainer.num_workers=0",
                                "trainer.group_by_length=false",  # every record has one length
                                "model.liger_kernel=false"])


def plain_model(ctx, cfg):
    """What a user writes with transformers and peft, with the recipe's LoRA settings."""
    from peft import LoraConfig, get_peft_model

    model = build_model(ctx.size, ctx.device)
    if cfg.model.gradient_checkpointing:
        model.config.use_cache = False
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    lora = cfg.model.lora
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=lora.target_modules,
                                            modules_to_save=lora.modules_to_save or None))


def lvlm_cl_model(ctx, cfg):
    from lvlm_cl.models import apply_training_setup

    return apply_training_setup(build_model(ctx.size, ctx.device), cfg.model)


def liger_model(ctx, cfg):
    """lvlm-cl's model with liger-kernel's fused layers, as ``model.liger_kernel: true`` sets it up."""
    from lvlm_cl.models import apply_training_setup
    from lvlm_cl.models.kernels import use_liger

    model = build_model(ctx.size, ctx.device)
    use_liger(model, True, ctx.device, log=lambda *_: None)
    return apply_training_setup(model, cfg.model)


def plain_loss(model, batch):
    return model(**batch).loss


def lvlm_cl_loss(model, batch):
    from lvlm_cl.loop import language_modelling_loss

    return language_modelling_loss(model, batch)[1]


def batch_order(ctx, cfg):
    """The batches' record indices, as ``train_task`` draws them for the stream's first task."""
    from lvlm_cl.data.dataset import StepBatchOrder

    tr = cfg.trainer
    return StepBatchOrder(len(ctx.records), tr.batch_size, tr.steps_per_task, seed=cfg.seed * 1000)


def plain_loop(ctx, cfg) -> SimpleNamespace:
    """The plain loop over the same batches: (clock marks, first loss, last loss)."""
    from lvlm_cl.data.encoding import collate_train

    tr, device = cfg.trainer, ctx.device
    model = plain_model(ctx, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tr.lr, weight_decay=tr.weight_decay,
                                  **({"fused": True} if tr.optimizer == "adamw_fused" else {}))
    loader = torch.utils.data.DataLoader(list(range(len(ctx.records))), batch_sampler=batch_order(ctx, cfg),
                                         collate_fn=lambda idx: collate_train([ctx.records[i] for i in idx], PAD_ID),
                                         pin_memory=device.type == "cuda")
    marks, times, first = (ctx.warmup, ctx.warmup + ctx.steps), [], None
    model.train()
    for step, batch in enumerate(loader, 1):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = plain_loss(model, batch)
        loss.backward()
        if tr.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, tr.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        if first is None:
            first = loss.detach()
        if step in marks:
            times.append(clock(device))
    return SimpleNamespace(times=times, first_loss=first, last_loss=loss.detach())


def lvlm_cl_loop(ctx, cfg, setup=lvlm_cl_model) -> SimpleNamespace:
    """lvlm-cl's ``train_task`` on the same records with the recipe's methods and a ``StepClock``."""
    from lvlm_cl.data.encoding import collate_train
    from lvlm_cl.methods import build_methods
    from lvlm_cl.methods.base import Task
    from lvlm_cl.loop import train_task

    model = setup(ctx, cfg)
    step_clock = StepClock(ctx.device, (ctx.warmup, ctx.warmup + ctx.steps))
    methods = [*build_methods(cfg.methods), step_clock]
    task = Task(index=0, name="synthetic", metric="exact_match", train_records=ctx.records, test_records=[])
    with tempfile.TemporaryDirectory() as run_dir:
        train_task(ctx.accelerator, model, methods, task, ctx.records, lambda items: collate_train(items, PAD_ID), cfg,
                   lambda *_: None, False, [task.name], Path(run_dir))
    return SimpleNamespace(times=step_clock.times, first_loss=step_clock.first_loss, last_loss=step_clock.last_loss)


def liger_loop(ctx, cfg) -> SimpleNamespace:
    return lvlm_cl_loop(ctx, cfg, liger_model)


LOOPS = {PLAIN: (plain_model, plain_loss, plain_loop), LVLM_CL: (lvlm_cl_model, lvlm_cl_loss, lvlm_cl_loop)}
# liger-kernel patches the transformers modules of the whole process: every model built after it has the
# fused layers, the plain loop's included. Its contestant runs in a child process of its own (``--liger``).
LIGER_LOOPS = {LIGER: (liger_model, lvlm_cl_loss, liger_loop)}


def step_flops(model, batch: dict, loss_of, device: torch.device) -> int:
    """FLOPs of one forward and backward of ``model`` on ``batch`` with ``loss_of`` under bf16 autocast
    (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = {k: v.to(device) for k, v in batch.items()}
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_of(model, batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def flops_per_record(ctx, name: str, cfg) -> int:
    """A contestant's model FLOPs for one record, counted without gradient checkpointing."""
    from lvlm_cl.data.encoding import collate_train

    setup, loss_of, _ = ctx.loops[name]
    model = setup(ctx, cfg)
    model.train()
    flops = step_flops(model, collate_train(ctx.records[:1], PAD_ID), loss_of, ctx.device)
    del model
    release(ctx)
    return flops


def release(ctx) -> None:
    """Drop what a finished (or failed) measurement left: accelerate's references, cached GPU memory."""
    ctx.accelerator.free_memory()
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def measure(ctx, name: str, cfg) -> dict:
    """One run of contestant ``name`` in one setting: s/step, peak memory and losses, or status "oom"."""
    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    try:
        out = ctx.loops[name][2](ctx, cfg)
    except torch.OutOfMemoryError:
        out = None
    release(ctx)        # after the except block, so the traceback's references to the model are gone
    if out is None:
        return {"status": "oom"}
    return {"status": "ok", "seconds_per_step": (out.times[1] - out.times[0]) / ctx.steps,
            "first_loss": float(out.first_loss), "last_loss": float(out.last_loss),
            "peak_memory_bytes": torch.cuda.max_memory_allocated(ctx.device) if cuda else None}


def peak_matmul_flops(device: torch.device, n: int, repeats: int = 7, min_seconds: float = 0.2) -> dict:
    """The median FLOP/s of square bf16 ``torch.mm`` of size ``n`` on ``device``: each timing repeats the
    product for at least ``min_seconds``, between device synchronisations."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    torch.mm(a, b, out=c)
    start, calls = clock(device), 0
    while clock(device) - start < min_seconds:      # warm-up, and how many products fill min_seconds
        torch.mm(a, b, out=c)
        calls += 1
    rates = []
    for _ in range(repeats):
        start = clock(device)
        for _ in range(calls):
            torch.mm(a, b, out=c)
        rates.append(2 * n ** 3 * calls / (clock(device) - start))
    return {"n": n, "calls_per_timing": calls, "flops": rates, "peak_flops": statistics.median(rates)}


def summarise(name: str, batch_size: int, checkpointing: bool, runs: list[dict], tokens: int, flops: int,
              peak: float) -> dict:
    row = {"loop": name, "batch_size": batch_size, "gradient_checkpointing": checkpointing, "rounds": runs}
    if any(r["status"] == "oom" for r in runs):
        return {**row, "status": "oom"}
    seconds = statistics.median(r["seconds_per_step"] for r in runs)
    memory = [r["peak_memory_bytes"] for r in runs if r["peak_memory_bytes"] is not None]
    return {**row, "status": "ok", "seconds_per_step": seconds, "tokens_per_step": tokens,
            "tokens_per_second": tokens / seconds, "flops_per_step": flops, "achieved_flops": flops / seconds,
            "mfu": flops / seconds / peak, "peak_memory_gib": max(memory) / 2 ** 30 if memory else None,
            "first_loss": runs[0]["first_loss"], "last_loss": runs[-1]["last_loss"]}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def versions() -> dict:
    import accelerate
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "peft": peft.__version__, "accelerate": accelerate.__version__}


def markdown(rows: list[dict]) -> str:
    lines = ["| loop | batch | grad. checkpointing | s/step | tokens/s | MFU | peak memory |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['loop']} | {r['batch_size']} | {'yes' if r['gradient_checkpointing'] else 'no'} |"
        if r["status"] == "oom":
            lines.append(head + " out of memory | | | |")
            continue
        memory = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else "n/a (CPU)"
        lines.append(head + f" {r['seconds_per_step']:.3f} | {r['tokens_per_second']:.0f} | {100 * r['mfu']:.1f}% | "
                            f"{memory} |")
    return "\n".join(lines)


def run(args, device: torch.device, out_dir: str) -> dict:
    """Every measurement of the run, alternating contestants within rounds; the result written as JSON."""
    from lvlm_cl.distributed import make_accelerator

    checkpointing = {"on": [True], "off": [False], "both": [True, False]}[args.gradient_checkpointing]
    total = args.warmup + args.steps
    configs = {(b, ck): setting_config(b, ck, total, out_dir) for ck in checkpointing for b in args.batch_sizes}
    accelerator = make_accelerator(next(iter(configs.values())), out_dir)
    mine, theirs = torch.device(accelerator.device), torch.device(device)     # "cuda" is "cuda:0"
    if mine.type != theirs.type or (mine.index or 0) != (theirs.index or 0):
        sys.exit(f"benchmark_gpu: lvlm-cl's loop runs on accelerate's device ({accelerator.device}), not on "
                 f"{device}; choose the device with CUDA_VISIBLE_DEVICES (empty for the CPU) instead")
    size = SIZES[args.size]
    loops = LIGER_LOOPS if args.contestants == "liger" else LOOPS
    ctx = SimpleNamespace(size=size, device=device, accelerator=accelerator, warmup=args.warmup, steps=args.steps,
                          records=make_records(size, 2 * max(args.batch_sizes)), loops=loops)
    print(f"[benchmark] {device_name(device)}: LLaVA-1.5 {args.size}, {size.tokens} tokens per record "
          f"({size.image_tokens} image tokens)", flush=True)

    per_record = {name: flops_per_record(ctx, name, setting_config(1, False, total, out_dir)) for name in loops}
    # a GPU gets large products for long; a CPU run is a smoke test of the script
    peak_n, peak_seconds = (8192, 0.2) if device.type == "cuda" else (1024, 0.05)
    peak_before = peak_matmul_flops(device, peak_n, min_seconds=peak_seconds)
    runs = {(name, key): [] for key in configs for name in loops}
    for k in range(args.rounds):
        for key, cfg in configs.items():
            for name in (list(loops) if k % 2 == 0 else list(loops)[::-1]):
                done = runs[(name, key)]
                if any(r["status"] == "oom" for r in done):
                    continue
                done.append(measure(ctx, name, cfg))
                r = done[-1]
                print(f"[benchmark] round {k + 1} {name}, batch {key[0]}, checkpointing {'on' if key[1] else 'off'}: "
                      + (f"{r['seconds_per_step']:.3f} s/step, loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}"
                         if r["status"] == "ok" else "out of memory"), flush=True)
    peak_after = peak_matmul_flops(device, peak_n, min_seconds=peak_seconds)
    peak = max(peak_before["peak_flops"], peak_after["peak_flops"])

    rows, agreement = [], {}
    for (b, ck), cfg in configs.items():
        tokens = sum(int(ctx.records[i].input_ids.numel()) for i in next(iter(batch_order(ctx, cfg))))
        pair = [summarise(name, b, ck, runs[(name, (b, ck))], tokens, per_record[name] * b, peak) for name in loops]
        rows += pair
        if len(pair) == 2 and all(r["status"] == "ok" for r in pair):
            agreement[f"batch {b}, checkpointing {'on' if ck else 'off'}"] = \
                abs(pair[0]["first_loss"] - pair[1]["first_loss"]) / abs(pair[0]["first_loss"])
    return {"device": device_name(device), "device_type": device.type, "versions": versions(),
            "size": args.size, "recipe": str(RECIPE.relative_to(ROOT)), "tokens_per_record": size.tokens,
            "image_tokens_per_record": size.image_tokens, "answer_tokens_per_record": size.answer_tokens,
            "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "flops_per_record": per_record,
            "peak_matmul": {"before": peak_before, "after": peak_after, "peak_flops": peak},
            "rows": rows, "initial_loss_relative_difference": agreement,
            "peak_memory_note": ("torch.cuda.max_memory_allocated per measurement" if device.type == "cuda" else
                                 "not measured per setting on a CPU; process_peak_rss_mib covers the whole run"),
            "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def liger_child(argv: list[str], output: Path) -> dict:
    """The liger-kernel contestant, measured by this script in a child process with the same settings (its
    own matmul peak, which its MFU is against; its rows join the parent's)."""
    import subprocess

    args = [a for a in argv if a != "--liger"]
    if "--output" in args:
        i = args.index("--output")
        del args[i:i + 2]
    subprocess.run([sys.executable, str(Path(__file__).resolve()), *args, "--contestants", "liger",
                    "--output", str(output)], check=True)
    import json

    child = json.loads(output.read_text())
    return {"rows": child["rows"], "peak_matmul": child["peak_matmul"], "flops_per_record": child["flops_per_record"],
            "note": "measured in a child process right after the other contestants, MFU against its own peak"}


def main(argv=None) -> int:
    from lvlm_cl.io import atomic_write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="7b")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--gradient-checkpointing", choices=["on", "off", "both"], default="both")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps before them (at least 1)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks_gpu.json"))
    parser.add_argument("--liger", action="store_true",
                        help="also measure lvlm-cl's loop with liger-kernel (model.liger_kernel: true), in a child "
                             "process right after the others (liger patches every later model of a process)")
    parser.add_argument("--contestants", choices=["main", "liger"], default="main", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1 or min(args.batch_sizes) < 1:
        parser.error("--steps, --warmup, --rounds and --batch-sizes must be at least 1")
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    if args.liger or args.contestants == "liger":
        import importlib.util

        if device.type != "cuda" or importlib.util.find_spec("liger_kernel") is None:
            sys.exit("benchmark_gpu: --liger needs a CUDA device and liger-kernel (pip install -e \".[gpu]\")")
    with tempfile.TemporaryDirectory(prefix="benchmark_gpu_") as out_dir:
        result = run(args, device, out_dir)
        if args.liger:
            result["liger"] = liger_child(argv if argv is not None else sys.argv[1:], Path(out_dir) / "liger.json")
            result["rows"] += result["liger"].pop("rows")
    atomic_write_json(args.output, result)
    peak = result["peak_matmul"]["peak_flops"]
    print(f"[benchmark] bf16 matmul peak {peak / 1e12:.1f} TFLOP/s; first-step losses of the two loops differ by "
          + ", ".join(f"{100 * v:.2f}% ({k})" for k, v in result["initial_loss_relative_difference"].items()))
    print(markdown(result["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
