"""From records to batches, as the loop needs them: encoded when their batch is built (in DataLoader
workers), never kept; and the order of the batches, a pure function of the seed and the step."""

from __future__ import annotations

import signal
import sys

import numpy as np
import torch

from lvlm_cl.data.encoding import EncodingError, collate_prompts, collate_train, encode_many

TASK_IDS = "cl_task_ids"        # the batch key of each sample's task index (lvlm_cl.methods.routing reads it)


class Collator:
    """A DataLoader's ``collate_fn``: a list of records -> one padded batch of tensors, encoded through the
    processor there and then (``encode_many``: one processor call for the batch), in a worker process when
    the loader has workers. Nothing is kept: a record's pixels live as long as its batch.

    ``prompt``: left-padded generation prompts (``collate_prompts``) instead of training samples.
    ``task_index`` (task name -> stream index): adds each sample's task under ``TASK_IDS``, for methods that
    route by it. A record that cannot be encoded does not raise in the worker (where the error would come
    back wrapped in a traceback): the batch is ``{"error": ...}`` and ``check_batch`` raises it in the loop,
    naming the record's file (``files``: task name -> path), record and field.

    ``keep`` (``trainer.keep_encodings``; a dict shared by the run's collators, used in this process only:
    the loader then has no workers): encoded samples are kept and reused, pixels included. For small data
    on a machine whose cores the model itself trains on (seq5 on a CPU), where encoding every epoch again
    costs more than the memory; memory then grows with the data (1.35 MB a 336-px LLaVA-1.5 sample).
    """

    def __init__(self, processor, max_length: int, *, prompt: bool = False, task_index: dict | None = None,
                 files: dict | None = None, keep: dict | None = None):
        self.processor, self.max_length, self.prompt = processor, max_length, prompt
        self.task_index, self.files, self.keep = task_index, files or {}, keep
        self.pad_id = processor.tokenizer.pad_token_id

    def _encode(self, records: list[dict]) -> list:
        if self.keep is None:
            return encode_many(self.processor, records, self.max_length, prompt=self.prompt)
        keys = [(self.prompt, r.get("task", ""), r["id"]) for r in records]
        todo = {k: r for k, r in zip(keys, records) if k not in self.keep}
        if todo:
            self.keep.update(zip(todo, encode_many(self.processor, list(todo.values()), self.max_length,
                                                   prompt=self.prompt)))
        return [self.keep[k] for k in keys]

    def __call__(self, records: list[dict]) -> dict:
        try:
            encoded = self._encode(records)
        except EncodingError as e:
            task = next((r.get("task") for r in records if r["id"] == e.record_id), None)
            return {"error": (e.reason, self.files.get(task), e.record_id, e.field)}
        batch = collate_prompts(encoded, self.pad_id) if self.prompt else collate_train(encoded, self.pad_id)
        if self.task_index is not None:
            try:
                batch[TASK_IDS] = torch.tensor([self.task_index[r["task"]] for r in records], dtype=torch.long)
            except KeyError as e:
                return {"error": (f"task {e.args[0]!r} is not one of this stream's tasks {list(self.task_index)}",
                                  None, None, "task")}
        return batch


def check_batch(batch: dict) -> dict:
    """``batch``, or the ``EncodingError`` a ``Collator`` met building it."""
    if "error" in batch:
        reason, path, record_id, field = batch["error"]
        raise EncodingError(reason, path=path, record_id=record_id, field=field)
    return batch


def loader(records, collate: Collator, batch_sampler, *, num_workers: int, device: torch.device):
    """A DataLoader over ``records`` building each batch of ``batch_sampler`` with ``collate`` in
    ``num_workers`` worker processes (0: in this process), pinned on a GPU so the copy overlaps compute.
    Workers only where there is a batch to prepare while another is used: no more than the batches after
    the first (a one-batch evaluation starts none); none for a collator that keeps its encodings (they
    must stay in this process)."""
    num_workers = max(0, min(num_workers, len(batch_sampler) - 1))
    if getattr(collate, "keep", None) is not None:
        num_workers = 0
    return torch.utils.data.DataLoader(records, batch_sampler=batch_sampler, collate_fn=collate,
                                       num_workers=num_workers, pin_memory=device.type == "cuda",
                                       prefetch_factor=2 if num_workers else None,
                                       worker_init_fn=quiet_worker if num_workers else None)


def quiet_worker(worker_id: int) -> None:
    """A DataLoader worker ends without a traceback when its training process stops (SIGTERM, Ctrl-C): the
    worker takes SIGTERM's default action instead of the training process's handler it inherited (which
    raises, for the run's one-line exit), and a thread of the worker that loses its connection to the
    training process (``multiprocessing.resource_sharer`` handing over a batch's shared memory while the
    training process exits) does not print one either. Any other error keeps its traceback."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    default = sys.excepthook

    def hook(kind, value, tb):
        if not issubclass(kind, (ConnectionError, EOFError)):
            default(kind, value, tb)

    sys.excepthook = hook


# How many global batches ``StepBatchOrder`` sorts together when it groups by length: as transformers'
# LengthGroupedSampler (50 per mega-batch), enough for little padding, few enough for the order to stay random.
GROUP_WINDOW = 50


class StepBatchOrder(torch.utils.data.Sampler):
    """Which samples make up each optimizer micro-step: a fresh permutation per epoch from a seeded
    generator, so step k's batch is the same in every run and a resumed run continues the same order.

    Each micro-step takes ``global_batch`` indices; rank r of w processes takes every w-th of them.

    ``lengths`` (one per sample) groups the batches by length (``trainer.group_by_length``): each epoch's
    permutation is cut into windows of ``GROUP_WINDOW`` global batches, each window sorted by length (longest
    first) and cut into batches, and the batches of a window are shuffled. A batch then holds samples of
    about one length (little padding), and which batch comes when is still random; the order remains a pure
    function of the seed, so a resumed run continues it exactly.
    """

    def __init__(self, n: int, global_batch: int, num_micro_steps: int, seed: int, *, start: int = 0,
                 rank: int = 0, world: int = 1, lengths=None):
        if n < 1:
            raise ValueError("no training samples")
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} samples")
        self.n, self.global_batch, self.num = n, global_batch, num_micro_steps
        self.seed, self.start, self.rank, self.world = seed, start, rank, world
        self.lengths = None if lengths is None else np.asarray(lengths)

    def epoch_order(self, epoch: int, g: torch.Generator) -> list[int]:
        """Epoch ``epoch``'s order of the samples (``g`` is reseeded here)."""
        g.manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g)
        if self.lengths is None:
            return perm.tolist()
        # Batches are cut from the flat stream of epochs: where the previous epoch's last batch is not full, this
        # epoch's first ``head`` samples complete it, so that every later batch is one sorted chunk.
        gb = self.global_batch
        head = (gb - (epoch * self.n) % gb) % gb
        perm = perm.numpy()
        out = perm[:head].tolist()
        window = GROUP_WINDOW * gb
        for w in range(head, self.n, window):
            part = perm[w:w + window]
            part = part[np.argsort(-self.lengths[part], kind="stable")]
            chunks = [part[b:b + gb] for b in range(0, len(part), gb)]
            full = [c for c in chunks if len(c) == gb]
            for j in torch.randperm(len(full), generator=g).tolist():
                out.extend(full[j].tolist())
            out.extend(c for chunk in chunks if len(chunk) < gb for c in chunk.tolist())   # a partial one last
        return out

    def __len__(self) -> int:
        return self.num - self.start

    def __iter__(self):
        perm, epoch = None, -1
        total = self.num * self.global_batch
        first = self.start * self.global_batch
        g = torch.Generator()
        for flat in range(0, total, self.global_batch):
            batch = []
            for k in range(flat, flat + self.global_batch):
                e, i = divmod(k, self.n)
                if e != epoch:
                    epoch = e
                    perm = self.epoch_order(e, g)
                batch.append(perm[i])
            if flat >= first:
                yield batch[self.rank::self.world]
