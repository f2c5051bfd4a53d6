"""Task keys matched against a frozen text feature of the instruction: how ``task_prompts`` and
``task_lora`` pick a task at inference, with no task label (LVLM-CL, seed 003; ModalPrompt).

The query of a sample is its instruction's text feature (``methods.queries``: the frozen
``InstructionEncoder``).

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

import typing
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from lvlm_cl.data.dataset import TASK_IDS
from lvlm_cl.distributed import gather_objects, whole
from lvlm_cl.methods.queries import InstructionEncoder, query_cache_setting
from lvlm_cl.models.continual import Selector, selectors
from lvlm_cl.settings import Settings, setting


def routers(model: torch.nn.Module) -> list["TaskKeyRouter"]:
    return [s for s in selectors(model) if isinstance(s, TaskKeyRouter)]


KeyMode = Literal["prototypes", "learned"]
KEY_MODES = typing.get_args(KeyMode)


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

    routes_tasks = True
    # In training (the batch's task ids given): each sample through its own task's slot ("own"), or every
    # sample through the task in training's, the last known one ("current"; task_prompts' replay_route).
    train_route: str = "own"

    def __init__(self, num_tasks: int, dim: int, prompts: list[torch.Tensor] | None = None, *,
                 key_mode: str = "prototypes", keys_per_task: int = 8, seed: int = 0):
        super().__init__()
        if key_mode not in KEY_MODES:
            raise ValueError(f"key_mode must be one of {list(KEY_MODES)}, got {key_mode!r}")
        self.key_mode, self.seed, self.dim = key_mode, seed, dim
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
            if self.train_route == "current":      # replayed records too run through the task in training's slot
                return TaskChoice(torch.full_like(task_ids, known - 1).long(), None, counts)
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
