"""task_prompts and task_lora: the query is the same in training and at inference, routing picks the right
task, prompts/adapters change the model only through the routed task, generation with the key-value cache
equals generation without it and batched equals one-by-one, and a run reports routing accuracy."""

import copy
import json

import pytest
import torch

from conftest import SMALL_MODEL, colour_stream, prompt_batch, task_batch, write_colour_tasks, write_recipe
from lvlm_cl.config import load_recipe
from lvlm_cl.data.encoding import encode_prompt, encode_record
from lvlm_cl.methods.base import Task
from lvlm_cl.data.dataset import TASK_IDS
from lvlm_cl.models.continual import held, is_continual, selectors
from lvlm_cl.methods.queries import InstructionEncoder
from lvlm_cl.methods.routing import routers
from lvlm_cl.models.continual import generate as routed_generate
from lvlm_cl.methods.task_lora import TaskLoRA
from lvlm_cl.methods.task_prompts import TaskPrompts
from lvlm_cl.models import trainable_state_dict
from lvlm_cl.loop import language_modelling_loss
from lvlm_cl.train import run


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)      # adapters' initialisation draws from the global generator


@pytest.fixture(scope="module")
def tiny():
    from lvlm_cl.models.tiny import TinyLlavaSize, build_tiny_llava

    model, processor = build_tiny_llava(TinyLlavaSize(text_hidden=64, vision_hidden=64, text_intermediate=128), seed=0)
    processor.tokenizer.padding_side = "left"
    return model, processor


@pytest.fixture(scope="module", params=["llava", "gemma3", "qwen2.5-vl"])
def tiny_any(request, tiny):
    """The tiny model of each supported family (Gemma 3 builds its attention masks above its language model;
    Qwen2.5-VL computes 3-D rotary positions there)."""
    if request.param == "llava":
        return tiny
    from lvlm_cl.models.tiny import TinyLlavaSize
    from lvlm_cl.models.tiny_gemma3 import build_tiny_gemma3
    from lvlm_cl.models.tiny_qwen25vl import build_tiny_qwen25vl

    build = build_tiny_gemma3 if request.param == "gemma3" else build_tiny_qwen25vl
    model, processor = build(TinyLlavaSize(text_hidden=64, vision_hidden=64, text_intermediate=128), seed=0)
    processor.tokenizer.padding_side = "left"
    return model, processor


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    return colour_stream(tmp_path_factory.mktemp("routing"))


def _train_batch(processor, records, task_index):
    return task_batch(processor, records, task_index)


_prompts = prompt_batch


def _two_tasks_known(method, model, processor, stream):
    """Both tasks go through before_task, one training step's key term and after_task, as in a run."""
    method.setup(model, stream)
    for task in stream:
        method.before_task(task, model, task.train_records)
        batch = _train_batch(processor, task.train_records[:4], task.index)
        term = method.loss(model, batch, None, task)
        if method.hparams["key_mode"] == "learned":
            assert term is not None and torch.isfinite(term)
        else:
            assert term is None                       # prototype keys add no loss: they are fitted at the end
        method.after_task(task, model, task.train_records)
    return routers(model)[0]


def test_instruction_tokens_are_the_same_in_training_and_at_inference(tiny, stream):
    model, processor = tiny
    r = stream[1].train_records[0]
    train, prompt = encode_record(processor, r, 512), encode_prompt(processor, r, 512)
    image = model.config.image_token_id
    a = InstructionEncoder.instruction_tokens(train.input_ids[None], None, train.labels[None], image)[0]
    b = InstructionEncoder.instruction_tokens(prompt.input_ids[None], None, None, image)[0]
    assert torch.equal(a, b)
    text = processor.tokenizer.decode(a)
    assert "warm or cold" in text and r["messages"][1]["content"][0]["text"] not in text.split("ASSISTANT:")[-1]
    assert not (a == image).any()


@pytest.mark.parametrize("cls, kwargs", [(TaskPrompts, {"length": 4}), (TaskLoRA, {"r": 4}),
                                         (TaskPrompts, {"length": 4, "adapter_r": 4}),
                                         (TaskPrompts, {"length": 4, "key_mode": "learned"}),
                                         (TaskLoRA, {"r": 4, "key_mode": "learned"})])
def test_routes_each_instruction_to_its_task(tiny_any, stream, cls, kwargs):
    model = copy.deepcopy(tiny_any[0]).eval()
    processor = tiny_any[1]
    router = _two_tasks_known(cls(**kwargs), model, processor, stream)
    for task in stream:
        batch = _prompts(processor, task.test_records)
        best, sims = router.route(batch["input_ids"], batch["attention_mask"])
        assert best.tolist() == [task.index] * len(task.test_records)
        assert sims.shape == (len(task.test_records), 2) and bool((sims[:, task.index] > 0.99).all())
        assert bool((sims[:, 1 - task.index] < sims[:, task.index]).all())


@pytest.mark.parametrize("cls, kwargs", [(TaskPrompts, {"length": 4}), (TaskLoRA, {"r": 4}),
                                         (TaskPrompts, {"length": 4, "adapter_r": 4}),
                                         (TaskPrompts, {"length": 0, "adapter_r": 4}),
                                         (TaskPrompts, {"length": 4, "adapter_r": 4, "adapter_head": True})])
def test_generation_routes_by_itself_and_equals_unbatched_and_uncached(tiny_any, stream, cls, kwargs):
    model = copy.deepcopy(tiny_any[0]).eval()
    processor = tiny_any[1]
    method = cls(**kwargs)
    _two_tasks_known(method, model, processor, stream)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # make every task's part far from its initial value, so a wrong route shows
        for n, p in model.named_parameters():
            if is_continual(n) and (n.endswith(".prompt") or "lora_B" in n):
                p.copy_(torch.randn(p.shape, generator=g))
    records = stream[0].test_records[:2] + stream[1].test_records[:2]
    batch = _prompts(processor, records)
    tok = processor.tokenizer
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        cached = routed_generate(model, **batch, **gen)
        new = cached[:, batch["input_ids"].shape[1]:]
        # Several tokens decoded per sample, none of them the end: every decoding step after the first ran.
        assert new.shape[1] == 5 and not bool(torch.isin(new, torch.tensor([tok.pad_token_id, tok.eos_token_id])).any())
        assert not selectors_hold(model)              # nothing is left on the model after the call
        uncached = routed_generate(model, **batch, **gen, use_cache=False)
        assert torch.equal(cached, uncached)
        for i, r in enumerate(records):
            single = routed_generate(model, **_prompts(processor, [r]), **gen)
            assert torch.equal(single[0, -5:], cached[i, -5:])
        # Every decoding step used each sample's own task: its logits are those with the true task forced,
        # and forcing the other task changes them.
        truth = torch.tensor([0, 0, 1, 1])
        scores = dict(gen, return_dict_in_generate=True, output_logits=True)
        steps = torch.stack(routed_generate(model, **batch, **scores).logits)
        with held(model, task_ids=truth, input_ids=batch["input_ids"]):
            assert torch.allclose(torch.stack(model.generate(**batch, **scores).logits), steps, atol=1e-5)
        with held(model, task_ids=1 - truth, input_ids=batch["input_ids"]):
            other = torch.stack(model.generate(**batch, **scores).logits)
        assert not torch.allclose(other[-1], steps[-1], atol=1e-3)     # the last step too, not only the first
        # Routed logits = logits with each sample's true task forced; a different task gives others.
        with held(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]):
            routed = model(**batch).logits
        with held(model, task_ids=truth, input_ids=batch["input_ids"]):
            forced = model(**batch).logits
        with held(model, task_ids=1 - truth, input_ids=batch["input_ids"]):
            wrong = model(**batch).logits
    assert torch.allclose(routed, forced, atol=1e-5)
    assert not torch.allclose(routed, wrong, atol=1e-3)
    assert not selectors_hold(model)


def selectors_hold(model) -> bool:
    return any(s.held or getattr(s, "selected", None) is not None
               or getattr(s, "queries", None) is not None or s.input_mask is not None for s in selectors(model))


@pytest.mark.parametrize("cls, kwargs", [(TaskPrompts, {"length": 4}), (TaskLoRA, {"r": 4})])
def test_plain_generate_of_a_routed_model_is_refused_not_misrouted(tiny, stream, cls, kwargs):
    """``model.generate`` (or a forward) without a held choice would have to guess, and its one-token decoding
    steps cannot be routed: it stops with the fix in the message, and leaves no choice behind."""
    model = copy.deepcopy(tiny[0]).eval()
    processor = tiny[1]
    _two_tasks_known(cls(**kwargs), model, processor, stream)
    batch = _prompts(processor, stream[0].test_records[:2])
    with torch.no_grad(), pytest.raises(ValueError, match=r"routing\.generate"):
        model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    assert not selectors_hold(model)
    with pytest.raises(ValueError, match=r"routing\.held"):
        model(**batch)
    with pytest.raises(TypeError, match="task_ids"):
        model(**batch, **{TASK_IDS: torch.tensor([0, 0])})
    with held(model, input_ids=batch["input_ids"]), pytest.raises(RuntimeError, match="do not nest"):
        with held(model, input_ids=batch["input_ids"]):
            pass
    assert not selectors_hold(model)


def test_task_prompts_keeps_sequence_length_and_trains_only_the_current_task(tiny, stream):
    model = copy.deepcopy(tiny[0]).train()
    processor = tiny[1]
    method = TaskPrompts(length=3)
    method.setup(model, stream)
    method.before_task(stream[0], model, [])
    method.before_task(stream[1], model, [])
    pool = method.pool
    assert [s.prompt.requires_grad for s in pool.slots] == [False, True]
    assert [s.keys.requires_grad for s in pool.slots] == [False, False]     # prototype keys are fitted, not trained
    batch = _train_batch(processor, stream[1].train_records[:2] + stream[0].train_records[:2], 1)
    batch[TASK_IDS] = torch.tensor([1, 1, 0, 0])              # two replayed samples of task 0
    out, _ = language_modelling_loss(model, batch, full=True)
    assert out.logits.shape[:2] == batch["input_ids"].shape    # prompt positions are dropped again
    out.loss.backward()
    assert pool.slots[1].prompt.grad is not None and pool.slots[1].prompt.grad.abs().sum() > 0
    assert pool.slots[0].prompt.grad is None                        # the earlier task's prompt is frozen
    names = trainable_state_dict(model)
    assert any("continual.task_prompts.slots.0.prompt" in n for n in names)   # saved although frozen
    assert any(n.endswith("continual.task_prompts.known") for n in names)


def test_task_prompts_adapters_start_fresh_or_from_the_previous_task_and_only_the_current_one_trains(tiny, stream):
    """With ``adapter_r`` each task owns a LoRA adapter beside its prompt: with ``adapter_init: previous`` the
    new task's starts as a copy of the previous one's (fresh by default: PEFT's zero B), and only it (and its
    prompt) receives gradients."""
    model = copy.deepcopy(tiny[0]).train()
    processor = tiny[1]
    method = TaskPrompts(length=3, adapter_r=4, adapter_init="previous")
    method.setup(model, stream)
    method.before_task(stream[0], model, [])
    params = dict(model.named_parameters())
    first = {n: p for n, p in params.items() if ".cl_task_prompts_00." in n}
    second = {n.replace("_00.", "_01."): p for n, p in first.items()}
    assert first and all(n in params for n in second)
    assert any("vision_tower" in n for n in first) and any("language_model" in n for n in first)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in first.values():
            p.copy_(torch.randn(p.shape, generator=g))         # what task 0 "learnt"
    method.before_task(stream[1], model, [])
    for n, p in first.items():
        assert torch.equal(params[n.replace("_00.", "_01.")], p), n
        assert not p.requires_grad and params[n.replace("_00.", "_01.")].requires_grad
    batch = _train_batch(processor, stream[1].train_records[:2] + stream[0].train_records[:2], 1)
    batch[TASK_IDS] = torch.tensor([1, 1, 0, 0])
    out, _ = language_modelling_loss(model, batch, full=True)
    out.loss.backward()
    assert all(p.grad is None for p in first.values())
    assert sum(float(params[n].grad.abs().sum()) for n in second if params[n].grad is not None) > 0

    # By default (adapter_init: fresh) a new task's adapter is the base model's: PEFT's zero B.
    model = copy.deepcopy(tiny[0]).train()
    method = TaskPrompts(length=3, adapter_r=4)
    method.setup(model, stream)
    method.before_task(stream[0], model, [])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".cl_task_prompts_00." in n:
                p.copy_(torch.randn(p.shape, generator=g))
    method.before_task(stream[1], model, [])
    second_b = [p for n, p in model.named_parameters() if ".cl_task_prompts_01." in n and "lora_B" in n]
    assert second_b and all(not p.any() for p in second_b)


def test_task_prompts_head_adapters_start_as_the_base_model_and_only_the_current_one_trains(tiny, stream):
    """``adapter_head``: each task's residual on the language model's last hidden state starts at zero (the
    model is unchanged), is copied with ``adapter_init: previous``, is saved with the stage, and only the task
    in training's receives gradients; a sample routed to a task gets that task's residual and no other."""
    model = copy.deepcopy(tiny[0]).train()
    processor = tiny[1]
    records = stream[1].train_records[:2] + stream[0].train_records[:2]
    batch = _train_batch(processor, records, 1)
    batch[TASK_IDS] = torch.tensor([1, 1, 0, 0])
    plain = copy.deepcopy(tiny[0]).train()
    plain_method = TaskPrompts(length=3, adapter_r=4, init="random")
    plain_method.setup(plain, stream)
    method = TaskPrompts(length=3, adapter_r=4, init="random", adapter_head=True, adapter_init="previous")
    method.setup(model, stream)
    heads = method.heads.tasks
    for m, mod in [(plain_method, plain), (method, model)]:
        m.before_task(stream[0], mod, [])
    first = dict(batch, **{TASK_IDS: torch.tensor([0, 0, 0, 0])})
    with torch.no_grad():
        want = language_modelling_loss(plain, first, full=True)[0].logits
        got = language_modelling_loss(model, first, full=True)[0].logits
    assert torch.allclose(got, want, atol=1e-6)                    # zero B: the base model's outputs
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in heads[0].parameters():
            p.copy_(torch.randn(p.shape, generator=g))              # what task 0 "learnt"
    method.before_task(stream[1], model, [])
    assert all(torch.equal(a, b) for a, b in zip(heads[1].parameters(), heads[0].parameters()))
    assert all(p.requires_grad for p in heads[1].parameters()) and not any(p.requires_grad for p in heads[0].parameters())
    with torch.no_grad():
        heads[1].lora_B.mul_(-1.0)                                   # task 1's residual differs from task 0's
        both = language_modelling_loss(model, batch, full=True)[0].logits
        batch_own = dict(batch, **{TASK_IDS: torch.tensor([1, 1, 1, 1])})
        ones = language_modelling_loss(model, batch_own, full=True)[0].logits
    assert torch.allclose(both[:2], ones[:2], atol=1e-5) and not torch.allclose(both[2:], ones[2:], atol=1e-3)
    out, _ = language_modelling_loss(model, batch, full=True)
    out.loss.backward()
    assert all(p.grad is None for p in heads[0].parameters())
    assert float(heads[1].lora_A.grad.abs().sum()) > 0 and float(heads[1].lora_B.grad.abs().sum()) > 0
    names = trainable_state_dict(model)
    assert any("continual.task_prompts_head.tasks.0.lora_B" in n for n in names)   # saved although frozen


@pytest.mark.parametrize("adapter_r", [0, 4])
def test_replay_route_current_runs_replayed_records_through_the_task_in_training(tiny, stream, adapter_r):
    """``replay_route: current``: a replayed record of task 0 trains task 1's prompt (and adapter): its loss is
    the one it has when labelled task 1, and task 1's prompt gets its gradient; ``own`` keeps its own route."""
    processor = tiny[1]
    records = stream[1].train_records[:2] + stream[0].train_records[:2]
    losses = {}
    for route, ids in [("current", [1, 1, 0, 0]), ("own", [1, 1, 1, 1]), ("own", [1, 1, 0, 0])]:
        torch.manual_seed(0)
        model = copy.deepcopy(tiny[0]).train()
        method = TaskPrompts(length=3, adapter_r=adapter_r, replay_route=route, init="random")
        method.setup(model, stream)
        method.before_task(stream[0], model, [])
        with torch.no_grad():      # task 0's prompt and task 1's differ
            method.pool.slots[0].prompt.mul_(3.0)
        method.before_task(stream[1], model, [])
        batch = _train_batch(processor, records, 1)
        batch[TASK_IDS] = torch.tensor(ids)
        out, _ = language_modelling_loss(model, batch, full=True)
        losses[(route, tuple(ids))] = out.loss.detach()
    assert torch.allclose(losses[("current", (1, 1, 0, 0))], losses[("own", (1, 1, 1, 1))])
    assert not torch.allclose(losses[("own", (1, 1, 0, 0))], losses[("own", (1, 1, 1, 1))])


def test_task_lora_refuses_the_recipe_lora(tiny, stream):
    from lvlm_cl.config import LoraSettings, ModelConfig
    from lvlm_cl.models import apply_training_setup

    model = apply_training_setup(copy.deepcopy(tiny[0]), ModelConfig(lora=LoraSettings(r=2)))
    with pytest.raises(ValueError, match="remove model.lora"):
        TaskLoRA().setup(model, stream)


def test_prototype_keys_give_each_phrasing_of_a_task_its_own_key(tiny, tmp_path):
    """A task asked in two phrasings, one of which resembles the other task's: prototypes keep both."""
    from conftest import png, record

    img = str(png(tmp_path / "i.png", "red"))
    a = [record(f"a{i}", img, q, "x", "a") for i, q in enumerate(["What color is the image?",
                                                                  "Name the main colour in this picture."] * 4)]
    b = [record(f"b{i}", img, "What color is the image? Is it warm or cold?", "warm", "b") for i in range(8)]
    stream = [Task(0, "a", "exact_match", a, a), Task(1, "b", "exact_match", b, b)]
    model, processor = copy.deepcopy(tiny[0]).eval(), tiny[1]
    router = _two_tasks_known(TaskPrompts(length=2, keys_per_task=2), model, processor,
                              [Task(t.index, t.name, t.metric, t.train_records, t.test_records) for t in stream])
    batch = _prompts(processor, a[:2] + b[:2])
    best, _ = router.route(batch["input_ids"], batch["attention_mask"])
    assert best.tolist() == [0, 0, 1, 1]
    keys = router.slots[0]()[0]
    assert keys.shape[0] == 2 and float(torch.nn.functional.cosine_similarity(keys[0], keys[1], dim=0)) < 0.999


@pytest.mark.parametrize("bad, match", [({"length": 0}, "length"), ({"init": "zeros"}, "init"),
                                        ({"key_mode": "random"}, "key_mode"), ({"keys_per_task": 0}, "keys_per_task"),
                                        ({"key_weight": -1}, "key_weight"), ({"top_k": 1.5}, "top_k"),
                                        ({"adapter_r": -1}, "adapter_r"), ({"adapter_r": 2, "top_k": 2}, "top_k"),
                                        ({"adapter_r": 2, "adapter_language": False, "adapter_vision": False},
                                         "adapter_language"), ({"replay_route": "mixed"}, "replay_route"),
                                        ({"length": -1, "adapter_r": 2}, "length"),
                                        ({"adapter_head": True}, "adapter_head")])
def test_task_prompts_settings_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        TaskPrompts(**bad)


@pytest.mark.slow
def test_a_run_reports_routing_accuracy(tmp_path):
    files = write_colour_tasks(tmp_path / "data", n_train=16, n_test=8)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", files, out, steps_per_task=2)
    run(load_recipe(recipe, [*SMALL_MODEL, "methods=[task_prompts, {name: replay, memory_per_task: 4}]"]),
        progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["routing_accuracy"] == {"colour": {"colour": 100.0}, "warmth": {"colour": 100.0, "warmth": 100.0}}
    assert "## Routing accuracy" in (out / "report.md").read_text()
