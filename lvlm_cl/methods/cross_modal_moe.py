"""Cross-modal MoE: a mixture-of-experts adapter where the image enters the language model, a CLIP-style
alignment of image and instruction, and a relation-preservation regulariser (Chee, Hsu & Lee, "Multi-Modal
Continual Learning via Cross-Modality Adapters and Representation Alignment with Knowledge Preservation",
arXiv 2511.06723, 2025; seed 001).

Adapted to instruction tuning of a LLaVA-style model (vision tower -> projector -> language model):

- **The adapter** sits beside the projector (a forward hook on it): for every image token x (the vision
  feature the projector maps),

      out = projector(x) + sum_e g_e(x, q) * up_e(gelu(down_e x)),   g_e = sigmoid(norm(x) w_e + norm(q) v_e + b_e)

  where q is the sample's instruction feature (``routing.query_encoder``: the frozen base language model's
  mean-pooled hidden states of the instruction): the router is cross-modal, it reads the image token and
  the instruction. Every expert's up-projection starts at zero, so the first task starts from the base
  model. The gates are independent sigmoids (DeepSeek-V3's affinities) rather than a softmax, so that adding
  a task's zero-initialised experts changes nothing: a softmax would take gate mass from earlier experts on
  earlier tasks' inputs the moment the new ones join.
- **Experts across tasks**: each task adds its own ``experts_per_task`` experts (and their router columns);
  earlier tasks' experts are frozen, not removed: every known expert stays in the mixture, so a later task
  can reuse them and the router picks, per image token, from the image and the instruction, with no task
  label (``generate``, evaluation and chat route by themselves). Why not the paper's shared pool with its
  most-used experts frozen after each task: here the stream's length is known, a task's own experts give
  the same protection (a frozen expert cannot be overwritten) without a usage threshold, and what is left
  to drift is the router's choice on earlier tasks' inputs, which the relation term below watches.
- **Alignment** (``align_weight``): each sample's image representation (the adapted projector output
  mean-pooled over its image tokens) and its instruction feature q go through two linear heads into a joint
  space, and a symmetric InfoNCE over the batch (cosine / ``temperature``, CLIP) pulls matching pairs
  together. Samples with the same instruction are positives of each other (instruction-tuning batches
  repeat a task's few phrasings; counting them as negatives would push apart pairs that match).
- **Relation preservation** (``relation_weight``): ``anchors_per_task`` samples of each finished task are
  kept as the tensors the model saw (pixel values and instruction tokens: hooks get no processor to encode
  records again, and a few preprocessed images per task are small). When a task ends, the pairwise cosine
  similarities of every anchor's representation are recorded (the new task's rows now; earlier rows stay as
  they were recorded when their task ended). During later tasks the anchors' current representations are
  computed each micro-step (vision tower, projector and adapter only, with gradients) and
  ``relation_weight * mean_{i != j} (cos_now(i, j) - cos_ref(i, j))^2`` is added: the geometry of earlier
  tasks' image representations may rotate or scale, but not change its structure.

    methods:
      - {name: cross_modal_moe, experts_per_task: 2, bottleneck: 16, align_weight: 0.1, relation_weight: 1.0}
      - {name: replay, memory_fraction: 0.05, selection: task_balanced, replay_ratio: 0.2}

Left out: top-k sparsity (every known expert is evaluated, with its gate: the experts are small bottlenecks,
and a top-k cut would let a new task's experts push earlier ones out of the k on earlier tasks' inputs);
the paper's separate pre-trained encoder per modality with adapters in every layer of both (here
the LLaVA model is the encoder of both modalities and the adapter sits at the one place they meet), its
classification head and logit distillation (the language-modelling loss replaces both; ``lwf`` composes
for distillation). The adapter supports projectors that map each vision token to one language-model token
(LLaVA); a projector that pools tokens (Gemma 3) is refused at its first forward.

DeepSpeed: ZeRO-2 as it is; ZeRO-3 with the language model frozen or under LoRA (the instruction encoder
needs it whole and frozen, as for ``task_prompts``). The experts are read by calling their modules (ZeRO-3
gathers them then), the anchors' pass inside a task goes through the engine's module hooks, and the pass
when a task ends gathers the image pathway whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lvlm_cl.data.dataset import TASK_IDS
from lvlm_cl.distributed import gather_objects, whole
from lvlm_cl.methods.base import Method, Task
from lvlm_cl.methods.queries import InstructionEncoder, query_cache_setting, query_encoder
from lvlm_cl.models import parts
from lvlm_cl.models.continual import Selector, attach, unwrap
from lvlm_cl.settings import Settings, seed_setting, setting


class ExpertGroup(torch.nn.Module):
    """One task's experts (bottleneck MLPs, stacked) and their columns of the cross-modal router. Read by
    calling it (ZeRO-3 gathers a module's parameters while it runs): returns the router logits, the experts'
    hidden activations and a copy of the up-projections."""

    def __init__(self, d_in: int, d_out: int, d_query: int, experts: int, bottleneck: int, generator):
        super().__init__()
        bound = 1 / math.sqrt(d_in)
        self.down = torch.nn.Parameter((torch.rand(experts, d_in, bottleneck, generator=generator) * 2 - 1) * bound)
        self.up = torch.nn.Parameter(torch.zeros(experts, bottleneck, d_out))        # zero: starts as the base
        self.route_image = torch.nn.Parameter(torch.zeros(d_in, experts))
        self.route_text = torch.nn.Parameter(torch.zeros(d_query, experts))
        self.route_bias = torch.nn.Parameter(torch.zeros(experts))

    def forward(self, x: torch.Tensor, q: torch.Tensor):
        x, q = x.to(self.down.dtype), q.to(self.down.dtype)
        logits = F.normalize(x, dim=-1) @ self.route_image + (F.normalize(q, dim=-1) @ self.route_text)[:, None] \
            + self.route_bias                                                       # (N, T, E)
        hidden = F.gelu(torch.einsum("ntd,edb->nteb", x, self.down))               # (N, T, E, b)
        return logits, hidden, self.up * 1


@dataclass(frozen=True)
class QueryChoice:
    """``CrossModalAdapter``'s choice for one call: the instructions' queries and the image tokens per sample."""

    queries: torch.Tensor
    image_counts: torch.Tensor


class CrossModalAdapter(Selector, torch.nn.Module):
    """The experts of every task of the stream, the alignment heads, and the count of known tasks (the
    groups in the mixture). It is also a ``continual.Selector``: while the model runs, it holds the queries of
    the batch's instructions (``choose``), which route its images."""

    def __init__(self, num_tasks: int, d_in: int, d_out: int, d_query: int, *, experts: int, bottleneck: int,
                 align_dim: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.groups = torch.nn.ModuleList([ExpertGroup(d_in, d_out, d_query, experts, bottleneck, g)
                                           for _ in range(num_tasks)])
        self.image_head = torch.nn.Linear(d_out, align_dim, bias=False)
        self.text_head = torch.nn.Linear(d_query, align_dim, bias=False)
        for head in (self.image_head, self.text_head):
            torch.nn.init.normal_(head.weight, std=1 / math.sqrt(head.in_features), generator=g)
        self.register_buffer("known", torch.zeros((), dtype=torch.long))
        self.encoder: InstructionEncoder | None = None
        # The call's choice (the batch's queries and image tokens per sample) lives in its routing context
        # (``Selector.choice``), not here. Kept here: queries given directly while ``represent`` encodes anchor
        # images without a batch (set and cleared around that one call), and what a training forward leaves
        # for the same step's loss (``loss`` takes it and clears it).
        self.image_queries: torch.Tensor | None = None
        self.batch_repr: tuple[torch.Tensor, torch.Tensor] | None = None   # (pooled images, their queries)
        self.tokens_per_image: int | None = None          # seen at the projector's last call

    @property
    def needs_route(self) -> bool:
        return int(self.known) > 0

    def choose(self, task_ids, input_ids: torch.Tensor | None, attention_mask, labels=None) -> QueryChoice | None:
        """The instructions' queries (they end where the ``labels``' answers start) and the image tokens per
        sample; the gates route by them, not by the task ids. None before the first task."""
        if input_ids is None or int(self.known) == 0:     # nothing to route before the first task
            return None
        return QueryChoice(self.encoder(input_ids, attention_mask, labels),
                           (input_ids == self.encoder.image_token_id).sum(-1))

    @property
    def queries(self) -> torch.Tensor | None:
        """(B, D) per sample of the call's batch (None outside ``held``)."""
        choice = self.choice
        return None if choice is None else choice.queries

    @property
    def image_counts(self) -> torch.Tensor | None:
        choice = self.choice
        return None if choice is None else choice.image_counts

    def queries_per_image(self, n_images: int, tokens: int) -> torch.Tensor:
        if self.image_queries is not None:
            return self.image_queries
        if self.queries is None:
            raise ValueError("cross_modal_moe: images were encoded without input_ids to route them by; call the "
                             "model (or generate) with input_ids")
        per_sample = torch.div(self.image_counts, tokens, rounding_mode="floor").to(self.queries.device)
        if int(per_sample.sum()) != n_images:
            raise ValueError(f"cross_modal_moe: {int(self.image_counts.sum())} image tokens in the batch for "
                             f"{n_images} images of {tokens} tokens")
        return self.queries.repeat_interleave(per_sample, dim=0)

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The mixture's output (N, T, d_out) for vision features x (N, T, d_in) and queries q (N, D)."""
        outs = [group(x, q) for group in self.groups[:int(self.known)]]
        logits = torch.cat([o[0] for o in outs], dim=-1)                            # (N, T, E_known)
        hidden = torch.cat([o[1] for o in outs], dim=-2)                            # (N, T, E_known, b)
        up = torch.cat([o[2] for o in outs], dim=0)                                 # (E_known, b, d_out)
        gates = torch.sigmoid(logits)
        mixed = (gates.to(hidden.dtype).unsqueeze(-1) * hidden).flatten(-2)         # (N, T, E_known * b)
        return mixed @ up.flatten(0, 1)


@dataclass(frozen=True)
class CrossModalMoESettings(Settings):
    experts_per_task: int = setting(2, low=1, help="experts each task adds")
    bottleneck: int = setting(16, low=1, help="hidden width of an expert")
    align_weight: float = setting(0.1, low=0, help="weight of the image-instruction InfoNCE (0 turns it off)")
    align_dim: int = setting(64, low=1, help="width of the alignment heads' joint space")
    temperature: float = setting(0.1, above=0, help="InfoNCE temperature")
    relation_weight: float = setting(1.0, low=0, help="weight of the relation-preservation term (0 turns it off)")
    anchors_per_task: int = setting(16, low=2, help="samples of each finished task whose relations are kept")
    query_cache: int = query_cache_setting()
    seed: int = seed_setting("initialisation of experts and heads")


class CrossModalMoE(Method):
    name = "cross_modal_moe"
    settings_class = CrossModalMoESettings
    settings: CrossModalMoESettings
    uses_task_ids = True           # anchors are taken from the task's own samples, not replayed ones

    def __init__(self, **args):
        super().__init__(**args)
        self.adapter: CrossModalAdapter | None = None
        self.anchors: list[dict] = []                 # finished tasks' anchors: pixel_values, tokens, task
        self.reference: torch.Tensor | None = None    # (A, A) cosine similarities as recorded at task ends
        self.pending: list[dict] = []                 # the task in training's anchors collected so far

    # Setup and the adapter's hooks

    def setup(self, model, stream: list[Task]) -> None:
        s = self.settings
        encoder = query_encoder(model, s.query_cache)
        cfg = unwrap(model).config
        layers = getattr(cfg, "vision_feature_layer", -1)     # LLaVA's projector reads one or several layers
        d_in = cfg.vision_config.hidden_size * (1 if isinstance(layers, int) else len(layers))
        d_out = cfg.get_text_config().hidden_size
        projector = parts(model)["projector"]
        self.adapter = attach(model, self.name, CrossModalAdapter(
            len(stream), d_in, d_out, d_out, experts=s.experts_per_task, bottleneck=s.bottleneck,
            align_dim=s.align_dim, seed=s.seed))
        device = next(projector.parameters()).device
        self.adapter.to(device).requires_grad_(False)
        self.adapter.encoder = encoder
        _install_hooks(model, projector, self.adapter)

    def before_task(self, task: Task, model, train_data: list) -> list:
        adapter = self.adapter
        adapter.known.fill_(max(int(adapter.known), task.index + 1))
        adapter.requires_grad_(False)
        adapter.groups[task.index].requires_grad_(True)
        adapter.image_head.requires_grad_(True)
        adapter.text_head.requires_grad_(True)
        return train_data

    # The terms

    def loss(self, model, batch: dict, outputs, task: Task):
        s, adapter = self.settings, self.adapter
        term = None
        if adapter.batch_repr is not None:
            pooled, queries = adapter.batch_repr
            adapter.batch_repr = None
            if s.align_weight and pooled.shape[0] > 1:
                same = (queries[:, None] == queries[None]).all(-1)
                term = s.align_weight * alignment_loss(adapter.image_head(pooled.float()),
                                                       adapter.text_head(queries.float()), same, s.temperature)
        self._collect(model, batch, task)
        if self.reference is not None and s.relation_weight:
            rel = s.relation_weight * relation_loss(self.represent(model, self.anchors), self.reference)
            term = rel if term is None else term + rel
        return term

    def after_task(self, task: Task, model, train_data: list) -> None:
        new = _gather_first(self.pending, self.settings.anchors_per_task)
        self.pending = []
        if len(new) < 2:
            return
        self.anchors += new
        modes = [(m, m.training) for m in model.modules()]
        # Between tasks no DeepSpeed engine gathers ZeRO-3's partitioned parameters module by module: the image
        # pathway and the query encoder are gathered whole for this pass (collectively: every process runs
        # after_task).
        pathway = [p for name in ("vision_tower", "projector") for p in parts(model)[name].parameters()]
        pathway += list(self.adapter.encoder.lm.parameters())
        try:
            model.eval()
            with torch.no_grad(), whole(pathway + list(self.adapter.parameters())):
                reps = self.represent(model, self.anchors).float()
        finally:
            for m, training in modes:
                m.training = training
        now = cosine_matrix(reps).cpu()
        if self.reference is not None:              # earlier tasks' relations stay as they were recorded
            old = self.reference.shape[0]
            now[:old, :old] = self.reference
        self.reference = now

    # Anchors

    def _collect(self, model, batch: dict, task: Task) -> None:
        """Keep the first ``anchors_per_task`` samples of the task's own (with images) this process sees."""
        k, per_image = self.settings.anchors_per_task, self.adapter.tokens_per_image
        if len(self.pending) >= k or "pixel_values" not in batch or per_image is None:
            return
        image = self.adapter.encoder.image_token_id
        ids, labels, mask = batch["input_ids"], batch["labels"], batch.get("attention_mask")
        tokens = InstructionEncoder.instruction_tokens(ids, mask, labels, image)
        images = torch.div((ids == image).sum(-1), per_image, rounding_mode="floor").tolist()
        starts = [sum(images[:i]) for i in range(len(images))]
        own = batch.get(TASK_IDS)
        for i, n in enumerate(images):
            if len(self.pending) >= k:
                break
            if n and (own is None or int(own[i]) == task.index):
                pv = batch["pixel_values"][starts[i]:starts[i] + n]
                self.pending.append({"pixel_values": pv.detach().to("cpu", copy=True),
                                     "tokens": tokens[i].detach().to("cpu", copy=True), "task": task.index})

    def represent(self, model, anchors: list[dict]) -> torch.Tensor:
        """(A, D) representations of ``anchors``: their images through the vision tower, the projector and the
        adapter (routed by their instructions), mean-pooled over each anchor's image tokens."""
        adapter, base = self.adapter, unwrap(model)
        tower = parts(model)["vision_tower"]
        param = next(tower.parameters())
        pixels = torch.cat([a["pixel_values"] for a in anchors]).to(param.device, param.dtype)
        counts = torch.tensor([a["pixel_values"].shape[0] for a in anchors], device=param.device)
        queries = adapter.encoder.encode([a["tokens"] for a in anchors], param.device)
        adapter.image_queries = queries.repeat_interleave(counts, dim=0)
        try:
            features = base.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
        finally:
            adapter.image_queries = None
        pooled = torch.stack([f.mean(0) for f in features])                            # (images, D)
        owner = torch.arange(len(anchors), device=pooled.device).repeat_interleave(counts)
        return torch.zeros(len(anchors), pooled.shape[1], device=pooled.device, dtype=pooled.dtype) \
            .index_add(0, owner, pooled) / counts[:, None].to(pooled.dtype)

    # Resume

    def state_dict(self) -> dict:
        return {"anchors": list(self.anchors), "reference": self.reference, "pending": list(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        self.anchors = list(state.get("anchors", []))
        self.reference = state.get("reference")
        self.pending = list(state.get("pending", []))


def _install_hooks(model, projector, adapter: CrossModalAdapter) -> None:
    """The adapter's mixture is added to the projector's output."""
    def add_mixture(module, args, output):
        if int(adapter.known) == 0:
            return output
        x = args[0] if args else None
        if x is None or x.shape[:-1] != output.shape[:-1]:
            raise ValueError("cross_modal_moe: the projector does not map each vision token to one language-model "
                             f"token ({None if x is None else tuple(x.shape)} -> {tuple(output.shape)}); the adapter "
                             "supports LLaVA-style projectors")
        adapter.tokens_per_image = x.shape[1]
        q = adapter.queries_per_image(x.shape[0], x.shape[1])
        out = output + adapter(x, q).to(output.dtype)
        if torch.is_grad_enabled() and adapter.image_queries is None:     # a training forward: for the alignment
            adapter.batch_repr = (out.mean(1), q)
        return out

    projector.register_forward_hook(add_mixture)


def _gather_first(items: list, k: int) -> list:
    """The first ``k`` of every process's ``items``, in process order (the same on every process)."""
    return [x for part in gather_objects(items) for x in part][:k]


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    z = F.normalize(x, dim=-1)
    return z @ z.T


def alignment_loss(image: torch.Tensor, text: torch.Tensor, same: torch.Tensor | None = None,
                   temperature: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE between (N, d) image and text embeddings (CLIP): pair i is (image i, text i);
    ``same`` (N, N, bool, reflexive and symmetric) marks further positives, whose target mass is shared."""
    logits = cosine_between(image, text) / temperature
    if same is None:
        same = torch.eye(len(image), dtype=torch.bool, device=image.device)
    target = same.float() / same.float().sum(-1, keepdim=True)
    i2t = -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    t2i = -(target * F.log_softmax(logits.T, dim=-1)).sum(-1).mean()
    return (i2t + t2i) / 2


def cosine_between(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def relation_loss(current: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean squared change of the pairwise cosine similarities of (A, D) representations, off the diagonal."""
    sims = cosine_matrix(current.float())
    off = ~torch.eye(len(sims), dtype=torch.bool, device=sims.device)
    return ((sims - reference.to(sims.device)) ** 2)[off].mean()
