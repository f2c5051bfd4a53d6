"""EWC: Elastic Weight Consolidation (Kirkpatrick et al., "Overcoming catastrophic forgetting in neural
networks", PNAS 2017), with the online variant of Schwarz et al. 2018 ("Progress & Compress") as default.

After each task the method stores, for every parameter that requires grad, a diagonal Fisher F and the
parameter's value θ* at the end of the task; every later micro-step adds

    λ/2 · Σ_params Σ F · (θ − θ*)²

to the language-modelling loss, so parameters that mattered for earlier tasks are pulled back to where
those tasks left them.

    methods: [{name: ewc, lambda_: 100.0}]                        # online, gamma 1.0
    methods: [{name: ewc, lambda_: 100.0, online: true, gamma: 0.9}]
    methods: [{name: ewc, lambda_: 100.0, online: false}]          # one penalty per finished task

Settings (``lambda_`` keeps the trailing underscore because ``lambda`` is a Python keyword):

- ``lambda_`` (number >= 0, default 100.0): the penalty's weight λ; 0 keeps estimating F but adds nothing.
- ``online`` (bool, default true): one running Fisher and one anchor, F ← γ·F_old + F_task, θ* ← the values
  after the latest task (Schwarz et al.). false: one (F_t, θ*_t) pair kept per finished task and the
  penalty summed over them (the original EWC; memory grows by two copies of the trainable parameters per
  task).
- ``gamma`` (number in (0, 1], default 1.0): decay of the old Fisher in the online variant; only with
  ``online: true``.

Which Fisher. The hooks never see the processor, so the method cannot re-encode a task's records after
training to run extra backward passes. F is therefore the *empirical Fisher from the training gradients*
(the cheap variant several continual-learning libraries offer): the mean, over every micro-step of the
task, of the squared per-micro-batch gradient of each trainable parameter. Precisely:

- The gradient is read by a hook on each trainable parameter (``Tensor.register_hook``), which autograd
  calls with that backward pass's own gradient before it is accumulated into ``p.grad``, reduced across
  processes by DDP or moved into DeepSpeed ZeRO's partitioned buffers. So F is the same computation in one
  process, under DDP and under ZeRO-1/2, and each micro-step's gradient is its own even when gradients
  accumulate over ``trainer.grad_accum`` = m micro-steps.
- accelerate (and DeepSpeed) divide each micro-batch loss by m; the window of micro-steps between two
  optimizer steps (the ``after_step`` hook) gives m, and the window's squares are multiplied by m². F does
  not depend on m.
- With several processes each one sees its own micro-batches; at the end of the task the sums are added
  over processes (an all-reduce), so F is the mean over every micro-batch of every process, the same on all.
- The gradient is that of the whole training loss: from the second task on it includes the EWC penalty's
  own gradient and the terms of any other method in the recipe.
- Under fp16 mixed precision the gradients the hook sees are multiplied by the loss scale: use bf16 or
  fp32 with EWC. Under ZeRO-3 the penalty would need every parameter's whole value at each step outside
  the forward, so EWC is refused at start there (ZeRO-2 or DDP run it). ``after_task`` raises if no
  gradient was seen at all.
- A trainable parameter that never received a gradient during the task gets F = 0 for it.

F and θ* are kept only for parameters that require grad (F in float32, θ* in the parameter's dtype), on the
parameter's device while training and on the CPU in ``state_dict`` (saved with every task checkpoint).
Parameters are matched by name (``model.named_parameters()``); one that did not exist at anchoring time has
no penalty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lvlm_cl.methods.base import Method, Task
from lvlm_cl.settings import Settings, setting


@dataclass(frozen=True)
class EWCSettings(Settings):
    lambda_: float = setting(100.0, low=0, help="penalty weight (lambda is a Python keyword)")
    online: bool = setting(True, help="one running Fisher, F ← γ·F_old + F_task, anchored at the latest task; false: "
                                      "one (F, θ*) per task, penalties summed")
    gamma: float = setting(1.0, above=0, high=1, help="decay of the running Fisher (online only)")

    def resolve(self, given: frozenset[str]) -> EWCSettings:
        """Cross-field rule: ``gamma`` means something only for the online variant."""
        if not self.online and "gamma" in given:
            raise ValueError("setting 'gamma' applies only with 'online: true' (online: false keeps one Fisher per "
                             "task, undecayed); remove it")
        return self


class EWC(Method):
    name = "ewc"
    zero3_unsupported = ("its penalty reads every trainable parameter's whole value at each step, outside the "
                         "forward, and ZeRO-3 keeps only a shard of each parameter on a process")
    settings_class = EWCSettings
    settings: EWCSettings

    def __init__(self, **args):
        super().__init__(**args)
        # Each anchor: {"task": name, "fisher": {param name: F}, "params": {param name: θ*}}.
        # Online keeps at most one (the running one); otherwise one per finished task, in stream order.
        self.anchors: list[dict] = []
        self.tasks: list[str] = []              # tasks anchored so far
        self.micro_steps: dict[str, int] = {}   # micro-steps the Fisher of each task averaged over
        self._hooks: list = []                  # gradient hooks of the task in training
        self._reset_accumulators()

    # Fisher estimation

    def _reset_accumulators(self) -> None:
        self._acc: dict[str, torch.Tensor] = {}      # Σ over closed windows of m² · Σ_k g_k²
        self._acc_steps = 0                          # micro-steps in closed windows
        self._window: dict[str, torch.Tensor] = {}   # Σ_k g_k² in the open window
        self._window_len = 0

    def _watch(self, model: torch.nn.Module) -> None:
        """Hook every trainable parameter's gradient (once per task, at its first micro-step, when every
        method has added what it trains)."""
        def record(name):
            def hook(grad):
                sq = grad.detach().float().pow(2)
                self._window[name] = self._window[name] + sq if name in self._window else sq
            return hook

        self._hooks = [p.register_hook(record(n)) for n, p in model.named_parameters() if p.requires_grad]

    def _unwatch(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _close_window(self) -> None:
        m = self._window_len
        if m:
            for n, sq in self._window.items():
                sq = sq * float(m * m)
                self._acc[n] = self._acc[n].to(sq.device) + sq if n in self._acc else sq
            self._acc_steps += m
        self._window, self._window_len = {}, 0

    def after_backward(self, model: torch.nn.Module, task: Task) -> None:
        self._window_len += 1

    def after_step(self, model: torch.nn.Module, task: Task) -> None:
        self._close_window()

    def after_task(self, task: Task, model: torch.nn.Module, train_data: list) -> None:
        self._close_window()
        self._unwatch()
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if trainable and not self._acc:
            raise RuntimeError(f"ewc: no gradient was seen during task {task.name!r}, so there is no Fisher to "
                               "estimate")
        sums = {n: self._acc[n] if n in self._acc else torch.zeros_like(p, dtype=torch.float32)
                for n, p in trainable.items()}
        steps = self._acc_steps
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:     # every process's micro-batches
            for n in sorted(sums):
                torch.distributed.all_reduce(sums[n])
            count = torch.tensor(float(steps), device=next(iter(sums.values())).device if sums else "cpu")
            torch.distributed.all_reduce(count)
            steps = int(count.item())
        fisher = {n: s / max(steps, 1) for n, s in sums.items()}
        params = {n: p.detach().clone() for n, p in trainable.items()}
        self.micro_steps[task.name] = steps
        self._reset_accumulators()
        if self.settings.online and self.anchors:
            old, gamma = self.anchors[0], self.settings.gamma
            merged_f = {n: gamma * f.to(fisher[n].device if n in fisher else f.device)
                        for n, f in old["fisher"].items()}
            for n, f in fisher.items():
                merged_f[n] = merged_f[n] + f if n in merged_f else f
            merged_p = {**old["params"], **params}   # θ* is the latest value; a vanished parameter keeps its own
            self.anchors = [{"task": task.name, "fisher": merged_f, "params": merged_p}]
        else:
            self.anchors.append({"task": task.name, "fisher": fisher, "params": params})
        self.tasks.append(task.name)

    # The penalty

    def loss(self, model: torch.nn.Module, batch: dict, outputs, task: Task) -> torch.Tensor | None:
        if not self._hooks:
            self._watch(model)
        return self.penalty(model)

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        """λ/2 · Σ F (θ − θ*)² over the anchored parameters; None before the first task ends or with λ = 0."""
        if not self.anchors or self.settings.lambda_ == 0:
            return None
        current = dict(model.named_parameters())
        total = None
        for anchor in self.anchors:
            fisher, params = anchor["fisher"], anchor["params"]
            for n, f in fisher.items():
                p = current.get(n)
                if p is None or not p.requires_grad:
                    continue
                if f.shape != p.shape:
                    raise ValueError(f"ewc: parameter {n!r} has shape {tuple(p.shape)} but was anchored with "
                                     f"{tuple(f.shape)}")
                if f.device != p.device:        # after load_state_dict: move once, keep it there
                    fisher[n] = f = f.to(p.device)
                    params[n] = params[n].to(p.device)
                term = (f * (p.float() - params[n].float()).pow(2)).sum()
                total = term if total is None else total + term
        if total is None:
            return None
        return 0.5 * self.settings.lambda_ * total

    # Resume

    def state_dict(self) -> dict:
        return {
            "online": self.settings.online,
            "anchors": [{"task": a["task"],
                         "fisher": {n: t.detach().cpu().clone() for n, t in a["fisher"].items()},
                         "params": {n: t.detach().cpu().clone() for n, t in a["params"].items()}}
                        for a in self.anchors],
            "tasks": list(self.tasks),
            "micro_steps": dict(self.micro_steps),
            # Mid-task (a step checkpoint, taken between optimizer steps): this process's Fisher sums so far.
            "running": {"sums": {n: t.detach().cpu().clone() for n, t in self._acc.items()},
                        "micro_steps": self._acc_steps},
        }

    def load_state_dict(self, state: dict) -> None:
        self._reset_accumulators()
        if not state:
            self.anchors, self.tasks, self.micro_steps = [], [], {}
            return
        if state.get("online", self.settings.online) != self.settings.online:
            raise ValueError(f"ewc: the saved state was made with online={state['online']}, the recipe says "
                             f"online={self.settings.online}")
        anchors = []
        for a in state.get("anchors", []):
            if set(a["fisher"]) != set(a["params"]):
                raise ValueError(f"ewc state: anchor of task {a['task']!r} has Fisher and values for different "
                                 "parameters")
            anchors.append({"task": a["task"], "fisher": {n: t.clone() for n, t in a["fisher"].items()},
                            "params": {n: t.clone() for n, t in a["params"].items()}})
        self.anchors = anchors
        self.tasks = list(state.get("tasks", []))
        self.micro_steps = dict(state.get("micro_steps", {}))
        running = state.get("running") or {}
        self._acc = {n: t.clone() for n, t in running.get("sums", {}).items()}
        self._acc_steps = int(running.get("micro_steps", 0))
