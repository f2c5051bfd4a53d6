"""Batched greedy generation with left padding: how every task is evaluated after every task."""

from __future__ import annotations

import torch
from accelerate.utils import send_to_device
from tqdm.auto import tqdm

from lvlm_cl.data.encoding import collate_prompts
from lvlm_cl.methods.routing import generate as routed_generate


@torch.no_grad()
def generate_answers(model, processor, records: list[dict], cache, *, batch_size: int, max_new_tokens: int,
                     desc: str = "generate", progress: bool = True, synced_gpus: bool = False,
                     device: torch.device | str | None = None) -> list[str]:
    """The model's answer to the last user turn of each record, in the records' order.

    Prompts are sorted by length so that batches carry little padding; answers are put back in order.
    Batches are sent to ``device`` (default: the device of the model's first parameter). ``synced_gpus``:
    every process keeps stepping until all are done (DeepSpeed ZeRO-3, where each step gathers parameters
    from every process).
    """
    if device is None:
        device = next(model.parameters()).device
    tokenizer = processor.tokenizer
    encoded = [cache.prompt(r) for r in records]
    order = sorted(range(len(records)), key=lambda i: encoded[i].input_ids.numel())
    answers: list[str] = [""] * len(records)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=not progress):
            idx = order[start:start + batch_size]
            batch = send_to_device(collate_prompts([encoded[i] for i in idx], tokenizer.pad_token_id), device,
                                   non_blocking=True)
            out = routed_generate(model, **batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 synced_gpus=synced_gpus)
            new = out[:, batch["input_ids"].shape[1]:]
            for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                answers[i] = text.strip()
    finally:
        model.train(was_training)
    return answers
