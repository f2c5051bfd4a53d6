"""The model's continual-learning holder and the routing context: what methods add to a model and how a
choice of task is held for one call of it.

- ``<model>.continual`` (``attach``): a ``ModuleDict`` holding every method's modules (keys, prompts,
  adapters' routers), so they are saved with every task checkpoint and restored with it (``is_continual``).
- The routing context (``held``): one choice of task per sample, made once per call from that call's own
  inputs (a training batch's task ids, or the prompt of a ``generate`` call) and held for it by every
  ``Selector`` attached to the model, then released. Nothing depends on the arguments transformers passes to
  the forward inside ``generate``, and nothing of a call is left on the model after it.

It lives with the models (below the methods and the evaluation) because evaluation and chat generate through
it (``generate``) without knowing which methods a run uses.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from lvlm_cl.data.dataset import TASK_IDS

CONTINUAL = "continual"          # the submodule of the model that holds every method's modules


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP / DeepSpeed / compile wrappers and a PEFT wrapper (or the model
    itself)."""
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model, keep_fp32_wrapper=True)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def holder(model: torch.nn.Module) -> torch.nn.ModuleDict:
    """The model's ``continual`` holder (created on first use, with the routing context's hooks): where
    methods' modules live (``attach``), the call held now (``held``), and what methods share of the model
    without it being part of its state (``shared``)."""
    base = unwrap(model)
    if not hasattr(base, CONTINUAL):
        base.add_module(CONTINUAL, torch.nn.ModuleDict())
        _install_selection(base)
    return getattr(base, CONTINUAL)


def _existing_holder(model: torch.nn.Module) -> torch.nn.ModuleDict | None:
    """The model's ``continual`` holder if a method has made one (``holder`` makes it)."""
    return getattr(unwrap(model), CONTINUAL, None)


def shared(model: torch.nn.Module, key: str, build):
    """One object per model that every method of the run shares and that is not part of the model's state
    (never saved, never moved with it): ``build()`` on first use, kept on the model's holder after that
    (the frozen instruction encoder of task-key routing, ``methods.queries.query_encoder``)."""
    store = holder(model).__dict__.setdefault("_shared", {})
    if key not in store:
        store[key] = build()
    return store[key]


def attach(model: torch.nn.Module, name: str, module: torch.nn.Module) -> torch.nn.Module:
    """Register ``module`` as ``<model>.continual.<name>`` (part of the model's state from now on)."""
    holder(model)[name] = module
    return module


def is_continual(name: str) -> bool:
    """Whether a parameter or buffer belongs to what methods added to the model (always checkpointed, frozen
    or not): modules under ``continual``, adapters whose name starts with ``cl_``."""
    return any(part == CONTINUAL or part.startswith("cl_") for part in name.split("."))


@contextlib.contextmanager
def adapters_disabled(module: torch.nn.Module):
    """Run ``module`` on its base weights: every PEFT adapter layer in it disabled (PEFT's
    ``enable_adapters``), and every layer of a method's own (``is_cl_adapter``), then restored,
    ``requires_grad`` flags included (PEFT resets them)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    own = [m for m in module.modules() if getattr(m, "is_cl_adapter", False)]   # methods' own adapter layers
    states = [(m, m.disable_adapters, [(p, p.requires_grad) for p in m.parameters()]) for m in layers]
    enabled = [(m, m.adapters_enabled) for m in own]
    try:
        for m in layers:
            m.enable_adapters(False)
        for m in own:
            m.adapters_enabled = False
        yield
    finally:
        for m, disabled, flags in states:
            m.enable_adapters(not disabled)
            for p, flag in flags:
                p.requires_grad_(flag)
        for m, flag in enabled:
            m.adapters_enabled = flag


def selectors(model: torch.nn.Module) -> list["Selector"]:
    """The modules of ``<model>.continual`` that select per sample inside the forward (``Selector``)."""
    found = _existing_holder(model)
    return [m for m in found.values() if isinstance(m, Selector)] if found is not None else []


def task_router(model: torch.nn.Module) -> "Selector | None":
    """The selector that picks one task per sample by routing its instruction (``routes_tasks``), if the
    model has one: what routing accuracy is measured on, and what chat shows."""
    return next((s for s in selectors(model) if s.routes_tasks), None)


@dataclass
class Call:
    """The routing context of one call of the model: what ``held`` holds for the duration of its block, in
    one place (the model's ``continual`` holder), and nowhere else once the block ends.

    ``choices`` holds what each ``Selector`` chose for the call's samples (its ``choose``'s return value).
    Per forward inside the block, the model's own hooks set ``past_length`` (positions of this call already
    in a decoding cache) and ``input_mask`` (the forward's 2-D padding mask, or None) for the hooks below the
    model, and clear them after it. ``past_length`` is counted, not read from the cache: a forward shorter
    than the held prompt continues the previous ones (how ``generate`` decodes with a cache); one at least as
    long starts again from position 0. ``notes``: what a selector's hook below the model hands from its
    pre-hook to its post-hook within one forward (``task_prompts``: the prompt positions to strip)."""

    prompt_length: int = 0              # of the held call's input_ids
    choices: dict[int, Any] = field(default_factory=dict)        # id(selector) -> its choice
    cache_length: int = 0               # positions the call's forwards have run so far
    past_length: int = 0
    input_mask: torch.Tensor | None = None
    notes: dict[tuple[int, str], Any] = field(default_factory=dict)


def current_call(model: torch.nn.Module) -> Call | None:
    """The call held for ``model`` now (None outside ``held``)."""
    found = _existing_holder(model)
    return None if found is None else found.__dict__.get("_call")


@contextlib.contextmanager
def held(model: torch.nn.Module, *, input_ids: torch.Tensor | None = None,
         attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
         task_ids: torch.Tensor | None = None):
    """One routing choice for everything the model runs inside the block, released at its end.

    Each ``Selector`` of the model chooses now, in the order the methods attached them (the recipe's):
    from ``task_ids`` (a training batch: each sample's task, replayed samples included) or by routing the
    instructions of ``input_ids`` (the text before the first answer token of ``labels``, when given). A
    ``generate`` call inside the block decodes every token with that choice (``generate`` below). ``model``
    may be wrapped (PEFT, DDP, DeepSpeed). Without selectors there is nothing to hold."""
    found = selectors(model)
    if not found:
        yield
        return
    box = _existing_holder(model)
    if box.__dict__.get("_call") is not None:
        raise RuntimeError("routing.held: a routing choice is already held for this model (blocks do not nest)")
    call = Call(prompt_length=0 if input_ids is None else input_ids.shape[1])
    box.__dict__["_call"] = call          # a plain attribute, not a submodule: never saved, never moved
    try:
        for s in found:
            # Where the selector reads the call back (``Selector.call``); bound here, at every call, so that a
            # deep copy of the model reads its own holder.
            s.__dict__["_holder"] = weakref.ref(box)
            call.choices[id(s)] = s.choose(task_ids, input_ids, attention_mask, labels)
        yield
    finally:
        box.__dict__["_call"] = None


@contextlib.contextmanager
def held_for_batch(model: torch.nn.Module, batch: dict):
    """``held`` for a training batch (its ``cl_task_ids`` when it has them, else its instructions)."""
    with held(model, task_ids=batch.get(TASK_IDS), input_ids=batch["input_ids"],
              attention_mask=batch.get("attention_mask"), labels=batch.get("labels")):
        yield


def model_inputs(batch: dict) -> dict:
    """A training batch as the model's forward takes it (without ``cl_task_ids``)."""
    return {k: v for k, v in batch.items() if k != TASK_IDS}


def generate(model: torch.nn.Module, **inputs):
    """``model.generate(**inputs)`` with the routing chosen once from the prompt (``input_ids``) and held for
    the whole call: how evaluation, ``scripts/evaluate.py`` and chat generate. Without routed methods it is
    ``model.generate``."""
    with held(model, input_ids=inputs.get("input_ids"), attention_mask=inputs.get("attention_mask")):
        return model.generate(**inputs)


class Selector:
    """What a module that selects by task inside the forward implements (a ``TaskKeyRouter``, the
    ``cross_modal_moe`` adapter): ``needs_route`` and ``choose``, which returns the choice for a call's samples
    (it keeps nothing itself). The choice lives in the call's context (``Call``) for the duration of ``held``
    and is read back with ``choice``. Once a task is known (``needs_route``), a forward of the model outside
    such a block is refused: it would have to guess, and a decoding step's one-token input cannot be routed."""

    routes_tasks = False        # picks one task per sample by routing its instruction (``route``)

    @property
    def needs_route(self) -> bool:
        """Whether a forward must have a choice (some task is known)."""
        raise NotImplementedError

    @property
    def num_known(self) -> int:
        """Tasks that take part in routing (``routes_tasks`` selectors)."""
        raise NotImplementedError

    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """``routes_tasks`` selectors: (best task per sample (B,), similarities (B, known)) for prompts."""
        raise NotImplementedError

    def choose(self, task_ids, input_ids, attention_mask, labels) -> Any:
        """This selector's choice for the call's samples (None: nothing to choose yet)."""
        raise NotImplementedError

    @property
    def call(self) -> Call | None:
        """The call held for the model this selector is attached to (None outside ``held``)."""
        ref = self.__dict__.get("_holder")
        box = ref() if ref is not None else None
        return None if box is None else box.__dict__.get("_call")

    @property
    def held(self) -> bool:
        return self.call is not None

    @property
    def choice(self) -> Any:
        call = self.call
        return None if call is None else call.choices.get(id(self))

    @property
    def past_length(self) -> int:
        call = self.call
        return 0 if call is None else call.past_length

    @property
    def input_mask(self) -> torch.Tensor | None:
        call = self.call
        return None if call is None else call.input_mask


def _positions(args, kwargs) -> int:
    """The sequence length of a forward's input (``input_ids`` or ``inputs_embeds``)."""
    x = kwargs.get("input_ids", args[0] if args else None)
    if x is None:
        x = kwargs.get("inputs_embeds")
    return 0 if x is None else x.shape[1]


def _install_selection(base: torch.nn.Module) -> None:
    """The forward hooks of ``Selector`` (once per model: when its ``continual`` holder is created). The
    post-hook runs even when the forward raises."""

    def before(module, args, kwargs):
        if TASK_IDS in kwargs:
            raise TypeError(f"the model got '{TASK_IDS}': pass each sample's task with routing.held(model, "
                            "task_ids=...) around the forward (as loop.language_modelling_loss does)")
        call = current_call(module)
        if call is None:
            if any(s.needs_route for s in selectors(module)):
                raise ValueError("routing: this model picks a task per sample, and it ran with no routing choice "
                                 "held: generate with lvlm_cl.models.continual.generate(model, ...) (routing.generate), "
                                 "or run a forward inside lvlm_cl.models.continual.held(model, input_ids=...) "
                                 "(routing.held; or task_ids=...)")
            return args, kwargs
        mask = kwargs.get("attention_mask")
        length = _positions(args, kwargs)
        two_d = isinstance(mask, torch.Tensor) and mask.dim() == 2
        call.past_length = call.cache_length if length < call.prompt_length else 0
        if two_d and mask.shape[1] - length != call.past_length:
            raise RuntimeError(f"routing: a forward of {length} positions with an attention mask of "
                               f"{mask.shape[1]}, after {call.cache_length} positions of this call: the model "
                               "was not called as greedy or sampled decoding calls it")
        call.input_mask = mask if two_d else None
        return args, kwargs

    def after(module, args, kwargs, output):
        call = current_call(module)
        if call is not None:
            call.cache_length = call.past_length + _positions(args, kwargs)
            call.input_mask, call.past_length = None, 0
            call.notes.clear()
        return output

    base.register_forward_pre_hook(before, with_kwargs=True)
    base.register_forward_hook(after, with_kwargs=True, always_call=True)


__all__ = ["CONTINUAL", "Call", "Selector", "adapters_disabled", "attach", "current_call", "generate", "held",
           "held_for_batch", "holder", "is_continual", "model_inputs", "selectors", "shared", "task_router", "unwrap"]
