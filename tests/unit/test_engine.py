"""The generation engine (driver) with fake chains: no sockets, no model.

Fake workers keep batches by id the way a worker does (rows in order, merge on a decode that
names several batches, filter keeps rows in order, a KV budget checked before every prefill and
merge), and any of them can be made to fail in each way a real step can end (faults.py). Every
test asserts exactly which rows moved, which workers were blamed, and that every stream that
finished got the tokens an undisturbed run gives.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.common.errors import ServiceError
from services.common.settings import RouterSettings
from services.common.types import ModelKind, SamplingParams, Span, WorkerDescriptor
from services.router.admission import Admission
from services.router.chain_client import Sampled
from services.router.engine import Finished, Generation, Generations
from services.router.faults import (
    BatchLost,
    Fault,
    InputRefused,
    StageDown,
    StageDraining,
    StageFull,
    StageStuck,
)
from services.router.pool import WorkerPool
from services.router.routing import Chain, RoutingTable
from services.router.scheduler import Decode, Drop, Prefill, Request, SchedulerConfig, kv_cost

EOS = 99
MODEL = "m"
BIG = 1_000_000


def next_token(seq: Sequence[int]) -> int:
    """The fake model: the next token is a function of everything before it (never EOS)."""
    return (sum(seq) * 31 + len(seq)) % 50 + 1


def expected(prompt: list[int], max_new: int) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(max_new):
        seq.append(next_token(seq))
        out.append(seq[-1])
    return out


@dataclass
class FakeWorker:
    """One stage's batches: batch id -> rows [request id, tokens in the KV cache, max_tokens]."""

    address: str
    budget: int = BIG
    batches: dict[str, list[list]] = field(default_factory=dict)
    # (method, fault, which calls): the next such call raises the fault
    faults: list[tuple[str, Fault, Callable[[int], bool]]] = field(default_factory=list)
    draining: bool = False
    down: bool = False
    calls: list[tuple[str, list[int]]] = field(default_factory=list)  # (method, request ids)
    chunked: dict[str, tuple[int, list[int]]] = field(default_factory=dict)  # next column, rows

    def fail_next(
        self,
        method: str,
        fault: Callable[[str, str], Fault],
        batches: Callable[[int], bool] = lambda _: True,
    ) -> None:
        """The next call of `method` naming a number of batches that `batches` accepts fails."""
        self.faults.append((method, fault(self.address, "injected"), batches))

    def _enter(self, method: str, batches: int = 1) -> None:
        if self.down:
            raise StageDown(self.address, "connection refused")
        for index, (name, fault, which) in enumerate(self.faults):
            if name == method and which(batches):
                del self.faults[index]
                raise fault

    def used(self) -> int:
        return sum(
            kv_cost([len(seq) for _, seq, _ in rows], [m for _, _, m in rows])
            for rows in self.batches.values()
        )

    def prefill(
        self, batch_id: str, rows: list[list], start: int = 0, end: int = 0, width: int = 0
    ) -> None:
        """A new batch, or (chunked) columns [start, end) of one: a batch is decoded only once
        its last chunk has run."""
        self._enter("prefill")
        ids = [rid for rid, _, _ in rows]
        if start:
            assert self.chunked.get(batch_id) == (start, ids), "a chunk out of order"
        else:
            if self.draining:
                raise StageDraining(self.address, "draining")
            cost = kv_cost([len(seq) for _, seq, _ in rows], [m for _, _, m in rows])
            if self.used() + cost > self.budget:
                raise StageFull(self.address, "KV budget")
            self.batches[batch_id] = rows
        if end < width:
            self.chunked[batch_id] = (end, ids)
        else:
            self.chunked.pop(batch_id, None)
        self.calls.append(("chunk" if end < width else "prefill", ids))

    def decode(self, batch_ids: Sequence[str], tokens: Sequence[int]) -> None:
        self._enter("decode", len(batch_ids))
        assert not set(batch_ids) & set(self.chunked), "a decode of a batch still prefilling"
        missing = [b for b in batch_ids if b not in self.batches]
        if missing:
            raise BatchLost(self.address, f"batch {missing[0]} is not held")
        merged = [row for b in batch_ids for row in self.batches[b]]
        if len(batch_ids) > 1:
            before = sum(
                kv_cost([len(s) for _, s, _ in self.batches[b]], [m for _, _, m in self.batches[b]])
                for b in batch_ids
            )
            after = kv_cost([len(s) for _, s, _ in merged], [m for _, _, m in merged])
            if self.used() - before + after > self.budget:
                raise StageFull(self.address, "KV budget (merge)")
        assert len(tokens) == len(merged), "a token per row"
        for b in batch_ids:
            del self.batches[b]
        self.batches[batch_ids[0]] = merged
        for row, token in zip(merged, tokens, strict=True):
            row[1].append(token)  # the sampled token enters the KV cache
        self.calls.append(("decode", [rid for rid, _, _ in merged]))

    def filter(self, batch_id: str, keep: Sequence[int]) -> None:
        self._enter("filter")
        if batch_id not in self.batches:
            raise BatchLost(self.address, f"batch {batch_id} is not held")
        rows = {row[0]: row for row in self.batches[batch_id]}
        assert list(keep) == [rid for rid in rows if rid in set(keep)], "keep out of row order"
        self.batches[batch_id] = [rows[rid] for rid in keep]
        self.calls.append(("filter", list(keep)))

    def clear(self, batch_ids: Sequence[str]) -> None:
        for batch_id in batch_ids:
            self.batches.pop(batch_id, None)
            self.chunked.pop(batch_id, None)


class FakeChainClient:
    """A chain of fake workers, called in order like the real ChainClient."""

    def __init__(self, chain: Chain, workers: dict[str, FakeWorker]) -> None:
        self.stages = [workers[a] for a in chain.addresses]

    async def prefill(self, prefill: Prefill, start: int = 0, end: int = 0) -> Sampled:
        """The prompts, or columns [start, end) of them (a chunk: nothing sampled yet)."""
        width = max(len(r.feed) for r in prefill.requests)
        end = end or width
        tokens = []
        for index, stage in enumerate(self.stages):
            await asyncio.sleep(0)
            rows = [[r.request_id, list(r.feed), r.max_tokens] for r in prefill.requests]
            stage.prefill(prefill.batch_id, rows, start, end, width)
            if index == len(self.stages) - 1 and end == width:
                tokens = [next_token(seq) for _, seq, _ in rows]
        return Sampled(tokens)

    async def decode(self, step: Decode) -> Sampled:
        for stage in self.stages:
            await asyncio.sleep(0)
            stage.decode(step.batch_ids, step.tokens)
        orders = {tuple(row[0] for row in s.batches[step.batch_ids[0]]) for s in self.stages}
        assert len(orders) == 1, f"stages disagree on row order: {orders}"
        last = self.stages[-1].batches[step.batch_ids[0]]
        return Sampled([next_token(seq) for _, seq, _ in last])

    async def filter(self, drop: Drop) -> None:
        if not drop.keep:
            await self.clear([drop.batch_id])
            return
        for stage in self.stages:
            stage.filter(drop.batch_id, drop.keep)

    async def clear(self, batch_ids: Sequence[str]) -> None:
        for stage in self.stages:
            stage.clear(batch_ids)


class RecordingPool(WorkerPool):
    """A real pool with no members whose table the test sets; it records every blame."""

    def __init__(self) -> None:
        super().__init__([], admission=Admission(Path("/nowhere"), frozenset(), 1.0))
        self.blamed: list[tuple[str, str]] = []

    def apply_blame(self, fault: Fault) -> None:
        self.blamed.append((fault.address, fault.blame.value))
        healthy = self.table.healthy - {fault.address}
        self.table = RoutingTable(self.table.workers, healthy)


def descriptor(address: str, span: str, budget: int = BIG, rows: int = 64) -> WorkerDescriptor:
    return WorkerDescriptor(
        address, MODEL, "v", "f", Span.parse(span, 4), 4, ModelKind.CAUSAL_LM, rows, 8, budget
    )


class Bench:
    """Workers, the pool's table over them, and a Generations driving fake chains."""

    def __init__(self, spans: dict[str, str], budgets: dict[str, int] | None = None, **cfg: object):
        budgets = budgets or {}
        self.workers = {a: FakeWorker(a, budgets.get(a, BIG)) for a in spans}
        descriptors = [descriptor(a, s, budgets.get(a, BIG)) for a, s in spans.items()]
        self.pool = RecordingPool()
        self.pool.table = RoutingTable(descriptors, list(spans))

        def config_for(chain: Chain) -> SchedulerConfig:
            budget = min(w.kv_token_budget for w in chain.workers)
            values: dict[str, object] = {"slots": 2, **cfg}
            return SchedulerConfig.from_settings(
                RouterSettings(),
                budget_tokens=budget,
                max_rows=64,
                stages=len(chain.workers),
                **values,
            )

        self.generations = Generations(
            self.pool,
            config_for,
            client_for=lambda chain: FakeChainClient(chain, self.workers),  # type: ignore[arg-type,return-value]
        )
        self._next = 0

    def chain(self, *addresses: str) -> Chain:
        for chain in self.pool.table.all_chains(MODEL):
            if chain.addresses == addresses:
                return chain
        raise AssertionError(f"no chain {addresses}")

    def start(
        self, chain: Chain, prompt_len: int = 4, max_new: int = 8, deadline_s: float = 30.0
    ) -> Generation:
        self._next += 1
        loop = asyncio.get_running_loop()
        request = Request(
            request_id=self._next,
            prompt=[self._next % 7 + 1] * prompt_len,
            max_new=max_new,
            sampling=SamplingParams(),
            eos=frozenset({EOS}),
            arrived=loop.time(),
            deadline=loop.time() + deadline_s,
        )
        generation = Generation(MODEL, request)
        self.generations.submit(generation, chain)
        return generation


async def collect(generation: Generation, timeout: float = 10.0) -> list[int] | ServiceError:
    tokens: list[int] = []
    try:
        while True:
            event = await generation.next(timeout)
            if isinstance(event, Finished):
                return tokens
            assert event.token is not None
            tokens.append(event.token)
    except ServiceError as error:
        return error


def run(scenario: Callable[[], object]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 30))  # type: ignore[arg-type]


async def until(predicate: Callable[[], bool], what: str, steps: int = 20_000) -> None:
    for _ in range(steps):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


def correct(generation: Generation, result: object) -> bool:
    request = generation.request
    return result == expected(request.prompt, request.max_new)


# -- the happy path ----------------------------------------------------------------------------


def test_requests_join_and_leave_a_running_batch_with_their_own_tokens() -> None:
    async def scenario() -> None:
        bench = Bench({"a": "0:2", "b": "2:4"}, slots=1, max_waiting_steps=1)
        chain = bench.chain("a", "b")
        early = [bench.start(chain, 3 + i, 20 + 3 * i) for i in range(3)]
        tasks = [asyncio.create_task(collect(g)) for g in early]
        await until(lambda: len(early[0].request.generated) >= 3, "the first batch running")
        late = [bench.start(chain, 2 + i, 5) for i in range(3)]
        tasks += [asyncio.create_task(collect(g)) for g in late]
        results = await asyncio.gather(*tasks)
        for g, result in zip([*early, *late], results, strict=True):
            assert correct(g, result), (g.request_id, result)
        decodes = [ids for kind, ids in bench.workers["a"].calls if kind == "decode"]
        prefills = [ids for kind, ids in bench.workers["a"].calls if kind == "prefill"]
        assert len(prefills) >= 2  # the late ones joined in a prefill of their own ...
        assert any(set(ids) >= {1, 4} for ids in decodes)  # ... and then ran beside the first
        assert any(kind == "filter" for kind, _ in bench.workers["a"].calls)
        assert not bench.workers["a"].batches and not bench.workers["b"].batches
        assert bench.pool.blamed == [] and bench.pool.load == {}
        await bench.generations.close()

    run(scenario)


def test_simultaneous_arrivals_share_one_prefill() -> None:
    async def scenario() -> None:
        bench = Bench({"r": "0:4"})
        chain = bench.chain("r")
        gens = [bench.start(chain, 4, 3) for _ in range(8)]
        results = await asyncio.gather(*(collect(g) for g in gens))
        assert all(correct(g, r) for g, r in zip(gens, results, strict=True))
        prefills = [ids for kind, ids in bench.workers["r"].calls if kind == "prefill"]
        assert prefills == [[g.request_id for g in gens]]
        await bench.generations.close()

    run(scenario)


def test_a_wide_prompt_is_prefilled_in_chunks_between_the_running_batchs_steps() -> None:
    async def scenario() -> None:
        bench = Bench(
            {"a": "0:2", "b": "2:4"}, slots=1, max_waiting_steps=1, prefill_chunk_tokens=8
        )
        chain = bench.chain("a", "b")
        running = bench.start(chain, 3, 40)
        first = asyncio.create_task(collect(running))
        await until(lambda: len(running.request.generated) >= 2, "the first batch running")
        wide = bench.start(chain, 30, 5)  # 30 columns: chunks of 8, 8, 8 and the last 6
        results = await asyncio.gather(first, collect(wide))
        assert correct(running, results[0]) and correct(wide, results[1])
        for worker in bench.workers.values():
            kinds = [kind for kind, ids in worker.calls if wide.request_id in ids]
            assert kinds[:4] == ["chunk", "chunk", "chunk", "prefill"], kinds
            # The running batch stepped between every two chunks of the wide prompt.
            calls = worker.calls
            at = [i for i, (kind, ids) in enumerate(calls) if wide.request_id in ids][:4]
            for before, after in zip(at, at[1:], strict=False):
                assert any(kind == "decode" for kind, _ in calls[before + 1 : after]), calls
        assert bench.pool.blamed == []
        await bench.generations.close()

    run(scenario)


def test_a_wide_prompt_alone_is_prefilled_in_one_pass() -> None:
    async def scenario() -> None:
        bench = Bench({"a": "0:2", "b": "2:4"}, slots=1, prefill_chunk_tokens=8)
        chain = bench.chain("a", "b")
        wide = bench.start(chain, 30, 5)
        assert correct(wide, await collect(wide))
        assert [kind for kind, _ in bench.workers["a"].calls][:2] == ["prefill", "decode"]
        await bench.generations.close()

    run(scenario)


def test_a_chunked_prefill_whose_rows_left_stops_and_the_batch_goes_on() -> None:
    async def scenario() -> None:
        bench = Bench(
            {"a": "0:2", "b": "2:4"}, slots=1, max_waiting_steps=1, prefill_chunk_tokens=4
        )
        chain = bench.chain("a", "b")
        running = bench.start(chain, 3, 60)
        first = asyncio.create_task(collect(running))
        await until(lambda: len(running.request.generated) >= 2, "the first batch running")
        wide = bench.start(chain, 200, 5)
        await until(
            lambda: any(kind == "chunk" for kind, _ in bench.workers["a"].calls), "a chunk ran"
        )
        engine = wide.engine
        assert engine is not None
        bench.generations.cancel(wide)
        assert correct(running, await first)
        assert wide.request not in engine.scheduler.requests()
        chunks = [ids for kind, ids in bench.workers["a"].calls if kind == "chunk"]
        assert len(chunks) < 200 // 4 - 1  # it stopped well before its last chunk
        await until(lambda: not any(w.chunked for w in bench.workers.values()), "cleared")
        assert not any(wide.request_id in ids for _, ids in bench.workers["a"].calls[-3:])
        assert bench.pool.blamed == []
        await bench.generations.close()

    run(scenario)


# -- a request's own end: nothing else changes ------------------------------------------------


def test_a_late_row_leaves_alone_and_no_worker_is_blamed() -> None:
    async def scenario() -> None:
        bench = Bench({"a": "0:2", "b": "2:4"}, slots=1)
        chain = bench.chain("a", "b")
        loop = asyncio.get_running_loop()
        late = bench.start(chain, 4, 40)
        others = [bench.start(chain, 5, 30) for _ in range(3)]
        tasks = [asyncio.create_task(collect(g)) for g in others]
        await until(lambda: len(late.request.generated) >= 2, "the late one running")
        late.request.deadline = loop.time()  # its client's deadline passes now
        result = await collect(late)
        assert isinstance(result, ServiceError) and result.code.name == "DEADLINE_EXCEEDED"
        assert all(correct(g, r) for g, r in zip(others, await asyncio.gather(*tasks)))
        assert bench.pool.blamed == []
        assert all(g.request.retries == 0 for g in others)  # nobody moved or re-prefilled
        assert ("filter", [g.request_id for g in others]) in bench.workers["a"].calls
        await bench.generations.close()

    run(scenario)


def test_a_cancelled_row_leaves_at_the_next_step() -> None:
    async def scenario() -> None:
        bench = Bench({"r": "0:4"}, slots=1)
        chain = bench.chain("r")
        keep, leave = bench.start(chain, 4, 30), bench.start(chain, 4, 30)
        assert not isinstance(await leave.next(5), Finished)
        bench.generations.cancel(leave)
        assert correct(keep, await collect(keep))
        assert ("filter", [keep.request_id]) in bench.workers["r"].calls
        assert bench.pool.blamed == [] and keep.request.retries == 0
        await bench.generations.close()

    run(scenario)


# -- faults: exactly who pays --------------------------------------------------------------


def _two_chains() -> tuple[Bench, Chain, Chain]:
    """s (0:2) shared by two chains: s => t and s => u (both 2:4)."""
    bench = Bench({"s": "0:2", "t": "2:4", "u": "2:4"})
    return bench, bench.chain("s", "t"), bench.chain("s", "u")


def _fails_over(fault: Callable[[str, str], Fault], blame: str) -> None:
    async def scenario() -> None:
        bench, on_t, on_u = _two_chains()
        moving = [bench.start(on_t, 4, 12) for _ in range(3)]
        staying = [bench.start(on_u, 5, 12) for _ in range(3)]
        tasks = [asyncio.create_task(collect(g)) for g in (*moving, *staying)]
        await until(lambda: len(moving[0].request.generated) >= 3, "both chains running")
        bench.workers["t"].fail_next("decode", fault)
        results = await asyncio.gather(*tasks)
        for g, result in zip((*moving, *staying), results, strict=True):
            assert correct(g, result), (g.request_id, result)
        assert bench.pool.blamed == [("t", blame)]  # never s, never u
        assert all(g.request.retries == 1 for g in moving)
        assert all(g.request.retries == 0 for g in staying)
        assert not bench.workers["t"].batches  # the survivors' copies were cleared
        await bench.generations.close()

    run(scenario)


def test_a_stage_down_moves_only_the_rows_of_chains_through_it() -> None:
    _fails_over(StageDown, "down")


def test_a_stuck_stage_is_failed_over_and_its_neighbours_are_not_blamed() -> None:
    _fails_over(StageStuck, "down")


def test_a_draining_stage_finishes_its_rows_and_new_work_goes_elsewhere() -> None:
    async def scenario() -> None:
        bench, on_t, on_u = _two_chains()
        running = [bench.start(on_t, 4, 16) for _ in range(3)]
        tasks = [asyncio.create_task(collect(g)) for g in running]
        await until(lambda: len(running[0].request.generated) >= 2, "rows running on t")
        bench.workers["t"].draining = True
        newcomer = bench.start(on_t, 6, 6)  # planned for t before the router knew
        results = await asyncio.gather(*tasks, collect(newcomer))
        assert all(correct(g, r) for g, r in zip((*running, newcomer), results, strict=True))
        assert bench.pool.blamed == [("t", "draining")]
        assert all(g.request.retries == 0 for g in running)  # finished where they were
        t_decodes = [ids for kind, ids in bench.workers["t"].calls if kind == "decode"]
        assert sum(running[0].request_id in ids for ids in t_decodes) == 15
        u_prefills = [ids for kind, ids in bench.workers["u"].calls if kind == "prefill"]
        assert [newcomer.request_id] in u_prefills
        await bench.generations.close()

    run(scenario)


def test_a_full_stage_sends_only_the_new_rows_back_to_wait() -> None:
    async def scenario() -> None:
        bench = Bench({"a": "0:2", "b": "2:4"}, slots=1, max_waiting_steps=1)
        chain = bench.chain("a", "b")
        running = [bench.start(chain, 4, 20) for _ in range(2)]
        tasks = [asyncio.create_task(collect(g)) for g in running]
        await until(lambda: len(running[0].request.generated) >= 2, "a batch running")
        bench.workers["b"].fail_next("prefill", StageFull)
        bench.workers["b"].fail_next("prefill", StageFull)
        newcomers = [bench.start(chain, 3, 5) for _ in range(2)]
        results = await asyncio.gather(*tasks, *(collect(g) for g in newcomers))
        assert all(correct(g, r) for g, r in zip((*running, *newcomers), results, strict=True))
        assert bench.pool.blamed == []
        assert all(g.request.retries == 0 for g in (*running, *newcomers))
        assert not bench.workers["a"].batches and not bench.workers["b"].batches
        await bench.generations.close()

    run(scenario)


def test_a_refused_merge_keeps_the_running_batch_going() -> None:
    async def scenario() -> None:
        bench = Bench({"a": "0:2", "b": "2:4"}, slots=1, max_waiting_steps=1)
        chain = bench.chain("a", "b")
        running = [bench.start(chain, 4, 20) for _ in range(2)]
        tasks = [asyncio.create_task(collect(g)) for g in running]
        await until(lambda: len(running[0].request.generated) >= 2, "a batch running")
        first = bench.workers["a"]
        steps_before = sum(kind == "decode" for kind, _ in first.calls)
        first.fail_next("decode", StageFull, lambda batches: batches > 1)  # the merge: refused
        newcomer = bench.start(chain, 3, 5)
        results = await asyncio.gather(*tasks, collect(newcomer))
        assert all(correct(g, r) for g, r in zip((*running, newcomer), results, strict=True))
        assert bench.pool.blamed == [] and running[0].request.retries == 0
        # The running rows were stepped alone after the refusal, before the newcomer joined.
        solo = [ids for kind, ids in first.calls[steps_before:] if kind == "decode"]
        assert solo and newcomer.request_id not in solo[0]
        await bench.generations.close()

    run(scenario)


def test_a_lost_batch_is_prefilled_again_and_nobody_is_blamed() -> None:
    async def scenario() -> None:
        bench = Bench({"a": "0:2", "b": "2:4"}, slots=1)
        chain = bench.chain("a", "b")
        gens = [bench.start(chain, 4, 12) for _ in range(3)]
        tasks = [asyncio.create_task(collect(g)) for g in gens]
        await until(lambda: len(gens[0].request.generated) >= 3, "a batch running")
        bench.workers["b"].batches.clear()  # it restarted: the batch is gone
        results = await asyncio.gather(*tasks)
        assert all(correct(g, r) for g, r in zip(gens, results, strict=True))
        assert bench.pool.blamed == []
        assert all(g.request.retries == 1 for g in gens)
        await bench.generations.close()

    run(scenario)


def test_a_refused_step_fails_only_its_own_rows() -> None:
    async def scenario() -> None:
        bench = Bench({"r": "0:4"}, slots=2, balanced=True)
        chain = bench.chain("r")
        running = [bench.start(chain, 4, 20) for _ in range(2)]
        tasks = [asyncio.create_task(collect(g)) for g in running]
        await until(lambda: all(len(g.request.generated) >= 2 for g in running), "rows running")
        bench.workers["r"].fail_next("prefill", InputRefused)
        refused = bench.start(chain, 3, 5)
        result = await collect(refused)
        assert isinstance(result, ServiceError) and result.code.name == "INTERNAL"
        assert all(correct(g, r) for g, r in zip(running, await asyncio.gather(*tasks)))
        assert bench.pool.blamed == []
        await bench.generations.close()

    run(scenario)


def test_chains_that_share_a_stage_share_its_budget() -> None:
    """Two first stages share one second stage whose KV budget holds ~6 of the 24 rows: the
    engines admit within what the other leaves, so the stage never has to refuse."""

    async def scenario() -> None:
        budget = 6 * (6 + 10)
        bench = Bench({"a0": "0:2", "a1": "0:2", "s": "2:4"}, budgets={"s": budget})
        one, two = bench.chain("a0", "s"), bench.chain("a1", "s")
        gens = [bench.start(one if i % 2 else two, 6, 10) for i in range(24)]
        results = await asyncio.gather(*(collect(g, 20) for g in gens))
        assert all(correct(g, r) for g, r in zip(gens, results, strict=True))
        assert bench.pool.blamed == []
        assert all(g.request.retries == 0 for g in gens)
        await bench.generations.close()

    run(scenario)
