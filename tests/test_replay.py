"""Replay: budgets, selection policies, the replay ratio, determinism, resume, and a real run."""

import json
from pathlib import Path

import pytest

from conftest import SMALL_MODEL, write_recipe
from lvlm_cl.config import ConfigError, load_recipe
from lvlm_cl.methods import build_methods
from lvlm_cl.methods.base import Task
from lvlm_cl.methods.replay import Replay, ReplayMemory, even_shares
from lvlm_cl.state_io import load_state


def make_task(index: int, n: int = 200, name: str | None = None) -> Task:
    name = name or f"t{index}"
    records = [{"id": str(i), "task": name, "images": [f"/data/{name}/{i}.png"],
                "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
                             {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]}
               for i in range(n)]
    return Task(index=index, name=name, metric="exact_match", train_records=records, test_records=[])


def run_stream(method: Replay, tasks: list[Task]) -> list[list]:
    """What the loop does with one method; returns each task's training data."""
    trained = []
    for task in tasks:
        data = method.before_task(task, None, task.train_records)
        trained.append(data)
        method.after_task(task, None, data)
    return trained


# Budgets

def test_fraction_of_each_task():
    m = Replay(memory_fraction=0.05)
    run_stream(m, [make_task(0), make_task(1)])
    assert m.summary() == {"t0": 10, "t1": 10} and m.report()["memory_records"] == 20


def test_small_positive_fraction_keeps_at_least_one():
    m = Replay(memory_fraction=0.05)
    run_stream(m, [make_task(0, n=6)])
    assert m.summary() == {"t0": 1}


def test_count_per_task_replaces_the_default_fraction():
    assert Replay().hparams["memory_fraction"] == 0.05
    m = Replay(memory_per_task=7)
    assert m.hparams["memory_fraction"] is None
    run_stream(m, [make_task(i) for i in range(3)])
    assert m.summary() == {"t0": 7, "t1": 7, "t2": 7}
    for name in ("t0", "t1", "t2"):                    # distinct records of the right task
        kept = m.memory.of_task(name)
        assert all(r["task"] == name for r in kept) and len({r["id"] for r in kept}) == 7


def test_task_balanced_shrinks_older_tasks_evenly():
    m = Replay(memory_per_task=50, selection="task_balanced", total_budget=12)
    tasks = [make_task(i) for i in range(4)]
    m.after_task(tasks[0], None, [])
    assert m.summary() == {"t0": 12}
    first = m.memory.of_task("t0")
    m.after_task(tasks[1], None, [])
    assert m.summary() == {"t0": 6, "t1": 6}
    assert m.memory.of_task("t0") == first[:6]          # shrinking keeps a subset, never swaps records in
    m.after_task(tasks[2], None, [])
    assert m.summary() == {"t0": 4, "t1": 4, "t2": 4}
    m.after_task(tasks[3], None, [])
    assert m.summary() == {"t0": 3, "t1": 3, "t2": 3, "t3": 3} and m.report()["memory_records"] == 12


def test_task_balanced_without_total_is_the_per_task_budget_and_the_remainder_goes_first():
    m = Replay(memory_per_task=5, selection="task_balanced")
    run_stream(m, [make_task(i) for i in range(3)])
    assert m.summary() == {"t0": 5, "t1": 5, "t2": 5}
    m = Replay(memory_per_task=50, selection="task_balanced", total_budget=10)
    run_stream(m, [make_task(i) for i in range(3)])
    assert m.summary() == {"t0": 4, "t1": 3, "t2": 3}
    assert even_shares(10, 4) == [3, 3, 2, 2]


def test_random_with_total_budget_is_capped():
    m = Replay(memory_per_task=10, total_budget=25)
    run_stream(m, [make_task(i) for i in range(4)])
    assert m.report()["memory_records"] == 25 and sum(m.summary().values()) == 25


def test_reservoir_keeps_exactly_the_budget():
    m = Replay(selection="reservoir", total_budget=30)
    run_stream(m, [make_task(0, n=10), make_task(1, n=100), make_task(2, n=100)])
    assert m.report()["memory_records"] == 30 and m.memory.seen == 210
    assert set(m.summary()) == {"t0", "t1", "t2"}


def test_reservoir_gives_every_record_an_equal_chance():
    # 10,000 records through a 100-slot reservoir, in 10 chunks of 1,000: each chunk holds 10 in expectation.
    records = [{"id": str(i), "task": "s"} for i in range(10_000)]

    def chunks(seed):
        import random
        mem = ReplayMemory()
        mem.add_reservoir("s", records, 100, random.Random(seed))
        assert len(mem) == 100 and len({r["id"] for r in mem.records}) == 100
        counts = [0] * 10
        for r in mem.records:
            counts[int(r["id"]) // 1000] += 1
        return counts

    # One run: every chunk within 10 ± 7 (a count is close to Binomial(100, 0.1), sd 3).
    assert all(3 <= c <= 17 for c in chunks(0)), chunks(0)
    # Averaged over 50 seeded runs: the sd of a chunk's mean is about 0.42; allow 1.5.
    means = [sum(col) / 50 for col in zip(*(chunks(s) for s in range(50)))]
    assert all(abs(m - 10) < 1.5 for m in means), means


# Mixing into later tasks

def test_replay_ratio_and_sources():
    m = Replay(memory_per_task=10, replay_ratio=0.25)
    t0, t1, t2 = make_task(0, n=100), make_task(1, n=60), make_task(2, n=90)
    assert m.before_task(t0, None, t0.train_records) == t0.train_records     # empty bank: unchanged
    m.after_task(t0, None, t0.train_records)
    data1 = m.before_task(t1, None, t1.train_records)
    assert abs(len(data1) - 60 / (1 - 0.25)) <= 1
    assert data1[:60] == t1.train_records
    replayed = data1[60:]
    assert replayed and all(r["task"] == "t0" for r in replayed)             # earlier tasks only, own task field
    m.after_task(t1, None, data1)
    # The bank took t1's own records, not the replayed t0 records that trained with them.
    assert m.summary() == {"t0": 10, "t1": 10}
    assert all(r["task"] == "t1" for r in m.memory.of_task("t1"))

    data2 = m.before_task(t2, None, t2.train_records)
    assert abs(len(data2) - 90 / (1 - 0.25)) <= 1                           # 30 replayed > 20 stored
    replayed = data2[90:]
    assert {r["task"] for r in replayed} == {"t0", "t1"}
    ids = [(r["task"], r["id"]) for r in replayed]
    counts = {k: ids.count(k) for k in set(ids)}
    assert len(counts) == 20 and set(counts.values()) <= {1, 2}              # every stored record, repeated evenly


def test_ratio_zero_means_no_replay():
    m = Replay(memory_per_task=5, replay_ratio=0)
    t0, t1 = make_task(0), make_task(1)
    run_stream(m, [t0])
    assert m.before_task(t1, None, t1.train_records) == t1.train_records
    assert m.report()["memory_records"] == 5                      # the bank still fills (its size is reported)


# Determinism and resume

def test_same_seed_same_bank_and_replay_other_seed_differs():
    def go(seed):
        m = Replay(memory_fraction=0.05, seed=seed, selection="task_balanced", total_budget=25)
        data = run_stream(m, [make_task(i) for i in range(3)])
        return m.state_dict(), [[(r["task"], r["id"]) for r in d] for d in data]

    assert go(3) == go(3)
    assert go(3)[0] != go(4)[0]


@pytest.mark.parametrize("selection, settings", [
    ("random", {"memory_per_task": 6}),
    ("reservoir", {"total_budget": 15}),
    ("task_balanced", {"memory_fraction": 0.1, "total_budget": 20}),
])
def test_state_round_trip_continues_identically(selection, settings):
    tasks = [make_task(i, n=50) for i in range(4)]
    kw = dict(selection=selection, replay_ratio=0.3, seed=1, **settings)
    straight = Replay(**kw)
    data = run_stream(straight, tasks)

    first = Replay(**kw)
    run_stream(first, tasks[:2])
    state = json.loads(json.dumps(first.state_dict()))            # JSON-able, and survives the trip
    resumed = Replay(**kw)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == first.state_dict()
    assert run_stream(resumed, tasks[2:]) == data[2:]
    assert resumed.state_dict() == straight.state_dict()


def test_state_is_a_copy_and_empty_state_resets():
    m = Replay(memory_per_task=3)
    run_stream(m, [make_task(0)])
    state = m.state_dict()
    state["records"].clear()
    assert m.report()["memory_records"] == 3
    m.load_state_dict({})
    assert m.report()["memory_records"] == 0 and m.summary() == {}


def test_a_task_is_added_once():
    m = Replay()
    t0 = make_task(0)
    m.after_task(t0, None, t0.train_records)
    with pytest.raises(ValueError, match="already"):
        m.after_task(t0, None, t0.train_records)


# Validation and the registry

@pytest.mark.parametrize("settings, key", [
    ({"memory_per_task": 5, "memory_fraction": 0.1}, "memory_per_task"),  # both budgets
    ({"memory_fraction": None}, "memory_fraction"),                       # neither
    ({"memory_per_task": -1}, "memory_per_task"),
    ({"memory_fraction": -0.1}, "memory_fraction"),
    ({"memory_fraction": 1.5}, "memory_fraction"),
    ({"replay_ratio": 1.0}, "replay_ratio"),
    ({"replay_ratio": -0.2}, "replay_ratio"),
    ({"selection": "fifo"}, "selection"),
    ({"selection": "reservoir"}, "total_budget"),                         # reservoir needs a size
    ({"selection": "reservoir", "total_budget": 10, "memory_per_task": 3}, "memory_per_task"),
    ({"total_budget": -5}, "total_budget"),
    ({"seed": "x"}, "seed"),
])
def test_invalid_settings_name_the_setting(settings, key):
    with pytest.raises(ValueError, match=key):
        Replay(**settings)


def test_recipe_turns_it_on_and_rejects_unknown_settings(tmp_path, colour_tasks):
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, tmp_path / "run")
    cfg = load_recipe(recipe, ["methods=[{name: replay, memory_fraction: 0.1}]"])
    [method] = build_methods(cfg.methods)
    assert isinstance(method, Replay) and method.hparams["memory_fraction"] == 0.1
    assert method.hparams["selection"] == "random" and method.hparams["replay_ratio"] == 0.2
    with pytest.raises(ConfigError, match="memory_size"):
        load_recipe(recipe, ["methods=[{name: replay, memory_size: 10}]"])


# A real run

@pytest.mark.slow
def test_real_run_saves_the_bank_with_each_checkpoint(tmp_path, colour_tasks):
    from lvlm_cl.train import run

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, out, steps_per_task=5, eval_batch_size=24)
    cfg = load_recipe(recipe, [*SMALL_MODEL, "trainer.eval_max_samples=4",
                               "methods=[{name: replay, memory_per_task: 8, replay_ratio: 0.3}]"])
    _, _, state = run(cfg, progress=False)
    assert len(state.rows) == 2 and all(len(r) == 2 for r in state.rows)

    ck0 = load_state(out / "checkpoints" / "task-00-colour", "methods")["replay"]
    assert len(ck0["records"]) == 8 and set(ck0["owners"]) == {"colour"}
    ck1 = load_state(out / "checkpoints" / "task-01-warmth", "methods")["replay"]
    assert len(ck1["records"]) == 16 and ck1["owners"].count("colour") == 8 and ck1["owners"].count("warmth") == 8
    assert all(r["task"] == o for r, o in zip(ck1["records"], ck1["owners"]))
    assert all(Path(p).is_absolute() and Path(p).is_file() for r in ck1["records"] for p in r["images"])
    # The warmth task trained on 48 own records + round(0.3 / 0.7 * 48) = 21 replayed colour records.
    meta = json.loads((out / "checkpoints" / "task-01-warmth" / "meta.json").read_text())
    assert meta["train_samples"] == 48 + 21
