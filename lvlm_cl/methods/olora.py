"""O-LoRA: orthogonal subspace learning for language-model continual learning (Wang et al., EMNLP 2023
Findings; github.com/cmnfriend/O-LoRA).

A new LoRA adapter per task, in the same layers; earlier tasks' adapters stay in the model, frozen and
active (their updates add up), and the new adapter's A matrices are pushed to be orthogonal to theirs, so
the new task learns in a subspace the old ones do not use:

    term = orth_weight * sum over adapted layers, over earlier tasks s of ||A_t A_s^T||^2
         + l2_weight * sum over the new adapter's parameters of ||p||^2

(A is r x d_in; O-LoRA's λ1 and λ2, 0.5 and 0 by default as in its scripts.) No task routing: every
sample goes through every trained adapter, so no task label is needed at inference.

    model: {freeze_vision_tower: true, freeze_projector: true, freeze_language_model: true}
    methods: [{name: olora, r: 8, alpha: 16, orth_weight: 0.5}]

Adapters are added with ``peft.functional.inject_adapter_in_model`` (``cl_olora_00``, ``cl_olora_01``, ...)
for every task of the stream at ``setup``; a task's adapter starts at B = 0, so adapters of tasks not
trained yet change nothing. ``vision: true`` also adapts the vision tower.
"""

from __future__ import annotations

import torch

from lvlm_cl.methods.adapters import adapter_params, inject_lora, refuse_recipe_lora, set_trainable_adapter, targets
from lvlm_cl.methods.base import Method, Task, check_integer
from lvlm_cl.models.continual import unwrap


class OLoRA(Method):
    name = "olora"
    zero3_unsupported = ("its orthogonality term multiplies the adapters' A matrices in the loss, outside the "
                         "forward, where ZeRO-3 holds only a shard of each")
    defaults = {
        "r": 8,
        "alpha": 16.0,
        "dropout": 0.0,
        "orth_weight": 0.5,      # λ1: orthogonality of the new A to the earlier tasks' A
        "l2_weight": 0.0,        # λ2: L2 on the new adapter's parameters
        "vision": False,         # adapt the vision tower too
    }

    def __init__(self, **hparams):
        super().__init__(**hparams)
        h = self.hparams
        check_integer(self.name, h, "r")
        for key in ("alpha", "dropout", "orth_weight", "l2_weight"):
            if not isinstance(h[key], (int, float)) or isinstance(h[key], bool) or h[key] < 0:
                raise ValueError(f"olora: setting {key!r} must be a number >= 0, got {h[key]!r}")
        self.names: list[str] = []
        self.layers: list[torch.nn.Module] = []
        self.current: int | None = None

    def setup(self, model, stream: list[Task]) -> None:
        from peft.functional import set_adapter

        refuse_recipe_lora(model, self.name)
        h = self.hparams
        self.names = [f"cl_olora_{i:02d}" for i in range(len(stream))]
        for name in self.names:
            paths = inject_lora(model, name, r=h["r"], alpha=h["alpha"], dropout=h["dropout"],
                                target_modules=targets(language=True, vision=h["vision"]))
        modules = dict(unwrap(model).named_modules())
        self.layers = [modules[p] for p in paths]
        # Untrained adapters are zero (B = 0): all active is the same model as the trained ones active.
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        set_adapter(model, self.names)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])

    def before_task(self, task: Task, model, train_data: list) -> list:
        from peft.functional import set_adapter

        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        set_adapter(model, self.names[:task.index + 1])
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        set_trainable_adapter(model, self.names, self.names[task.index])
        self.current = task.index
        return train_data

    def orthogonality(self, index: int) -> torch.Tensor:
        """sum over layers and earlier tasks of ||A_index A_s^T||_F^2."""
        new, terms = self.names[index], []
        for layer in self.layers:
            a_new = layer.lora_A[new].weight
            for old in self.names[:index]:
                terms.append((a_new @ layer.lora_A[old].weight.detach().T).pow(2).sum())
        return torch.stack(terms).sum() if terms else a_new.new_zeros(())

    def loss(self, model, batch: dict, outputs, task: Task):
        h = self.hparams
        term = None
        if h["orth_weight"] and task.index > 0:
            term = h["orth_weight"] * self.orthogonality(task.index)
        if h["l2_weight"]:
            l2 = sum(p.pow(2).sum() for p in adapter_params(model, self.names[task.index]).values())
            term = l2 * h["l2_weight"] if term is None else term + h["l2_weight"] * l2
        return term
