"""LwF: Learning without Forgetting (Li & Hoiem, ECCV 2016; TPAMI 2017), adapted to instruction tuning.

The original keeps the previous model's outputs on the new task's images as soft targets for the old
heads. Here there is one head, the language model's next-token distribution, so the previous model (the
teacher) is distilled on the current task's own inputs: on every answer token of the current task's
batch (label != -100), the student's next-token distribution at temperature T is pulled towards the
teacher's by

    term = alpha * T^2 * mean over answer positions of KL(teacher_T || student_T)

(the T^2 keeps the gradient scale independent of T, as in Hinton et al.'s distillation). The positions are
shifted as in the causal LM loss: logits[:, :-1] predict labels[:, 1:].

    methods: [{name: lwf, alpha: 1.0, temperature: 2.0}]

The teacher is not a copy of the model (a 7B model cannot be copied): at ``after_task`` the values of the
parameters that require grad are snapshotted (detached CPU clones, by name). Frozen parameters are the
same in teacher and student, so the snapshot is the whole difference. In ``loss`` the teacher's logits
come from the same model with its trainable values swapped for the snapshot, under ``torch.no_grad()``
and in eval mode (no dropout), and the student's values are put back in a ``finally`` block, so an
exception never leaves the teacher's weights in the model. The swap writes through ``param.data``, which
does not bump the parameters' autograd version counters, so the student's graph (already built by the
loop's forward) still backpropagates. A parameter that requires grad but is not in the snapshot (a module
a method added after the last task ended) keeps its current value in the teacher pass.

The first task has no teacher: the term is None until a task has ended. The snapshot is the method's
state, saved with every task checkpoint, so a resumed run distils from the right teacher. Costs: one
extra forward per micro-step, the snapshot in CPU memory, and during the swap a device copy of the
trainable values (small with LoRA; with full fine-tuning, the size of the model). Not for DeepSpeed
ZeRO-3, whose parameters are partitioned across processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lvlm_cl.data.encoding import IGNORE_INDEX
from lvlm_cl.methods.base import Method, Task
from lvlm_cl.models.continual import held_for_batch, model_inputs
from lvlm_cl.settings import Settings, setting


@dataclass(frozen=True)
class LwFSettings(Settings):
    alpha: float = setting(1.0, low=0, help="weight of the distillation term (0 turns it off)")
    temperature: float = setting(2.0, above=0, help="softmax temperature T")


class LwF(Method):
    name = "lwf"
    full_outputs = True            # distils the logits of every answer position against the teacher's (B, L, V)
    zero3_unsupported = ("its teacher swaps whole parameter values into the model, and ZeRO-3 keeps only a "
                         "shard of each parameter on each process")
    settings_class = LwFSettings
    settings: LwFSettings

    def __init__(self, **args):
        super().__init__(**args)
        self.teacher: dict[str, torch.Tensor] | None = None   # trainable values after the last finished task
        self.teacher_task: str | None = None

    # The teacher

    def snapshot(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Detached CPU clones of the parameters that require grad, by name."""
        return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}

    def after_task(self, task: Task, model: torch.nn.Module, train_data: list) -> None:
        # After the task, not before the next one: the checkpoint saved right after this hook then holds
        # the teacher, and a run resumed from it needs no model state to rebuild it.
        self.teacher = self.snapshot(model)
        self.teacher_task = task.name

    def teacher_logits(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The teacher's logits on ``batch`` (labels dropped): the model with the snapshot's values, in eval
        mode, without grad; the model's own values and train/eval modes are restored afterwards."""
        params = dict(model.named_parameters())
        missing = sorted(set(self.teacher) - set(params))
        if missing:
            raise ValueError(f"lwf: the teacher snapshot has parameters {missing[:3]} that are not in the model "
                             "(was the model or the method list changed?)")
        inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
        modes = [(m, m.training) for m in model.modules()]
        saved: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                # .data: the in-place copies must not bump the version counters the student's graph checks.
                for n, t in self.teacher.items():
                    data = params[n].data
                    saved[n] = data.clone()
                    data.copy_(t, non_blocking=True)
                model.eval()
                with held_for_batch(model, batch):
                    logits = model(**inputs).logits.detach()
        finally:
            with torch.no_grad():
                for n, t in saved.items():
                    params[n].data.copy_(t)
            for m, training in modes:
                m.training = training
        return logits

    # The term

    def loss(self, model: torch.nn.Module, batch: dict, outputs, task: Task) -> torch.Tensor | None:
        if self.teacher is None or self.settings.alpha == 0:
            return None
        labels = batch["labels"]
        mask = labels[:, 1:] != IGNORE_INDEX
        if not mask.any():
            return None
        teacher = self.teacher_logits(model, batch)
        return self.settings.alpha * distillation(outputs.logits, teacher, mask, self.settings.temperature)

    # Resume

    def state_dict(self) -> dict:
        if self.teacher is None:
            return {}
        return {"teacher": dict(self.teacher), "task": self.teacher_task}

    def load_state_dict(self, state: dict) -> None:
        teacher = state.get("teacher") if state else None
        self.teacher = None if teacher is None else {n: t.detach().to("cpu", copy=True) for n, t in teacher.items()}
        self.teacher_task = state.get("task") if state else None


def distillation(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * mean over the masked positions of KL(teacher_T || student_T).

    ``student`` and ``teacher`` are (B, L, V) logits; ``mask`` is (B, L - 1) and selects the positions whose
    next token (labels[:, 1:]) is an answer token, so logits[:, :-1] are compared. ``weights`` (B,): each
    sample's positions count with its weight (``semantic_transfer``'s relevance); the sum is still divided
    by the number of positions, so weights of 1 give the plain mean.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"distillation: student logits {tuple(student.shape)} and teacher logits "
                         f"{tuple(teacher.shape)} differ")
    s = student[:, :-1][mask].float() / temperature
    t = teacher[:, :-1][mask].to(s.device).float() / temperature
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="none").sum(-1)
    if weights is not None:
        kl = kl * weights.to(s.device, s.dtype).unsqueeze(1).expand(mask.shape)[mask]
    return kl.sum() / s.shape[0] * temperature ** 2
