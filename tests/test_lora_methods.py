"""olora and moelora: their distinctive terms and layers, on the tiny model."""

import copy

import pytest
import torch

from lvlm_cl.methods.base import Task
from lvlm_cl.methods.moelora import MoELoRA, MoELoRALinear
from lvlm_cl.methods.olora import OLoRA
from lvlm_cl.models.continual import adapters_disabled, is_continual
from lvlm_cl.models import trainable_state_dict

STREAM = [Task(i, n, "exact_match", [], []) for i, n in enumerate(["a", "b", "c"])]


@pytest.fixture(scope="module")
def tiny(tiny_small):
    return tiny_small


@pytest.fixture
def frozen(tiny):
    model = copy.deepcopy(tiny[0])
    model.requires_grad_(False)
    return model


def _inputs(model):
    ids = torch.tensor([[1, 5, 9, 12, 7, 3]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_olora_trains_only_the_current_adapter_and_keeps_earlier_ones_active(frozen):
    m = OLoRA(r=2, vision=True)
    m.setup(frozen, STREAM)
    m.before_task(STREAM[1], frozen, [])
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable and all(".cl_olora_01." in n for n in trainable)
    assert any("vision_tower" in n for n in trainable)
    layer = m.layers[0]
    assert set(layer.active_adapters) == {"cl_olora_00", "cl_olora_01"}
    saved = trainable_state_dict(frozen)
    assert any(".cl_olora_00." in n for n in saved) and any(".cl_olora_02." in n for n in saved)


def test_olora_orthogonality_term_is_the_sum_of_squared_overlaps(frozen):
    m = OLoRA(r=2, orth_weight=0.5)
    m.setup(frozen, STREAM)
    m.before_task(STREAM[2], frozen, [])
    expected = sum((layer.lora_A["cl_olora_02"].weight @ layer.lora_A[old].weight.T).pow(2).sum()
                   for layer in m.layers for old in ("cl_olora_00", "cl_olora_01"))
    assert torch.allclose(m.orthogonality(2), expected)
    term = m.loss(frozen, {}, None, STREAM[2])
    assert torch.allclose(term, 0.5 * expected)
    term.backward()                          # the gradient reaches the new A only
    assert m.layers[0].lora_A["cl_olora_02"].weight.grad is not None
    assert m.layers[0].lora_A["cl_olora_00"].weight.grad is None
    # Orthogonal A matrices give zero.
    with torch.no_grad():
        for layer in m.layers:
            d = layer.lora_A["cl_olora_00"].weight.shape[1]
            eye = torch.eye(d)
            layer.lora_A["cl_olora_00"].weight.copy_(eye[0:2])
            layer.lora_A["cl_olora_01"].weight.copy_(eye[2:4])
            layer.lora_A["cl_olora_02"].weight.copy_(eye[4:6])
    assert m.orthogonality(2).item() == 0.0
    assert m.loss(frozen, {}, None, STREAM[0]) is None       # the first task has nothing to be orthogonal to


def test_moelora_starts_as_the_base_model_and_its_gate_mixes_experts(frozen, tiny):
    base_out = tiny[0](**_inputs(tiny[0])).logits
    m = MoELoRA(r=4, experts=2, alpha=8)
    m.setup(frozen, STREAM)
    assert m.layers and all(isinstance(layer, MoELoRALinear) for layer in m.layers)
    assert torch.allclose(frozen(**_inputs(frozen)).logits, base_out, atol=1e-6)   # B = 0 at the start
    layer = m.layers[0]
    e = layer.cl_moelora
    with torch.no_grad():
        e.lora_B.normal_()
    x = torch.randn(3, layer.base_layer.in_features)
    gate = torch.softmax(e.router(x), -1)
    manual = layer.base_layer(x) + layer.scale * sum(
        gate[:, i:i + 1] * (x @ e.lora_A[i].T @ e.lora_B[i].T) for i in range(2))
    assert torch.allclose(layer(x), manual, atol=1e-5)
    with adapters_disabled(frozen):
        assert torch.allclose(layer(x), layer.base_layer(x))
    assert torch.allclose(layer(x), manual, atol=1e-5)
    trainable = [n for n, p in frozen.named_parameters() if p.requires_grad]
    assert trainable and all(is_continual(n) and ".cl_moelora." in n for n in trainable)


def test_lora_methods_check_settings():
    with pytest.raises(ValueError, match="multiple of experts"):
        MoELoRA(r=6, experts=4)
    with pytest.raises(ValueError, match="'r'"):
        OLoRA(r=0)
    with pytest.raises(ValueError, match="orth_weight"):
        OLoRA(orth_weight=-1)
