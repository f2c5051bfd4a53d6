"""The recipe: one YAML file = one experiment, read into typed dataclasses.

Every key is typed and documented here; an unknown key or a wrong type is a ``ConfigError`` naming the
file and the key path (``trainer.lr``). ``key=value`` overrides (values parsed as YAML) are applied on top,
so ``trainer.steps_per_task=50 model.tiny.text_layers=4`` works from the command line.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lvlm_cl.errors import ConfigError
from lvlm_cl.models.tiny import TinyLlavaSize
from lvlm_cl.recipe_checks import check_name, validate  # noqa: F401  (check_name: part of the recipe's API)


@dataclass
class LoraSettings:
    """LoRA through peft's public API (``peft.LoraConfig``)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # A regex over full module names (peft matches it with re.fullmatch) or a list of name suffixes.
    target_modules: Union[str, list[str]] = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    # Modules trained in full beside the adapters, e.g. ["multi_modal_projector"].
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    """Which model to tune and which of its parts train."""

    # "builtin:tiny-llava" (the pretrained tiny base, built by recipes/pretrain_tiny.yaml on first use),
    # "builtin:tiny-llava-random" (randomly initialised), "builtin:tiny-gemma3-random" (a tiny Gemma 3,
    # randomly initialised: the second family), "builtin:tiny-qwen2.5-vl-random" (a tiny Qwen2.5-VL, the
    # third), or a local Hugging Face directory (docs/models.md).
    path: str = "builtin:tiny-llava"
    tiny: TinyLlavaSize = field(default_factory=TinyLlavaSize)
    # Recipe that builds the builtin:tiny-llava base (relative to the repository or absolute).
    pretrain_recipe: str = "recipes/pretrain_tiny.yaml"
    # Chat template: None = the processor's own (must have {% generation %} markers), or a built-in
    # name ("llava15", "gemma3", "qwen2_5_vl") or a .jinja file path.
    chat_template: Union[str, None] = None
    max_length: int = 256
    # Qwen2-VL / Qwen2.5-VL (dynamic resolution): each image is resized, keeping its aspect ratio, so that
    # its pixel count lies between these (one language-model token per 28 x 28 pixels at Qwen's patch 14);
    # None = the processor's own (Qwen2.5-VL-7B-Instruct's: 3136 and 12845056). Refused for fixed-size models.
    min_pixels: Union[int, None] = None
    max_pixels: Union[int, None] = None
    freeze_vision_tower: bool = True
    freeze_projector: bool = False
    freeze_language_model: bool = False
    lora: Union[LoraSettings, None] = None
    # Load the language model's weights quantized through bitsandbytes: "4bit" (NF4 with double
    # quantisation: QLoRA) or "8bit" (LLM.int8); the vision tower, projector and lm_head stay unquantized.
    # Quantized weights do not train: set freeze_language_model: true and train adapters on them.
    quantization: Union[Literal["4bit", "8bit"], None] = None
    # Recompute activations in the backward pass instead of keeping them (less memory, about 30% more time).
    # "auto": on only where the longest batch would not fit the GPU's memory without it, measured before
    # each task (lvlm_cl/models/memory.py); always on under ZeRO-3, off on a CPU.
    gradient_checkpointing: Union[bool, Literal["auto"]] = False
    # liger-kernel's fused RMSNorm, MLP and rotary embedding for the language model (a CUDA GPU and
    # pip install -e ".[gpu]"): "auto" uses them where they can run, true refuses to start where they cannot.
    liger_kernel: Union[bool, Literal["auto"]] = "auto"
    # The attention kernel (transformers' attn_implementation): None = transformers' default (PyTorch's SDPA
    # where the model supports it), "sdpa", "eager", or "flash_attention_2" (GPU, the flash-attn package).
    attn_implementation: Union[Literal["sdpa", "eager", "flash_attention_2"], None] = None


@dataclass
class TaskConfig:
    """One task of the sequence, from canonical JSONL files (see docs/data.md)."""

    name: str
    train: str
    eval: str
    metric: str
    image_root: Union[str, None] = None


@dataclass
class BenchmarkConfig:
    """A built-in offline benchmark (lvlm_cl.benchmarks), generated on first use and cached."""

    name: str = "seq5"
    seed: int = 0
    train_size: Union[int, None] = None
    test_size: Union[int, None] = None
    # Use only these tasks, in this order (None = all, in the benchmark's order).
    tasks: Union[list[str], None] = None


@dataclass
class MethodSpec:
    """A continual-learning method and its settings (checked by the method registry against the method's settings
    dataclass, ``lvlm_cl.settings.build``)."""

    name: str
    args: dict = field(default_factory=dict)


@dataclass
class TrainerConfig:
    steps_per_task: Union[int, None] = 300   # optimizer steps per task; or set epochs_per_task
    epochs_per_task: Union[float, None] = None
    lr: float = 3e-4
    # LoRA+ (peft.optimizers.create_loraplus_optimizer): the LoRA adapters' B matrices learn at lr x this ratio
    # (the paper suggests 16; A, prompts and every other parameter at lr); null: one rate for everything.
    lora_plus_ratio: Union[float, None] = None
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    batch_size: int = 32           # per process, per micro-step
    grad_accum: int = 1
    max_grad_norm: Union[float, None] = 1.0
    eval_batch_size: int = 64
    max_new_tokens: int = 16
    eval_max_samples: Union[int, None] = None  # per task; None = the whole test split
    log_every: int = 20
    # Mixed precision through accelerate: "no" (fp32), "bf16" or "fp16" (autocast; weights stay fp32). Under
    # DeepSpeed the JSON's bf16/fp16 "enabled": "auto" follow this setting.
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    save_every: int = 100          # optimizer steps between step checkpoints inside a task (0: none)
    # AdamW's implementation: "adamw_fused" (torch's fused kernel: one pass over all parameters, the fastest
    # on CPU and GPU) or "adamw" (torch's default implementation, a loop of per-tensor operations on CPU).
    optimizer: Literal["adamw_fused", "adamw"] = "adamw_fused"
    # DataLoader worker processes that encode batches (templating, tokenizing, image processing) while the
    # model computes; 0 encodes in the training process. Per training process (none in a run of several processes
    # on CPUs: a fork beside gloo's threads was seen to hang).
    num_workers: int = 2
    # Batches of samples of about one length (sorted within windows of 50 batches, the windows' batches
    # shuffled), as LLaVA's group_by_modality_length: less padding, the same samples per epoch.
    group_by_length: bool = False
    # Keep every encoded sample (pixels included) in memory for the whole run, encoding in the training process:
    # for small data on a CPU, where the model trains on the cores workers would use (recipes/seq5.yaml). Memory
    # then grows with the data; leave it off for real datasets (docs/data.md#at-scale).
    keep_encodings: bool = False


@dataclass
class JudgeConfig:
    """The model that scores a task with ``metric: judge`` (``lvlm_cl.evaluation.judge``): an OpenAI-compatible
    chat endpoint (``vllm serve MODEL`` gives ``http://localhost:8000/v1``) or a local Hugging Face directory."""

    model: str = ""                      # the judge model's name (sent to the endpoint; part of the cache key)
    endpoint: Union[str, None] = None    # the endpoint's base URL ...
    local_model_dir: Union[str, None] = None   # ... or a local model directory: one of the two
    api_key_env: Union[str, None] = None  # the environment variable holding the endpoint's API key
    cache: str = ""                      # verdict cache (JSONL); "" = <output_dir>/judge_cache.jsonl
    timeout_s: float = 60.0
    retries: int = 3
    max_workers: int = 8                 # requests in flight to the endpoint
    batch_size: int = 8                  # prompts per forward of a local judge


@dataclass
class RunConfig:
    """A whole experiment."""

    output_dir: str
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    benchmark: Union[BenchmarkConfig, None] = None
    tasks: list[TaskConfig] = field(default_factory=list)
    methods: list[MethodSpec] = field(default_factory=list)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # Where benchmarks and the pretrained tiny base are cached ("" = $LVLM_CL_CACHE or ~/.cache/lvlm_cl).
    cache_dir: str = ""
    # Trackers for accelerate (e.g. ["tensorboard"]); [] = stdout only.
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    # Evaluate every task before any training (the matrix's first row, needed for FWT).
    eval_before_training: bool = True
    # The judge of tasks scored with metric: judge (None: no task is).
    judge: Union[JudgeConfig, None] = None


# ----------------------------------------------------------------------------- loading


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error names the nested key (model.lora.r)
            return _convert(value, options[0], key, where)
        for option in options:
            try:
                return _convert(value, option, key, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: key {key!r}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: key {key!r}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: key {key!r}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key {key!r}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if tp is MethodSpec:
            return _method_spec(value, key, where)
        if tp is BenchmarkConfig and isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key {key!r}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where=where, prefix=key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: key {key!r}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: key {key!r}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads "1e-4" as a string; accept numeric literals
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: key {key!r}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: key {key!r}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: key {key!r}: unsupported type {tp}")  # a schema bug, not a user error


def _method_spec(value: Any, key: str, where: str) -> MethodSpec:
    # A method is written as a bare name ("replay") or a mapping {name: replay, memory_fraction: 0.05}.
    if isinstance(value, str):
        return MethodSpec(name=value)
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        args = {k: v for k, v in value.items() if k != "name"}
        if "args" in args and len(args) == 1 and isinstance(args["args"], dict):
            args = args["args"]
        return MethodSpec(name=value["name"], args=args)
    raise ConfigError(f"{where}: key {key!r}: a method is a name or a mapping with 'name', got {value!r}")


def from_dict(cls, data: dict, *, where: str = "<recipe>", prefix: str = ""):
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{where}: unknown key {name!r}; allowed here: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{prefix}.{name}" if prefix else name, where)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        name = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise ConfigError(f"{where}: missing required key {name!r}")
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """The resolved config as plain data (what is saved next to the results)."""
    out = dataclasses.asdict(cfg)
    out["methods"] = [{"name": m.name, **m.args} for m in cfg.methods]
    return out


def apply_override(data: dict, assignment: str, where: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"{where}: override {assignment!r} is not of the form key=value")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: override {assignment!r}: value is not valid YAML ({e})") from None
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: override {key!r}: {'.'.join(parts[:i + 1])!r} is not a mapping")
        node = child
    node[parts[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# A name that becomes a folder or file name (tasks: predictions/<stage>/<task>.jsonl, checkpoints/task-NN-<task>).
def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """Read a recipe file, apply ``key=value`` overrides, validate, and return a ``RunConfig``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the recipe as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of keys, got {type(data).__name__}")
    for o in overrides:
        apply_override(data, o, f"{path} (command line)")
    cfg = from_dict(RunConfig, data, where=str(path))
    validate(cfg, str(path))
    return cfg


def cache_dir(cfg: RunConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("LVLM_CL_CACHE") or "~/.cache/lvlm_cl"
    return Path(root).expanduser()
