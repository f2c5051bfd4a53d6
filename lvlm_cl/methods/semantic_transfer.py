"""Semantic transfer: SECA (He, Cheng, Xu, Wang & Wang, "Harnessing Textual Semantic Priors for Knowledge
Transfer and Refinement in CLIP-Driven Continual Learning", arXiv 2508.01579, 2025; seed 002), adapted to
instruction tuning of a LLaVA-style model. Two terms are added to the language-modelling loss.

SG-AKT (semantic-guided adaptive knowledge transfer) -> relevance-weighted distillation. The model as it was
after the previous task is the teacher (``lwf.LwF``'s snapshot of the trainable values, swapped in for the
teacher pass). On the answer tokens the student is pulled towards the teacher's next-token distribution, as
in ``lwf``, but each sample's positions are weighted by how related its instruction is to the earlier tasks:

    w_i  = sum_{s<t} softmax_s( [sim(q_i, task 0) .. sim(q_i, task t)] / relevance_temperature )
    term = alpha * T^2 * sum over answer positions p of w_{sample(p)} KL(teacher_T || student_T) / #positions

q_i is the frozen text feature of the sample's instruction (``queries.InstructionEncoder``, the base language
model's mean-pooled hidden states); each finished task has k-means keys of its training queries
(``routing.TaskKeyRouter``, fitted at the task's end); sim to a task is the highest cosine to its keys.
The current task has no keys until it ends: its similarity is the highest cosine to the queries of its
own samples seen so far (k-means keys in the limit of one key per instruction; a sample of the task is at
cosine 1 to it). A sample whose instruction looks like an earlier task's (where learning the new task
overwrites the old mapping) keeps the teacher's behaviour; an unrelated one learns freely. With all
weights 1 the term is LwF's.

SE-VPR (semantic-enhanced visual prototype refinement) -> answer prototypes. A task is *closed-set* when
its training records have between 2 and ``max_answers`` distinct first answers and at least two records
per answer on average (seq5: all five tasks; captions or free text: none). For each answer of such a task
(a class: the label tokens of the first assistant turn) a prototype is kept: the running mean (momentum
``proto_momentum``) of the unit-length hidden state at the position that predicts the answer's first token,
the state the language-model head reads. The prototypes are refined by the relations between the answers'
text embeddings (the same frozen encoder on the answer's own tokens, end-of-sequence dropped; CLIP's class
name embeddings in SECA):

    R = softmax_row(cos(e_i, e_j) / relation_temperature)       P' = (1 - refine_weight) P + refine_weight R P

and the hidden states of the task's samples are classified against P' by cosine at ``proto_temperature``
(cross-entropy, weight ``proto_weight``; the prototypes are detached, the gradient reaches the model).
During a task this shapes the current task's answer states into classes whose layout follows the answers'
meaning; at the task's end its prototypes are frozen, and replayed samples of it (with ``replay``) are
classified against them in every later task, which holds their states where the old task left them.

    methods:
      - {name: replay, memory_fraction: 0.05, selection: task_balanced, replay_ratio: 0.2}
      - {name: semantic_transfer, alpha: 1.0, temperature: 2.0, relevance_temperature: 0.02, proto_weight: 0.1}

What was left out, and why: SECA distils from a pool of per-task adapters, aggregating the historical ones a
sample is relevant to; here there is one teacher (the previous stage, which already holds every earlier
task), so the aggregation over tasks becomes one weight per sample. SECA's classifier at inference fuses a
text classifier with the refined visual prototypes; a generative model answers by generating text, so the
prototypes only shape representations in training and are not used to answer (rescoring generations against
them would need the task at inference, i.e. routing, which this method does not do). SECA is rehearsal-free
(SECA++ adds replay); here old prototypes do work only on replayed samples.

State: the teacher snapshot, the keys and queries, the answer prototypes and the closed-set decisions go
through ``state_dict`` (saved with every task and step checkpoint); nothing is attached to the model, and
inference is the plain model. Costs: one teacher forward per micro-step (as ``lwf``), the snapshot in CPU
memory, the query encoder (a frozen copy of the language model when it trains in full, as ``task_prompts``)
and a few vectors per answer. Not for DeepSpeed ZeRO-3 (the teacher swaps whole parameters).

Batches carry ``cl_task_ids`` (``uses_task_ids``): a replayed sample is known as one, and its prototypes are
its own task's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lvlm_cl.data.dataset import TASK_IDS
from lvlm_cl.data.encoding import IGNORE_INDEX
from lvlm_cl.data.records import final_answer
from lvlm_cl.distributed import gather_objects
from lvlm_cl.methods.base import Method, Task
from lvlm_cl.methods.lwf import LwF, distillation
from lvlm_cl.methods.queries import InstructionEncoder, query_cache_setting, query_encoder
from lvlm_cl.methods.routing import TaskKeyRouter
from lvlm_cl.models.continual import unwrap
from lvlm_cl.settings import Settings, setting

# The terms, on tensors (unit-tested by hand)

def relevance_weights(old: torch.Tensor, current: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B,) softmax mass on the earlier tasks: ``old`` (B, S) similarities to the S earlier tasks, ``current``
    (B,) to the task in training, all divided by ``temperature``. Zero when there is no earlier task."""
    if old.shape[1] == 0:
        return torch.zeros(old.shape[0], dtype=old.dtype, device=old.device)
    logits = torch.cat([old, current.unsqueeze(1).to(old)], dim=1) / temperature
    return logits.softmax(dim=1)[:, :-1].sum(dim=1)


def nearest_similarity(query: torch.Tensor, bank: torch.Tensor | None) -> torch.Tensor:
    """(B,) highest cosine of each query to the rows of ``bank`` (N, D); -1 when the bank is empty."""
    if bank is None or bank.shape[0] == 0:
        return torch.full((query.shape[0],), -1.0, dtype=query.dtype, device=query.device)
    return (F.normalize(query, dim=-1) @ F.normalize(bank.to(query), dim=-1).T).amax(dim=1)


def refine_prototypes(prototypes: torch.Tensor, text: torch.Tensor, relation_temperature: float,
                      refine_weight: float) -> torch.Tensor:
    """SE-VPR: (1 - b) P + b R P, with R = row-softmax of the answers' text cosines / temperature."""
    e = F.normalize(text.float(), dim=-1)
    relation = (e @ e.T / relation_temperature).softmax(dim=1)
    p = prototypes.float()
    return (1 - refine_weight) * p + refine_weight * relation.to(p.device) @ p


def prototype_loss(hidden: torch.Tensor, targets: torch.Tensor, prototypes: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """Per-sample cross-entropy of the cosine classifier: logits = cos(hidden, prototype_c) / temperature."""
    logits = F.normalize(hidden.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).T / temperature
    return F.cross_entropy(logits, targets, reduction="none")


def first_answers(labels: torch.Tensor) -> list[tuple[int | None, tuple[int, ...]]]:
    """Per sample: (index of its first answer token, the label tokens of that first assistant span), or
    (None, ()) for a sample with no answer token."""
    out = []
    for row in labels:
        answer = (row != IGNORE_INDEX).nonzero().flatten()
        if len(answer) == 0:
            out.append((None, ()))
            continue
        start = int(answer[0])
        gap = (row[start:] == IGNORE_INDEX).nonzero()
        end = start + int(gap[0]) if len(gap) else len(row)
        out.append((start, tuple(row[start:end].tolist())))
    return out


def is_closed_set(records: list[dict], max_answers: int) -> bool:
    """The closed-set rule: 2..max_answers distinct first answers, and at least two records per answer on
    average."""
    answers = {_first_answer_text(r) for r in records}
    return 2 <= len(answers) <= max_answers and len(records) >= 2 * len(answers)


def _first_answer_text(record: dict) -> str:
    for turn in record["messages"]:
        if turn["role"] == "assistant":
            return " ".join(p["text"] for p in turn["content"] if p["type"] == "text").strip()
    return final_answer(record)


class AnswerPrototypes:
    """One closed-set task's answers (label-token tuples), their text embeddings and prototypes."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, ...]] = []
        self.text: list[torch.Tensor] = []            # (E,) per answer, frozen
        self.protos: list[torch.Tensor | None] = []   # (D,) running mean of unit hidden states, None until seen
        self.counts: list[int] = []

    def index(self, answer: tuple[int, ...]) -> int | None:
        try:
            return self.answers.index(answer)
        except ValueError:
            return None

    def add(self, answer: tuple[int, ...], text: torch.Tensor) -> int:
        self.answers.append(answer)
        self.text.append(text.detach().float().cpu())
        self.protos.append(None)
        self.counts.append(0)
        return len(self.answers) - 1

    def ready(self) -> list[int]:
        return [i for i, p in enumerate(self.protos) if p is not None]

    def update(self, cls: int, states: torch.Tensor, momentum: float) -> None:
        mean = F.normalize(states.detach().float(), dim=-1).mean(0).cpu()
        old = self.protos[cls]
        self.protos[cls] = mean if old is None else momentum * old + (1 - momentum) * mean
        self.counts[cls] += states.shape[0]

    def state(self) -> dict:
        return {"answers": list(self.answers), "text": [t.clone() for t in self.text],
                "protos": [None if p is None else p.clone() for p in self.protos], "counts": list(self.counts)}

    @classmethod
    def from_state(cls, state: dict) -> "AnswerPrototypes":
        a = cls()
        a.answers = [tuple(x) for x in state["answers"]]
        a.text = [t.detach().float().cpu() for t in state["text"]]
        a.protos = [None if p is None else p.detach().float().cpu() for p in state["protos"]]
        a.counts = list(state["counts"])
        return a

    def merged_over_processes(self) -> "AnswerPrototypes":
        """Every process's prototypes averaged (weighted by counts), in one order on all processes."""
        parts = gather_objects(self.state())
        merged = AnswerPrototypes()
        for answer in sorted({tuple(a) for p in parts for a in p["answers"]}):
            found = [(p, p["answers"].index(answer)) for p in parts if answer in [tuple(a) for a in p["answers"]]]
            cls = merged.add(answer, found[0][0]["text"][found[0][1]])
            seen = [(p["protos"][i], p["counts"][i]) for p, i in found if p["protos"][i] is not None]
            total = sum(c for _, c in seen)
            if len(seen) == 1:
                merged.protos[cls], merged.counts[cls] = seen[0][0].clone(), seen[0][1]
            elif seen and total > 0:
                merged.protos[cls] = sum(v * c for v, c in seen) / total
                merged.counts[cls] = total
        return merged


@dataclass(frozen=True)
class SemanticTransferSettings(Settings):
    alpha: float = setting(1.0, low=0, help="weight of the distillation term (0 turns SG-AKT off)")
    temperature: float = setting(2.0, above=0, help="softmax temperature T of teacher and student")
    relevance_temperature: float = setting(0.02, above=0, help="temperature of the softmax over the tasks' "
                                                               "similarities (instruction features share the chat "
                                                               "template, so cosines sit close together)")
    keys_per_task: int = setting(8, low=1, help="k-means keys per finished task")
    query_cache: int = query_cache_setting()
    proto_weight: float = setting(0.1, low=0, help="weight of the prototype term (0 turns SE-VPR off)")
    proto_temperature: float = setting(0.1, above=0, help="temperature of the cosine classifier")
    proto_momentum: float = setting(0.9, low=0, below=1, help="running-mean momentum of the prototypes")
    relation_temperature: float = setting(0.1, above=0, help="temperature of the answers' text relations")
    refine_weight: float = setting(0.5, low=0, high=1, help="share of the relation-mixed prototype in the refined "
                                                            "one")
    max_answers: int = setting(32, low=2, help="closed-set rule: at most this many distinct answers")


class SemanticTransfer(Method):
    name = "semantic_transfer"
    uses_task_ids = True
    full_outputs = True            # LwF's distillation on (B, L, V) logits
    zero3_unsupported = LwF.zero3_unsupported
    settings_class = SemanticTransferSettings
    settings: SemanticTransferSettings

    def __init__(self, **args):
        super().__init__(**args)
        s = self.settings
        self.teacher = LwF(alpha=s.alpha, temperature=s.temperature)   # snapshot and teacher pass
        self.router: TaskKeyRouter | None = None
        self.encoder: InstructionEncoder | None = None
        self.eos: set[int] = set()
        self.closed: dict[int, bool] = {}                    # task index -> closed-set
        self.answer_sets: dict[int, AnswerPrototypes] = {}   # finished closed-set tasks
        self.current: AnswerPrototypes | None = None         # the closed-set task in training
        self.relevance: dict[str, list[float]] = {}          # task -> [sum of its samples' weights, count]
        self.last_weights: torch.Tensor | None = None        # the last batch's relevance weights
        self._hidden: torch.Tensor | None = None             # the student's last hidden states (lm_head input)
        self._bank: tuple[int, torch.Tensor] | None = None   # the current task's seen queries, stacked

    # Hooks

    def setup(self, model, stream: list[Task]) -> None:
        base = unwrap(model)
        self.encoder = query_encoder(model, self.settings.query_cache)   # before training: base weights
        dim = base.config.get_text_config().hidden_size
        self.router = TaskKeyRouter(len(stream), dim, key_mode="prototypes", keys_per_task=self.settings.keys_per_task)
        self.router.requires_grad_(False)
        self.router.encoder = self.encoder
        eos = [getattr(base.config.get_text_config(), "eos_token_id", None),
               getattr(getattr(base, "generation_config", None), "eos_token_id", None)]
        self.eos = {int(e) for x in eos if x is not None for e in (x if isinstance(x, (list, tuple)) else [x])}
        if self.settings.proto_weight > 0:
            def capture(module, args):
                if torch.is_grad_enabled() and not self.encoder.running:
                    self._hidden = args[0]
            base.get_output_embeddings().register_forward_pre_hook(capture)

    def before_task(self, task: Task, model, train_data: list) -> list:
        self.router.train_only(task.index)
        self.router.requires_grad_(False)
        # The rule looks at the task's own records (not the replayed ones other methods may have added).
        self.closed[task.index] = (self.settings.proto_weight > 0
                                   and is_closed_set(task.train_records, self.settings.max_answers))
        self.current = AnswerPrototypes() if self.closed[task.index] else None
        self._bank, self._hidden = None, None
        return train_data

    def loss(self, model, batch: dict, outputs, task: Task) -> torch.Tensor | None:
        hidden, self._hidden = self._hidden, None
        labels = batch["labels"]
        ids = batch.get(TASK_IDS)
        ids = (torch.full((labels.shape[0],), task.index, dtype=torch.long) if ids is None else ids).to(labels.device)
        own = ids == task.index
        tokens = InstructionEncoder.instruction_tokens(batch["input_ids"], batch.get("attention_mask"), labels,
                                                       self.encoder.image_token_id)
        query = self.encoder.encode(tokens, labels.device)
        self.router.observe(query[own], [t for t, o in zip(tokens, own.tolist()) if o])
        terms = []
        mask = labels[:, 1:] != IGNORE_INDEX
        if self.teacher.teacher is not None and self.settings.alpha > 0 and mask.any():
            weights = self.weights(query, task.index)
            self.last_weights = weights.detach()
            stats = self.relevance.setdefault(task.name, [0.0, 0])
            stats[0] += float(weights[own].sum())
            stats[1] += int(own.sum())
            teacher = self.teacher.teacher_logits(model, batch)
            terms.append(self.settings.alpha * distillation(outputs.logits, teacher, mask, self.settings.temperature,
                                                            weights))
        if hidden is not None:
            if hidden.shape[:2] != labels.shape:
                raise ValueError(f"semantic_transfer: the language-model head saw hidden states {tuple(hidden.shape)}"
                                 f" for labels {tuple(labels.shape)}; was another forward run in between?")
            term = self.prototype_term(hidden, labels, ids, task.index)
            if term is not None:
                terms.append(self.settings.proto_weight * term)
        return sum(terms) if terms else None

    def after_task(self, task: Task, model, train_data: list) -> None:
        self.router.finish_task(task.index)
        if self.current is not None:
            self.answer_sets[task.index] = self.current.merged_over_processes()
        self.current, self._bank, self._hidden = None, None, None
        self.teacher.after_task(task, model, train_data)

    # SG-AKT

    def weights(self, query: torch.Tensor, task_index: int) -> torch.Tensor:
        """(B,) relevance of each sample to the earlier tasks (see the module docstring)."""
        old = self.router.similarities(query)[:, :task_index]
        seen = self.router.seen_queries()
        if self._bank is None or self._bank[0] != len(seen):
            self._bank = (len(seen), torch.stack(list(seen.values())) if seen else None)
        current = nearest_similarity(query, self._bank[1])
        return relevance_weights(old, current, self.settings.relevance_temperature)

    # SE-VPR

    def answer_set(self, task_index: int, current: int) -> AnswerPrototypes | None:
        return self.current if task_index == current else self.answer_sets.get(task_index)

    def text_embedding(self, answer: tuple[int, ...], device) -> torch.Tensor:
        tokens = list(answer)
        while len(tokens) > 1 and tokens[-1] in self.eos:
            tokens.pop()
        return self.encoder.encode([torch.tensor(tokens, dtype=torch.long)], device)[0]

    def prototype_term(self, hidden: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor,
                       current: int) -> torch.Tensor | None:
        """Mean cosine-classification loss of the answer-position states of every sample whose task is
        closed-set, against that task's refined prototypes; then the current task's prototypes move."""
        s = self.settings
        spans = first_answers(labels)
        losses, updates = [], []
        for t in sorted(set(ids.tolist())):
            answers = self.answer_set(t, current)
            if answers is None:
                continue
            rows, classes = [], []
            for i in (ids == t).nonzero().flatten().tolist():
                start, answer = spans[i]
                if start is None or start == 0:
                    continue
                cls = answers.index(answer)
                if cls is None and t == current and len(answers.answers) < s.max_answers:
                    cls = answers.add(answer, self.text_embedding(answer, labels.device))
                if cls is not None:
                    rows.append((i, start - 1))
                    classes.append(cls)
            if not rows:
                continue
            states = hidden[[i for i, _ in rows], [p for _, p in rows]]              # (N, D), with grad
            ready = answers.ready()
            if len(ready) >= 2:
                keep = [k for k, c in enumerate(classes) if c in ready]
                if keep:
                    protos = torch.stack([answers.protos[c] for c in ready]).to(states.device)
                    text = torch.stack([answers.text[c] for c in ready]).to(states.device)
                    refined = refine_prototypes(protos, text, s.relation_temperature, s.refine_weight)
                    targets = torch.tensor([ready.index(classes[k]) for k in keep], device=states.device)
                    losses.append(prototype_loss(states[keep], targets, refined, s.proto_temperature))
            if t == current:
                updates.append((answers, states, classes))
        for answers, states, classes in updates:          # after the loss: a sample is not its own prototype
            for cls in sorted(set(classes)):
                answers.update(cls, states[[k for k, c in enumerate(classes) if c == cls]], s.proto_momentum)
        return torch.cat(losses).mean() if losses else None

    # Resume

    def state_dict(self) -> dict:
        if self.router is None:
            return {}
        return {"teacher": self.teacher.state_dict(),
                "router": {k: v.detach().cpu().clone() for k, v in self.router.state_dict().items()},
                "seen": dict(self.router.seen_queries()),
                "closed": dict(self.closed),
                "answers": {t: a.state() for t, a in self.answer_sets.items()},
                "current": None if self.current is None else self.current.state(),
                "relevance": {k: list(v) for k, v in self.relevance.items()}}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.teacher.load_state_dict(state.get("teacher", {}))
        if self.router is not None and "router" in state:
            self.router.load_state_dict(state["router"])
            self.router.restore_seen(state.get("seen", {}))
        self.closed = dict(state.get("closed", {}))
        self.answer_sets = {int(t): AnswerPrototypes.from_state(a) for t, a in state.get("answers", {}).items()}
        current = state.get("current")
        self.current = None if current is None else AnswerPrototypes.from_state(current)
        self.relevance = {k: list(v) for k, v in state.get("relevance", {}).items()}
        self._bank = None
