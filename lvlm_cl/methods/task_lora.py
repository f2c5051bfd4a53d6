"""Task LoRA: one LoRA adapter per task, on the language model and the vision tower, chosen at inference
by the same text-feature keys as ``task_prompts`` (the dual-modality idea of seed 000, "task-specific
LoRA modules for the image encoder"; per-task LoRA experts picked by a router as in HiDe-LLaVA and
MR-LoRA).

- ``setup`` adds one adapter per task of the stream (``cl_task_lora_00``, ``cl_task_lora_01``, ...) through
  ``peft.functional.inject_adapter_in_model``, on the language model's attention and MLP projections and,
  with ``vision: true``, on the vision tower's.
- Training on task t: only adapter t and key t train. Each sample runs through the adapter of its own
  task (a replayed record through its earlier task's frozen adapter), with PEFT's mixed-adapter batches
  (the ``adapter_names`` argument of its LoRA layers). Keys as in ``task_prompts`` (prototypes of the
  task's queries by default, or a learned key).
- Inference: each sample is routed to the task whose key is most similar to its instruction's query
  (``queries.InstructionEncoder``) and runs through that task's adapter only; the vision tower's adapter
  follows the sample's route for each of its images.

Each task's adapter starts at PEFT's initialisation (B = 0: the base model), so no task's training moves
another task's weights: with correct routing there is no forgetting, and what is forgotten is what is
misrouted (reported as routing accuracy). Costs: r * (d_in + d_out) parameters per adapted layer per task.

    model: {freeze_vision_tower: true, freeze_projector: true, freeze_language_model: true}
    methods: [{name: task_lora, r: 8, alpha: 16, vision: true}]
"""

from __future__ import annotations

from dataclasses import dataclass

from lvlm_cl.methods.adapters import inject_lora, refuse_recipe_lora, set_trainable_adapter, targets
from lvlm_cl.methods.base import Method, Task
from lvlm_cl.methods.queries import query_encoder
from lvlm_cl.methods.routing import RouterState, RoutingSettings, TaskKeyRouter, key_term_on_batch
from lvlm_cl.models.continual import attach, unwrap
from lvlm_cl.settings import setting

BASE = "__base__"      # PEFT's name for "no adapter" in a mixed batch


@dataclass(frozen=True)
class TaskLoRASettings(RoutingSettings):
    r: int = setting(8, low=1, help="LoRA rank of each task's adapter")
    alpha: float = setting(16.0, low=0, help="LoRA scaling (alpha / r)")
    dropout: float = setting(0.0, low=0, below=1, help="LoRA dropout")
    vision: bool = setting(True, help="adapt the vision tower (seed 000's image-encoder LoRA)")
    language: bool = setting(True, help="adapt the language model")

    def resolve(self, given: frozenset[str]) -> TaskLoRASettings:
        """Cross-field rule: the adapters go somewhere."""
        if not (self.vision or self.language):
            raise ValueError("at least one of the settings 'vision' and 'language' must be true")
        return self


class TaskLoRA(RouterState, Method):
    name = "task_lora"
    settings_class = TaskLoRASettings
    settings: TaskLoRASettings
    uses_task_ids = True

    def __init__(self, **args):
        super().__init__(**args)
        self.router: TaskKeyRouter | None = None
        self.names: list[str] = []

    def setup(self, model, stream: list[Task]) -> None:
        refuse_recipe_lora(model, self.name)
        s = self.settings
        encoder = query_encoder(model, s.query_cache)   # before any adapter: the base's queries
        dim = unwrap(model).config.get_text_config().hidden_size
        self.router = attach(model, self.name, TaskKeyRouter(len(stream), dim, key_mode=s.key_mode,
                                                             keys_per_task=s.keys_per_task))
        self.router.to(next(model.parameters()).device).requires_grad_(False)
        self.router.encoder = encoder
        self.names = add_task_adapters(model, self.name, len(stream), self.router, r=s.r, alpha=s.alpha,
                                       dropout=s.dropout, target_modules=targets(language=s.language, vision=s.vision))

    def before_task(self, task: Task, model, train_data: list) -> list:
        set_trainable_adapter(model, self.names, self.names[task.index])
        self.router.train_only(task.index)
        return train_data

    def loss(self, model, batch: dict, outputs, task: Task):
        return key_term_on_batch(self.router, batch, task.index, self.settings.key_weight)

    def after_task(self, task: Task, model, train_data: list) -> None:
        self.router.finish_task(task.index)


def add_task_adapters(model, method: str, num_tasks: int, router: TaskKeyRouter, *, r: int, alpha: float,
                      dropout: float, target_modules: str) -> list[str]:
    """One LoRA adapter per task of the stream (``cl_<method>_00``, ``cl_<method>_01``, ...) on every module
    matching ``target_modules``, each sample's (and each image's) adapter the one ``router`` chose for it
    (``install_adapter_hooks``). Returns the adapters' names, in task order."""
    names = [f"cl_{method}_{i:02d}" for i in range(num_tasks)]
    layers: list[str] = []
    for name in names:
        layers = inject_lora(model, name, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules)
    install_adapter_hooks(model, layers, router, names)
    return names


def install_adapter_hooks(model, layer_paths: list[str], router: TaskKeyRouter, names: list[str]) -> None:
    """Pass PEFT's ``adapter_names`` to every adapted layer: the routed task's adapter per sample, and per
    image in the vision tower (a sample's images follow its route)."""
    def per_input(kind: str, n: int) -> list[str]:
        if router.encoder.running or not router.needs_route:
            return [BASE] * n
        if router.selected is None:
            raise ValueError(f"task_lora: a LoRA layer of the {kind} side ran with no routing choice (was the model "
                             "run outside its forward?); generate with lvlm_cl.models.continual.generate(model, ...) (routing.generate) "
                             "or inside lvlm_cl.models.continual.held(...)")
        per_sample = [names[int(t)] for t in router.selected]
        if kind == "image":
            counts = router.image_counts.tolist()
            per_image = sum(counts) // n if n else 0
            per_sample = [name for name, c in zip(per_sample, counts) for _ in range(c // max(per_image, 1))]
        if len(per_sample) != n:
            raise ValueError(f"task_lora: {len(per_sample)} routed {kind} inputs for a batch of {n} in a LoRA layer")
        return per_sample

    def hook(kind):
        def add_names(module, args, kwargs):
            x = args[0] if args else kwargs.get("x")
            kwargs["adapter_names"] = per_input(kind, x.shape[0])
            return args, kwargs
        return add_names

    modules = dict(unwrap(model).named_modules())
    for path in layer_paths:
        modules[path].register_forward_pre_hook(hook("image" if "vision_tower" in path else "text"), with_kwargs=True)
