"""Encoded samples for the loop: canonical records -> model inputs, encoded once and kept when asked."""

from __future__ import annotations

import torch

from lvlm_cl.data.encoding import Encoded, encode_many, encode_prompt, encode_record


class EncodingCache:
    """Encodes records through one processor; keeps results in memory when ``keep`` (small images).

    Keys are (task, id), so records of different tasks may share ids. Train and prompt encodings are kept
    apart: a prompt stops before the last answer.
    """

    def __init__(self, processor, max_length: int, keep: bool = True):
        self.processor = processor
        self.max_length = max_length
        self.keep = keep
        self._train: dict[tuple[str, str], Encoded] = {}
        self._prompt: dict[tuple[str, str], Encoded] = {}

    def train(self, record: dict) -> Encoded:
        return self._get(self._train, record, encode_record)

    def prompt(self, record: dict) -> Encoded:
        return self._get(self._prompt, record, encode_prompt)

    def encode_all(self, records: list[dict], *, prompt: bool, chunk: int = 64) -> None:
        """Encode and keep every record not encoded yet, ``chunk`` records per processor call
        (``encode_many``). An ``EncodingError`` names its record."""
        store = self._prompt if prompt else self._train
        todo = [r for r in records if self._key(r) not in store]
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            for record, encoded in zip(part, encode_many(self.processor, part, self.max_length, prompt=prompt)):
                if self.keep:
                    store[self._key(record)] = encoded

    @staticmethod
    def _key(record: dict) -> tuple[str, str]:
        return record.get("task", ""), record["id"]

    def _get(self, store, record, encode) -> Encoded:
        key = self._key(record)
        hit = store.get(key)
        if hit is None:
            hit = encode(self.processor, record, self.max_length)
            if self.keep:
                store[key] = hit
        return hit


class StepBatchOrder(torch.utils.data.Sampler):
    """Which samples make up each optimizer micro-step: a fresh permutation per epoch from a seeded
    generator, so step k's batch is the same in every run and a resumed run continues the same order.

    Each micro-step takes ``global_batch`` indices; rank r of w processes takes every w-th of them.
    """

    def __init__(self, n: int, global_batch: int, num_micro_steps: int, seed: int, *, start: int = 0,
                 rank: int = 0, world: int = 1):
        if n < 1:
            raise ValueError("no training samples")
        self.n, self.global_batch, self.num = n, global_batch, num_micro_steps
        self.seed, self.start, self.rank, self.world = seed, start, rank, world

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
                    g.manual_seed(self.seed * 1_000_003 + e)
                    perm = torch.randperm(self.n, generator=g).tolist()
                batch.append(perm[i])
            if flat >= first:
                yield batch[self.rank::self.world]
