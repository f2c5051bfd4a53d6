"""Property-based checks of what resuming relies on: the batch order continues exactly where a step
checkpoint left it, whatever the data size, batch, process count and resume point; and the record
validator accepts exactly the conversations whose roles alternate user/assistant."""

from hypothesis import given, settings
from hypothesis import strategies as st

from lvlm_cl.data.dataset import StepBatchOrder
from lvlm_cl.data.records import record_problems


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 40), per_rank=st.integers(1, 6), world=st.integers(1, 4), steps=st.integers(1, 12),
       seed=st.integers(0, 10_000), grouped=st.booleans(), data=st.data())
def test_a_resumed_batch_order_is_the_tail_of_the_uninterrupted_one(n, per_rank, world, steps, seed, grouped, data):
    start = data.draw(st.integers(0, steps))
    lengths = data.draw(st.lists(st.integers(1, 50), min_size=n, max_size=n)) if grouped else None

    def order(**kw):
        return StepBatchOrder(n, per_rank * world, steps, seed, lengths=lengths, **kw)
    full = {r: list(order(rank=r, world=world)) for r in range(world)}
    for r in range(world):
        resumed = list(order(start=start, rank=r, world=world))
        assert resumed == full[r][start:]
        assert len(order(start=start, rank=r, world=world)) == len(resumed)
    for step in range(steps):                        # the processes' shares make up the global batch
        shares = [i for r in range(world) for i in full[r][step]]
        assert len(shares) == per_rank * world and all(0 <= i < n for i in shares)
    # The global order walks through epochs: each full epoch of n draws is a permutation of the samples
    # (grouped by length or not: the same samples as often).
    flat = [i for b in order() for i in b]
    for e in range(len(flat) // n):
        assert sorted(flat[e * n:(e + 1) * n]) == list(range(n))


ROLES = st.lists(st.sampled_from(["user", "assistant"]), min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(roles=ROLES, system=st.booleans())
def test_roles_must_alternate_starting_with_the_user(roles, system):
    turns = ([{"role": "system", "content": [{"type": "text", "text": "be brief"}]}] if system else [])
    turns += [{"role": r, "content": [{"type": "text", "text": f"turn {i}"}]} for i, r in enumerate(roles)]
    record = {"id": "x", "messages": turns, "images": []}
    alternating = all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles))
    ends_with_answer = roles[-1] == "assistant"
    problems = record_problems(record)
    role_problems = [p for p in problems if p.field.endswith(".role")]
    assert (not role_problems) == alternating
    if alternating and ends_with_answer:
        assert problems == []
