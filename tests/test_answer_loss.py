"""The training loss from the logits of answer positions only (``loop.language_modelling_loss``): the same
loss and the same gradients as the model's own loss over every position, for both model families and with
a method's hooks in the forward; methods that need every position's logits get them."""

import copy

import pytest
import torch

from conftest import colour_stream, task_batch
from lvlm_cl.methods import build_methods
from lvlm_cl.config import MethodSpec
from lvlm_cl.data.dataset import TASK_IDS
from lvlm_cl.methods.task_prompts import TaskPrompts
from lvlm_cl.loop import answer_positions, language_modelling_loss

SIZE = dict(text_hidden=64, vision_hidden=64, text_intermediate=128)


@pytest.fixture(scope="module", params=["llava", "gemma3", "qwen2.5-vl"])
def family(request):
    from lvlm_cl.models.tiny import TinyLlavaSize, build_tiny_llava
    from lvlm_cl.models.tiny_gemma3 import build_tiny_gemma3
    from lvlm_cl.models.tiny_qwen25vl import build_tiny_qwen25vl

    build = {"llava": build_tiny_llava, "gemma3": build_tiny_gemma3, "qwen2.5-vl": build_tiny_qwen25vl}[request.param]
    return build(TinyLlavaSize(**SIZE), seed=0)


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    return colour_stream(tmp_path_factory.mktemp("answer_loss"))


def _batch(processor, stream):
    """Samples of both tasks (different lengths, so right padding), with answers of one and more tokens."""
    records = stream[0].train_records[:3] + stream[1].train_records[:3]
    return task_batch(processor, records, [0, 0, 0, 1, 1, 1])


def _loss_and_grads(model, batch, full):
    model.zero_grad()
    outputs, loss = language_modelling_loss(model, batch, full)
    loss.backward()
    return outputs, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_answer_positions_are_those_whose_next_token_is_an_answer_token():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, -100]])
    assert answer_positions(labels).tolist() == [[False, True, True, False, False],
                                                 [True, False, False, False, False]]


def test_the_answer_only_loss_and_gradients_equal_the_models_own(family, stream):
    model, processor = family
    model = copy.deepcopy(model).train()
    batch = _batch(processor, stream)
    del batch[TASK_IDS]
    lengths = batch["attention_mask"].sum(-1)
    assert lengths.min() < lengths.max()                     # padding is part of what is skipped
    full_out, full_loss, full_grads = _loss_and_grads(model, batch, full=True)
    out, loss, grads = _loss_and_grads(model, batch, full=False)
    answers = int((batch["labels"] != -100).sum())
    assert full_out.logits.shape[:2] == batch["input_ids"].shape
    assert out.logits.shape[0] == answers < batch["input_ids"].numel() / 4
    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.detach(), loss)            # methods read the LM loss as outputs.loss
    assert grads.keys() == full_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # the rows are the full logits at the answer positions
    torch.testing.assert_close(out.logits, full_out.logits[answer_positions(batch["labels"])], rtol=1e-5, atol=1e-5)


def test_with_task_prompts_in_the_forward_the_losses_still_agree(stream):
    from lvlm_cl.models.tiny import TinyLlavaSize, build_tiny_llava

    model, processor = build_tiny_llava(TinyLlavaSize(**SIZE), seed=0)
    torch.manual_seed(0)
    method = TaskPrompts(length=4)
    method.setup(model, stream)
    method.before_task(stream[0], model, stream[0].train_records)
    method.before_task(stream[1], model, stream[1].train_records)
    batch = _batch(processor, stream)
    _, full_loss, full_grads = _loss_and_grads(model, dict(batch), full=True)
    _, loss, grads = _loss_and_grads(model, dict(batch), full=False)
    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-6)
    prompt = [n for n in grads if "prompt" in n]
    assert prompt and all(float(grads[n].abs().sum()) > 0 for n in prompt)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_methods_that_read_every_positions_logits_ask_for_them():
    full = {m.name for m in build_methods([MethodSpec(n) for n in ("lwf", "semantic_transfer", "cross_modal_moe")])
            if m.full_outputs}
    assert full == {"lwf", "semantic_transfer"}
    # cross_modal_moe's router reads the batch's labels through routing.held, not through the forward's.
    assert not any(m.full_outputs for m in build_methods([MethodSpec(n) for n in ("finetune", "replay", "task_prompts",
                                                                                  "task_lora", "ewc", "cross_modal_moe")]))


def test_a_hook_that_changes_the_sequence_length_is_caught(stream):
    from lvlm_cl.models.tiny import TinyLlavaSize, build_tiny_llava

    model, processor = build_tiny_llava(TinyLlavaSize(**SIZE), seed=0)
    batch = _batch(processor, stream)
    del batch[TASK_IDS]
    lm = model.model.language_model
    handle = lm.register_forward_hook(lambda m, a, out: out.__class__(last_hidden_state=out.last_hidden_state[:, 1:]))
    try:
        with pytest.raises((RuntimeError, IndexError)):
            language_modelling_loss(model, batch)
    finally:
        handle.remove()
