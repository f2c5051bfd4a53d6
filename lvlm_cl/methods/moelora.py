"""MoELoRA: CoIN's mixture of LoRA experts (Chen et al., "CoIN: A Benchmark of Continual Instruction
tuNing for Multimodel Large Language Model", NeurIPS 2024 D&B; zackschen/CoIN, CoIN/peft/tuners/coinmoelora.py).

Every targeted Linear gets E experts of rank r/E and a dense softmax router over them, per token:

    y = W x + scale * sum_e softmax(router(x))_e * B_e A_e x,     scale = alpha / r

trained (with the router) on every task in turn, as CoIN does: there is no task-specific part, the experts
let different tasks use different low-rank directions if the router learns to separate them.

    model: {freeze_vision_tower: true, freeze_projector: true, freeze_language_model: true}
    methods: [{name: moelora, r: 16, experts: 4, alpha: 32}]

PEFT has no mixture-of-experts LoRA, so the layer is written here (``MoELoRALinear``, 40 lines): it wraps
the original Linear as ``base_layer`` and keeps its experts under ``cl_moelora`` (saved with every task
checkpoint). B starts at zero, so the wrapped model starts as the base model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from lvlm_cl.methods.adapters import refuse_recipe_lora, targets
from lvlm_cl.methods.base import Method, Task
from lvlm_cl.models.continual import unwrap
from lvlm_cl.settings import Settings, seed_setting, setting


class MoEExperts(torch.nn.Module):
    def __init__(self, d_in: int, d_out: int, experts: int, rank: int, generator: torch.Generator):
        super().__init__()
        bound = 1 / math.sqrt(d_in)
        self.lora_A = torch.nn.Parameter((torch.rand(experts, rank, d_in, generator=generator) * 2 - 1) * bound)
        self.lora_B = torch.nn.Parameter(torch.zeros(experts, d_out, rank))
        self.router = torch.nn.Linear(d_in, experts, bias=False)
        torch.nn.init.normal_(self.router.weight, std=0.02, generator=generator)


class MoELoRALinear(torch.nn.Module):
    """A Linear plus E routed LoRA experts (see the module docstring)."""

    is_cl_adapter = True    # ``routing.adapters_disabled`` turns it into its base layer

    def __init__(self, base: torch.nn.Linear, experts: int, r: int, alpha: float, dropout: float,
                 generator: torch.Generator):
        super().__init__()
        if r % experts:
            raise ValueError(f"moelora: r={r} is not a multiple of experts={experts}")
        self.base_layer = base
        self.cl_moelora = MoEExperts(base.in_features, base.out_features, experts, r // experts, generator)
        self.cl_moelora.to(base.weight.device)
        self.scale = alpha / r
        self.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
        self.adapters_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.adapters_enabled:
            return y
        e = self.cl_moelora
        xd = self.dropout(x).to(e.lora_A.dtype)
        gate = torch.softmax(e.router(xd), dim=-1)                         # (..., E)
        low = torch.einsum("...i,eri->...er", xd, e.lora_A)               # (..., E, r/E)
        out = torch.einsum("...er,eor->...eo", low, e.lora_B)             # (..., E, d_out)
        return y + (self.scale * (gate.unsqueeze(-1) * out).sum(-2)).to(y.dtype)


@dataclass(frozen=True)
class MoELoRASettings(Settings):
    r: int = setting(16, low=1, help="total rank, split among the experts")
    experts: int = setting(4, low=1, help="experts per layer")
    alpha: float = setting(32.0, low=0, help="scaling (alpha / r)")
    dropout: float = setting(0.0, low=0, below=1, help="dropout on the experts' input")
    vision: bool = setting(False, help="adapt the vision tower too")
    seed: int = seed_setting("initialisation")

    def resolve(self, given: frozenset[str]) -> MoELoRASettings:
        """Cross-field rule: the rank is split evenly among the experts."""
        if self.r % self.experts:
            raise ValueError(f"r={self.r} must be a multiple of experts={self.experts}")
        return self


class MoELoRA(Method):
    name = "moelora"
    settings_class = MoELoRASettings
    settings: MoELoRASettings

    def __init__(self, **args):
        super().__init__(**args)
        self.layers: list[MoELoRALinear] = []

    def setup(self, model, stream: list[Task]) -> None:
        refuse_recipe_lora(model, self.name)
        s = self.settings
        base = unwrap(model)
        pattern = targets(language=True, vision=s.vision)
        paths = [n for n, m in base.named_modules() if re.fullmatch(pattern, n) and isinstance(m, torch.nn.Linear)]
        if not paths:
            raise ValueError(f"moelora: no Linear layer matches {pattern!r}")
        g = torch.Generator().manual_seed(s.seed)
        for path in paths:
            parent_path, _, child = path.rpartition(".")
            parent = base.get_submodule(parent_path)
            layer = MoELoRALinear(getattr(parent, child), s.experts, s.r, s.alpha, s.dropout, g)
            setattr(parent, child, layer)
            self.layers.append(layer)
        for layer in self.layers:      # the experts train on every task (CoIN); the base layer keeps its flags
            layer.cl_moelora.requires_grad_(True)
