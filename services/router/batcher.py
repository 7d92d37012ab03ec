"""The generation driver: continuous batching per chain, pipelined across stages, with failover.

`Generations` takes a request, picks a chain (least outstanding work, one fingerprint) and hands
it to that chain's `ChainEngine`. The engine runs one loop per slot (micro-batch): ask the
scheduler for a plan, filter leaving rows out on every stage, prefill newcomers, then one decode
step for the whole slot. With two stages and two slots, one slot's step runs on stage 0 while
the other's runs on stage 1. Tokens reach each request's `Generation` queue; the servicer
detokenizes and streams.

When a stage fails, every request of that chain (running or waiting) goes to another chain of
the same fingerprint with its prompt and the tokens generated so far; the new chain's prefill
re-runs them and the stream continues where it stopped (seeded draws depend only on seed and
position, so the tokens are the ones an undisturbed run draws).
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from prometheus_client import Gauge, Histogram

from services.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from services.router.chain_client import ChainClient
from services.router.pipeline import HopFailed
from services.router.pool import WorkerPool
from services.router.routing import Chain
from services.router.scheduler import Request, Scheduler, SchedulerConfig, Slot

log = logging.getLogger(__name__)
tracer = trace.get_tracer("tessera.router")
T = TypeVar("T")

GENERATION_QUEUE_DEPTH = Gauge(
    "tessera_generation_queue_depth", "generations waiting for a batch", ["model", "priority"]
)
GENERATION_QUEUE_SECONDS = Histogram(
    "tessera_generation_queue_seconds",
    "arrival to first prefill",
    ["model", "priority"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)

RETRY_BUDGET = 2  # chains a generation may fail over to
STEP_TIMEOUT_S = 60.0  # one step of one batch; longer means the stage is stuck
REFUSED_BACKOFF_S = 0.05  # an empty slot waits this long after a worker refused its prefill
IDLE_EXIT_S = 30.0  # a slot loop with nothing to do for this long ends
# An idle slot woken by a request waits for the others of the same burst (clients that start
# together are parsed over a few ms) so that they share one prefill instead of one prefilling
# alone while the rest wait for it: until no request came for GATHER_QUIET_S, at most
# GATHER_MAX_S. A lone request pays GATHER_QUIET_S once, against a prefill of 100+ ms.
GATHER_QUIET_S = 0.005
GATHER_MAX_S = 0.05


def _span_context(request: Request) -> trace.SpanContext:
    assert isinstance(request, Generation)
    return trace.get_current_span(request.trace_context).get_span_context()


def priority_bucket(priority: int) -> str:
    return "high" if priority > 0 else "low" if priority < 0 else "normal"


@dataclass(frozen=True)
class Finished:
    reason: str  # "eos" or "length"


class Generation(Request):
    """A request plus the channel its tokens reach the servicer by."""

    def __init__(self, model: str, **fields: Any) -> None:
        super().__init__(**fields)
        self.model = model
        self._events: asyncio.Queue[int | Finished | ServiceError] = asyncio.Queue()
        self.trace_context = otel_context.get_current()
        self.admitted_at: float | None = None
        self.closed = False
        self.chain: Chain | None = None

    def deliver(self, token: int) -> None:
        self.generated.append(token)
        self._events.put_nowait(token)

    def finish(self) -> None:
        if not self.closed:
            self.closed = True
            self._events.put_nowait(Finished(self.finish_reason))

    def fail(self, error: ServiceError) -> None:
        if not self.closed:
            self.closed = True
            self._events.put_nowait(error)

    def cancel(self) -> None:
        self.cancelled = True

    async def next(self, timeout: float) -> int | Finished:
        """The next token, or Finished; raises the error that ended the generation."""
        try:
            async with asyncio.timeout(timeout):
                event = await self._events.get()
        except TimeoutError:
            self.cancel()
            raise DeadlineExceeded("deadline passed while generating") from None
        if isinstance(event, ServiceError):
            raise event
        return event


class ChainEngine:
    """Runs the generations assigned to one chain."""

    def __init__(
        self, owner: Generations, chain: Chain, client: ChainClient, config: SchedulerConfig
    ) -> None:
        self.owner = owner
        self.chain = chain
        self.client = client
        self.scheduler = Scheduler(config)
        self.failed = False
        self._wakes = [asyncio.Event() for _ in self.scheduler.slots]
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._ids = itertools.count()
        self._spans: dict[int, trace.Span] = {}
        self._prefix = f"{owner.router_id}-{uuid.uuid4().hex[:8]}"
        self._submitted = 0  # requests ever submitted: a burst is over when it stops moving

    @property
    def load(self) -> int:
        return len(self.scheduler.all_requests())

    def submit(self, generation: Generation) -> None:
        if not self.scheduler.fits_alone(generation):
            raise InvalidArgument(
                f"prompt + max_new_tokens ({generation.max_tokens} tokens) does not fit the KV "
                f"budget of any chain of model {self.chain.model!r} "
                f"({self.scheduler.config.budget_tokens} token slots)"
            )
        self.scheduler.submit(generation)
        self._submitted += 1
        generation.chain = self.chain
        self.owner.count(generation, +1)
        self._observe_queue()
        for slot in self.scheduler.slots:
            task = self._tasks.get(slot.index)
            if task is None or task.done():
                # A fresh context: a slot loop must not carry the first request's trace.
                self._tasks[slot.index] = asyncio.create_task(
                    self._run(slot), context=contextvars.Context()
                )
        self._wake_all()

    def _wake_all(self) -> None:
        for event in self._wakes:
            event.set()

    def _observe_queue(self) -> None:
        depths = self.scheduler.queue_depths(priority_bucket)
        for bucket in ("high", "normal", "low"):
            GENERATION_QUEUE_DEPTH.labels(self.chain.model, bucket).set(depths.get(bucket, 0))

    # -- the slot loop -----------------------------------------------------------------------

    async def _gather(self) -> None:
        """Returns once a burst of submissions has stopped (or GATHER_MAX_S has passed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GATHER_MAX_S
        seen = -1
        while seen != self._submitted and loop.time() < deadline:
            seen = self._submitted
            await asyncio.sleep(GATHER_QUIET_S)

    async def _run(self, slot: Slot) -> None:
        wake = self._wakes[slot.index]
        try:
            await self._gather()  # a new loop starts on a submit: its burst joins the prefill
            while not self.failed:
                # Cleared before the turn: a submit during the turn's awaits is not lost.
                wake.clear()
                if not await self._iteration(slot) and not self.failed:
                    try:
                        await asyncio.wait_for(wake.wait(), IDLE_EXIT_S)
                    except TimeoutError:
                        if not self.scheduler.all_requests():
                            return  # an idle loop ends; the next submit starts it again
                    await self._gather()
        except HopFailed as failure:
            self._fail_over(failure)
        except asyncio.CancelledError:
            self._abandon(Unavailable("the router is shutting down"))
            raise
        except Exception:  # noqa: BLE001 - a slot loop must not die silently with work in it
            log.exception("generation loop on %s failed", self.chain.describe())
            self._abandon(ServiceError("internal error in the generation loop; see router logs"))

    async def _iteration(self, slot: Slot) -> bool:
        """One turn: drop, admit, step. False when the slot has nothing to do."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for gone in self.scheduler.expired(now):
            self._close(gone, now)
        plan = self.scheduler.plan(slot, now)
        if plan.drop:
            await self._drop(slot, plan.drop, now)
        if plan.prefill:
            await self._prefill(slot, plan.prefill)
        self._observe_queue()
        if not slot.rows and not slot.pending:
            return bool(plan.prefill)  # True: everything it prefilled finished at once
        await self._decode(slot)
        return True

    def _close(self, generation: Request, now: float) -> None:
        """Ends a generation that leaves: finished, cancelled, or past its deadline."""
        assert isinstance(generation, Generation)
        self.owner.count(generation, -1)
        if generation.done:
            generation.finish()
        elif now >= generation.deadline and not generation.cancelled:
            generation.fail(DeadlineExceeded("deadline passed while generating"))
        else:
            generation.fail(Unavailable("generation cancelled"))

    async def _drop(self, slot: Slot, leaving: list[Request], now: float) -> None:
        slot.rows = [r for r in slot.rows if not any(r is g for g in leaving)]
        for generation in leaving:
            self._close(generation, now)
        self._wake_all()  # memory and rows came free: idle slots may admit now
        if slot.batch_id is None:
            return
        with trace.use_span(self._batch_span(slot, slot.rows), end_on_exit=False):
            if slot.rows:
                keep = [r.request_id for r in slot.rows]
                await self._guard(self.client.filter(slot.batch_id, keep))
                return
            await self._guard(self.client.clear([slot.batch_id]))
        slot.batch_id = None
        self._end_batch_span(slot)

    async def _prefill(self, slot: Slot, newcomers: list[Request]) -> None:
        loop = asyncio.get_running_loop()
        slot.pending = newcomers
        batch_id = f"{self._prefix}-{next(self._ids)}"
        first = newcomers[0]
        assert isinstance(first, Generation)
        timeout = self._step_timeout(newcomers)
        # The prefill is part of the first request's trace and linked from the others'.
        with tracer.start_as_current_span(
            "prefill",
            context=first.trace_context,
            links=[trace.Link(_span_context(g)) for g in newcomers[1:]],
            attributes={"tessera.rows": len(newcomers), "tessera.batch": batch_id},
        ):
            try:
                tokens = await self._guard(
                    self.client.prefill(
                        batch_id,
                        [r.request_id for r in newcomers],
                        [r.feed for r in newcomers],
                        [r.max_tokens for r in newcomers],
                        [r.sampling for r in newcomers],
                        timeout,
                    )
                )
            except ResourceExhausted as refused:
                # Another router holds the memory: wait for rows to leave, keep their places.
                log.info("prefill refused on %s: %s", self.chain.describe(), refused)
                slot.pending = []
                self.scheduler.requeue(newcomers)
                await self.client.clear([batch_id])
                if not slot.rows:
                    await asyncio.sleep(REFUSED_BACKOFF_S)
                return
            except ServiceError as error:
                slot.pending = []
                await self.client.clear([batch_id])
                for generation in newcomers:
                    assert isinstance(generation, Generation)
                    self.owner.count(generation, -1)
                    generation.fail(error)
                return
        if self.failed:
            return
        now = loop.time()
        for generation, token in zip(newcomers, tokens, strict=True):
            assert isinstance(generation, Generation)
            if generation.admitted_at is None:
                generation.admitted_at = now
                GENERATION_QUEUE_SECONDS.labels(
                    self.chain.model, priority_bucket(generation.priority)
                ).observe(now - generation.arrived)
            generation.deliver(token)
        slot.steps_since_prefill = 0
        # Rows done at their first token never join the running batch.
        staying = [r for r in newcomers if not (r.done or r.cancelled)]
        for generation in newcomers:
            if generation.done or generation.cancelled:
                self._close(generation, now)
        slot.pending = staying
        slot.pending_batch_id = batch_id if staying else None
        if len(staying) < len(newcomers):
            with tracer.start_as_current_span("prefill.filter", context=first.trace_context):
                if staying:
                    await self._guard(self.client.filter(batch_id, [r.request_id for r in staying]))
                else:
                    await self._guard(self.client.clear([batch_id]))

    async def _decode(self, slot: Slot) -> None:
        pending_id = slot.pending_batch_id if slot.pending else None
        batch_ids = [b for b in (slot.batch_id, pending_id) if b]
        rows = [*slot.rows, *slot.pending]
        tokens_in = [r.generated[-1] for r in rows]
        with trace.use_span(self._batch_span(slot, rows), end_on_exit=False):
            tokens = await self._guard(
                self.client.decode(batch_ids, tokens_in, self._step_timeout(rows))
            )
        if self.failed:
            return
        slot.batch_id = batch_ids[0]
        slot.rows = rows
        slot.pending = []
        slot.pending_batch_id = None
        slot.steps_since_prefill += 1
        for generation, token in zip(rows, tokens, strict=True):
            if not generation.cancelled:
                assert isinstance(generation, Generation)
                generation.deliver(token)

    def _batch_span(self, slot: Slot, rows: list[Request]) -> trace.Span:
        """One trace per running batch (its decode steps), linked from the requests' traces.

        A step serves many requests, so it cannot sit in one request's trace; a trace per step
        would be noise.
        """
        span = self._spans.get(slot.index)
        if span is None:
            span = tracer.start_span(
                "batch",
                context=otel_context.Context(),
                links=[trace.Link(_span_context(r)) for r in rows],
                attributes={"tessera.route": self.chain.describe(), "tessera.slot": slot.index},
            )
            self._spans[slot.index] = span
        return span

    def _end_batch_span(self, slot: Slot) -> None:
        span = self._spans.pop(slot.index, None)
        if span is not None:
            span.end()

    def _step_timeout(self, rows: list[Request]) -> float:
        now = asyncio.get_running_loop().time()
        return max(0.1, min(STEP_TIMEOUT_S, max(r.deadline for r in rows) - now))

    async def _guard(self, call: Awaitable[T]) -> T:
        """Awaits a chain call; a stuck stage (its step outlived the timeout) counts as failed."""
        try:
            return await call
        except DeadlineExceeded as error:
            for address in self.chain.addresses:
                self.owner.pool.mark_failed(address)
            raise HopFailed(self.chain.addresses[0], f"a step timed out: {error}") from None

    # -- failure -----------------------------------------------------------------------------

    def _stop(self) -> list[Request]:
        self.failed = True
        self._wake_all()
        batch_ids = [s.batch_id for s in self.scheduler.slots if s.batch_id]
        batch_ids += [s.pending_batch_id for s in self.scheduler.slots if s.pending_batch_id]
        for slot in self.scheduler.slots:
            self._end_batch_span(slot)
        requests = self.scheduler.take_all()
        for request in requests:
            assert isinstance(request, Generation)
            self.owner.count(request, -1)
        if batch_ids:
            # Survivors free their copies now rather than at their idle timeout.
            task = asyncio.get_running_loop().create_task(self.client.clear(batch_ids))
            self.owner.background.add(task)
            task.add_done_callback(self.owner.background.discard)
        self.owner.forget(self)
        return requests

    def _fail_over(self, failure: HopFailed) -> None:
        if self.failed:
            return
        requests = self._stop()
        log.warning(
            "chain %s failed (%s); moving %d generations",
            self.chain.describe(),
            failure,
            len(requests),
        )
        self.owner.reroute(requests, self.chain, failure.address)

    def _abandon(self, error: ServiceError) -> None:
        if self.failed:
            return
        for request in self._stop():
            assert isinstance(request, Generation)
            request.fail(error)


class Generations:
    """Every generation the router runs: chain choice, engines, failover."""

    def __init__(
        self,
        pool: WorkerPool,
        config_for: Callable[[Chain], SchedulerConfig],
        hidden_dtype: str = "float32",
    ) -> None:
        self.pool = pool
        self.config_for = config_for
        self.hidden_dtype = hidden_dtype
        self.router_id = uuid.uuid4().hex[:12]
        self._engines: dict[tuple[str, ...], ChainEngine] = {}
        self._ids = itertools.count(1)
        self.background: set[asyncio.Task[None]] = set()

    def new_id(self) -> int:
        return next(self._ids)

    def count(self, generation: Generation, delta: int) -> None:
        """Outstanding work per worker, which chain choice balances."""
        if generation.chain is None:
            return
        for address in generation.chain.addresses:
            self.pool.load[address] = self.pool.load.get(address, 0) + delta

    def submit(
        self,
        generation: Generation,
        fingerprint: str | None = None,
        exclude: frozenset[str] = frozenset(),
    ) -> None:
        chain = self.pool.table.route(
            generation.model, self.pool.load, exclude=exclude, fingerprint=fingerprint
        )
        self._engine(chain).submit(generation)

    def _engine(self, chain: Chain) -> ChainEngine:
        engine = self._engines.get(chain.addresses)
        if engine is None or engine.failed or engine.chain != chain:
            client = ChainClient(self.pool, chain, self.hidden_dtype)
            engine = self._engines[chain.addresses] = ChainEngine(
                self, chain, client, self.config_for(chain)
            )
        return engine

    def forget(self, engine: ChainEngine) -> None:
        if self._engines.get(engine.chain.addresses) is engine:
            del self._engines[engine.chain.addresses]

    def reroute(self, requests: list[Request], failed: Chain, address: str) -> None:
        excluded = frozenset({address})
        for request in requests:
            assert isinstance(request, Generation)
            request.chain = None
            request.failovers += 1
            if request.cancelled:
                request.fail(Unavailable("generation cancelled"))
                continue
            if request.failovers > RETRY_BUDGET:
                request.fail(Unavailable(f"model {failed.model!r}: worker {address} failed"))
                continue
            log.warning(
                "generation %d on %s failed after %d tokens; resuming on another chain",
                request.request_id,
                failed.describe(),
                len(request.generated),
            )
            try:
                self.submit(request, fingerprint=failed.fingerprint, exclude=excluded)
            except ServiceError as error:
                request.fail(error)

    async def close(self) -> None:
        tasks = [t for e in self._engines.values() for t in e._tasks.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
