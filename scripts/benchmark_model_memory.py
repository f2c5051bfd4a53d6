"""Weight memory of one model loaded in fp32, bf16, 8-bit and 4-bit, and what LoRA adds: measured on the
built-in family at two sizes, next to what the per-parameter formula used for 7B/13B estimates predicts.

    python scripts/benchmark_model_memory.py --output docs/model_memory.md

For each size the model is written once as a Hugging Face directory and loaded through lvlm-cl's own
loader (``load_model_dir``) with each setting; the bytes are those of every parameter and buffer storage
the loaded model holds (bitsandbytes' packed 4-bit weights and their quantisation constants included).
The formula counts 4 bytes per fp32 parameter, 2 per bf16 parameter, 1 per 8-bit and 0.5 per 4-bit
parameter of the quantized layers (the language model's linear layers), the rest in fp32.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lvlm_cl.models.tiny import BENCHMARK_SIZES as SIZES  # noqa: E402

SETTINGS = [("fp32", None, "float32"), ("bf16", None, "bfloat16"), ("8-bit", "8bit", "float32"),
            ("4-bit NF4", "4bit", "float32")]


def storage_bytes(model) -> int:
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    for m in model.modules():          # 4-bit quantisation constants (absmax, double-quant state)
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            for v in vars(state).values():
                if hasattr(v, "untyped_storage"):
                    seen[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
            nested = getattr(state, "state2", None)
            if nested is not None:
                for v in vars(nested).values():
                    if hasattr(v, "untyped_storage"):
                        seen[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    return sum(seen.values())


def quantizable(model) -> tuple[int, int]:
    """(parameters in the language model's linear layers, all other parameters)."""
    import torch

    lin = sum(m.weight.numel() for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and "language_model" in n)
    return lin, sum(p.numel() for p in model.parameters()) - lin


def main(argv=None) -> int:
    import torch

    from lvlm_cl.config import LoraSettings, ModelConfig
    from lvlm_cl.io import atomic_write_text
    from lvlm_cl.models import apply_training_setup, load_model_dir
    from lvlm_cl.models.tiny import TinyLlavaSize, build_tiny_llava, save_model_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("docs/model_memory.md"))
    args = parser.parse_args(argv)
    lines = ["# Weight memory by precision (measured)", "",
             "Written by `python scripts/benchmark_model_memory.py` (see its docstring). MiB of parameter and buffer "
             "storage after loading through `load_model_dir`; formula = 4 bytes per fp32 parameter, 2 per bf16, "
             "1 per 8-bit and 0.5 per 4-bit parameter of the language model's linear layers (the rest fp32).", "",
             "| model | parameters | setting | measured MiB | formula MiB | measured / fp32 |",
             "|---|---|---|---|---|---|"]
    lora_lines = ["", "| model | LoRA r=16 on the language model (trainable parameters) | share of the model |", "|---|---|---|"]
    for name, size in SIZES.items():
        folder = Path(tempfile.mkdtemp()) / "model"
        model, processor = build_tiny_llava(TinyLlavaSize(**size), seed=0)
        save_model_dir(model, processor, folder)
        lin, rest = quantizable(model)
        total = lin + rest
        fp32 = None
        for label, quant, dtype in SETTINGS:
            loaded, _ = load_model_dir(folder, quantization=quant, dtype=getattr(torch, dtype))
            measured = storage_bytes(loaded)
            per = {"fp32": 4, "bf16": 2, "8-bit": 1, "4-bit NF4": 0.5}[label]
            formula = (total * per) if quant is None else (lin * per + rest * 4)
            fp32 = fp32 or measured
            lines.append(f"| {name} | {total:,} | {label} | {measured / 2**20:.2f} | {formula / 2**20:.2f} | "
                         f"{measured / fp32:.3f} |")
            print(f"[benchmark] {name} {label}: {measured / 2**20:.2f} MiB", flush=True)
        cfg = ModelConfig(freeze_language_model=True, lora=LoraSettings(r=16, alpha=32))
        wrapped = apply_training_setup(load_model_dir(folder)[0], cfg)
        trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        lora_lines.append(f"| {name} | {trainable:,} | {100 * trainable / total:.2f}% |")
    atomic_write_text(args.output, "\n".join(lines + lora_lines) + "\n")
    print(f"[benchmark] wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
