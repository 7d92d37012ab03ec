"""The generation engine: continuous batching per chain, pipelined across stages, with failover.

`Generations` holds every generation the router runs and one `ChainEngine` per chain in use.
An engine runs one loop per slot (micro-batch): it asks its `Scheduler` for a plan, executes it
on the workers (`ChainClient`), and reports each result back; the scheduler alone changes
requests and slots and answers with the `Output`s that reach each `Generation`'s stream. With
two stages and two slots, one slot's step runs on stage 0 while the other's runs on stage 1.

When a call fails, its `Fault` (faults.py) says who pays, and `_fault` is the one place that
acts on it: the worker's standing (`WorkerPool.apply_blame`), and then only the rows that the
fault touched: a stage that is down, stuck or misbehaving moves the rows of every chain
through it (with their tokens so far; seeded draws depend only on seed and position, so the
stream continues as it would have); a draining stage keeps its running rows and sends its new
ones elsewhere; a stage out of KV memory sends the new rows back to the queue; a lost batch is
prefilled again. A client that leaves or whose deadline passes is no fault at all: its row
leaves at its slot's next step.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram

from services.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ServiceError,
    Unavailable,
)
from services.common.metrics import (
    MODEL_KV,
    MODEL_QUEUED,
    MODEL_RUNNING,
    VLLM_KV,
    VLLM_RUNNING,
    VLLM_WAITING,
)
from services.router.chain_client import ChainClient
from services.router.faults import (
    Abandoned,
    BatchLost,
    Blame,
    Fault,
    InputRefused,
    PrefixNotHeld,
    StageDraining,
    StageFull,
)
from services.router.pool import Holding, WorkerPool
from services.router.prefixes import PrefixIndex
from services.router.relay import StepTimes
from services.router.routing import Chain
from services.router.scheduler import (
    Output,
    Prefill,
    Request,
    Room,
    Scheduler,
    SchedulerConfig,
    Slot,
    chunk_columns,
    kv_cost,
)

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
PREFIX_TOKENS = Counter(
    "tessera_prefix_tokens_total",
    "prompt tokens prefilled, by whether the stages took them from their prefix cache",
    ["model", "source"],  # source: "cached" or "computed"
)

REFUSED_BACKOFF_S = 0.05  # an empty slot waits this long after a worker refused its prefill
IDLE_EXIT_S = 30.0  # a slot loop with nothing to do for this long ends
# An idle slot woken by a request waits for the others of the same burst (clients that start
# together are parsed over a few ms) so that they share one prefill instead of one prefilling
# alone while the rest wait for it: until no request came for GATHER_QUIET_S, at most
# GATHER_MAX_S. A lone request pays GATHER_QUIET_S once, against a prefill of 100+ ms.
GATHER_QUIET_S = 0.005
GATHER_MAX_S = 0.05
AFFINITY_SLACK = 4  # a chain holding a request's prefix wins while this much busier, at most


def priority_bucket(priority: int) -> str:
    return "high" if priority > 0 else "low" if priority < 0 else "normal"


@dataclass(frozen=True)
class Finished:
    reason: str  # "eos" or "length"


class Generation:
    """The front door's handle on one generation: its request and the stream of its outputs."""

    def __init__(self, model: str, request: Request) -> None:
        self.model = model
        self.request = request
        self.trace_context = otel_context.get_current()
        self.engine: ChainEngine | None = None  # the engine running it now
        self._events: asyncio.Queue[Output] = asyncio.Queue()
        self.closed = False

    @property
    def request_id(self) -> int:
        return self.request.request_id

    def put(self, output: Output) -> None:
        if self.closed:
            return
        if output.error is not None or output.finished:
            self.closed = True
        self._events.put_nowait(output)

    async def next(self, timeout: float) -> Output | Finished:
        """The next token's Output, or Finished; raises the error that ended the generation."""
        try:
            async with asyncio.timeout(timeout):
                output = await self._events.get()
        except TimeoutError:
            raise DeadlineExceeded("deadline passed while generating") from None
        if output.error is not None:
            raise output.error
        if output.token is not None:
            return output
        return Finished(output.finished)


class ChainEngine:
    """Executes the scheduler's plans for the generations assigned to one chain."""

    def __init__(
        self, owner: Generations, chain: Chain, client: ChainClient, config: SchedulerConfig
    ) -> None:
        self.owner = owner
        self.chain = chain
        self.client = client
        self.scheduler = Scheduler(config)
        self.stopped = False  # a stage failed: everything moved elsewhere
        self.draining = False  # a stage is draining: running rows finish, nothing new starts
        self._wakes = [asyncio.Event() for _ in self.scheduler.slots]
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._spans: dict[int, trace.Span] = {}
        self._submitted = 0  # requests ever submitted: a burst is over when it stops moving
        self._held = Holding(chain.addresses)  # what the load book has from this engine
        self._chunks: dict[int, tuple[Prefill, int]] = {}  # slot -> prefill, its next column
        for source in ("cached", "computed"):
            PREFIX_TOKENS.labels(chain.model, source)  # both series exist from the start

    # -- the front door's calls --------------------------------------------------------------

    def submit(self, generation: Generation) -> None:
        request = generation.request
        if not self.scheduler.fits_alone(request):
            raise InvalidArgument(
                f"prompt + max_new_tokens ({request.max_tokens} tokens) does not fit the KV "
                f"budget of any chain of model {self.chain.model!r} "
                f"({self.scheduler.config.budget_tokens} token slots)"
            )
        self.scheduler.submit(request)
        self._submitted += 1
        generation.engine = self
        self.refresh()
        for slot in self.scheduler.slots:
            task = self._tasks.get(slot.index)
            if task is None or task.done():
                # A fresh context: a slot loop must not carry the first request's trace.
                self._tasks[slot.index] = asyncio.create_task(
                    self._run(slot), context=contextvars.Context()
                )
        self.wake()

    def cancel(self, request_id: int) -> None:
        self.scheduler.cancel(request_id)
        self.wake()

    # -- bookkeeping -------------------------------------------------------------------------

    def wake(self) -> None:
        for event in self._wakes:
            event.set()

    def refresh(self) -> None:
        """What this engine holds changed: the load book and the queue gauges follow, and
        chains that share a stage with it may admit into what it freed."""
        scheduler = self.scheduler
        held = Holding(
            self.chain.addresses,
            requests=len(scheduler.requests()),
            rows=scheduler.rows(),
            tokens=scheduler.cost(),
        )
        freed = held.rows < self._held.rows or held.tokens < self._held.tokens
        self._held = held
        self.owner.pool.book.hold(self, held)
        if freed:
            self.owner.wake_sharers(self)
        depths = scheduler.queue_depths(priority_bucket)
        for bucket in ("high", "normal", "low"):
            GENERATION_QUEUE_DEPTH.labels(self.chain.model, bucket).set(depths.get(bucket, 0))
        self.owner.observe(self.chain.model)

    def head(self) -> Request | None:
        """The request that has waited longest here."""
        return min(self.scheduler.waiting, key=lambda r: r.arrived, default=None)

    def _room(self) -> Room:
        """What this chain may hold now: each stage's budget less what other chains hold on it
        (chains that share a stage share its KV budget and rows), and less room for the head
        of each sharing chain that has waited longer than this one's (so none starves)."""
        book = self.owner.pool.book
        mine = self.head()
        elders = [
            head
            for other in self.owner.sharers(self)
            if (head := other.head()) is not None and (mine is None or head.arrived < mine.arrived)
        ]
        held_back = sum(kv_cost([len(h.feed)], [h.max_tokens]) for h in elders)
        tokens = rows = None
        for worker in self.chain.workers:
            other_rows, other_tokens = book.others(self, worker.address)
            free_tokens = worker.kv_token_budget - other_tokens - held_back
            free_rows = worker.capacity - other_rows - len(elders)
            tokens = free_tokens if tokens is None else min(tokens, free_tokens)
            rows = free_rows if rows is None else min(rows, free_rows)
        config = self.scheduler.config
        if self.draining:
            return Room(0, 0)
        return Room(min(config.budget_tokens, tokens or 0), min(config.max_rows, max(0, rows or 0)))

    def _emit(self, outputs: Iterable[Output]) -> None:
        for output in outputs:
            generation = self.owner.generations.get(output.request_id)
            if generation is None:
                continue
            if output.token is not None and generation.request.admitted_at is not None:
                self._observe_admission(generation)
            generation.put(output)
            if generation.closed:
                self.owner.forget(generation)

    def _observe_admission(self, generation: Generation) -> None:
        request = generation.request
        if len(request.generated) == 1 and request.retries == 0 and request.admitted_at:
            GENERATION_QUEUE_SECONDS.labels(
                self.chain.model, priority_bucket(request.priority)
            ).observe(request.admitted_at - request.arrived)

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
            while not self.stopped:
                # Cleared before the turn: a submit during the turn's awaits is not lost.
                wake.clear()
                if await self._turn(slot) or self.stopped:
                    continue
                if not self.scheduler.requests() and not self.owner.is_current(self):
                    self.owner.retire(self)  # draining or superseded, and now empty
                    return
                try:
                    # asyncio.timeout, not wait_for: wait_for swallows a cancellation that
                    # arrives as the event is set (Python 3.11), and the loop would go on.
                    async with asyncio.timeout(IDLE_EXIT_S):
                        await wake.wait()
                except TimeoutError:
                    if not self.scheduler.requests():
                        return  # an idle loop ends; the next submit starts it again
                await self._gather()
        except asyncio.CancelledError:
            self._abandon(Unavailable("the router is shutting down"))
            raise
        except Exception:  # noqa: BLE001 - a slot loop must not die silently with work in it
            log.exception("generation loop on %s failed", self.chain.describe())
            outputs, cleared = self.scheduler.failed(
                slot, ServiceError("internal error in the generation loop; see router logs")
            )
            self._emit(outputs)
            self._clear(cleared)
            self.refresh()

    async def _turn(self, slot: Slot) -> bool:
        """One turn: drop, admit, step. False when the slot has nothing to do."""
        now = asyncio.get_running_loop().time()
        self._emit(self.scheduler.expire(now))
        matched = self._matched if self.scheduler.config.prefix_reuse else None
        plan = self.scheduler.plan(slot, now, self._room(), matched)
        self._emit(plan.outputs)
        self.refresh()
        if plan.outputs:
            self.wake()  # memory and rows came free: idle slots may admit now
        if plan.drop is not None:
            with trace.use_span(self._batch_span(slot), end_on_exit=False):
                if await self._call(slot, self.client.filter(plan.drop)) is None:
                    return True
            if not slot.rows:
                self._end_batch_span(slot)
        prefill = plan.prefill or self._chunked_prefill(slot)
        if prefill is not None and not await self._prefill(slot, prefill):
            if not self.scheduler.busy(slot) and not self.stopped:
                await asyncio.sleep(REFUSED_BACKOFF_S)  # a refused prefill is not retried at once
            return True
        step = self.scheduler.decode(slot)
        if step is None:
            # Everything it prefilled finished at once, or chunks of its prefill are to come.
            return prefill is not None
        with trace.use_span(self._batch_span(slot), end_on_exit=False):
            decoded = await self._call(slot, self.client.decode(step))
        if decoded is not None:
            sampled = decoded[0]
            self._emit(self.scheduler.decoded(slot, sampled.tokens, sampled.logprobs))
            self.refresh()
        return True

    def _matched(self, request: Request) -> int:
        """Leading tokens of the request's feed this chain's stages hold cached."""
        return self.owner.prefixes.matched(self.chain.addresses, request.feed)

    def _chunked_prefill(self, slot: Slot) -> Prefill | None:
        """The slot's chunked prefill under way, if the scheduler still has it in flight (a
        fault since may have sent its rows back)."""
        chunked = self._chunks.get(slot.index)
        if chunked is not None and self.scheduler.prefilling(slot) is not chunked[0]:
            del self._chunks[slot.index]
            return None
        return chunked[0] if chunked is not None else None

    def _chunk_end(self, slot: Slot, prefill: Prefill) -> tuple[int, int]:
        """The columns the slot's prefill runs next: all of them, or its next chunk when the
        prompts are wide and other generations run on the chain (their steps go between)."""
        start = self._chunks.pop(slot.index, (prefill, prefill.start))[1]
        width = prefill.width
        chunk = self._chunk_size(prefill)
        if not chunk or start + chunk >= width:
            return start, width
        if start == prefill.start and not any(s.rows or s.pending for s in self.scheduler.slots):
            return start, width  # nothing else runs: one pass is fastest
        return start, start + chunk

    def _chunk_size(self, prefill: Prefill) -> int:
        """Columns per chunk: about `prefill_chunk_steps` decode steps of the running batch,
        from the step times observed on this chain's workers; the ceiling until both kinds of
        step were seen."""
        config = self.scheduler.config
        ceiling = config.prefill_chunk_tokens
        if not ceiling or not config.prefill_chunk_steps:
            return ceiling
        rows = max((len(s.rows) + len(s.pending) for s in self.scheduler.slots), default=0)
        times = self.owner.times
        decode = [times.typical(a, "decode") for a in self.chain.addresses]
        prefill_rate = [times.typical(a, "prefill") for a in self.chain.addresses]
        if not rows or None in decode or None in prefill_rate:
            return ceiling
        decode_s = sum(d for d in decode if d is not None) * rows
        column_s = sum(p for p in prefill_rate if p is not None) * len(prefill.requests)
        return chunk_columns(config.prefill_chunk_steps, decode_s, column_s, ceiling)

    async def _prefill(self, slot: Slot, prefill: Prefill) -> bool:
        """Runs a planned prefill, or its next chunk; False when it failed (the fault is
        handled)."""
        start, end = self._chunk_end(slot, prefill)
        if start > prefill.start and not prefill.wanted(asyncio.get_running_loop().time()):
            self._fault(slot, Abandoned(self.chain.addresses[0], "every row left"), prefill)
            return False
        if end < prefill.width:
            with tracer.start_as_current_span(
                "prefill.chunk",
                attributes={"tessera.batch": prefill.batch_id, "tessera.columns": end - start},
            ):
                if await self._call(slot, self.client.prefill(prefill, start, end), prefill):
                    self._chunks[slot.index] = (prefill, end)
                    return True
                return False
        requests = prefill.requests
        first = self.owner.generations.get(requests[0].request_id)
        links = [
            trace.Link(trace.get_current_span(g.trace_context).get_span_context())
            for g in (self.owner.generations.get(r.request_id) for r in requests[1:])
            if g is not None
        ]
        # The prefill is part of the first request's trace and linked from the others'.
        with tracer.start_as_current_span(
            "prefill",
            context=first.trace_context if first is not None else None,
            links=links,
            attributes={
                "tessera.rows": len(requests),
                "tessera.batch": prefill.batch_id,
                "tessera.cached_tokens": self._cached_tokens(prefill),
            },
        ):
            prefilled = await self._call(slot, self.client.prefill(prefill, start), prefill)
            if prefilled is None:
                return False
            self._prefix_done(prefill)
            now = asyncio.get_running_loop().time()
            sampled = prefilled[0]
            outputs, drop = self.scheduler.prefilled(
                slot, prefill, sampled.tokens, now, sampled.logprobs
            )
            self._emit(outputs)
            self.refresh()
            if drop is not None:
                with tracer.start_as_current_span("prefill.filter"):
                    return await self._call(slot, self.client.filter(drop)) is not None
        return True

    @staticmethod
    def _cached_tokens(prefill: Prefill) -> int:
        """Prompt tokens the prefill takes from the stages' caches: each row's part before its
        first column."""
        width = prefill.width
        return sum(max(0, prefill.start - (width - len(r.feed))) for r in prefill.requests)

    def _prefix_done(self, prefill: Prefill) -> None:
        """Every stage holds the prefill's prompts now: the index records their blocks."""
        cached = self._cached_tokens(prefill)
        computed = sum(len(r.feed) for r in prefill.requests) - cached
        PREFIX_TOKENS.labels(self.chain.model, "cached").inc(cached)
        PREFIX_TOKENS.labels(self.chain.model, "computed").inc(computed)
        if self.scheduler.config.prefix_reuse:
            for request in prefill.requests:
                self.owner.prefixes.add(self.chain.addresses, request.feed)

    async def _call(
        self, slot: Slot, call: Awaitable[T], prefill: Prefill | None = None
    ) -> tuple[T] | None:
        """Awaits a chain call: its result (in a 1-tuple), or None when it failed (the fault's
        consequences applied) or the chain stopped meanwhile (the result is moot)."""
        try:
            result = await call
        except Fault as fault:
            if not self.stopped:
                self._fault(slot, fault, prefill)
            return None
        return None if self.stopped else (result,)

    # -- faults: who pays --------------------------------------------------------------------

    def _fault(self, slot: Slot, fault: Fault, prefill: Prefill | None) -> None:
        """The one place a failed call's consequences are decided (faults.py's table)."""
        now = asyncio.get_running_loop().time()
        if fault.blame in (Blame.DOWN, Blame.REJECT):
            self.owner.stage_failed(fault)  # every chain through the worker moves, this one too
            return
        if isinstance(fault, StageDraining):
            self.owner.stage_draining(fault)
            if prefill is not None:
                self.scheduler.refused(slot, prefill)
                self.owner.reroute(self.scheduler.take_waiting(), self.chain, fault.address)
            self._clear([prefill.batch_id] if prefill else [])
        elif isinstance(fault, StageFull):
            log.info("%s on %s: new rows wait", fault, self.chain.describe())
            if prefill is not None:
                self._clear(self.scheduler.refused(slot, prefill))
            elif fault.address == self.chain.addresses[0] and slot.pending:
                self._clear(self.scheduler.merge_refused(slot))
            else:  # a later stage refused what the first one did: the slot starts again
                self._lost(slot, fault, now, retry=False)
        elif isinstance(fault, PrefixNotHeld) and prefill is not None:
            log.info("%s on %s: its rows prefill from the start", fault, self.chain.describe())
            for request in prefill.requests:
                self.owner.prefixes.forget(self.chain.addresses, request.feed)
            self._clear(self.scheduler.refused(slot, prefill))
        elif isinstance(fault, Abandoned) and prefill is not None:
            self._clear(self.scheduler.refused(slot, prefill))  # they leave at the next turn
        elif isinstance(fault, InputRefused):
            log.error("a worker refused the router's step on %s: %s", self.chain.describe(), fault)
            error = ServiceError("internal error: a worker refused the router's step")
            if prefill is not None:  # only the rows of that prefill
                outputs, cleared = self.scheduler.prefill_failed(slot, prefill, error)
            else:
                outputs, cleared = self.scheduler.failed(slot, error)
            self._emit(outputs)
            self._clear(cleared)
        else:
            assert isinstance(fault, BatchLost), fault
            self._lost(slot, fault, now)
        if not self.scheduler.busy(slot):
            self._end_batch_span(slot)
        self.refresh()
        self.wake()

    def _lost(self, slot: Slot, fault: Fault, now: float, *, retry: bool = True) -> None:
        log.warning("%s on %s: its rows are prefilled again", fault, self.chain.describe())
        outputs, cleared = self.scheduler.lost(
            slot, Unavailable(f"model {self.chain.model!r}: {fault}"), now, retry=retry
        )
        self._emit(outputs)
        self._clear(cleared)

    def _clear(self, batch_ids: list[str]) -> None:
        """Frees batches on every stage that still answers, in the background."""
        if batch_ids:
            self.owner.background(self.client.clear(batch_ids))

    def stop(self) -> list[Request]:
        """A stage of this chain failed: everything it holds leaves (for another chain)."""
        if self.stopped:
            return []
        self.stopped = True
        self.wake()
        for index in list(self._spans):
            self._end_batch_span(self.scheduler.slots[index])
        requests, cleared = self.scheduler.take_all()
        self._clear(cleared)  # survivors free their copies now rather than at their idle timeout
        self.refresh()
        return requests

    def _abandon(self, error: ServiceError) -> None:
        for request in self.stop():
            self._emit([Output(request.request_id, error=error)])

    # -- tracing -----------------------------------------------------------------------------

    def _batch_span(self, slot: Slot) -> trace.Span:
        """One trace per running batch (its decode steps), linked from the requests' traces.

        A step serves many requests, so it cannot sit in one request's trace; a trace per step
        would be noise.
        """
        span = self._spans.get(slot.index)
        if span is None:
            links = []
            for request in (*slot.rows, *slot.pending):
                generation = self.owner.generations.get(request.request_id)
                if generation is not None:
                    context = trace.get_current_span(generation.trace_context).get_span_context()
                    links.append(trace.Link(context))
            span = tracer.start_span(
                "batch",
                context=otel_context.Context(),
                links=links,
                attributes={"tessera.route": self.chain.describe(), "tessera.slot": slot.index},
            )
            self._spans[slot.index] = span
        return span

    def _end_batch_span(self, slot: Slot) -> None:
        span = self._spans.pop(slot.index, None)
        if span is not None:
            span.end()


class Generations:
    """Every generation the router runs: their engines, and moving them when a stage fails."""

    def __init__(
        self,
        pool: WorkerPool,
        config_for: Callable[[Chain], SchedulerConfig],
        hidden_dtype: str = "float32",
        times: StepTimes | None = None,
        client_for: Callable[[Chain], ChainClient] | None = None,
    ) -> None:
        self.pool = pool
        self.config_for = config_for
        self.times = times or StepTimes()
        self._client_for = client_for or (
            lambda chain: ChainClient(pool, chain, self.times, hidden_dtype)
        )
        self.router_id = uuid.uuid4().hex[:12]
        self.prefixes = PrefixIndex()
        self.generations: dict[int, Generation] = {}
        self._engines: dict[tuple[str, ...], ChainEngine] = {}  # the chains taking new work
        self._leaving: set[ChainEngine] = set()  # draining or superseded: finishing their rows
        self._next_id = 0
        self._background: set[asyncio.Task[None]] = set()

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def submit(self, generation: Generation, chain: Chain) -> None:
        """Runs the generation on `chain` (the front door routed it once)."""
        self.generations[generation.request_id] = generation
        try:
            self._engine(chain).submit(generation)
        except ServiceError:
            self.generations.pop(generation.request_id, None)
            raise

    def prefer(self, chain: Chain, chains: Iterable[Chain], feed: list[int]) -> Chain:
        """Prefix affinity: of the chains of `chain`'s version whose load is close to its own
        (within AFFINITY_SLACK outstanding requests on their busiest stage), the one whose stages
        hold the most of `feed`'s start; `chain` when none holds more."""
        load = self.pool.load

        def busiest(c: Chain) -> int:
            return max(load.get(a, 0) for a in c.addresses)

        ceiling = busiest(chain) + AFFINITY_SLACK
        best, most = chain, self.prefixes.matched(chain.addresses, feed)
        for other in chains:
            if other.fingerprint != chain.fingerprint or busiest(other) > ceiling:
                continue
            held = self.prefixes.matched(other.addresses, feed)
            if held > most:
                best, most = other, held
        return best

    def cancel(self, generation: Generation) -> None:
        """The client left or a stop string ended it: its row leaves at the next step."""
        if generation.engine is not None:
            generation.engine.cancel(generation.request_id)
        self.forget(generation)

    def forget(self, generation: Generation) -> None:
        self.generations.pop(generation.request_id, None)

    def _engine(self, chain: Chain) -> ChainEngine:
        engine = self._engines.get(chain.addresses)
        if engine is None or engine.stopped or engine.chain != chain:
            if engine is not None and not engine.stopped:
                self._leaving.add(engine)  # its chain's capacity changed: it finishes its rows
            batch_prefix = f"{self.router_id}-{uuid.uuid4().hex[:8]}"
            client = self._client_for(chain)
            config = self.config_for(chain)
            config = dataclasses.replace(config, batch_prefix=batch_prefix)
            engine = self._engines[chain.addresses] = ChainEngine(self, chain, client, config)
        return engine

    def retire(self, engine: ChainEngine) -> None:
        """An engine with nothing left to run goes."""
        if self.is_current(engine):
            del self._engines[engine.chain.addresses]
        self._leaving.discard(engine)
        self.pool.book.hold(engine, Holding(engine.chain.addresses))

    def is_current(self, engine: ChainEngine) -> bool:
        """Whether new work for its chain goes to `engine`."""
        return self._engines.get(engine.chain.addresses) is engine

    def _all(self) -> list[ChainEngine]:
        return [*self._engines.values(), *self._leaving]

    def _through(self, address: str) -> list[ChainEngine]:
        return [e for e in self._all() if address in e.chain.addresses]

    def load_of(self, model: str, version: str | None = None) -> tuple[int, int, float]:
        """(generations waiting, generations running, KV budget held on the fullest worker
        0-1) over the model's chains, or over one version's."""
        engines = [
            e for e in self._all() if e.chain.model == model and version in (None, e.chain.version)
        ]
        waiting = sum(len(e.scheduler.waiting) for e in engines)
        running = sum(e.scheduler.rows() for e in engines)
        tokens = self.pool.book.tokens
        usage = max(
            (
                tokens(w.address) / w.kv_token_budget
                for e in engines
                for w in e.chain.workers
                if w.kv_token_budget
            ),
            default=0.0,
        )
        return waiting, running, usage

    def observe(self, model: str) -> None:
        """The model's signals for autoscalers and inference gateways."""
        waiting, running, usage = self.load_of(model)
        for gauge, value in ((MODEL_QUEUED, waiting), (MODEL_RUNNING, running), (MODEL_KV, usage)):
            gauge.labels(model).set(value)
        for gauge, value in ((VLLM_WAITING, waiting), (VLLM_RUNNING, running), (VLLM_KV, usage)):
            gauge.labels(model).set(value)

    def sharers(self, engine: ChainEngine) -> list[ChainEngine]:
        """The other engines whose chains share a worker with `engine`'s."""
        mine = set(engine.chain.addresses)
        return [e for e in self._all() if e is not engine and mine & set(e.chain.addresses)]

    def wake_sharers(self, engine: ChainEngine) -> None:
        """`engine` freed rows or memory on its workers: chains that share them and have
        requests waiting try to admit now."""
        for other in self.sharers(engine):
            if other.scheduler.waiting:
                other.wake()

    # -- faults that reach beyond one chain --------------------------------------------------

    def stage_failed(self, fault: Fault) -> None:
        """A stage is down, stuck or misbehaving: its standing changes, and only the chains
        through it move their generations (running or waiting) to other chains."""
        self.pool.apply_blame(fault)
        self.times.forget(fault.address)
        for engine in self._through(fault.address):
            requests = engine.stop()
            self.retire(engine)
            if requests:
                log.warning(
                    "chain %s lost a stage (%s); moving %d generations",
                    engine.chain.describe(),
                    fault,
                    len(requests),
                )
            self.reroute(requests, engine.chain, fault.address, retry=True)

    def stage_draining(self, fault: Fault) -> None:
        """A stage is draining: chains through it take nothing new; their waiting requests go
        elsewhere, their running rows finish where they are."""
        self.pool.apply_blame(fault)
        for engine in self._through(fault.address):
            if not engine.draining:
                engine.draining = True
                if self.is_current(engine):
                    del self._engines[engine.chain.addresses]
                self._leaving.add(engine)
                log.info(
                    "chain %s: a stage is draining; its running rows finish there",
                    engine.chain.describe(),
                )
                self.reroute(engine.scheduler.take_waiting(), engine.chain, fault.address)
                engine.refresh()
                engine.wake()

    def reroute(
        self, requests: list[Request], chain: Chain, address: str, *, retry: bool = False
    ) -> None:
        """Requests go to another chain of the same version, avoiding `address`. A retry
        (their rows were lost) counts against each request's retry budget."""
        exclude = frozenset({address})
        for request in requests:
            generation = self.generations.get(request.request_id)
            if generation is None:
                continue
            if request.cancelled:
                self._end(generation, Unavailable("generation cancelled"))
                continue
            if retry:
                request.retries += 1
                if request.retries > self.config_for(chain).max_retries:
                    self._end(
                        generation, Unavailable(f"model {chain.model!r}: worker {address} failed")
                    )
                    continue
                log.warning(
                    "generation %d on %s failed after %d tokens; resuming on another chain",
                    request.request_id,
                    chain.describe(),
                    len(request.generated),
                )
            try:
                target = self.pool.table.route(
                    chain.model, self.pool.load, exclude=exclude, fingerprint=chain.fingerprint
                )
                self._engine(target).submit(generation)
            except ServiceError as error:
                self._end(generation, error)

    def _end(self, generation: Generation, error: ServiceError) -> None:
        generation.put(Output(generation.request_id, error=error))
        self.forget(generation)

    def background(self, call: Awaitable[None]) -> None:
        async def run() -> None:
            await call

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        tasks = [t for e in self._all() for t in e._tasks.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
