"""Replay: the memory bank of LVLM-CL (seed 003), which keeps a few records of every finished task and
mixes them into the training data of every later task.

The storage policies follow avalanche (``training/storage_policy.py``: reservoir and group-balanced
buffers) and mammoth (``utils/buffer.py``: reservoir sampling). LVLM-CL ablates a memory of 0 / 5% / 10%
of each task, which is ``memory_fraction``.

    methods: [{name: replay, memory_fraction: 0.05, selection: task_balanced, replay_ratio: 0.2}]

The bank holds canonical records (image paths, never decoded images), so its state is plain JSON-able
data saved with every task checkpoint, and a resumed run continues with the same bank. Every random
choice comes from a generator seeded by (``seed``, task index, purpose): no state is carried between
tasks but the bank itself and the reservoir's count of records seen.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from dataclasses import dataclass
from typing import Literal

from lvlm_cl.methods.base import Method, Task
from lvlm_cl.settings import Settings, seed_setting, setting


class ReplayMemory:
    """The bank: records in slots, each slot owned by the task that added it.

    Records are kept in the order they were selected, which is a random order, so the first k records of
    a task are a random subset of its records: shrinking a task keeps a prefix.
    """

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.owners: list[str] = []      # owners[i] = name of the task whose record is in slot i
        self.tasks: list[str] = []       # tasks added so far, in stream order (also those that kept nothing)
        self.seen = 0                    # records offered so far (the reservoir's stream position)

    def __len__(self) -> int:
        return len(self.records)

    def summary(self) -> dict[str, int]:
        """Records per task, for every task added so far."""
        counts = dict.fromkeys(self.tasks, 0)
        for owner in self.owners:
            counts[owner] = counts.get(owner, 0) + 1
        return counts

    def of_task(self, name: str) -> list[dict]:
        return [r for r, o in zip(self.records, self.owners) if o == name]

    def _start(self, name: str) -> None:
        if name in self.tasks:
            raise ValueError(f"replay: task {name!r} is already in the memory bank")
        self.tasks.append(name)

    def _keep(self, keep: list[bool]) -> None:
        self.records = [r for r, k in zip(self.records, keep) if k]
        self.owners = [o for o, k in zip(self.owners, keep) if k]

    def add_random(self, name: str, records: list, budget: int, total: int | None, rng: random.Random) -> None:
        """A random subset of ``budget`` records; over ``total``, random slots of the whole bank are dropped."""
        self._start(name)
        chosen = rng.sample(records, min(budget, len(records)))
        self.records += chosen
        self.owners += [name] * len(chosen)
        self.seen += len(records)
        if total is not None and len(self) > total:
            drop = set(rng.sample(range(len(self)), len(self) - total))
            self._keep([i not in drop for i in range(len(self))])

    def add_task_balanced(self, name: str, records: list, budget: int, total: int | None,
                          rng: random.Random) -> None:
        """Up to ``budget`` records of the new task; with ``total``, every task gets an equal share of it
        (the first tasks take the remainder) and older tasks are cut down to their share."""
        self._start(name)
        if total is not None:
            shares = even_shares(total, len(self.tasks))
            budget = min(budget, shares[-1])
            kept = dict.fromkeys(self.tasks, 0)
            limit = dict(zip(self.tasks, shares))
            keep = []
            for owner in self.owners:
                keep.append(kept[owner] < limit[owner])
                kept[owner] += 1
            self._keep(keep)
        chosen = rng.sample(records, min(budget, len(records)))
        self.records += chosen
        self.owners += [name] * len(chosen)
        self.seen += len(records)

    def add_reservoir(self, name: str, records: list, capacity: int, rng: random.Random) -> None:
        """Reservoir sampling (Vitter's algorithm R) over every record seen so far: after n records, each
        of them is in the bank with probability capacity / n."""
        self._start(name)
        for record in records:
            if len(self) < capacity:
                self.records.append(record)
                self.owners.append(name)
            else:
                j = rng.randrange(self.seen + 1)
                if j < capacity:
                    self.records[j], self.owners[j] = record, name
            self.seen += 1

    def state_dict(self) -> dict:
        return copy.deepcopy({"records": self.records, "owners": self.owners, "tasks": self.tasks,
                              "seen": self.seen})

    def load_state_dict(self, state: dict) -> None:
        state = copy.deepcopy(state)
        self.records = list(state.get("records", []))
        self.owners = list(state.get("owners", []))
        self.tasks = list(state.get("tasks", []))
        self.seen = int(state.get("seen", 0))
        if len(self.records) != len(self.owners):
            raise ValueError(f"replay state: {len(self.records)} records but {len(self.owners)} owners")


def even_shares(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` shares differing by at most one, the larger ones first."""
    base, rest = divmod(total, parts)
    return [base + (i < rest) for i in range(parts)]


@dataclass(frozen=True)
class ReplaySettings(Settings):
    memory_per_task: int | None = setting(None, low=0, help="records kept per task, as a count; setting it replaces "
                                                            "the default memory_fraction (giving both is an error)")
    memory_fraction: float | None = setting(0.05, low=0, high=1, help="records kept per task, as a share of its "
                                                                      "training records (rounded; at least 1 when "
                                                                      "positive)")
    selection: Literal["random", "reservoir", "task_balanced"] = setting(
        "random", help="how records are chosen: random, reservoir or task_balanced (see below)")
    replay_ratio: float = setting(0.2, low=0, below=1, help="expected share of replayed records in each batch of a "
                                                            "later task, in [0, 1); 0 keeps the bank but replays "
                                                            "nothing")
    total_budget: int | None = setting(None, low=0, help="a cap on the whole bank, over all tasks (required by "
                                                         "reservoir)")
    seed: int = seed_setting("seeds every choice (by task index), independently of the run's seed")

    def resolve(self, given: frozenset[str]) -> ReplaySettings:
        """Cross-field rules of the budget: exactly one of ``memory_per_task`` and ``memory_fraction`` (reservoir:
        neither, and ``total_budget``). A budget the user gives replaces the default one (``memory_fraction``,
        returned as None then), and reservoir uses neither."""
        s = self
        if (s.memory_per_task is not None and "memory_fraction" not in given) \
                or (s.selection == "reservoir" and not given & {"memory_per_task", "memory_fraction"}):
            s = dataclasses.replace(s, memory_fraction=None)
        if s.selection == "reservoir":
            if s.total_budget is None:
                raise ValueError("selection 'reservoir' needs setting 'total_budget' (the reservoir's size)")
            explicit = sorted(given & {"memory_per_task", "memory_fraction"})
            if explicit:
                raise ValueError(f"setting {explicit[0]!r} does not apply to selection 'reservoir', which keeps "
                                 "'total_budget' records over the whole stream; remove it")
        elif (s.memory_per_task is None) == (s.memory_fraction is None):
            raise ValueError("set exactly one of the settings 'memory_per_task' (a count per task) or "
                             f"'memory_fraction' (a share of each task), got {s.memory_per_task!r} and "
                             f"{s.memory_fraction!r}")
        return s


class Replay(Method):
    name = "replay"
    settings_class = ReplaySettings
    settings: ReplaySettings

    def __init__(self, **args):
        super().__init__(**args)
        self.memory = ReplayMemory()

    def budget(self, task: Task) -> int:
        """How many records of ``task`` the bank takes (before the total budget)."""
        if self.settings.memory_per_task is not None:
            return self.settings.memory_per_task
        fraction, n = self.settings.memory_fraction, len(task.train_records)
        # At least one record for a positive fraction, so a small task is not left out entirely.
        return max(int(fraction * n + 0.5), 1 if fraction > 0 and n > 0 else 0)

    def _rng(self, task: Task, purpose: str) -> random.Random:
        # A string seed is hashed (sha512) by random.Random: stable across processes and Python runs.
        return random.Random(f"replay/{self.settings.seed}/{task.index}/{purpose}")

    def before_task(self, task: Task, model, train_data: list) -> list:
        ratio, bank = self.settings.replay_ratio, self.memory.records
        if not bank or ratio == 0:
            return train_data
        n_replay = round(ratio / (1 - ratio) * len(train_data))
        # Every stored record q times, the remainder a random subset: each is replayed q or q + 1 times.
        q, r = divmod(n_replay, len(bank))
        replayed = list(bank) * q + self._rng(task, "mix").sample(bank, r)
        return train_data + replayed         # a RecordTable stays one (compact, lengths carried)

    def after_task(self, task: Task, model, train_data: list) -> None:
        # The task's own records: records replayed into train_data are already in the bank.
        s, rng, records = self.settings, self._rng(task, "select"), task.train_records
        if s.selection == "reservoir":
            self.memory.add_reservoir(task.name, records, s.total_budget, rng)
        elif s.selection == "task_balanced":
            self.memory.add_task_balanced(task.name, records, self.budget(task), s.total_budget, rng)
        else:
            self.memory.add_random(task.name, records, self.budget(task), s.total_budget, rng)

    def report(self) -> dict[str, float]:
        return {"memory_records": len(self.memory)}

    def summary(self) -> dict[str, int]:
        """Records in the bank per task."""
        return self.memory.summary()

    def state_dict(self) -> dict:
        return self.memory.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state)
