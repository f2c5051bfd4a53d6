"""trainer.lora_plus_ratio: LoRA+ through PEFT's public optimizer factory (the B matrices at lr x ratio)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lvlm_cl.errors import ConfigError
from lvlm_cl.loop import make_optimizer
from lvlm_cl.methods.adapters import inject_lora


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.language_model = torch.nn.Module()
        self.language_model.layers = torch.nn.ModuleList([torch.nn.Module()])
        self.language_model.layers[0].self_attn = torch.nn.Module()
        self.language_model.layers[0].self_attn.q_proj = torch.nn.Linear(8, 8)
        self.prompt = torch.nn.Parameter(torch.zeros(4, 8))   # a method's own trainable parameter


def trainer(ratio, optimizer="adamw"):
    return SimpleNamespace(lr=1e-3, weight_decay=0.0, optimizer=optimizer, lora_plus_ratio=ratio)


def lora_net():
    net = Net()
    for p in net.parameters():
        p.requires_grad_(False)
    inject_lora(net, "cl_t_00", r=2, alpha=4, dropout=0.0, target_modules=r".*q_proj")
    for n, p in net.named_parameters():
        p.requires_grad_("lora_" in n or n == "prompt")
    return net


def lr_of(optimizer, name_fragment, net):
    params = dict(net.named_parameters())
    [param] = [p for n, p in params.items() if name_fragment in n]
    [group] = [g for g in optimizer.param_groups if any(q is param for q in g["params"])]
    return group["lr"]


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_fused"])
def test_the_b_matrices_learn_at_ratio_times_lr_and_the_rest_at_lr(optimizer):
    net = lora_net()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = make_optimizer(net, params, trainer(16.0, optimizer))
    assert lr_of(opt, "lora_B", net) == pytest.approx(16e-3)
    assert lr_of(opt, "lora_A", net) == pytest.approx(1e-3)
    assert lr_of(opt, "prompt", net) == pytest.approx(1e-3)
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for p in params}                 # every trainable parameter, once, nothing frozen
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params)


def test_without_the_ratio_one_rate_for_everything():
    net = lora_net()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = make_optimizer(net, params, trainer(None))
    assert {g["lr"] for g in opt.param_groups} == {1e-3}


def test_a_ratio_without_any_lora_is_refused():
    net = Net()
    params = list(net.parameters())
    with pytest.raises(ConfigError, match="lora_plus_ratio: nothing that trains is a LoRA adapter"):
        make_optimizer(net, params, trainer(16.0))
