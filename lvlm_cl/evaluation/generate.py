"""Batched greedy generation with left padding: how every task is evaluated after every task."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from accelerate.utils import send_to_device
from tqdm.auto import tqdm

from lvlm_cl.data.dataset import Collator, check_batch, loader
from lvlm_cl.data.lengths import TokenCounter, counted
from lvlm_cl.models.continual import generate as routed_generate


@torch.no_grad()
def generate_answers(model, processor, records: Sequence[dict], *, max_length: int, batch_size: int,
                     max_new_tokens: int, desc: str = "generate", progress: bool = True, synced_gpus: bool = False,
                     device: torch.device | str | None = None, num_workers: int = 0,
                     observe: Callable[[dict, list[int]], None] | None = None, keep: dict | None = None) -> list[str]:
    """The model's answer to the last user turn of each record, in the records' order.

    Prompts are sorted by length so that batches carry little padding (the table's lengths, or counted from
    the text: ``lengths.counted``), encoded batch by batch in ``num_workers`` DataLoader workers and not kept, and sent
    to ``device`` (default: the device of the model's first parameter); answers are put back in order.
    ``observe(batch, positions)`` sees each batch on the device with its records' positions (routing
    accuracy is counted so, without encoding the prompts twice). ``keep``: encodings kept across calls
    (``Collator``'s ``keep``, ``trainer.keep_encodings``). ``synced_gpus``: every process keeps
    stepping until all are done (DeepSpeed ZeRO-3, where each step gathers parameters from every process).
    """
    if device is None:
        device = next(model.parameters()).device
    tokenizer = processor.tokenizer
    lengths = counted(records, TokenCounter(processor, max_length), prompt=True)
    order = sorted(range(len(records)), key=lambda i: int(lengths[i]))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    answers: list[str] = [""] * len(records)
    was_training = model.training
    model.eval()
    prompts = loader(records, Collator(processor, max_length, prompt=True, keep=keep), batches, num_workers=num_workers,
                     device=torch.device(device))
    try:
        for idx, batch in zip(batches, tqdm(prompts, desc=desc, leave=False, disable=not progress)):
            batch = send_to_device(check_batch(batch), device, non_blocking=True)
            if observe is not None:
                observe(batch, idx)
            out = routed_generate(model, **batch, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                  synced_gpus=synced_gpus)
            new = out[:, batch["input_ids"].shape[1]:]
            for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                answers[i] = text.strip()
    finally:
        model.train(was_training)
    return answers
