"""The pretrained tiny base: LLaVA's two training stages in miniature, run once and cached.

A real LLaVA starts continual tuning already able to see and follow instructions; prompt- and
adapter-based methods depend on that. ``builtin:tiny-llava`` is therefore the randomly initialised tiny
LLaVA trained by ``recipes/pretrain_tiny.yaml`` on an offline corpus that is not the continual tasks
(captions, then generic questions: ``lvlm_cl.benchmarks.pretrain``). Stage 1 trains every part because
nothing here starts pretrained (a real LLaVA's stage 1 trains only the projector).

The result is cached under ``<cache>/models/tiny-llava-pretrained-<key>``, the key a hash of the resolved
pretraining recipe, so a changed recipe or size builds a new base and an unchanged one is reused.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from lvlm_cl.models.tiny import save_model_dir

REPO_ROOT = Path(__file__).resolve().parent.parent


def _recipe_path(name: str) -> Path:
    p = Path(name).expanduser()
    for candidate in (p, REPO_ROOT / p):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"model.pretrain_recipe: {name} not found (looked in the working folder and {REPO_ROOT})")


LATER_SETTINGS = [("model", "quantization", None), ("model", "gradient_checkpointing", False),
                  ("model", "liger_kernel", "auto"),
                  ("model", "attn_implementation", None),
                  ("trainer", "mixed_precision", "no"), ("trainer", "optimizer", "adamw"),
                  # how batches are built, not what they hold: the same base whatever these are
                  ("trainer", "num_workers", 2), ("trainer", "group_by_length", False),
                  ("trainer", "keep_encodings", False)]


def pretrain_config(model_cfg, cache: Path):
    """The pretraining recipe with the continual recipe's tiny sizes, cache and a cache-keyed output folder."""
    import dataclasses

    from lvlm_cl.config import load_recipe, to_dict

    path = _recipe_path(model_cfg.pretrain_recipe)
    cfg = load_recipe(path)
    if cfg.model.path != "builtin:tiny-llava-random":
        raise ValueError(f"{path}: model.path must be builtin:tiny-llava-random (the pretraining starts from it)")
    cfg.model.tiny = dataclasses.replace(model_cfg.tiny)
    cfg.cache_dir = str(cache)
    cfg.report_to = []
    resolved = to_dict(cfg)
    resolved.pop("output_dir"), resolved.pop("cache_dir")
    # Settings added to the schema after the first pretrained bases were cached leave the key alone at their
    # defaults (a cached base stays valid); how often step checkpoints are taken never changes the result.
    resolved["trainer"].pop("save_every")
    for section, key, default in LATER_SETTINGS:
        if resolved[section].get(key) == default:
            resolved[section].pop(key)
    key = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:12]
    cfg.output_dir = str(cache / "pretrain-runs" / key)
    # The tiny corpus is small and trains on the CPU's cores: its encodings are kept (the same result, no
    # encoding every epoch again; not part of the key).
    cfg.trainer.keep_encodings = True
    return cfg, key


def pretrained_dir(model_cfg, cache: Path) -> Path:
    """Where the pretrained base of ``model_cfg``'s sizes and pretraining recipe is cached."""
    return cache / "models" / f"tiny-llava-pretrained-{pretrain_config(model_cfg, cache)[1]}"


def pretrained_is_cached(model_cfg, cache: Path) -> bool:
    return (pretrained_dir(model_cfg, cache) / "config.json").is_file()


def pretrained_tiny_dir(model_cfg, cache: Path) -> Path:
    """The cached pretrained base, built now (resumably) if it is not there yet."""
    cfg, key = pretrain_config(model_cfg, cache)
    final = cache / "models" / f"tiny-llava-pretrained-{key}"
    if (final / "config.json").is_file():
        return final
    from filelock import FileLock

    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):     # two runs started at once on a fresh cache: one builds, one waits
        if (final / "config.json").is_file():
            return final
        return _build(cfg, model_cfg, final)


def _build(cfg, model_cfg, final: Path) -> Path:
    from lvlm_cl.train import run

    print(f"[lvlm_cl] building the pretrained tiny base (once, cached in {final}) with {model_cfg.pretrain_recipe}",
          flush=True)
    started = time.time()
    model, processor, state = run(cfg)
    model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    save_model_dir(model, processor, final)
    from lvlm_cl.io import atomic_write_json

    atomic_write_json(final / "pretrain_summary.json", {
        "recipe": str(model_cfg.pretrain_recipe), "seconds": round(time.time() - started, 1),
        "tasks": state.tasks, "scores_after": state.rows[-1] if state.rows else None})
    print(f"[lvlm_cl] pretrained tiny base ready in {time.time() - started:.0f}s", flush=True)
    return final


def main(argv: list[str] | None = None) -> int:
    """``python -m lvlm_cl.pretrain RECIPE [key=value ...]``: build (once) and cache the pretrained tiny base
    that RECIPE's ``model`` section asks for, in one process; prints its folder. A multi-process launch of a
    recipe on ``builtin:tiny-llava`` needs it built first."""
    import argparse

    from lvlm_cl.config import ConfigError, cache_dir, load_recipe

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_recipe(args.recipe, args.overrides)
    except ConfigError as e:
        print(f"lvlm_cl: error: {e}", flush=True)
        return 2
    print(pretrained_tiny_dir(cfg.model, cache_dir(cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
