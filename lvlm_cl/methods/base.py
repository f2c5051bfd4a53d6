"""The contract between the training loop and a continual-learning method.

A method is one class in one file, registered under one name. The loop calls these hooks, and only
these, in this order for every task of the stream:

    setup(model, stream)                               once, before the first task
    before_task(task, model, train_data) -> train_data  may change the task's training records
    loss(model, batch, outputs, task) -> term | None   every micro-step: a term added to outputs.loss
    after_backward(model, task)                        after each backward pass (every micro-step)
    after_step(model, task)                            after each optimizer step (every trainer.grad_accum
                                                       micro-steps)
    after_task(task, model, train_data)                after the task's last step, before evaluation
    state_dict() / load_state_dict(state)              everything the method needs to resume
    report() -> {name: value}                          figures for metrics.json, after each task

A hook gets what it needs through its arguments and returns a batch, data or a loss; it does not reach
into the loop. Methods compose as a list in the recipe (``methods: [replay, task_prompts]``): each hook
runs for every method in list order; ``before_task`` is chained through its return value and the
``loss`` terms are summed with the language-modelling loss.

A method that needs each training sample's task inside the model's forward (to pick a prompt or an
adapter) sets ``uses_task_ids = True``: training batches then carry ``cl_task_ids`` (the index in the
stream of each sample's task, replayed samples included). The loop does not pass them to the model: it runs
each training forward inside ``continual.held(model, task_ids=..., ...)``, where every ``continual.Selector``
attached to the model takes its choice for that forward; ``loss`` hooks read them from the batch.

The loop computes the language model's logits only at the positions that predict an answer token
(transformers' ``logits_to_keep``), and the loss from those: ``outputs.logits`` is then (N, V), one row per
answer token of the batch, the forward gets no ``labels``, and ``outputs.loss`` is that loss (the
language-modelling loss, in both ways). A method whose ``loss`` reads the logits at
every position, or whose forward hooks read the forward's ``labels``, sets ``full_outputs = True``: when any
method of the run does, the loop runs the model with the labels and the logits of every position, and
``outputs.loss`` is the model's own.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, ClassVar, Mapping

import torch

from lvlm_cl.settings import Settings, build
from lvlm_cl.settings import defaults as settings_defaults
from lvlm_cl.stream import Task  # noqa: F401  (what every hook is given; defined with the stream)


class Method:
    """Base class: every hook does nothing. Subclasses set ``name`` and declare their settings as a frozen
    dataclass deriving from ``lvlm_cl.settings.Settings`` (typed fields with defaults, help and ranges,
    ``settings.setting``), named by ``settings_class``. ``Method(**args)`` checks ``args`` against it
    (``settings.build``: unknown keys, types, finite numbers, ranges, choices) and keeps the result as
    ``self.settings``, which the hooks read; the registry runs the same check when the recipe is loaded."""

    name: ClassVar[str] = ""
    settings_class: ClassVar[type[Settings]] = Settings     # no settings
    settings: Settings                                       # this method's, set by __init__
    defaults: ClassVar[Mapping[str, Any]] = MappingProxyType({})   # name -> default, from settings_class (read-only)
    uses_task_ids: ClassVar[bool] = False
    full_outputs: ClassVar[bool] = False             # needs (B, L, V) logits or the labels in the forward
    zero_unsupported: ClassVar[str | None] = None    # why the method cannot run under any DeepSpeed ZeRO stage
    zero3_unsupported: ClassVar[str | None] = None   # why it cannot run under ZeRO-3 (parameters partitioned)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.defaults = MappingProxyType(settings_defaults(cls.settings_class))

    def __init__(self, **args: Any):
        self.settings = build(self.settings_class, args, owner=f"method {self.name!r}")

    @property
    def hparams(self) -> Mapping[str, Any]:
        """The settings as a read-only name -> value mapping, kept for the tests that look a setting up by its
        name (``m.hparams["key_mode"]``); the hooks read ``self.settings``."""
        return MappingProxyType(dataclasses.asdict(self.settings))

    def setup(self, model: torch.nn.Module, stream: list[Task]) -> None:
        pass

    def before_task(self, task: Task, model: torch.nn.Module, train_data: list) -> list:
        return train_data

    def loss(self, model: torch.nn.Module, batch: dict, outputs: Any, task: Task) -> torch.Tensor | None:
        """An extra term added to the language-modelling loss; None adds nothing."""
        return None

    def after_backward(self, model: torch.nn.Module, task: Task) -> None:
        pass

    def after_step(self, model: torch.nn.Module, task: Task) -> None:
        pass

    def after_task(self, task: Task, model: torch.nn.Module, train_data: list) -> None:
        pass

    def report(self) -> dict[str, float]:
        """Figures the method reports after each task (name -> value; e.g. ``memory_records``), kept in
        ``metrics.json`` as ``name: {task: value}``; the loop reads a method's figures here and nowhere else."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
