"""The generation scheduler and driver with a fake chain: no sockets, no model.

The fake chain keeps batches by id the way a worker does (rows in order, merge on a decode that
names several batches, filter keeps rows in order) and checks the KV budget on every call, so a
scheduler that over-admits fails here, not on a worker.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from services.common.errors import ResourceExhausted
from services.common.settings import RouterSettings
from services.common.types import SamplingParams
from services.router.scheduler import (
    MAX_PRIORITY,
    Request,
    Room,
    Scheduler,
    SchedulerConfig,
    Slot,
    kv_cost,
)

GREEDY = SamplingParams()
EOS = 99


def request(
    rid: int,
    prompt_len: int = 4,
    max_new: int = 4,
    *,
    priority: int = 0,
    tenant: str = "",
    arrived: float = 0.0,
) -> Request:
    return Request(
        request_id=rid,
        prompt=list(range(1, prompt_len + 1)),
        max_new=max_new,
        sampling=GREEDY,
        eos=frozenset({EOS}),
        arrived=arrived,
        deadline=1e9,
        priority=priority,
        tenant=tenant,
    )


def config(**overrides: object) -> SchedulerConfig:
    values: dict[str, object] = {"budget_tokens": 10_000, "max_rows": 64, "stages": 1, "slots": 1}
    values.update(overrides)
    return SchedulerConfig.from_settings(RouterSettings(), **values)  # type: ignore[arg-type]


def admitted(scheduler: Scheduler, slot: Slot, now: float, *, keep: bool = False) -> list[Request]:
    """What the scheduler admits to `slot` now, with the chain's whole budget as its room.

    The prefill is then reported: with `keep` the rows stay as the slot's pending rows (first
    token 7), else they end at their first token (EOS) and the slot is empty again."""
    room = Room(scheduler.config.budget_tokens, scheduler.config.max_rows)
    plan = scheduler.plan(slot, now, room)
    if plan.prefill is None:
        return []
    first = 7 if keep else EOS
    scheduler.prefilled(slot, plan.prefill, [first] * len(plan.prefill.requests), now)
    return plan.prefill.requests


# -- the wait queue --------------------------------------------------------------------------


def test_higher_priority_is_admitted_first() -> None:
    scheduler = Scheduler(config(max_rows=2))
    for rid, priority in ((1, 0), (2, -5), (3, 7), (4, 1)):
        scheduler.submit(request(rid, priority=priority))
    assert [r.request_id for r in admitted(scheduler, scheduler.slots[0], 0.0)] == [3, 4]


def test_equal_priority_is_first_come_first_served() -> None:
    scheduler = Scheduler(config(max_rows=3))
    for rid in (5, 6, 7, 8):
        scheduler.submit(request(rid, arrived=rid / 10))
    assert [r.request_id for r in admitted(scheduler, scheduler.slots[0], 1.0)] == [5, 6, 7]


def test_tenants_share_fairly() -> None:
    """Ten requests of a busy tenant and two of a quiet one: four places go two and two."""
    scheduler = Scheduler(config(max_rows=4))
    for rid in range(10):
        scheduler.submit(request(rid, tenant="busy", arrived=rid / 100))
    scheduler.submit(request(100, tenant="quiet", arrived=0.5))
    scheduler.submit(request(101, tenant="quiet", arrived=0.6))
    picked = admitted(scheduler, scheduler.slots[0], 1.0)
    assert sorted(r.tenant for r in picked) == ["busy", "busy", "quiet", "quiet"]


def test_running_rows_count_against_a_tenant() -> None:
    scheduler = Scheduler(config(max_rows=3))
    slot = scheduler.slots[0]
    slot.rows = [request(1, tenant="a"), request(2, tenant="a")]
    for row in slot.rows:
        row.generated = [7]
    slot.steps_since_prefill = 20  # past max_waiting_steps: the ratio rule does not hold it
    scheduler.submit(request(3, tenant="a", arrived=0.0))
    scheduler.submit(request(4, tenant="b", arrived=0.5))
    picked = admitted(scheduler, slot, 1.0)
    assert [r.request_id for r in picked] == [4]


def test_waiting_ages_so_low_priority_never_starves() -> None:
    """A priority-0 request with a 100 s deadline and aging_share 0.5 reaches the highest
    priority after 50 s of waiting: then it goes before fresh requests of any priority."""
    scheduler = Scheduler(config(max_rows=1, aging_share=0.5))
    old = request(1, priority=0, arrived=0.0)
    old.deadline = 100.0
    scheduler.submit(old)
    # A fresh request of priority 50 wins while the old one has waited under 25 s ...
    scheduler.submit(request(2, priority=50, arrived=10.0))
    assert admitted(scheduler, scheduler.slots[0], 10.0)[0].request_id == 2
    assert scheduler.effective_priority(old, 10.0, ceiling=MAX_PRIORITY) == 20
    # ... but at 50 s it has the highest priority and, having come first, goes first.
    scheduler.submit(request(3, priority=MAX_PRIORITY, arrived=49.0))
    assert scheduler.effective_priority(old, 50.0, ceiling=MAX_PRIORITY) == MAX_PRIORITY
    assert admitted(scheduler, scheduler.slots[0], 50.0)[0].request_id == 1


def test_the_share_table_is_bounded_and_forgets_idle_tenants() -> None:
    scheduler = Scheduler(config(max_rows=1, max_tenants=100))
    for index in range(1000):  # a thousand tenants, each admitted once
        scheduler.submit(request(index, tenant=f"t{index}", arrived=index))
        assert len(admitted(scheduler, scheduler.slots[0], float(index))) == 1
    assert len(scheduler._shares) <= 100
    assert "t999" in scheduler._shares  # the busiest recent ones are kept


def test_a_full_queue_refuses() -> None:
    scheduler = Scheduler(config(max_waiting=2))
    scheduler.submit(request(1))
    scheduler.submit(request(2))
    with pytest.raises(ResourceExhausted, match="max_waiting"):
        scheduler.submit(request(3))


# -- budget admission ------------------------------------------------------------------------


def test_kv_cost_counts_padding_and_the_longest_remaining_generation() -> None:
    # Three rows: lengths 10, 2, 5; limits 12, 30, 6 -> 3 x (10 + 28).
    assert kv_cost([10, 2, 5], [12, 30, 6]) == 3 * (10 + 28)
    assert kv_cost([], []) == 0


def test_admission_stays_within_the_budget_and_over_budget_waits() -> None:
    # Each request alone costs 1 x (4 + 4) = 8 slots; 3 together cost 24.
    scheduler = Scheduler(config(budget_tokens=20))
    for rid in range(4):
        scheduler.submit(request(rid))
    picked = admitted(scheduler, scheduler.slots[0], 0.0)
    assert len(picked) == 2  # 2 x 8 = 16 <= 20 < 3 x 8
    assert len(scheduler.waiting) == 2


def test_a_long_request_is_not_padded_together_with_short_ones() -> None:
    """One 4,096-token prompt and 31 short ones: the long one runs in its own slot."""
    long = request(0, prompt_len=4096, max_new=8)
    shorts = [request(i, prompt_len=8, max_new=8, arrived=i) for i in range(1, 32)]
    budget = kv_cost([4096], [4104]) + kv_cost([8] * 31, [16] * 31)
    scheduler = Scheduler(config(budget_tokens=budget, slots=2))
    scheduler.submit(long)
    for short in shorts:
        scheduler.submit(short)
    first = admitted(scheduler, scheduler.slots[0], 100.0, keep=True)
    assert first == [long]
    second = admitted(scheduler, scheduler.slots[1], 100.0, keep=True)
    assert second == shorts
    assert scheduler.cost() <= budget


def test_a_request_that_can_never_fit_is_recognised() -> None:
    scheduler = Scheduler(config(budget_tokens=100))
    assert scheduler.fits_alone(request(1, prompt_len=50, max_new=50))
    assert not scheduler.fits_alone(request(2, prompt_len=50, max_new=51))


def test_running_rows_leave_when_done_cancelled_or_late() -> None:
    scheduler = Scheduler(config())
    slot = scheduler.slots[0]
    done, cancelled, late, running = (request(i, max_new=2) for i in range(4))
    done.generated = [5, 6]
    cancelled.generated, cancelled.cancelled = [5], True
    late.generated, late.deadline = [5], 10.0
    running.generated = [5]
    slot.rows = [done, cancelled, late, running]
    slot.batch_id = "b-1"
    plan = scheduler.plan(slot, 11.0, Room(10_000, 64))
    assert plan.drop is not None and plan.drop.keep == [running.request_id]
    assert slot.rows == [running]
    ends = {o.request_id: (o.finished, o.error and o.error.code.name) for o in plan.outputs}
    assert ends == {
        done.request_id: ("length", None),
        cancelled.request_id: ("", "UNAVAILABLE"),
        late.request_id: ("", "DEADLINE_EXCEEDED"),
    }


def test_new_arrivals_wait_for_the_ratio_or_the_step_count() -> None:
    scheduler = Scheduler(config(waiting_served_ratio=1.2, max_waiting_steps=3))
    slot = scheduler.slots[0]
    slot.rows = [request(i) for i in range(10)]
    for row in slot.rows:
        row.generated = [1]
    scheduler.submit(request(50))
    assert admitted(scheduler, slot, 0.0) == []  # 1 waiting < 1.2 x 10 running
    slot.steps_since_prefill = 3
    assert [r.request_id for r in admitted(scheduler, slot, 0.0)] == [50]


def test_balanced_slots_split_the_rows() -> None:
    scheduler = Scheduler(config(slots=2, balanced=True))
    for rid in range(16):
        scheduler.submit(request(rid, arrived=rid))
    a = admitted(scheduler, scheduler.slots[0], 100.0, keep=True)
    b = admitted(scheduler, scheduler.slots[1], 100.0, keep=True)
    assert (len(a), len(b)) == (8, 8)


def test_rows_a_stage_had_no_room_for_wait_again_without_spending_retries() -> None:
    """A lost batch (a stage failed inside a step) spends a retry per row and a row out of
    retries fails; a stage refusing for room is no failure: the rows wait again, however often."""
    scheduler = Scheduler(config(max_retries=1))
    slot = scheduler.slots[0]
    row = request(1)
    row.generated = [5]
    error = ResourceExhausted("a stage is full")
    for _ in range(5):
        slot.rows, slot.batch_id = [row], "b-1"
        outputs, cleared = scheduler.lost(slot, error, 1.0, retry=False)
        assert outputs == [] and cleared == ["b-1"]
        assert scheduler.waiting == [row] and row.retries == 0
        scheduler.waiting.clear()
    slot.rows, slot.batch_id = [row], "b-2"
    assert scheduler.lost(slot, error, 1.0)[0] == []  # a failure: one retry left ...
    scheduler.waiting.clear()
    slot.rows, slot.batch_id = [row], "b-3"
    (ended,) = scheduler.lost(slot, error, 1.0)[0]  # ... and none now
    assert ended.error is error


def test_a_chunk_is_sized_to_cost_about_the_decode_steps_asked() -> None:
    from services.router.relay import StepTimes
    from services.router.scheduler import MIN_CHUNK, chunk_columns

    # 2 steps of 80 ms at 2 ms per column: 80 columns; never above the ceiling nor below 16.
    assert chunk_columns(2.0, 0.080, 0.002, 128) == 80
    assert chunk_columns(2.0, 0.080, 0.0005, 128) == 128
    assert chunk_columns(2.0, 0.001, 0.002, 128) == MIN_CHUNK
    assert chunk_columns(2.0, 0.001, 0.002, 8) == 8  # a ceiling below the floor wins
    times = StepTimes()
    assert times.typical("w", "decode") is None
    for seconds in (0.08, 0.09, 0.5):  # one slow outlier does not set the size
        times.observe("w", "decode", 8, seconds)
    assert times.typical("w", "decode") == 0.09 / 8


# -- prefix reuse: who shares a prefill ------------------------------------------------------


def _cached(held: dict[int, int]) -> Callable[[Request], int]:
    """A chain's prefix index as the scheduler sees it: leading tokens held, by request id."""
    return lambda r: held.get(r.request_id, 0)


def _planned(scheduler: Scheduler, held: dict[int, int]) -> tuple[list[int], int]:
    """The request ids of the next prefill and the column it starts at (reported done)."""
    slot = scheduler.slots[0]
    room = Room(scheduler.config.budget_tokens, scheduler.config.max_rows)
    plan = scheduler.plan(slot, 0.0, room, _cached(held))
    assert plan.prefill is not None
    prefill = plan.prefill
    scheduler.prefilled(slot, prefill, [EOS] * len(prefill.requests), 0.0)
    return [r.request_id for r in prefill.requests], prefill.start


def test_a_cold_prompt_does_not_make_warm_ones_recompute_their_cached_blocks() -> None:
    scheduler = Scheduler(config())
    held = {1: 192, 2: 192, 3: 0}  # two turns of one chat, and a stranger of the same length
    for rid in (1, 2, 3):
        scheduler.submit(request(rid, prompt_len=200))
    assert _planned(scheduler, held) == ([1, 2], 192)
    assert _planned(scheduler, held) == ([3], 0)


def test_a_warm_prompt_is_not_dragged_into_a_cold_prefill() -> None:
    scheduler = Scheduler(config())
    held = {1: 0, 2: 192}
    for rid in (1, 2):
        scheduler.submit(request(rid, prompt_len=200))
    assert _planned(scheduler, held) == ([1], 0)
    assert _planned(scheduler, held) == ([2], 192)


def test_prompts_share_a_prefill_when_splitting_saves_little_or_nothing_is_cached() -> None:
    scheduler = Scheduler(config())
    # A short stranger starts after the warm row's cached part: nothing is lost by sharing.
    held = {1: 64, 2: 0}
    scheduler.submit(request(1, prompt_len=70))
    scheduler.submit(request(2, prompt_len=5))
    assert _planned(scheduler, held) == ([1, 2], 64)
    # Nothing cached anywhere: prompts of any lengths share one prefill, as without reuse.
    for rid, length in ((3, 200), (4, 10), (5, 120)):
        scheduler.submit(request(rid, prompt_len=length))
    assert _planned(scheduler, {}) == ([3, 4, 5], 0)
    # A few cached columns at stake: less than a prefill of its own would cost.
    held = {6: 32, 7: 0}
    scheduler.submit(request(6, prompt_len=40))
    scheduler.submit(request(7, prompt_len=40))
    assert _planned(scheduler, held) == ([6, 7], 0)
