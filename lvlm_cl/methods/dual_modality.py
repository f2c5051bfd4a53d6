"""Dual-modality adaptation (Chen, Tan, Wang et al., "Dual-modality adaptation in vision-language models
for continual learning", Neural Networks 196, 2025; seed 000), adapted from CLIP class-incremental
learning to instruction tuning of a LLaVA-style model.

The paper trains both modalities of CLIP together: a task-specific LoRA on the image encoder (new
knowledge per task, tighter image features) and class-specific learnable text prompts on the text
encoder, with earlier tasks' prompts reused in training so the new task's features are pushed away from
theirs, and an inference strategy that first picks the task. Here:

- Image side: one LoRA adapter per task of the stream on the vision tower (``cl_dual_modality_00``,
  ...; ``peft.functional.inject_adapter_in_model`` through ``adapters.inject_lora``). Each sample's images
  run through its own task's adapter (PEFT's mixed-adapter batches, as ``task_lora``); only the adapter of
  the task in training moves.
- Text side: the language model is LLaVA's text encoder and decoder at once. Each task owns ``length``
  learnable prompt vectors prepended to the language model's input embeddings (``task_prompts``'
  ``TaskPromptPool`` and hooks); earlier tasks' prompts are frozen.
- The decoder, which CLIP does not have: a frozen language model must produce each task's answers from
  its prompts alone. On the tiny seq5 model it cannot (vision adapters and prompts, the LM frozen, lr 1e-2:
  digits 15%, one constant answer, scienceqa 0% after 150 steps), so ``language: true`` extends each
  task's adapter to the language model's projections (the same adapter name, the same route). Off by
  default, as in the paper; on in ``recipes/seq5_dual_modality.yaml``.
- Separation with earlier prompts (the paper's reuse of previous text prompts): a sample's image feature
  in the language model's embedding space, f = the projector's output averaged over the sample's image
  tokens, is scored against every known task's prompt, p_s = the mean of its ``length`` vectors:

      term = contrast_weight * mean over samples with images of CE(softmax_s(cos(f, p_s) / temperature), own task)

  Earlier prompts and adapters are frozen, so only the new task's prompt and adapter move: its image
  features are pulled towards its prompt and pushed away from earlier tasks' prompts, and its prompt is
  pushed away from earlier tasks' image features (replayed samples, when a memory bank is used). On the
  first task there is nothing to push from (a softmax over one task is constant): no term.
- Inference: the paper first predicts the task, then the class within it. Here the task is chosen per
  sample by the text-feature keys of ``routing`` (the instruction's frozen feature against each task's
  k-means prototypes), and that one task's vision adapter and prompts are used; within the task the
  language model generates the answer. One router object (the prompt pool, a ``TaskKeyRouter``) routes
  both, so prompts and adapter always agree, and routing accuracy is reported by evaluation.

    model: {freeze_vision_tower: true, freeze_projector: true, freeze_language_model: true}
    methods: [{name: dual_modality, r: 16, alpha: 32, language: true, length: 8, contrast_weight: 0.1}]

Left out, and why:
- Class-specific prompts. In CLIP the answer is the class whose prompted text feature is closest to the
  image feature, so a prompt per class is a classifier weight. A generative model's answer is the text it
  decodes: a prompt prepended for a class needs that class before the answer is generated. Using them
  would mean scoring every candidate answer with its own prompt (one language-model pass per class per
  sample), replacing generation by ranking, which neither ``generate``, chat nor the open-answer tasks
  (reading, boxes) can use. As contrast targets only (an anchor per answer, never read by the model) they
  pull a sample's pooled image feature towards its answer, which is meaningful only when the answer is a
  function of the image alone; in instruction tasks it mostly depends on the question as well (seq5's
  scienceqa letter and vqa answer change with the question for the same image), so the target would
  contradict itself. Prompts are per task.
- ``top_k`` blending of prompts at inference (``task_prompts``): a sample runs through one task's vision
  adapter, so it takes that same task's prompt.

Costs: r * (d_in + d_out) parameters per adapted projection (vision tower; language model with
``language: true``) per task, ``length`` x hidden per task, and the routing keys; the term is computed
from the forward's own activations (no extra pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lvlm_cl.data.dataset import TASK_IDS
from lvlm_cl.methods.adapters import refuse_recipe_lora, set_trainable_adapter, targets
from lvlm_cl.methods.base import Method, Task
from lvlm_cl.methods.routing import RouterState, key_term_on_batch
# Both halves are exactly task_lora's and task_prompts' mechanisms.
from lvlm_cl.methods.task_lora import add_task_adapters
from lvlm_cl.methods.task_prompts import (PromptSettings, TaskPromptPool, attach_prompt_pool, begin_task_prompt,
                                          install_prompt_hooks)
from lvlm_cl.models import parts
from lvlm_cl.settings import setting


def separation_loss(features: torch.Tensor, prompts: torch.Tensor, targets: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """Mean cross-entropy of ``cos(features, mean prompt of each task) / temperature`` towards each
    sample's own task. ``features`` (N, D) pooled image features, ``prompts`` (T, P, D) the known tasks'
    prompts, ``targets`` (N,) task indices < T."""
    protos = prompts.float().mean(1)
    logits = F.cosine_similarity(features.float().unsqueeze(1), protos.unsqueeze(0), dim=-1) / temperature
    return F.cross_entropy(logits, targets.long())


@dataclass(frozen=True)
class DualModalitySettings(PromptSettings):     # + length, init, seed and the routing settings
    r: int = setting(8, low=1, help="LoRA rank of each task's adapter")
    alpha: float = setting(16.0, low=0, help="LoRA scaling (alpha / r) of the per-task adapters")
    dropout: float = setting(0.0, low=0, below=1, help="LoRA dropout of the per-task adapters")
    language: bool = setting(False, help="each task's adapter also covers the language model")
    contrast_weight: float = setting(0.1, low=0, help="weight of the separation term (0 turns it off)")
    temperature: float = setting(0.1, above=0, help="temperature of its softmax over tasks")


class DualModality(RouterState, Method):
    name = "dual_modality"
    settings_class = DualModalitySettings
    settings: DualModalitySettings
    uses_task_ids = True

    def __init__(self, **args):
        super().__init__(**args)
        self.pool: TaskPromptPool | None = None
        self.names: list[str] = []
        # The training forward's activations the separation term is computed from (set by hooks).
        self._images: torch.Tensor | None = None          # projector output, (images, tokens, D)
        self._prompts: dict[int, torch.Tensor] = {}       # slot index -> its prompt as read in the forward

    @property
    def router(self) -> TaskPromptPool | None:
        return self.pool

    def setup(self, model, stream: list[Task]) -> None:
        refuse_recipe_lora(model, self.name)
        s = self.settings
        self.pool = attach_prompt_pool(model, self.name, len(stream), s)   # before any adapter: the base's queries
        self.names = add_task_adapters(model, self.name, len(stream), self.pool, r=s.r, alpha=s.alpha,
                                       dropout=s.dropout, target_modules=targets(language=s.language, vision=True))
        install_prompt_hooks(parts(model)["language_model"], self.pool)
        self._install_capture(parts(model)["projector"])

    def _install_capture(self, projector: torch.nn.Module) -> None:
        """Keep the training forward's image features and prompts (with their graphs) for the term: read
        inside the forward, they are whole under DeepSpeed ZeRO-3 and cost no extra pass. Forwards without
        grad (evaluation, a teacher's pass) are not kept."""
        def keep_images(module, args, output):
            if torch.is_grad_enabled() and self.pool.selected is not None:
                self._images = output

        def keep_prompt(index):
            def hook(module, args, output):
                if torch.is_grad_enabled():
                    self._prompts[index] = output[1]
            return hook

        projector.register_forward_hook(keep_images)
        for i, slot in enumerate(self.pool.slots):
            slot.register_forward_hook(keep_prompt(i))

    def before_task(self, task: Task, model, train_data: list) -> list:
        begin_task_prompt(self.pool, task.index, self.settings.init)
        set_trainable_adapter(model, self.names, self.names[task.index])
        return train_data

    def loss(self, model, batch: dict, outputs, task: Task):
        term = self.separation_term(batch, task)
        keys = key_term_on_batch(self.pool, batch, task.index, self.settings.key_weight)
        if term is None:
            return keys
        return term if keys is None else term + keys

    def separation_term(self, batch: dict, task: Task) -> torch.Tensor | None:
        """``contrast_weight`` x ``separation_loss`` on this micro-step's forward (see the module
        docstring); None when the weight is 0, fewer than two tasks are known, or no sample has an image."""
        images, prompts = self._images, self._prompts
        self._images, self._prompts = None, {}
        known = self.pool.num_known
        if self.settings.contrast_weight == 0 or known < 2 or images is None:
            return None
        if any(i not in prompts for i in range(known)):
            raise RuntimeError("dual_modality: the forward did not read every known task's prompt")
        counts = (batch["input_ids"] == self.pool.encoder.image_token_id).sum(-1).to(images.device)
        feats = images.reshape(-1, images.shape[-1])
        if feats.shape[0] != int(counts.sum()):
            raise ValueError(f"dual_modality: {feats.shape[0]} image features for {int(counts.sum())} image tokens")
        has = counts > 0
        if not has.any():
            return None
        owner = torch.repeat_interleave(torch.arange(len(counts), device=feats.device), counts)
        pooled = torch.zeros(len(counts), feats.shape[-1], device=feats.device, dtype=torch.float32)
        pooled = pooled.index_add(0, owner, feats.float()) / counts.clamp(min=1).unsqueeze(-1)
        ids = batch.get(TASK_IDS)
        own = ids.to(feats.device) if ids is not None else torch.full_like(counts, task.index)
        stack = torch.stack([prompts[i].to(feats.device) for i in range(known)])
        loss = separation_loss(pooled[has], stack, own[has], self.settings.temperature)
        return self.settings.contrast_weight * loss

    def after_task(self, task: Task, model, train_data: list) -> None:
        self.pool.finish_task(task.index)
