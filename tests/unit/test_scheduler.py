"""The generation scheduler and driver with a fake chain: no sockets, no model.

The fake chain keeps batches by id the way a worker does (rows in order, merge on a decode that
names several batches, filter keeps rows in order) and checks the KV budget on every call, so a
scheduler that over-admits fails here, not on a worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from services.common.errors import ResourceExhausted
from services.common.types import ModelKind, SamplingParams, Span, WorkerDescriptor
from services.router.batcher import ChainEngine, Finished, Generation, Generations
from services.router.routing import Chain
from services.router.scheduler import Request, Scheduler, SchedulerConfig, kv_cost

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
    values: dict[str, object] = {"budget_tokens": 10_000, "max_rows": 64}
    values.update(overrides)
    return SchedulerConfig(**values)  # type: ignore[arg-type]


# -- the wait queue --------------------------------------------------------------------------


def test_higher_priority_is_admitted_first() -> None:
    scheduler = Scheduler(config(max_rows=2))
    for rid, priority in ((1, 0), (2, -5), (3, 7), (4, 1)):
        scheduler.submit(request(rid, priority=priority))
    plan = scheduler.plan(scheduler.slots[0], now=0.0)
    assert [r.request_id for r in plan.prefill] == [3, 4]


def test_equal_priority_is_first_come_first_served() -> None:
    scheduler = Scheduler(config(max_rows=3))
    for rid in (5, 6, 7, 8):
        scheduler.submit(request(rid, arrived=rid / 10))
    assert [r.request_id for r in scheduler.plan(scheduler.slots[0], 1.0).prefill] == [5, 6, 7]


def test_tenants_share_fairly() -> None:
    """Ten requests of a busy tenant and two of a quiet one: four places go two and two."""
    scheduler = Scheduler(config(max_rows=4))
    for rid in range(10):
        scheduler.submit(request(rid, tenant="busy", arrived=rid / 100))
    scheduler.submit(request(100, tenant="quiet", arrived=0.5))
    scheduler.submit(request(101, tenant="quiet", arrived=0.6))
    picked = scheduler.plan(scheduler.slots[0], now=1.0).prefill
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
    picked = scheduler.plan(slot, now=1.0).prefill
    assert [r.request_id for r in picked] == [4]


def test_waiting_ages_so_low_priority_never_starves() -> None:
    scheduler = Scheduler(config(max_rows=1, aging_s=1.0))
    old = request(1, priority=-3, arrived=0.0)
    scheduler.submit(old)
    # A fresh request of priority 0 wins while the old one has waited under 3 s ...
    scheduler.submit(request(2, priority=0, arrived=2.0))
    assert scheduler.plan(scheduler.slots[0], now=2.0).prefill[0].request_id == 2
    # ... but after 5 s it has climbed to the best priority waiting (-3 + 5, capped at 1) and,
    # having arrived first, goes before a fresh priority-1 request.
    scheduler.submit(request(3, priority=1, arrived=5.0))
    assert scheduler.effective_priority(old, 5.0, ceiling=1) == 1
    assert scheduler.effective_priority(old, 2.0, ceiling=1) == -1
    assert scheduler.plan(scheduler.slots[0], now=5.0).prefill[0].request_id == 1


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
    picked = scheduler.plan(scheduler.slots[0], now=0.0).prefill
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
    first = scheduler.plan(scheduler.slots[0], now=100.0).prefill
    assert first == [long]
    scheduler.slots[0].pending = first
    second = scheduler.plan(scheduler.slots[1], now=100.0).prefill
    assert second == shorts
    scheduler.slots[1].pending = second
    assert sum(s.cost() for s in scheduler.slots) <= budget


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
    assert scheduler.plan(slot, now=11.0).drop == [done, cancelled, late]


def test_new_arrivals_wait_for_the_ratio_or_the_step_count() -> None:
    scheduler = Scheduler(config(waiting_served_ratio=1.2, max_waiting_steps=3))
    slot = scheduler.slots[0]
    slot.rows = [request(i) for i in range(10)]
    for row in slot.rows:
        row.generated = [1]
    scheduler.submit(request(50))
    assert scheduler.plan(slot, now=0.0).prefill == []  # 1 waiting < 1.2 x 10 running
    slot.steps_since_prefill = 3
    assert [r.request_id for r in scheduler.plan(slot, now=0.0).prefill] == [50]


def test_balanced_slots_split_the_rows() -> None:
    scheduler = Scheduler(config(slots=2, balanced=True))
    for rid in range(16):
        scheduler.submit(request(rid, arrived=rid))
    a = scheduler.plan(scheduler.slots[0], now=100.0).prefill
    scheduler.slots[0].pending = a
    b = scheduler.plan(scheduler.slots[1], now=100.0).prefill
    assert (len(a), len(b)) == (8, 8)


# -- the driver, with a fake chain -----------------------------------------------------------


@dataclass
class FakeChain:
    """Batches by id, as a worker keeps them; the next token of a row is a function of its feed."""

    budget: int
    batches: dict[str, list[tuple[int, list[int], int]]] = field(default_factory=dict)
    calls: list[tuple[str, object]] = field(default_factory=list)
    peak: int = 0

    @staticmethod
    def next_token(seq: Sequence[int]) -> int:
        return (sum(seq) * 31 + len(seq)) % 50 + 1

    def _check_budget(self) -> None:
        used = 0
        for rows in self.batches.values():
            used += kv_cost([len(s) - 1 for _, s, _ in rows], [m for _, _, m in rows])
        self.peak = max(self.peak, used)
        assert used <= self.budget, f"{used} slots over the budget {self.budget}"

    async def prefill(self, batch_id, request_ids, feeds, max_tokens, sampling, timeout):  # noqa: ANN001
        await asyncio.sleep(0)
        self.calls.append(("prefill", list(request_ids)))
        rows = []
        for rid, feed, limit in zip(request_ids, feeds, max_tokens, strict=True):
            seq = list(feed)
            seq.append(self.next_token(seq))
            rows.append((rid, seq, limit))
        self.batches[batch_id] = rows
        self._check_budget()
        return [seq[-1] for _, seq, _ in rows]

    async def decode(self, batch_ids, tokens, timeout):  # noqa: ANN001
        await asyncio.sleep(0)
        self.calls.append(("decode", list(batch_ids)))
        merged = [row for b in batch_ids for row in self.batches.pop(b)]
        self.batches[batch_ids[0]] = merged
        assert [seq[-1] for _, seq, _ in merged] == list(tokens), "tokens out of row order"
        for _, seq, _ in merged:
            seq.append(self.next_token(seq))
        self._check_budget()
        return [seq[-1] for _, seq, _ in merged]

    async def filter(self, batch_id, keep):  # noqa: ANN001
        self.calls.append(("filter", list(keep)))
        rows = {row[0]: row for row in self.batches[batch_id]}
        assert list(keep) == [rid for rid in rows if rid in set(keep)], "keep out of row order"
        self.batches[batch_id] = [rows[rid] for rid in keep]

    async def clear(self, batch_ids):  # noqa: ANN001
        self.calls.append(("clear", list(batch_ids)))
        for batch_id in batch_ids:
            self.batches.pop(batch_id, None)


def _expected(prompt: list[int], max_new: int) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(max_new):
        seq.append(FakeChain.next_token(seq))
        out.append(seq[-1])
    return out


class _Pool:
    def __init__(self) -> None:
        self.load: dict[str, int] = {}


def _engine(fake: FakeChain, cfg: SchedulerConfig) -> ChainEngine:
    worker = WorkerDescriptor("w0", "m", "v", "f", Span(0, 2), 2, ModelKind.CAUSAL_LM, 64, 8, 0)
    owner = Generations(_Pool(), lambda chain: cfg)  # type: ignore[arg-type]
    return ChainEngine(owner, Chain("m", "f", "v", (worker,)), fake, cfg)  # type: ignore[arg-type]


def _generation(rid: int, prompt_len: int, max_new: int) -> Generation:
    loop = asyncio.get_running_loop()
    return Generation(
        "m",
        request_id=rid,
        prompt=[rid % 7 + 1] * prompt_len,
        max_new=max_new,
        sampling=GREEDY,
        eos=frozenset({EOS}),
        arrived=loop.time(),
        deadline=loop.time() + 30,
    )


async def _collect(generation: Generation) -> list[int]:
    tokens: list[int] = []
    while True:
        event = await generation.next(10)
        if isinstance(event, Finished):
            return tokens
        tokens.append(event)


def test_merge_and_filter_keep_every_row_its_own_tokens() -> None:
    """Requests join a running batch (a decode naming two batches) and leave it (filter)."""

    async def run() -> None:
        fake = FakeChain(budget=10_000)
        engine = _engine(fake, config(slots=1, max_waiting_steps=1))
        early = [_generation(i, prompt_len=3 + i, max_new=20 + 3 * i) for i in range(3)]
        for g in early:
            engine.submit(g)
        tasks = [asyncio.create_task(_collect(g)) for g in early]
        while len(early[0].generated) < 3:  # the first batch is running
            await asyncio.sleep(0)
        late = [_generation(10 + i, prompt_len=2 + i, max_new=5) for i in range(3)]
        for g in late:
            engine.submit(g)
        tasks += [asyncio.create_task(_collect(g)) for g in late]
        results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        for g, tokens in zip([*early, *late], results, strict=True):
            assert tokens == _expected(g.prompt, g.max_new), g.request_id
        assert any(kind == "decode" and len(ids) == 2 for kind, ids in fake.calls)  # a merge
        assert any(kind == "filter" for kind, _ in fake.calls)
        assert not fake.batches  # everything freed at the end
        await engine.owner.close()

    asyncio.run(run())


def test_the_driver_never_exceeds_the_budget() -> None:
    async def run() -> None:
        budget = 5 * (6 + 6)
        fake = FakeChain(budget=budget)
        engine = _engine(fake, config(budget_tokens=budget, slots=2))
        gens = [_generation(i, prompt_len=6, max_new=6) for i in range(12)]
        for g in gens:
            engine.submit(g)
        results = await asyncio.wait_for(asyncio.gather(*(_collect(g) for g in gens)), 10)
        for g, tokens in zip(gens, results, strict=True):
            assert tokens == _expected(g.prompt, g.max_new)
        assert 0 < fake.peak <= budget
        await engine.owner.close()

    asyncio.run(run())


def test_a_cancelled_generation_leaves_at_the_next_step() -> None:
    async def run() -> None:
        fake = FakeChain(budget=10_000)
        engine = _engine(fake, config(slots=1))
        keep, leave = _generation(1, 4, 30), _generation(2, 4, 30)
        engine.submit(keep)
        engine.submit(leave)
        assert isinstance(await leave.next(5), int)
        leave.cancel()
        await asyncio.wait_for(_collect(keep), 10)
        assert ("filter", [1]) in fake.calls
        await engine.owner.close()

    asyncio.run(run())
