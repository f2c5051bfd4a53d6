"""Task keys matched against a frozen text feature of the instruction: how ``task_prompts`` and
``task_lora`` pick a task at inference, with no task label (LVLM-CL, seed 003; ModalPrompt).

The query of a sample is a text feature of its instruction: the base language model's final hidden states
(after the last norm), mean-pooled over the instruction's text tokens. "Instruction" is every text token
the model sees before the answer (system and user turns and the generation prompt; image tokens and
padding left out), so a training sample and the same sample at inference give the same query. The encoder
is frozen, so a query depends only on the instruction's tokens and is cached by them.

"Base" means the weights the run started from:
- the language model is frozen (only prompts, the projector or the vision tower train): it is used as it is;
- it carries LoRA adapters and nothing else of it trains: it runs with the adapters disabled
  (``adapters_disabled``), so no copy is needed on a 7B model;
- it trains in full: a frozen copy is taken at ``setup`` (one language model more in memory).

Routing picks, for each sample, the known task whose keys have the highest cosine similarity to the query
(``TaskKeyRouter``: k-means prototypes of each task's queries, or one learned key per task).
The modules that route (keys, prompts, adapters' routers) are attached to the model under
``<model>.continual.<method>``, so they are saved with every task checkpoint and restored with it.

When the choice is made: once per call, from that call's own inputs, and held explicitly for it
(``held``): per ``generate`` call from the prompt (``generate(model, **inputs)``: no task label, no
training code), per training forward from the batch's task ids. Nothing depends on the arguments
transformers passes to the forward inside ``generate`` (transformers 5.24 renamed the cache argument), and
nothing of a call is left on the model after it (``Selector``).
"""

from __future__ import annotations

import copy
import typing
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from lvlm_cl.data.dataset import TASK_IDS
from lvlm_cl.data.encoding import IGNORE_INDEX
from lvlm_cl.distributed import gather_objects, whole
from lvlm_cl.errors import ConfigError
from lvlm_cl.models.continual import CONTINUAL, Selector, adapters_disabled, unwrap
from lvlm_cl.settings import Settings, setting

# The instruction features cached in host memory (besides a method's query_cache count): at 7B's width (4096
# float32 values, 16 KiB a feature) 16k instructions; the cache stops growing there, and the rest are computed.
QUERY_CACHE_BYTES = 256 * 2 ** 20


def routers(model: torch.nn.Module) -> list["TaskKeyRouter"]:
    base = unwrap(model)
    holder = getattr(base, CONTINUAL, None)
    return [m for m in holder.values() if isinstance(m, TaskKeyRouter)] if holder is not None else []


class InstructionEncoder:
    """The frozen query encoder (see the module docstring). Not a module of the model: it is not saved,
    it is the base model's own language model (or a frozen copy of it)."""

    def __init__(self, language_model: torch.nn.Module, image_token_id: int,
                 pad_token_id: int, cache_size: int = 100_000):
        trains_in_full = any(p.requires_grad for n, p in language_model.named_parameters() if "lora_" not in n)
        if trains_in_full and any(hasattr(p, "ds_id") for p in language_model.parameters()):
            raise ConfigError("task routing under DeepSpeed ZeRO-3 with the language model trained in full: the "
                              "instruction queries need a frozen whole copy of the language model on every process, "
                              "which ZeRO-3 partitions. Train the language model with LoRA (model.lora, "
                              "model.freeze_language_model: true) or use ZeRO-2 (recipes/accelerate/zero2.yaml).")
        self.lm = copy.deepcopy(language_model).eval().requires_grad_(False) if trains_in_full else language_model
        self.image_token_id, self.pad_token_id = image_token_id, pad_token_id
        self.cache_size = cache_size
        self.cache: dict[bytes, torch.Tensor] = {}
        self.cache_bytes = 0           # held by the cache's keys and features; at most QUERY_CACHE_BYTES
        self.running = False           # hooks on the language model stand aside while it computes queries

    @staticmethod
    def instruction_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                           labels: torch.Tensor | None, image_token_id: int) -> list[torch.Tensor]:
        """Per sample (on the CPU): the text tokens before the first answer token (labels != -100), without
        image tokens and padding. The mask is computed on the batch's device and copied once (one
        synchronisation per batch, not one per sample)."""
        keep = input_ids != image_token_id
        if attention_mask is not None:
            keep &= attention_mask.bool()
        if labels is not None:
            answer = labels != IGNORE_INDEX
            first = torch.where(answer.any(-1), answer.int().argmax(-1), answer.shape[-1])        # (B,)
            keep &= torch.arange(answer.shape[-1], device=answer.device) < first.unsqueeze(-1)
        ids, keep = input_ids.cpu(), keep.cpu()
        return [row[k] for row, k in zip(ids, keep)]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D) float32 queries on ``input_ids``' device."""
        return self.encode(self.instruction_tokens(input_ids, attention_mask, labels, self.image_token_id),
                           input_ids.device)

    @torch.no_grad()
    def encode(self, seqs: list[torch.Tensor], device) -> torch.Tensor | None:
        """(B, D) float32 queries of instructions given as token sequences (``instruction_tokens``), on
        ``device``; None for no sequence.

        Under DeepSpeed ZeRO-3 the language model's forward is a collective (every process gathers each
        layer's parameters together), so every call runs exactly one forward on every process, a dummy one
        when all of this process's queries are cached: what one process has cached must not change what the
        others wait for. Callers call it once per step on every process, with or without sequences."""
        keys = [s.cpu().numpy().tobytes() for s in seqs]
        todo = {}
        for k, s in zip(keys, seqs):
            if k not in self.cache and k not in todo:
                if s.numel() == 0:
                    raise ValueError("task routing: a sample has no instruction text (only images or answer)")
                todo[k] = s
        fresh = {}
        if todo or self.forward_is_collective():
            fresh = dict(zip(todo, self._encode(list(todo.values()))))
        for k, v in fresh.items():
            size = len(k) + v.nbytes
            if len(self.cache) < self.cache_size and self.cache_bytes + size <= QUERY_CACHE_BYTES:
                self.cache[k] = v
                self.cache_bytes += size
        if not keys:
            return None
        return torch.stack([self.cache[k] if k in self.cache else fresh[k] for k in keys]).to(device)

    def forward_is_collective(self) -> bool:
        """Whether the encoder's forward gathers its parameters from every process: they are partitioned by
        DeepSpeed ZeRO-3 and not gathered whole at the moment (between tasks, a caller gathers them with
        ``distributed.whole``, and the forward is local)."""
        partitioned = [p for p in self.lm.parameters() if hasattr(p, "ds_id")]
        if not partitioned:
            return False
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        # Any of them: small ones (norms; below ZeRO-3's persistence threshold) stay whole all along.
        return any(p.ds_status != ZeroParamStatus.AVAILABLE for p in partitioned)

    def _encode(self, seqs: list[torch.Tensor]) -> list[torch.Tensor]:
        from lvlm_cl.data.encoding import Encoded, collate_prompts

        device = next(self.lm.parameters()).device
        dummy = not seqs
        if dummy:
            seqs = [torch.tensor([self.pad_token_id])]
        batch = collate_prompts([Encoded(s.cpu(), torch.empty(0, dtype=torch.long), None) for s in seqs],
                                self.pad_token_id)
        ids = batch["input_ids"].to(device, non_blocking=True)
        mask = batch["attention_mask"].to(device, non_blocking=True)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        was_training = self.lm.training
        self.running = True
        try:
            self.lm.eval()
            with adapters_disabled(self.lm):
                hidden = self.lm(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state.float()
        finally:
            self.running = False
            self.lm.train(was_training)
        if dummy:
            return []
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1)
        return list(pooled.cpu())


def query_encoder(model: torch.nn.Module, cache_size: int = 100_000) -> InstructionEncoder:
    """The model's one query encoder, shared by every routing method of a run (built on first use, which
    must be before any training: a frozen copy, when one is needed, is of the base weights)."""
    from lvlm_cl.models import parts

    base = unwrap(model)
    encoder = getattr(base, "_cl_query_encoder", None)
    if encoder is None:
        cfg = base.config
        pad = getattr(cfg, "pad_token_id", None)
        if pad is None:
            pad = getattr(cfg.get_text_config(), "pad_token_id", None)
        encoder = InstructionEncoder(parts(model)["language_model"], cfg.image_token_id, 0 if pad is None else int(pad),
                                     cache_size)
        object.__setattr__(base, "_cl_query_encoder", encoder)   # not a submodule: never saved, never moved
    return encoder


KeyMode = Literal["prototypes", "learned"]
KEY_MODES = typing.get_args(KeyMode)


def query_cache_setting() -> Any:
    """The ``query_cache`` field of a method that encodes instructions (``query_encoder``)."""
    return setting(100_000, low=1, help="instruction features kept in host memory (and at most 256 MiB of them, "
                                        "routing.QUERY_CACHE_BYTES: 16k features at a 7B model's width); the cache "
                                        "stops growing there")


@dataclass(frozen=True)
class RoutingSettings(Settings):
    """The settings every method that routes by task keys has (task_prompts, task_lora, dual_modality): their
    settings classes derive from this one."""

    key_mode: KeyMode = setting("prototypes", help="prototypes (k-means of the task's queries) or learned (L2P "
                                                   "surrogate loss)")
    keys_per_task: int = setting(8, low=1, help="prototypes per task")
    key_weight: float = setting(1.0, low=0, help="weight of the surrogate loss (learned keys)")
    query_cache: int = query_cache_setting()


@dataclass(frozen=True)
class TaskChoice:
    """A ``TaskKeyRouter``'s choice for one call: each sample's task (None before any task is known), the
    routing similarities (None when the tasks were given) and the image tokens per sample."""

    selected: torch.Tensor | None
    sims: torch.Tensor | None
    image_counts: torch.Tensor | None


class TaskSlot(torch.nn.Module):
    """One task's routed parameters: its keys, and optionally a prompt. They are read by calling the
    module, which returns copies: DeepSpeed ZeRO-3 gathers a module's parameters while it runs, and only
    then. ``keys`` is (K, D): K prototypes, or K = 1 learned key."""

    def __init__(self, dim: int, num_keys: int, prompt: torch.Tensor | None = None):
        super().__init__()
        self.keys = torch.nn.Parameter(torch.zeros(num_keys, dim))
        if prompt is not None:
            self.prompt = torch.nn.Parameter(prompt)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        prompt = getattr(self, "prompt", None)
        return self.keys * 1, (prompt * 1 if prompt is not None else None)


class TaskKeyRouter(Selector, torch.nn.Module):
    """One slot (keys, and whatever a subclass routes) per task of the stream; ``known`` tasks (trained or
    in training) take part in routing. ``encoder`` is set by the owning method.

    Keys, two ways (``key_mode``):
    - ``prototypes`` (default): at the end of a task its training instructions' queries are clustered
      (k-means, ``keys_per_task`` centroids); a query's similarity to a task is its highest cosine to the
      task's centroids. A task whose instructions come in several phrasings gets a key per phrasing.
    - ``learned`` (L2P's surrogate loss): one key per task, set to the mean query direction at the task's
      first step, then pulled towards its queries by ``key_weight · mean(1 − cos(q, k))``.
    """

    def __init__(self, num_tasks: int, dim: int, prompts: list[torch.Tensor] | None = None, *,
                 key_mode: str = "prototypes", keys_per_task: int = 8, seed: int = 0):
        super().__init__()
        if key_mode not in KEY_MODES:
            raise ValueError(f"key_mode must be one of {list(KEY_MODES)}, got {key_mode!r}")
        self.key_mode, self.seed = key_mode, seed
        self.num_keys = k = keys_per_task if key_mode == "prototypes" else 1
        self.slots = torch.nn.ModuleList([TaskSlot(dim, k, prompts[i] if prompts else None) for i in range(num_tasks)])
        self.register_buffer("known", torch.zeros((), dtype=torch.long))
        self.register_buffer("key_ready", torch.zeros(num_tasks, dtype=torch.bool))
        self.encoder: InstructionEncoder | None = None
        # The choice held while the model runs (``Selector``; None otherwise):
        self._seen: dict[bytes, torch.Tensor] = {}     # this task's training queries, by instruction

    @property
    def num_known(self) -> int:
        return int(self.known)

    def train_only(self, index: int) -> None:
        """Slot ``index`` trains (its prompt; its key only when learned), every other slot is frozen;
        ``index`` becomes known."""
        self.requires_grad_(False)
        self.slots[index].requires_grad_(True)
        if self.key_mode == "prototypes":
            self.slots[index].keys.requires_grad_(False)
        self.known.fill_(max(self.num_known, index + 1))
        self._seen = {}

    def similarities(self, query: torch.Tensor) -> torch.Tensor:
        """(B, known) similarity of each query to each known task: the highest cosine to its keys (-2 for a
        task whose keys are not fitted yet)."""
        out = []
        for t, slot in enumerate(self.slots[:self.num_known]):
            keys = slot()[0].to(query.device, query.dtype)                                  # (K, D)
            sims = F.cosine_similarity(query.unsqueeze(1), keys.unsqueeze(0), dim=-1).amax(-1)
            out.append(sims if bool(self.key_ready[t]) else torch.full_like(sims, -2.0))
        return torch.stack(out, dim=-1)

    @property
    def needs_route(self) -> bool:
        return self.num_known > 0

    def choose(self, task_ids: torch.Tensor | None, input_ids: torch.Tensor | None, attention_mask,
               labels: torch.Tensor | None = None) -> TaskChoice:
        """The choice for the batch about to run (``Selector``): each sample's task (None before any task is
        known) from ``task_ids`` or by routing the instructions, with the similarities when routed."""
        counts = None if input_ids is None else (input_ids == self.encoder.image_token_id).sum(-1)
        known = self.num_known
        if known == 0:
            return TaskChoice(None, None, counts)
        if task_ids is not None:
            if int(task_ids.max()) >= known:
                raise ValueError(f"a training sample of task {int(task_ids.max())}, but only {known} tasks are known")
            return TaskChoice(task_ids.long(), None, counts)
        if input_ids is None:
            raise ValueError("task routing needs input_ids; inputs_embeds alone cannot be routed")
        selected, sims = self.route(input_ids, attention_mask, labels)
        return TaskChoice(selected, sims, counts)

    # The call's choice, read back from its context (None outside ``held``)

    @property
    def selected(self) -> torch.Tensor | None:
        """Each sample's task."""
        choice = self.choice
        return None if choice is None else choice.selected

    @property
    def sims(self) -> torch.Tensor | None:
        """The routing similarities (None when the tasks were given)."""
        choice = self.choice
        return None if choice is None else choice.sims

    @property
    def image_counts(self) -> torch.Tensor | None:
        """Image tokens per sample (to map images to samples)."""
        choice = self.choice
        return None if choice is None else choice.image_counts

    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(best task per sample (B,), similarities (B, known)) for a batch of prompts."""
        if self.num_known == 0:
            raise ValueError("task routing: no task has been trained yet")
        sims = self.similarities(self.encoder(input_ids, attention_mask, labels))
        return sims.argmax(-1), sims

    # Learned keys

    def key_loss(self, query: torch.Tensor | None, task_index: int) -> torch.Tensor | None:
        """``learned``: 1 - cos(query, key of the task), averaged (None without queries). At the task's first
        step the key is set to the mean query direction (process 0's, under ZeRO-3), so it starts where the
        loss would take it; every process must call this at that step."""
        slot = self.slots[task_index]
        if not bool(self.key_ready[task_index]):
            with torch.no_grad(), whole([slot.keys], modifier_rank=0):
                if query is not None:
                    mean = F.normalize(F.normalize(query.float(), dim=-1).mean(0), dim=0)
                    slot.keys.copy_(mean.to(slot.keys.dtype).unsqueeze(0))
            self.key_ready[task_index] = True
        if query is None:
            return None
        key = slot()[0][0]
        return (1 - F.cosine_similarity(query, key.unsqueeze(0).to(query.dtype), dim=-1)).mean()

    # Prototype keys

    def observe(self, query: torch.Tensor | None, instructions: list[torch.Tensor]) -> None:
        """``prototypes``: remember this task's training queries (one per distinct instruction)."""
        if query is None:
            return
        for q, tokens in zip(query.detach().float().cpu(), instructions):
            self._seen.setdefault(tokens.cpu().numpy().tobytes(), q)

    def seen_queries(self) -> dict[bytes, torch.Tensor]:
        """This task's training queries so far, one per distinct instruction (what ``fit`` clusters at the
        task's end; per process, and part of a step checkpoint's method state)."""
        return self._seen

    def restore_seen(self, seen: dict[bytes, torch.Tensor]) -> None:
        self._seen = dict(seen)

    def finish_task(self, task_index: int) -> None:
        """At the end of a task: prototype keys are fitted now (learned keys trained with the task)."""
        if self.key_mode == "prototypes":
            self.fit(task_index)

    def fit(self, task_index: int) -> None:
        """``prototypes``: the task's keys = k-means centroids of the queries seen in its training, over
        every process (gathered first). Every process must call this."""
        import numpy as np
        from sklearn.cluster import KMeans
        from sklearn.exceptions import ConvergenceWarning

        seen = {}
        for part in gather_objects(dict(self._seen)):
            for key, q in part.items():
                seen.setdefault(key, q)
        if not seen:
            raise RuntimeError(f"task routing: no training query of task {task_index} was seen, so it has no keys")
        ordered = [seen[k] for k in sorted(seen)]                    # the same order on every process
        x = F.normalize(torch.stack(ordered), dim=-1).numpy().astype(np.float64)
        slot = self.slots[task_index]
        k = self.num_keys                 # not slot.keys.shape: ZeRO-3 partitions it
        if len(x) <= k:
            centroids = np.concatenate([x, x[:1].repeat(k - len(x), 0)]) if len(x) < k else x
        else:
            with warnings.catch_warnings():   # fewer distinct queries than k: some centroids coincide, harmless
                warnings.simplefilter("ignore", ConvergenceWarning)
                centroids = KMeans(n_clusters=k, n_init=4, random_state=self.seed).fit(x).cluster_centers_
        with torch.no_grad(), whole([slot.keys], modifier_rank=0):
            slot.keys.copy_(torch.as_tensor(centroids, dtype=slot.keys.dtype))
        self.key_ready[task_index] = True
        self._seen = {}


class RouterState:
    """``state_dict`` / ``load_state_dict`` for a method whose ``TaskKeyRouter`` is ``self.router``: the keys
    and prompts live in the model (saved with its parameters); what is left is the training queries of the
    task in training seen so far, which prototype keys are fitted from at its end (non-empty only in a step
    checkpoint taken inside the task, one per process)."""

    router: "TaskKeyRouter | None"

    def state_dict(self) -> dict:
        return {"seen": dict(self.router.seen_queries())} if self.router is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.router is not None:
            self.router.restore_seen(state.get("seen", {}))


def key_term_on_batch(router: TaskKeyRouter, batch: dict, task_index: int, weight: float) -> torch.Tensor | None:
    """On the batch's samples of the task in training (replayed samples excluded): the learned keys' loss
    times ``weight`` (None when 0), or, for prototype keys, their queries remembered for ``fit`` (no loss).
    Every process calls the encoder once, whatever its batch holds (see ``InstructionEncoder.encode``)."""
    ids = batch.get(TASK_IDS)
    own = ids == task_index if ids is not None else torch.ones(batch["input_ids"].shape[0], dtype=torch.bool)
    own = own.to(batch["input_ids"].device)
    tokens = InstructionEncoder.instruction_tokens(batch["input_ids"][own], batch["attention_mask"][own],
                                                   batch["labels"][own], router.encoder.image_token_id)
    query = router.encoder.encode(tokens, batch["input_ids"].device)
    if router.key_mode == "learned":
        term = router.key_loss(query, task_index)
        return None if term is None or weight == 0 else weight * term
    router.observe(query, tokens)
    return None
