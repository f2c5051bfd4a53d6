"""The pretrained tiny base: LLaVA's two training stages in miniature, run once and cached.

A real LLaVA starts continual tuning already able to see and follow instructions; prompt- and
adapter-based methods depend on that. ``builtin:tiny-llava`` is therefore the randomly initialised tiny
LLaVA trained by ``recipes/pretrain_tiny.yaml`` on an offline corpus that is not the continual tasks
(captions, then generic questions: ``lvlm_cl.benchmarks.pretrain``). Stage 1 trains every part because
nothing here starts pretrained (a real LLaVA's stage 1 trains only the projector).

The result is cached under ``<cache>/models/tiny-llava-pretrained-<key>``, the key a hash of the resolved
pretraining recipe, so a changed recipe or size builds a new base and an unchanged one is reused.

This module says which recipe and where (pure functions of the recipe); the base is built by the training
run that needs it (``lvlm_cl.train.pretrained_base``), or ahead of time by ``python -m lvlm_cl.pretrain``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _recipe_path(name: str) -> Path:
    p = Path(name).expanduser()
    for candidate in (p, REPO_ROOT / p):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"model.pretrain_recipe: {name} not found (looked in the working folder and {REPO_ROOT})")


LATER_SETTINGS = [("model", "quantization", None), ("model", "gradient_checkpointing", False),
                  ("model", "liger_kernel", "auto"),
                  ("model", "attn_implementation", None), ("model", "min_pixels", None), ("model", "max_pixels", None),
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
    if resolved.get("judge") is None:       # a later top-level section; the pretraining has no judged task
        resolved.pop("judge", None)
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


def cached_dir(model_cfg, cache: Path) -> Path:
    """The cached pretrained base (``lvlm_cl.models.resolve_model_dir``'s ``pretrained`` for a caller that only
    reads, as ``stage``); a ``ModelError`` if it has not been built."""
    from lvlm_cl.models import ModelError

    path = pretrained_dir(model_cfg, cache)
    if not (path / "config.json").is_file():
        raise ModelError(f"the pretrained tiny base is not in {path}: build it with python -m lvlm_cl.pretrain "
                         "<the run's recipe>")
    return path
