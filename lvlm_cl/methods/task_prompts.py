"""Task-keyed text-feature prompts: the prompt half of LVLM-CL (seed 003), after ModalPrompt
(AuroraZengfh/ModalPrompt, llava/model/llava_arch.py) and the key-query prompts of L2P.

Each task owns ``length`` learnable prompt vectors, prepended to the language model's input embeddings
(after the image features are merged in), and a key. The query of a sample is a frozen text feature of its
instruction (``queries.InstructionEncoder``: the base language model's mean-pooled hidden states).

- Training on task t: every sample uses the prompt of the task it comes from (the current task's, or an
  earlier task's for records a memory bank replays), or with ``replay_route: current`` task t's for every
  sample, so the bank trains the new task's prompt (and adapter) on the earlier tasks too. Earlier tasks'
  prompts are frozen; the new task's prompt starts as a copy of the previous one (``init: previous``) or at
  random.
- Per-task adapters (``adapter_r`` > 0): each task also owns a LoRA adapter on the language model and the
  vision tower, taken on the prompt's route (``task_lora``'s hooks, with this pool as the router). Only the
  task in training's adapter moves; it starts at PEFT's initialisation (the base model: ``adapter_init:
  fresh``) or as a copy of the previous task's (``previous``).
- Output residuals (``adapter_head``, with the adapters): each task's adapter also adds a low-rank residual
  to the language model's last hidden state, before the vocabulary projection (``lm_head(h + ΔW h)``, a
  LoRA of the projection's input, so its cost does not grow with the vocabulary). A frozen output layer
  cannot make a word likely that the base model never had to say (its embedding stayed small, and the
  final norm bounds the hidden state): the adapters then learn the argmax but not the probability, and the
  loss stays high (docs/methods.md#task_prompts).
- Keys (``routing.TaskKeyRouter``): by default the k-means prototypes of the task's training queries,
  fitted when the task ends (``key_mode: prototypes``); or L2P's learned key, pulled towards the task's
  queries by ``term = key_weight * mean(1 - cos(q, k_t))`` (``key_mode: learned``).
- Inference: each sample uses the prompt of the known task whose keys are most similar to its query
  (``top_k > 1``: the similarity-weighted mean of the k best tasks' prompts). No task label is needed:
  ``continual.generate`` (used by evaluation and chat) routes each prompt once and holds the choice.
- The prompts, keys and the count of known tasks live in the model (``<model>.continual.task_prompts``) and
  are saved with every task checkpoint.

    model: {freeze_vision_tower: true, freeze_projector: true, freeze_language_model: true}
    methods:
      - {name: task_prompts, length: 8, adapter_r: 64, adapter_alpha: 128, adapter_head: true,
         replay_route: current}
      - {name: replay, memory_fraction: 0.05, selection: task_balanced, replay_ratio: 0.2}

How the prompts enter the model: each sample's task is chosen once per call (``continual.held``: from the
training batch's ``cl_task_ids``, or by routing the prompt of a ``continual.generate`` call), a pre-hook on
the language model prepends the chosen prompts to ``inputs_embeds`` (extending the attention mask and
shifting position ids by ``length``), and a forward hook drops the prompt positions from its output, so
logits and labels keep their length. Later decoding steps of the call find the prompts in the key-value
cache and only get the mask and positions extended. Routing accuracy per task is reported in
``metrics.json`` and the report.

Adaptations: ModalPrompt's query blends a CLIP text and image feature; here the query is text-only (the
LLaVA model's own language model is the encoder, no second model is needed). ModalPrompt concatenates the
top-k prompts; here ``top_k`` averages them, so the prompt length is the same in training and inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lvlm_cl.distributed import whole
from lvlm_cl.methods.adapters import adapter_params, refuse_recipe_lora, set_trainable_adapter, targets
from lvlm_cl.methods.base import Method, Task
from lvlm_cl.methods.queries import query_encoder
from lvlm_cl.methods.routing import RouterState, RoutingSettings, TaskKeyRouter, key_term_on_batch
from lvlm_cl.methods.task_lora import add_task_adapters
from lvlm_cl.models import parts
from lvlm_cl.models.continual import attach
from lvlm_cl.settings import seed_setting, setting


@dataclass(frozen=True)
class PromptSettings(RoutingSettings):
    """The prompt pool's settings (``task_prompts``, ``dual_modality``), besides the routing ones."""

    length: int = setting(8, low=1, help="prompt vectors per task")
    init: Literal["previous", "random"] = setting("previous", help="a new task's prompt: previous (copy of the "
                                                                    "last one) or random")
    seed: int = seed_setting("initialisation of the prompts")


@dataclass(frozen=True)
class TaskPromptsSettings(PromptSettings):
    length: int = setting(8, low=0, help="prompt vectors per task (0: none, the per-task adapters alone)")
    top_k: int = setting(1, low=1, help="at inference, the similarity-weighted mean of the k best tasks' prompts")
    adapter_r: int = setting(0, low=0, help="rank of the LoRA adapter each task owns beside its prompt, on the "
                                            "prompt's route (0: prompts only)")
    adapter_alpha: float = setting(16.0, low=0, help="LoRA scaling (alpha / r) of the per-task adapters")
    adapter_language: bool = setting(True, help="the per-task adapters cover the language model")
    adapter_vision: bool = setting(True, help="the per-task adapters cover the vision tower")
    adapter_head: bool = setting(False, help="the per-task adapters also cover the output: a low-rank residual on "
                                             "the language model's last hidden state, before the vocabulary "
                                             "projection")
    adapter_init: Literal["fresh", "previous"] = setting(
        "fresh", help="a new task's adapter: fresh (PEFT's initialisation: the base model) or previous (a copy of "
                      "the previous task's)")
    replay_route: Literal["own", "current"] = setting(
        "own", help="in training, a replayed record runs through its own task's prompt and adapter (frozen) or "
                    "through the task in training's, which then also learns the earlier tasks from the bank")

    def resolve(self, given: frozenset[str]) -> TaskPromptsSettings:
        if self.length == 0 and not self.adapter_r:
            raise ValueError("length 0 (no prompts) needs per-task adapters: set adapter_r > 0, or length >= 1")
        if self.adapter_r and self.top_k > 1:
            raise ValueError("top_k > 1 blends prompts, but a sample runs through one task's adapter: with "
                             "adapter_r > 0 set top_k to 1")
        if self.adapter_r and not (self.adapter_language or self.adapter_vision):
            raise ValueError("with adapter_r > 0 at least one of adapter_language and adapter_vision must be true")
        if self.adapter_head and not self.adapter_r:
            raise ValueError("adapter_head adds to the per-task adapters: set adapter_r > 0")
        return self


class TaskPromptPool(TaskKeyRouter):
    """A slot per task of the stream: its keys (``TaskKeyRouter``) and its ``length`` prompt vectors."""

    def __init__(self, num_tasks: int, length: int, dim: int, init_std: float, seed: int, top_k: int = 1, **keys):
        g = torch.Generator().manual_seed(seed)
        super().__init__(num_tasks, dim, [torch.randn(length, dim, generator=g) * init_std for _ in range(num_tasks)],
                         seed=seed, **keys)
        self.length, self.top_k = length, top_k

    @property
    def active(self) -> bool:
        return self.selected is not None

    def weights(self) -> torch.Tensor:
        """(B, known) weight of each known task's prompt per sample: one-hot, or the top-k similarities."""
        known = self.num_known
        if self.sims is None or self.top_k == 1:
            return torch.nn.functional.one_hot(self.selected, known).float()
        top, idx = self.sims.topk(min(self.top_k, known), dim=-1)
        w = torch.zeros_like(self.sims).scatter_(-1, idx, top.clamp(min=1e-6))
        return w / w.sum(-1, keepdim=True)

    def batch_prompts(self, dtype, device) -> torch.Tensor:
        stack = torch.stack([slot()[1] for slot in self.slots[:self.num_known]]).to(device)   # (known, P, D)
        return torch.einsum("bt,tpd->bpd", self.weights().to(device, stack.dtype), stack).to(dtype)


class TaskPrompts(RouterState, Method):
    name = "task_prompts"
    settings_class = TaskPromptsSettings
    settings: TaskPromptsSettings
    uses_task_ids = True

    def __init__(self, **args):
        super().__init__(**args)
        self.pool: TaskPromptPool | None = None
        self.names: list[str] = []          # the per-task adapters (adapter_r > 0)
        self.heads: HeadAdapters | None = None   # their output residuals (adapter_head)

    @property
    def router(self) -> TaskPromptPool | None:
        return self.pool

    def setup(self, model, stream: list[Task]) -> None:
        s = self.settings
        self.pool = attach_prompt_pool(model, self.name, len(stream), s, s.top_k)   # before any adapter
        self.pool.train_route = s.replay_route
        if s.adapter_r:
            refuse_recipe_lora(model, self.name)
            self.names = add_task_adapters(model, self.name, len(stream), self.pool, r=s.adapter_r,
                                           alpha=s.adapter_alpha, dropout=0.0,
                                           target_modules=targets(language=s.adapter_language,
                                                                  vision=s.adapter_vision))
        if s.length:
            install_prompt_hooks(parts(model)["language_model"], self.pool)
        if s.adapter_head:
            self.heads = attach_head_adapters(model, f"{self.name}_head", self.pool, r=s.adapter_r,
                                              alpha=s.adapter_alpha, seed=s.seed)

    def before_task(self, task: Task, model, train_data: list) -> list:
        if self.names:
            if task.index > 0 and self.settings.adapter_init == "previous" and not bool(self.pool.key_ready[task.index]):
                copy_adapter(model, self.names[task.index - 1], self.names[task.index])
                if self.heads is not None:
                    self.heads.copy(task.index - 1, task.index)
            set_trainable_adapter(model, self.names, self.names[task.index])
            if self.heads is not None:
                self.heads.train_only(task.index)
        begin_task_prompt(self.pool, task.index, self.settings.init)
        return train_data

    def loss(self, model, batch: dict, outputs, task: Task):
        return key_term_on_batch(self.pool, batch, task.index, self.settings.key_weight)

    def after_task(self, task: Task, model, train_data: list) -> None:
        self.pool.finish_task(task.index)


def attach_prompt_pool(model, name: str, num_tasks: int, settings: PromptSettings, top_k: int = 1) -> TaskPromptPool:
    """A frozen ``TaskPromptPool`` under ``<model>.continual.<name>`` with the query encoder of the base model
    (taken now, before any adapter is added): prompts initialised at the input embeddings' scale. ``settings``:
    the method's (``length``, ``seed`` and the routing settings)."""
    s = settings
    encoder = query_encoder(model, s.query_cache)
    embed = parts(model)["language_model"].get_input_embeddings().weight
    with whole([embed]):    # ZeRO-3 may have partitioned the model at loading
        dim, std, device = embed.shape[1], float(embed.detach().float().std()), embed.device
    pool = attach(model, name, TaskPromptPool(num_tasks, s.length, dim, std, s.seed, top_k,
                                              key_mode=s.key_mode, keys_per_task=s.keys_per_task))
    pool.to(device).requires_grad_(False)
    pool.encoder = encoder
    return pool


def begin_task_prompt(pool: TaskPromptPool, index: int, init: str) -> None:
    """Task ``index``'s prompt trains from now on, the others frozen; with ``init: previous`` it starts as a
    copy of the previous task's (not when a resumed run had already started it)."""
    if index > 0 and init == "previous" and not bool(pool.key_ready[index]):
        copy_parameters([(pool.slots[index].prompt, pool.slots[index - 1].prompt)])
    pool.train_only(index)


def copy_adapter(model, source: str, target: str) -> None:
    """Adapter ``target`` starts as a copy of adapter ``source`` (``init: previous``: the new task's adapter
    starts from what the previous task learnt, as its prompt does)."""
    src, dst = adapter_params(model, source), adapter_params(model, target)
    copy_parameters([(dst[n.replace(f".{source}.", f".{target}.")], p) for n, p in src.items()])


def copy_parameters(pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]]) -> None:
    """Each ``(new, old)`` pair: ``new`` becomes a copy of ``old``, ZeRO-3-partitioned parameters gathered whole
    for it (written by rank 0 and partitioned again)."""
    with torch.no_grad(), whole([p for pair in pairs for p in pair], modifier_rank=0):
        for new, old in pairs:
            new.copy_(old)


def install_prompt_hooks(language_model, pool: TaskPromptPool) -> None:
    """Prompts in and out around the language model (see the module docstring)."""

    def prepend(module, args, kwargs):
        if pool.encoder.running or not pool.active:
            return args, kwargs
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise ValueError("task_prompts: the language model was called without inputs_embeds")
        P = pool.length
        first = pool.past_length == 0      # the prompts are not in a decoding cache yet: they are prepended
        if first:
            if pool.selected.shape[0] != embeds.shape[0]:
                raise ValueError(f"task_prompts: {pool.selected.shape[0]} routed samples for a batch of {embeds.shape[0]}")
            kwargs["inputs_embeds"] = torch.cat([pool.batch_prompts(embeds.dtype, embeds.device), embeds], dim=1)
            pool.call.notes[(id(pool), "strip")] = P     # for this forward's post-hook, in the call's context
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict):
            # Masks already built for the unprompted sequence (Gemma 3 builds them above its language model):
            # hand the language model the 2-D padding mask instead, extended below, and it builds its own.
            mask = pool.input_mask
            if mask is None:
                mask = torch.ones(embeds.shape[0], pool.past_length + embeds.shape[1], dtype=torch.long,
                                  device=embeds.device)
            kwargs["attention_mask"] = mask
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError("task_prompts needs a 2-D attention mask")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], P), mask], dim=1)
        pos = kwargs.get("position_ids")
        # (B, L), or Qwen's M-RoPE rows computed above the language model: (3, B, L), (4, B, L) in generate
        # (text positions first). Every row is shifted and the prompts take 0..P-1 on every row: the
        # positions Qwen gives P text tokens in front of the sequence (tests/test_qwen25vl.py).
        if pos is not None:
            shifted = pos + P
            if first:
                lead = torch.arange(P, device=pos.device, dtype=pos.dtype).expand(*pos.shape[:-1], P)
                shifted = torch.cat([lead, shifted], dim=-1)
            kwargs["position_ids"] = shifted
        return args, kwargs

    def strip(module, args, output):
        call = pool.call
        P = call.notes.pop((id(pool), "strip"), 0) if call is not None else 0
        if not P:
            return output
        output.last_hidden_state = output.last_hidden_state[:, P:]
        return output

    language_model.register_forward_pre_hook(prepend, with_kwargs=True)
    language_model.register_forward_hook(strip)


class HeadAdapter(torch.nn.Module):
    """One task's output residual: ``h + (alpha / r) · B A h`` on the language model's last hidden state
    ``h``, a LoRA of the vocabulary projection's input (``lm_head(h + ΔW h)``). ``B`` starts at zero, so a
    new one is the base model, and ``A`` as PEFT's (Kaiming-uniform)."""

    def __init__(self, dim: int, r: int, alpha: float, generator: torch.Generator):
        super().__init__()
        bound = 1 / dim ** 0.5
        self.lora_A = torch.nn.Parameter(torch.empty(r, dim).uniform_(-bound, bound, generator=generator))
        self.lora_B = torch.nn.Parameter(torch.zeros(dim, r))
        self.scale = alpha / r

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The residual for ``hidden`` (..., D), in its dtype."""
        A, B = self.lora_A, self.lora_B
        return ((hidden.to(A.dtype) @ A.t()) @ B.t() * self.scale).to(hidden.dtype)


class HeadAdapters(torch.nn.Module):
    """A ``HeadAdapter`` per task of the stream; each sample gets its routed task's (``pool.selected``)."""

    def __init__(self, num_tasks: int, dim: int, r: int, alpha: float, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed + 1)     # not the prompts' stream
        self.tasks = torch.nn.ModuleList([HeadAdapter(dim, r, alpha, g) for _ in range(num_tasks)])

    def train_only(self, index: int) -> None:
        self.requires_grad_(False)
        self.tasks[index].requires_grad_(True)

    def copy(self, source: int, target: int) -> None:
        copy_parameters(list(zip(self.tasks[target].parameters(), self.tasks[source].parameters())))

    def residual(self, hidden: torch.Tensor, selected: torch.Tensor, known: int) -> torch.Tensor:
        """``hidden`` (B, L, D) plus each sample's task's residual. Every known task's adapter is called, with
        the rows routed to it (none: an empty batch), so every process of a ZeRO-3 run gathers the same
        parameters in the same order; a loop over tasks, not samples."""
        if selected.shape[0] != hidden.shape[0]:
            raise ValueError(f"task_prompts: {selected.shape[0]} routed samples for a batch of {hidden.shape[0]}")
        selected = selected.to(hidden.device)
        out = hidden
        for t in range(known):
            rows = (selected == t).nonzero().flatten()
            out = out.index_add(0, rows, self.tasks[t](hidden.index_select(0, rows)))
        return out


def attach_head_adapters(model, name: str, pool: TaskPromptPool, *, r: int, alpha: float, seed: int) -> HeadAdapters:
    """Frozen ``HeadAdapters`` under ``<model>.continual.<name>``, and the forward hook on the language model
    that adds each sample's routed residual to its last hidden state (after the prompts' positions are
    dropped: the hook is registered after theirs). The query encoder's runs and a model with no task known
    yet see the base model."""
    heads = attach(model, name, HeadAdapters(len(pool.slots), pool.dim, r, alpha, seed))   # dim: the embeddings'
    heads.to(pool.known.device).requires_grad_(False)
    lm = parts(model)["language_model"]

    def add_residual(module, args, output):
        if pool.encoder.running or not pool.needs_route:
            return output
        if pool.selected is None:
            raise ValueError("task_prompts: the language model ran with no routing choice; generate with "
                             "lvlm_cl.models.continual.generate(model, ...) or inside "
                             "lvlm_cl.models.continual.held(...)")
        output.last_hidden_state = heads.residual(output.last_hidden_state, pool.selected, pool.num_known)
        return output

    lm.register_forward_hook(add_residual)
    return heads
