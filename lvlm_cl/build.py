"""One builder of what a run is made of, used by the training run (``lvlm_cl.train``) and by a trained run's
stage (``lvlm_cl.stage``): the model (loaded, its kernels, frozen / LoRA-wrapped), the task stream and the
methods set up on both. Built the same way in both, a stage sees exactly what training left. Also the checks
of the stream's samples before any training time is spent.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lvlm_cl.data.lengths import counted
from lvlm_cl.data.records import RecordTable
from lvlm_cl.methods import Method, build_methods, refuse_unsupported
from lvlm_cl.models import apply_training_setup, load_model_dir, weights_dtype
from lvlm_cl.models.kernels import use_liger
from lvlm_cl.stream import Task, build_stream


@dataclass
class Built:
    model: torch.nn.Module
    processor: object
    stream: list[Task]
    files: list[str]               # each task's train and test file, in stream order
    methods: list[Method]


def build(cfg, model_dir: Path, *, cache: Path, device, quantization: str | None = None, accelerator=None,
          digest=None, log=lambda message: None) -> Built:
    """The model of ``model_dir`` in the recipe's precision (its base language model quantized as
    ``quantization`` says: "4bit", "8bit" or None) on ``device`` (None: where transformers puts it,
    as under ZeRO-3) with the recipe's training setup, the stream (``digest`` updated with its files' bytes)
    and the methods set up on both (in the recipe's order). With an ``accelerator`` (a training run):
    liger-kernel's kernels as ``model.liger_kernel`` says, applied before LoRA wraps the layers; one process
    generates a missing built-in benchmark while the others wait; methods that cannot run under its DeepSpeed
    stage are refused before any setup."""
    model, processor = load_model_dir(model_dir, cfg.model, dtype=weights_dtype(cfg.trainer.mixed_precision),
                                      quantization=quantization,
                                      device=device)
    if accelerator is not None:
        use_liger(model, cfg.model.liger_kernel, accelerator.device, log)
    model = apply_training_setup(model, cfg.model)
    with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
        stream, files = build_stream(cfg, cache, digest)
    log(f"stream: {len(stream)} tasks: " + ", ".join(f"{t.name} ({len(t.train_records)} train / "
                                                      f"{len(t.test_records)} test, {t.metric})" for t in stream))
    methods = build_methods(cfg.methods)
    if accelerator is not None:
        refuse_unsupported(methods, accelerator)
    for m in methods:
        m.setup(model, stream)
    return Built(model, processor, stream, files, methods)


def eval_records(task, trainer) -> list[dict]:
    """The test records a task is scored on (the first ``trainer.eval_max_samples`` if set)."""
    return task.test_records[:trainer.eval_max_samples] if trainer.eval_max_samples else task.test_records


def check_samples(to_train, stream, files: list[str], counter, trainer, log, progress: bool) -> None:
    """Count the tokens of every training sample of the tasks still to train and of every test prompt,
    before any training time is spent, from the text and the image headers (no pixel is processed:
    ``lengths.TokenCounter``): a missing or unreadable image, a sample longer than ``model.max_length``
    (truncation would cut its answer or image tokens), one with no answer tokens, or one the chat template
    cannot encode stops the run here, naming its file, record and field. The counts are kept in the tables
    (``RecordTable.lengths``): they order the evaluation's batches and group training batches by length."""
    work = [(files[2 * t.index], t.train_records, False, t, "train_records") for t in to_train]
    work += [(files[2 * t.index + 1], eval_records(t, trainer), True, t, "test_records") for t in stream]
    with tqdm(total=sum(len(records) for _, records, *_ in work), desc="checking samples", disable=not progress,
              unit="sample") as bar:
        for path, records, prompt, task, which in work:
            if not counter.verify(records, prompt=prompt):
                log(f"{path}: token counts from the text differ from the processor's for this model; counting by "
                    "encoding every sample instead (slower)")
            counts = counter.count(records, prompt=prompt, path=path, progress=bar.update)
            table = getattr(task, which)
            if hasattr(table, "lengths"):
                full = np.full(len(table), -1, dtype=np.int32)
                full[:len(counts)] = counts
                table.lengths = full


def with_lengths(records, counter):
    """``records`` as a table whose every sample has its training token count (replayed records added by a
    method come without one: counted here, from the text)."""
    table = records if isinstance(records, RecordTable) else RecordTable(records)
    table.lengths = counted(table, counter, prompt=False)
    return table


def task_paths(stream, files: list[str]) -> dict[str, str]:
    """Each task's training file, by task name (what a batch's encoding error names)."""
    return {t.name: files[2 * t.index] for t in stream}
