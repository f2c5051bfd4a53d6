"""The recipe's checks that types alone cannot express: every numeric key's range, task names that become
paths, the methods' settings and the metrics' names, the judge and the trackers. ``config.load_recipe`` runs
them on every recipe it loads; a problem is one ``ConfigError`` naming the file and the key."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

from lvlm_cl.errors import ConfigError

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_name(name: str) -> str | None:
    """Why ``name`` cannot be a file name (None: it can): letters, digits, ``.``, ``_`` and ``-``, starting with
    a letter or digit, at most 100 characters, no ``..``."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        return (f"{name!r} is not a safe file name: use letters, digits, '.', '_' and '-', starting with a letter "
                "or digit, without '..' (it names folders and files of the run)")
    return None


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def _ranges(cfg) -> list[tuple[str, object, bool, str]]:
    """(key, value, within its range, the range): every numeric recipe key's range."""
    tr, m = cfg.trainer, cfg.model
    rows = [
        ("seed", cfg.seed, 0 <= cfg.seed < 2 ** 32, "an integer from 0 to 4294967295"),
        ("trainer.steps_per_task", tr.steps_per_task, tr.steps_per_task is None or tr.steps_per_task >= 1,
         "at least 1 (or null, with epochs_per_task)"),
        ("trainer.epochs_per_task", tr.epochs_per_task,
         tr.epochs_per_task is None or (_finite(tr.epochs_per_task) and tr.epochs_per_task > 0),
         "a finite number above 0 (or null, with steps_per_task)"),
        ("trainer.lr", tr.lr, _finite(tr.lr) and tr.lr > 0, "a finite number above 0"),
        ("trainer.lora_plus_ratio", tr.lora_plus_ratio,
         tr.lora_plus_ratio is None or (_finite(tr.lora_plus_ratio) and tr.lora_plus_ratio >= 1),
         "a finite number, 1 or more, or null (one learning rate)"),
        ("trainer.weight_decay", tr.weight_decay, _finite(tr.weight_decay) and tr.weight_decay >= 0,
         "a finite number, 0 or more"),
        ("trainer.warmup_steps", tr.warmup_steps, tr.warmup_steps >= 0, "0 or more"),
        ("trainer.max_grad_norm", tr.max_grad_norm,
         tr.max_grad_norm is None or (_finite(tr.max_grad_norm) and tr.max_grad_norm > 0),
         "a finite number above 0, or null (no clipping)"),
        ("trainer.eval_max_samples", tr.eval_max_samples, tr.eval_max_samples is None or tr.eval_max_samples >= 1,
         "at least 1, or null (the whole test split)"),
        ("trainer.save_every", tr.save_every, tr.save_every >= 0, "0 (no step checkpoints) or more"),
        ("trainer.num_workers", tr.num_workers, tr.num_workers >= 0, "0 (encode in the training process) or more"),
        ("model.max_length", m.max_length, m.max_length >= 8, "at least 8"),
        ("model.min_pixels", m.min_pixels, m.min_pixels is None or m.min_pixels >= 1,
         "at least 1, or null (the processor's own)"),
        ("model.max_pixels", m.max_pixels, m.max_pixels is None or m.max_pixels >= 1,
         "at least 1, or null (the processor's own)"),
    ]
    rows += [(f"trainer.{k}", getattr(tr, k), getattr(tr, k) >= 1, "at least 1")
             for k in ("batch_size", "grad_accum", "eval_batch_size", "max_new_tokens", "log_every")]
    if m.lora is not None:
        rows += [("model.lora.r", m.lora.r, m.lora.r >= 1, "at least 1"),
                 ("model.lora.alpha", m.lora.alpha, m.lora.alpha >= 1, "at least 1"),
                 ("model.lora.dropout", m.lora.dropout, _finite(m.lora.dropout) and 0 <= m.lora.dropout < 1,
                  "from 0 up to (not including) 1")]
    rows += [(f"model.tiny.{k}", v, v >= 1, "at least 1") for k, v in dataclasses.asdict(m.tiny).items()]
    if cfg.benchmark is not None:
        b = cfg.benchmark
        rows += [("benchmark.seed", b.seed, 0 <= b.seed < 2 ** 32, "an integer from 0 to 4294967295"),
                 ("benchmark.train_size", b.train_size, b.train_size is None or b.train_size >= 1, "at least 1"),
                 ("benchmark.test_size", b.test_size, b.test_size is None or b.test_size >= 1, "at least 1")]
    return rows


def validate(cfg, where: str) -> None:
    """Cross-key checks that types alone cannot express; method and metric names are checked here too."""
    from lvlm_cl.evaluation.scorers import check_metric
    from lvlm_cl.methods import check_methods

    if (cfg.benchmark is None) == (not cfg.tasks):
        raise ConfigError(f"{where}: give exactly one of 'benchmark' (a built-in name) or 'tasks' (a list)")
    names = [t.name for t in cfg.tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: task names must be unique, got {names}")
    for i, name in enumerate(names):
        problem = check_name(name)
        if problem:
            raise ConfigError(f"{where}: key 'tasks[{i}].name': {problem}")
    for key, value, ok, allowed in _ranges(cfg):
        if not ok:
            raise ConfigError(f"{where}: key {key!r} must be {allowed}, got {value!r}")
    if cfg.model.min_pixels is not None and cfg.model.max_pixels is not None \
            and cfg.model.min_pixels > cfg.model.max_pixels:
        raise ConfigError(f"{where}: key 'model.min_pixels' ({cfg.model.min_pixels}) must not be above "
                          f"'model.max_pixels' ({cfg.model.max_pixels})")
    if cfg.model.tiny.image_size % cfg.model.tiny.patch_size:
        raise ConfigError(f"{where}: key 'model.tiny.image_size' ({cfg.model.tiny.image_size}) must be a multiple "
                          f"of 'model.tiny.patch_size' ({cfg.model.tiny.patch_size})")
    template = cfg.model.chat_template
    if template and template.endswith(".jinja") and not Path(template).expanduser().is_file():
        raise ConfigError(f"{where}: key 'model.chat_template': {template} not found")
    _check_trackers(cfg.report_to, where)
    for i, t in enumerate(cfg.tasks):
        try:
            check_metric(t.metric)
        except ValueError as e:
            raise ConfigError(f"{where}: key 'tasks[{i}].metric': {e}") from None
        if t.metric == "judge" and cfg.judge is None:
            raise ConfigError(f"{where}: key 'tasks[{i}].metric': 'judge' needs a 'judge' section (its model and "
                              "an endpoint or a local_model_dir; docs/metrics.md)")
    if cfg.judge is not None:
        j = cfg.judge
        if not j.model:
            raise ConfigError(f"{where}: key 'judge.model': name the judge model (it is part of the cache key)")
        if (j.endpoint is None) == (j.local_model_dir is None):
            raise ConfigError(f"{where}: key 'judge': give exactly one of 'endpoint' (an OpenAI-compatible base URL) "
                              "or 'local_model_dir'")
        for key, ok, allowed in (("timeout_s", _finite(j.timeout_s) and j.timeout_s > 0, "a finite number > 0"),
                                 ("retries", 0 <= j.retries <= 100, "from 0 to 100"),
                                 ("max_workers", 1 <= j.max_workers <= 256, "from 1 to 256"),
                                 ("batch_size", 1 <= j.batch_size <= 4096, "from 1 to 4096")):
            if not ok:
                raise ConfigError(f"{where}: key 'judge.{key}' must be {allowed}, got {getattr(j, key)!r}")
    tr = cfg.trainer
    if (tr.steps_per_task is None) == (tr.epochs_per_task is None):
        raise ConfigError(f"{where}: set exactly one of 'trainer.steps_per_task' or 'trainer.epochs_per_task'")
    if cfg.model.quantization and not cfg.model.freeze_language_model:
        raise ConfigError(f"{where}: key 'model.quantization' ({cfg.model.quantization}) needs "
                          "'model.freeze_language_model: true': quantized weights cannot be trained; train LoRA "
                          "adapters on them (model.lora, or a method with its own adapters such as task_lora)")
    try:
        check_methods(cfg.methods)
    except ValueError as e:
        raise ConfigError(f"{where}: key 'methods': {e}") from None


def _check_trackers(report_to: list[str], where: str) -> None:
    """Every ``report_to`` entry is one of accelerate's trackers and is installed."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = [t.value for t in LoggerType]
    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    for i, name in enumerate(report_to):
        if name not in known:
            raise ConfigError(f"{where}: key 'report_to[{i}]': unknown tracker {name!r}; accelerate's are {known}")
        if name != "all" and name not in available:
            raise ConfigError(f"{where}: key 'report_to[{i}]': {name} is not installed here (pip install {name}), "
                              "or remove it from report_to")
