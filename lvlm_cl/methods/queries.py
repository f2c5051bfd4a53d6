"""The instruction's text feature, the query that task-key routing matches (LVLM-CL, seed 003; ModalPrompt),
and the frozen encoder that computes it.

The query of a sample is a text feature of its instruction: the base language model's final hidden states
(after the last norm), mean-pooled over the instruction's text tokens. "Instruction" is every text token
the model sees before the answer (system and user turns and the generation prompt; image tokens and
padding left out), so a training sample and the same sample at inference give the same query. The encoder
is frozen, so a query depends only on the instruction's tokens and is cached by them.

"Base" means the weights the run started from:
- the language model is frozen (only prompts, the projector or the vision tower train): it is used as it is;
- it carries LoRA adapters and nothing else of it trains: it runs with the adapters disabled
  (``adapters_disabled``), so no copy is needed on a 7B model;
- it trains in full: a frozen copy is taken at ``setup`` (one language model more in memory).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from lvlm_cl.data.encoding import IGNORE_INDEX
from lvlm_cl.errors import ConfigError
from lvlm_cl.models.continual import adapters_disabled, shared, unwrap
from lvlm_cl.settings import setting

# The instruction features cached in host memory (besides a method's query_cache count): at 7B's width (4096
# float32 values, 16 KiB a feature) 16k instructions; the cache stops growing there, and the rest are computed.
QUERY_CACHE_BYTES = 256 * 2 ** 20


class InstructionEncoder:
    """The frozen query encoder (see the module docstring). Not a module of the model: it is not saved,
    it is the base model's own language model (or a frozen copy of it)."""

    def __init__(self, language_model: torch.nn.Module, image_token_id: int,
                 pad_token_id: int, cache_size: int = 100_000):
        trains_in_full = any(p.requires_grad for n, p in language_model.named_parameters() if "lora_" not in n)
        if trains_in_full and any(hasattr(p, "ds_id") for p in language_model.parameters()):
            raise ConfigError("task routing under DeepSpeed ZeRO-3 with the language model trained in full: the "
                              "instruction queries need a frozen whole copy of the language model on every process, "
                              "which ZeRO-3 partitions. Train the language model with LoRA (model.lora, "
                              "model.freeze_language_model: true) or use ZeRO-2 (recipes/accelerate/zero2.yaml).")
        self.lm = copy.deepcopy(language_model).eval().requires_grad_(False) if trains_in_full else language_model
        self.image_token_id, self.pad_token_id = image_token_id, pad_token_id
        self.cache_size = cache_size
        self.cache: dict[bytes, torch.Tensor] = {}
        self.cache_bytes = 0           # held by the cache's keys and features; at most QUERY_CACHE_BYTES
        self.running = False           # hooks on the language model stand aside while it computes queries

    @staticmethod
    def instruction_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                           labels: torch.Tensor | None, image_token_id: int) -> list[torch.Tensor]:
        """Per sample (on the CPU): the text tokens before the first answer token (labels != -100), without
        image tokens and padding. The mask is computed on the batch's device and copied once (one
        synchronisation per batch, not one per sample)."""
        keep = input_ids != image_token_id
        if attention_mask is not None:
            keep &= attention_mask.bool()
        if labels is not None:
            answer = labels != IGNORE_INDEX
            first = torch.where(answer.any(-1), answer.int().argmax(-1), answer.shape[-1])        # (B,)
            keep &= torch.arange(answer.shape[-1], device=answer.device) < first.unsqueeze(-1)
        ids, keep = input_ids.cpu(), keep.cpu()
        return [row[k] for row, k in zip(ids, keep)]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D) float32 queries on ``input_ids``' device."""
        return self.encode(self.instruction_tokens(input_ids, attention_mask, labels, self.image_token_id),
                           input_ids.device)

    @torch.no_grad()
    def encode(self, seqs: list[torch.Tensor], device) -> torch.Tensor | None:
        """(B, D) float32 queries of instructions given as token sequences (``instruction_tokens``), on
        ``device``; None for no sequence.

        Under DeepSpeed ZeRO-3 the language model's forward is a collective (every process gathers each
        layer's parameters together), so every call runs exactly one forward on every process, a dummy one
        when all of this process's queries are cached: what one process has cached must not change what the
        others wait for. Callers call it once per step on every process, with or without sequences."""
        keys = [s.cpu().numpy().tobytes() for s in seqs]
        todo = {}
        for k, s in zip(keys, seqs):
            if k not in self.cache and k not in todo:
                if s.numel() == 0:
                    raise ValueError("task routing: a sample has no instruction text (only images or answer)")
                todo[k] = s
        fresh = {}
        if todo or self.forward_is_collective():
            fresh = dict(zip(todo, self._encode(list(todo.values()))))
        for k, v in fresh.items():
            size = len(k) + v.nbytes
            if len(self.cache) < self.cache_size and self.cache_bytes + size <= QUERY_CACHE_BYTES:
                self.cache[k] = v
                self.cache_bytes += size
        if not keys:
            return None
        return torch.stack([self.cache[k] if k in self.cache else fresh[k] for k in keys]).to(device)

    def forward_is_collective(self) -> bool:
        """Whether the encoder's forward gathers its parameters from every process: they are partitioned by
        DeepSpeed ZeRO-3 and not gathered whole at the moment (between tasks, a caller gathers them with
        ``distributed.whole``, and the forward is local)."""
        partitioned = [p for p in self.lm.parameters() if hasattr(p, "ds_id")]
        if not partitioned:
            return False
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        # Any of them: small ones (norms; below ZeRO-3's persistence threshold) stay whole all along.
        return any(p.ds_status != ZeroParamStatus.AVAILABLE for p in partitioned)

    def _encode(self, seqs: list[torch.Tensor]) -> list[torch.Tensor]:
        from lvlm_cl.data.encoding import Encoded, collate_prompts

        device = next(self.lm.parameters()).device
        dummy = not seqs
        if dummy:
            seqs = [torch.tensor([self.pad_token_id])]
        batch = collate_prompts([Encoded(s.cpu(), torch.empty(0, dtype=torch.long), None) for s in seqs],
                                self.pad_token_id)
        ids = batch["input_ids"].to(device, non_blocking=True)
        mask = batch["attention_mask"].to(device, non_blocking=True)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        was_training = self.lm.training
        self.running = True
        try:
            self.lm.eval()
            with adapters_disabled(self.lm):
                hidden = self.lm(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state.float()
        finally:
            self.running = False
            self.lm.train(was_training)
        if dummy:
            return []
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1)
        return list(pooled.cpu())


def query_encoder(model: torch.nn.Module, cache_size: int = 100_000) -> InstructionEncoder:
    """The model's one query encoder, shared by every routing method of a run (built on first use, which
    must be before any training: a frozen copy, when one is needed, is of the base weights)."""
    from lvlm_cl.models import parts

    def build() -> InstructionEncoder:
        cfg = unwrap(model).config
        pad = getattr(cfg, "pad_token_id", None)
        if pad is None:
            pad = getattr(cfg.get_text_config(), "pad_token_id", None)
        return InstructionEncoder(parts(model)["language_model"], cfg.image_token_id, 0 if pad is None else int(pad),
                                  cache_size)

    return shared(model, "query_encoder", build)


def query_cache_setting() -> Any:
    """The ``query_cache`` field of a method that encodes instructions (``query_encoder``)."""
    return setting(100_000, low=1, help="instruction features kept in host memory (and at most 256 MiB of them, "
                                        "queries.QUERY_CACHE_BYTES: 16k features at a 7B model's width); the cache "
                                        "stops growing there")
