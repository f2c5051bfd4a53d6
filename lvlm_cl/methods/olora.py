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

from dataclasses import dataclass

import torch

from lvlm_cl.methods.adapters import adapter_params, inject_lora, refuse_recipe_lora, set_trainable_adapter, targets
from lvlm_cl.methods.base import Method, Task
from lvlm_cl.models.continual import unwrap
from lvlm_cl.settings import Settings, setting


@dataclass(frozen=True)
class OLoRASettings(Settings):
    r: int = setting(8, low=1, help="LoRA rank of each task's adapter")
    alpha: float = setting(16.0, low=0, help="LoRA scaling (alpha / r)")
    dropout: float = setting(0.0, low=0, below=1, help="LoRA dropout")
    orth_weight: float = setting(0.5, low=0, help="λ1 of O-LoRA: orthogonality of the new A to the earlier tasks' A")
    l2_weight: float = setting(0.0, low=0, help="λ2 of O-LoRA: L2 on the new adapter's parameters")
    vision: bool = setting(False, help="adapt the vision tower too")


class OLoRA(Method):
    name = "olora"
    zero3_unsupported = ("its orthogonality term multiplies the adapters' A matrices in the loss, outside the "
                         "forward, where ZeRO-3 holds only a shard of each")
    settings_class = OLoRASettings
    settings: OLoRASettings

    def __init__(self, **args):
        super().__init__(**args)
        self.names: list[str] = []
        self.layers: list[torch.nn.Module] = []
        self.current: int | None = None

    def setup(self, model, stream: list[Task]) -> None:
        from peft.functional import set_adapter

        refuse_recipe_lora(model, self.name)
        s = self.settings
        self.names = [f"cl_olora_{i:02d}" for i in range(len(stream))]
        for name in self.names:
            paths = inject_lora(model, name, r=s.r, alpha=s.alpha, dropout=s.dropout,
                                target_modules=targets(language=True, vision=s.vision))
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
        s = self.settings
        term = None
        if s.orth_weight and task.index > 0:
            term = s.orth_weight * self.orthogonality(task.index)
        if s.l2_weight:
            l2 = sum(p.pow(2).sum() for p in adapter_params(model, self.names[task.index]).values())
            term = l2 * s.l2_weight if term is None else term + s.l2_weight * l2
        return term
