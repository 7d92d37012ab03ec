"""Coalescing: concurrent stateless work (Embed, Forward) becomes a few large worker calls.

Work for one model version (fingerprint), layer range, input kind and pooling shares a *lane*.
A lane sends at once when a worker of its version is idle: there is no fixed wait. While calls
are in flight it gathers what arrives, and sends it as the next call when capacity frees (at
most `in_flight` calls per worker) or, with a call already in flight, once it holds its share
of the lane's work (so two calls alternate on a worker and it never waits for the router). The
rows of one call are sorted by length and right-padded; the answer is split back per request.
The texts of one large request and those of many one-text requests go through the same lanes:
a 256-text Embed is cut into calls of `max_rows` like any other work and spread over replicas.

A call that fails at the transport is retried on another chain of the same version (a request
never mixes versions); when none is left the request gets `VersionGone` and may start again on
another version. A request whose deadline passes while queued gets DEADLINE_EXCEEDED and is not
sent. Tokenizing is batched the same way (`BatchedEncoder`), on a thread, off the event loop
(short texts that find the tokenizer idle are tokenized in place: cheaper than the hop).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import itertools
import logging
import math
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

import numpy as np
from opentelemetry import trace

from services.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    MissingSpanError,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from services.common.settings import RouterSettings
from services.common.tensors import ITEMSIZE
from services.common.types import Span
from services.pb.tessera.v1 import common_pb2, worker_pb2
from services.router.faults import DeadlinePassed, Fault, InputRefused, StageFull
from services.router.pool import WorkerPool
from services.router.relay import StepTimes, malformed, relay
from services.router.routing import Chain, RoutingTable

log = logging.getLogger(__name__)
tracer = trace.get_tracer("tessera.router")

IDS = "ids"  # the input kind of lanes that start at layer 0 (token ids, not hidden states)
# Texts up to this many characters in all are tokenized on the event loop (measured on the
# bench machine: a 30-token sentence takes ~60 us, the thread hop alone ~45 us more).
INLINE_CHARS = 512
_MASK_DTYPE = np.dtype("<i8")


@dataclass(frozen=True, slots=True)
class CoalescerConfig:
    """How large a coalesced call may be and how many run at once (declared in
    RouterSettings; `from_settings` copies them)."""

    max_rows: int  # rows (texts) per worker call
    max_tokens: int  # rows x padded width per worker call
    in_flight: int  # coalesced calls in flight per worker
    retries: int  # other chains of the same version tried after a worker fails a call
    hidden_dtype: str  # hidden states between the stages of a chain

    @classmethod
    def from_settings(cls, settings: RouterSettings) -> CoalescerConfig:
        return cls(
            max_rows=max(1, settings.embed_segment_size),
            max_tokens=max(1, settings.coalesce_max_tokens),
            in_flight=max(1, settings.coalesce_in_flight),
            retries=settings.retries,
            hidden_dtype=settings.hidden_dtype,
        )


class VersionGone(Unavailable):
    """No healthy chain of the version a request is pinned to is left (a rollout moved on)."""


@dataclass(frozen=True, slots=True)
class _LaneKey:
    model: str
    fingerprint: str
    span: Span | None  # None: every layer
    kind: str  # IDS, or the wire dtype of the hidden states that come in
    pool: bool  # mean-pool + normalise on the last stage (Embed)


class _Request:
    """One caller's work in a lane; its parts' results land here."""

    __slots__ = ("future", "deadline", "rows", "remaining", "result", "context")

    def __init__(self, future: asyncio.Future[object], deadline: float, parts: int) -> None:
        self.future = future
        self.deadline = deadline  # loop time
        self.rows = parts  # pooled lanes: one part per row of the result
        self.remaining = parts
        self.result: np.ndarray | None = None  # pooled lanes: [rows, dim] float32
        self.context = contextvars.copy_context()  # its trace: calls are spans of its request

    @property
    def done(self) -> bool:
        return self.future.done()


class _Part:
    """Rows of one request that travel together: one text (pooled) or a whole Forward input."""

    __slots__ = ("request", "index", "rows", "width", "ids", "data", "mask")

    def __init__(
        self,
        request: _Request,
        index: int,
        rows: int,
        width: int,
        *,
        ids: Sequence[int] | np.ndarray | None = None,
        data: np.ndarray | None = None,
        mask: np.ndarray | None = None,
    ) -> None:
        self.request = request
        self.index = index  # pooled lanes: the row of the request's result
        self.rows = rows
        self.width = width
        self.ids = ids  # one row of token ids, or [rows, width] int64
        self.data = data  # hidden states as raw bytes [rows, width, hidden x itemsize] uint8
        self.mask = mask  # [rows, width] int64, None = all ones


class _Lane:
    __slots__ = ("key", "pad_id", "pending", "pending_rows", "in_flight_rows", "kicked")

    def __init__(self, key: _LaneKey, pad_id: int) -> None:
        self.key = key
        self.pad_id = pad_id
        self.pending: collections.deque[_Part] = collections.deque()
        self.pending_rows = 0
        self.in_flight_rows = 0
        self.kicked = False  # a dispatch is scheduled for this turn of the event loop

    def take(self, max_rows: int, max_tokens: int, now: float) -> list[_Part]:
        """The oldest live parts that fit one call; parts of finished or expired requests go."""
        taken: list[_Part] = []
        rows = width = 0
        while self.pending:
            part = self.pending[0]
            request = part.request
            if request.done:
                self.pending.popleft()
                self.pending_rows -= part.rows
                continue
            if request.deadline <= now:
                self.pending.popleft()
                self.pending_rows -= part.rows
                request.future.set_exception(
                    DeadlineExceeded("deadline passed while waiting for a worker")
                )
                continue
            new_rows, new_width = rows + part.rows, max(width, part.width)
            if taken and (new_rows > max_rows or new_rows * new_width > max_tokens):
                break
            self.pending.popleft()
            self.pending_rows -= part.rows
            taken.append(part)
            rows, width = new_rows, new_width
        return taken


class Coalescer:
    """Lanes of pending work per (model, version, layers, input kind, pooling), and the calls."""

    def __init__(
        self,
        pool: WorkerPool,
        config: CoalescerConfig,
        times: StepTimes | None = None,
    ) -> None:
        self._pool = pool
        self.config = config
        self._times = times or StepTimes()  # when a call is overdue (its worker is checked)
        self._lanes: dict[_LaneKey, _Lane] = {}
        self._book = pool.book  # calls in flight per worker, for the in_flight limit
        self._tasks: set[asyncio.Task[None]] = set()
        self._chains_cache: tuple[
            RoutingTable | None, dict[tuple[str, str], tuple[Chain, ...] | None]
        ] = (None, {})
        pool.on_change(lambda _table: self._dispatch_all())

    # -- entry points -----------------------------------------------------------------------

    async def embed(
        self,
        model: str,
        fingerprint: str,
        rows: Sequence[Sequence[int]],
        *,
        pad_id: int,
        deadline: float,
    ) -> np.ndarray:
        """Mean-pooled, normalised vectors [len(rows), dim] float32 for token-id rows."""
        lane = self._lane(_LaneKey(model, fingerprint, None, IDS, True), pad_id)
        request = self._request(deadline, len(rows))
        for index, ids in enumerate(rows):
            lane.pending.append(_Part(request, index, 1, len(ids), ids=ids))
        lane.pending_rows += len(rows)
        self._kick(lane)
        result = await self._wait(request)
        assert isinstance(result, np.ndarray)
        return result

    async def forward(
        self,
        model: str,
        fingerprint: str,
        span: Span,
        *,
        ids: np.ndarray | None = None,
        hidden: common_pb2.Tensor | None = None,
        mask: np.ndarray | None = None,
        pad_id: int = 0,
        deadline: float,
    ) -> common_pb2.Tensor:
        """Hidden states after `span` for token ids [b, t] (span starts at 0) or validated
        hidden states [b, t, h]; `mask` [b, t] int64 or None (all ones)."""
        if ids is not None:
            rows, width = (int(d) for d in ids.shape)
            kind, data = IDS, None
        else:
            assert hidden is not None
            rows, width, size = (int(d) for d in hidden.shape)
            kind = hidden.dtype
            data = np.frombuffer(hidden.data, dtype=np.uint8).reshape(
                rows, width, size * ITEMSIZE[kind]
            )
        lane = self._lane(_LaneKey(model, fingerprint, span, kind, False), pad_id)
        request = self._request(deadline, 1)
        lane.pending.append(_Part(request, 0, rows, width, ids=ids, data=data, mask=mask))
        lane.pending_rows += rows
        self._kick(lane)
        result = await self._wait(request)
        assert isinstance(result, common_pb2.Tensor)
        return result

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- requests ---------------------------------------------------------------------------

    @staticmethod
    def _request(deadline: float, parts: int) -> _Request:
        return _Request(asyncio.get_running_loop().create_future(), deadline, parts)

    @staticmethod
    async def _wait(request: _Request) -> object:
        loop = asyncio.get_running_loop()
        if request.deadline <= loop.time():
            request.future.cancel()
            raise DeadlineExceeded("deadline passed before the work was done")
        # A plain timer (cheaper than asyncio.timeout): at the deadline the request fails, and
        # its parts still queued are dropped, never sent. Cancelling this wait (a client that
        # left) cancels the future, with the same effect.
        timer = loop.call_at(request.deadline, _expire, request.future)
        try:
            return await request.future
        finally:
            timer.cancel()

    def _lane(self, key: _LaneKey, pad_id: int) -> _Lane:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(key, pad_id)
        return lane

    # -- dispatch ---------------------------------------------------------------------------

    def _kick(self, lane: _Lane) -> None:
        """Dispatches at the end of this turn of the event loop, not at once: requests that
        became ready together (one tokenizer batch, one burst of arrivals) leave as one call.
        No timer is involved, so an idle worker still gets the work right away."""
        if not lane.kicked:
            lane.kicked = True
            asyncio.get_running_loop().call_soon(self._kicked, lane)

    def _kicked(self, lane: _Lane) -> None:
        lane.kicked = False
        self._dispatch(lane)

    def _dispatch_all(self) -> None:
        for lane in list(self._lanes.values()):
            if lane.pending:
                self._dispatch(lane)

    def _dispatch_version(self, model: str, fingerprint: str) -> None:
        for lane in list(self._lanes.values()):
            if lane.pending and lane.key.model == model and lane.key.fingerprint == fingerprint:
                self._dispatch(lane)
        # Lanes with nothing queued or in flight are dropped: they are cheap to make again.
        for key in [k for k, v in self._lanes.items() if not v.pending and not v.in_flight_rows]:
            del self._lanes[key]

    def _dispatch(self, lane: _Lane) -> None:
        """Sends what the lane holds while some worker of its version has capacity."""
        config = self.config
        loop = asyncio.get_running_loop()
        while lane.pending_rows > 0:
            chain = self._free_chain(lane)
            if chain is None:
                return
            if any(self._book.calls(a) for a in chain.addresses):
                # Busy: gather until the call holds this lane's share of the work in play, so
                # calls alternate on the worker instead of a lone row going out at every turn.
                slots = config.in_flight * self._chains_of(lane.key.model, lane.key.fingerprint)
                share = math.ceil((lane.pending_rows + lane.in_flight_rows) / max(1, slots))
                if lane.pending_rows < min(config.max_rows, share):
                    return
            parts = lane.take(config.max_rows, config.max_tokens, loop.time())
            if not parts:
                return
            self._start(lane, chain, parts)

    def _free_chain(self, lane: _Lane) -> Chain | None:
        """The least-loaded chain of the lane's version with a free call slot on every worker;
        None when all are busy. Fails the lane's work when the version has no chain left."""
        key = lane.key
        chains = self._version_chains(key.model, key.fingerprint)
        limit = self.config.in_flight
        calls = self._book.calls
        if chains is None:  # more chains than a listing holds: the planner picks
            table, load = self._pool.table, self._pool.load
            full = frozenset(a for a in load if calls(a) >= limit)
            try:
                return table.route(key.model, load, exclude=full, fingerprint=key.fingerprint)
            except MissingSpanError:
                pass
            if full:
                try:
                    table.route(key.model, load, fingerprint=key.fingerprint)
                    return None  # every chain of the version is at capacity: wait for a call
                except MissingSpanError:
                    pass
        elif chains:
            free = [c for c in chains if all(calls(a) < limit for a in c.addresses)]
            if len(free) <= 1:
                return free[0] if free else None
            load = self._pool.load
            costs = [sum(load.get(a, 0) for a in c.addresses) for c in free]
            best = min(costs)
            return random.choice([c for c, cost in zip(free, costs) if cost == best])
        gone = VersionGone(
            f"model {key.model!r}: no healthy chain of version {key.fingerprint[:12]} is left"
        )
        while lane.pending:
            part = lane.pending.popleft()
            if not part.request.done:
                part.request.future.set_exception(gone)
        lane.pending_rows = 0
        return None

    def _version_chains(self, model: str, fingerprint: str) -> tuple[Chain, ...] | None:
        """The healthy chains of one version, listed once per routing table; None when the
        listing is capped (then the planner, RoutingTable.route, chooses among them all)."""
        table, cached = self._chains_cache
        if table is not self._pool.table:
            table, cached = self._pool.table, {}
            self._chains_cache = (table, cached)
        if (model, fingerprint) in cached:
            return cached[(model, fingerprint)]
        listed = table.chains(model)
        cap = getattr(table, "max_listed", None)
        found = (
            None
            if cap is not None and len(listed) >= cap
            else tuple(c for c in listed if c.fingerprint == fingerprint)
        )
        cached[(model, fingerprint)] = found
        return found

    def _chains_of(self, model: str, fingerprint: str) -> int:
        chains = self._version_chains(model, fingerprint)
        return max(1, len(chains)) if chains is not None else max(1, self.config.in_flight)

    # -- calls ------------------------------------------------------------------------------

    def _start(self, lane: _Lane, chain: Chain, parts: list[_Part]) -> None:
        rows = sum(p.rows for p in parts)
        self._book.acquire(chain.addresses)
        lane.in_flight_rows += rows
        # The call is a span of its first request's trace (one request: exactly its trace).
        context = parts[0].request.context.copy()
        task = asyncio.get_running_loop().create_task(
            self._call(lane, chain, parts, rows), context=context
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, lane: _Lane, chain: Chain, parts: list[_Part], rows: int) -> None:
        try:
            await self._run(lane, chain, parts)
        except asyncio.CancelledError:
            _fail(parts, Unavailable("router is shutting down"))
            raise
        except Exception as exc:  # noqa: BLE001 - every waiting request gets an answer
            if not isinstance(exc, ServiceError):
                log.exception("a coalesced call failed")
                exc = ServiceError("a coalesced worker call failed")
            _fail(parts, exc)
        finally:
            self._book.release(chain.addresses)
            lane.in_flight_rows -= rows
            self._dispatch_version(lane.key.model, lane.key.fingerprint)

    async def _run(self, lane: _Lane, chain: Chain, parts: list[_Part]) -> None:
        parts = [p for p in parts if not p.request.done]
        if not parts:
            return
        try:
            out = await self._send(lane, chain, parts)
        except _Refused as exc:
            if lane.key.kind == IDS and lane.key.pool:
                raise ServiceError(f"a worker rejected the router's batch: {exc}") from None
            requests = list(dict.fromkeys(p.request for p in parts))
            if len(requests) == 1:
                raise InvalidArgument(exc.message) from None
            # One bad input must not fail the others it travelled with: each again, alone.
            for request in requests:
                own = [p for p in parts if p.request is request]
                try:
                    _deliver(lane, own, await self._send(lane, chain, own))
                except _Refused as alone:
                    _fail(own, InvalidArgument(alone.message))
                except ServiceError as failed:
                    _fail(own, failed)
            return
        _deliver(lane, parts, out)

    async def _send(self, lane: _Lane, chain: Chain, parts: list[_Part]) -> common_pb2.Tensor:
        """One worker call for the parts (sorted by width), retried on other chains of the
        same version after a transport failure."""
        key = lane.key
        parts.sort(key=lambda p: p.width)
        ids, hidden, mask = _assemble(lane, parts)
        loop = asyncio.get_running_loop()
        timeout = max(p.request.deadline for p in parts) - loop.time()
        excluded: set[str] = set()
        current = chain
        with tracer.start_as_current_span(
            "coalesced call",
            attributes={
                "tessera.rows": sum(p.rows for p in parts),
                "tessera.requests": len({id(p.request) for p in parts}),
            },
        ):
            for attempt in range(self.config.retries + 1):
                if timeout <= 0:
                    raise DeadlineExceeded("deadline passed while waiting for a worker")
                try:
                    return await self._relay(current, key, ids, hidden, mask, timeout)
                except (InputRefused, DeadlinePassed, StageFull) as fault:
                    raise _failure(fault) from None
                except Fault as fault:
                    # Down, stuck, draining, misbehaving, or failed inside: the worker's
                    # standing follows the fault; the work goes to another chain of its version.
                    self._pool.apply_blame(fault)
                    log.warning(
                        "attempt %d on %s failed: %s", attempt + 1, current.describe(), fault
                    )
                    excluded.add(fault.address)
                    if attempt == self.config.retries:
                        raise Unavailable(f"model {key.model!r}: {fault}") from None
                    try:
                        current = self._pool.table.route(
                            key.model,
                            self._pool.load,
                            exclude=frozenset(excluded),
                            fingerprint=key.fingerprint,
                        )
                    except MissingSpanError:
                        raise VersionGone(
                            f"model {key.model!r}: no other chain of version "
                            f"{key.fingerprint[:12]} after {fault}"
                        ) from None
                    timeout = max(p.request.deadline for p in parts) - loop.time()
        raise AssertionError("unreachable")

    async def _relay(
        self,
        chain: Chain,
        key: _LaneKey,
        ids: common_pb2.Tensor | None,
        hidden: common_pb2.Tensor | None,
        mask: common_pb2.Tensor | None,
        timeout: float,
    ) -> common_pb2.Tensor:
        """One coalesced call through the chain's hops (cut to the lane's layers). Hidden
        states travel as `hidden_dtype` between Embed's stages; the last hop answers float32."""
        hops = chain.hops(key.span)
        last = len(hops) - 1
        first = ids if ids is not None else hidden
        assert first is not None
        rows, width = int(first.shape[0]), int(first.shape[1])
        between = self.config.hidden_dtype if key.pool else "float32"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        def dtype(index: int) -> str:
            return "float32" if index == last else between

        def build(index: int, previous: common_pb2.Tensor | None) -> worker_pb2.StageForwardRequest:
            hop = hops[index]
            request = worker_pb2.StageForwardRequest(
                span=common_pb2.Span(start=hop.span.start, end=hop.span.end),
                pool=key.pool and index == last,
                hidden_dtype=dtype(index),
            )
            if index == 0 and ids is not None:
                request.input_ids.CopyFrom(ids)
            else:
                source = previous if index else hidden
                assert source is not None
                request.hidden_states.CopyFrom(source)
            if mask is not None:
                request.attention_mask.CopyFrom(mask)
            return request

        def check(index: int, answer: worker_pb2.StageForwardResponse) -> str:
            pooled = key.pool and index == last
            problem = malformed(answer.hidden_states, rows, None if pooled else width, dtype(index))
            return f"its Forward answer {problem}" if problem else ""

        answer = await relay(
            self._pool,
            [hop.address for hop in hops],
            "Forward",
            build,
            check,
            timeout=lambda _: deadline - loop.time(),
            timeout_is_stuck=False,
            stuck_after=lambda address: self._times.overdue(address, "forward", rows * width),
            observe=lambda address, s: self._times.observe(address, "forward", rows * width, s),
            hop_spans=[f"hop {hop.span}" for hop in hops],
        )
        hidden_states: common_pb2.Tensor = answer.hidden_states
        return hidden_states


class _Refused(ServiceError):
    """A worker refused a call's input (INVALID_ARGUMENT): the client's own, when the input came
    from it (Forward); the router's bug otherwise."""

    code = InvalidArgument.code


def _failure(fault: Fault) -> ServiceError:
    """What a fault that no other chain would answer differently means for the call's requests."""
    if isinstance(fault, InputRefused):
        return _Refused(fault.detail)
    if isinstance(fault, DeadlinePassed):
        return DeadlineExceeded(f"deadline passed while worker {fault.address} was working")
    return ResourceExhausted(fault.detail or f"worker {fault.address} is at capacity")


def _expire(future: asyncio.Future[object]) -> None:
    if not future.done():
        future.set_exception(DeadlineExceeded("deadline passed before the work was done"))


def _fail(parts: Sequence[_Part], error: BaseException) -> None:
    for part in parts:
        if not part.request.done:
            part.request.future.set_exception(error)


def _assemble(
    lane: _Lane, parts: Sequence[_Part]
) -> tuple[common_pb2.Tensor | None, common_pb2.Tensor | None, common_pb2.Tensor | None]:
    """(input_ids, hidden_states, attention_mask) of one call: the parts' rows, in order,
    right-padded to the widest with a mask that marks the padding."""
    rows = sum(p.rows for p in parts)
    width = max(p.width for p in parts)
    mask = np.zeros((rows, width), dtype=_MASK_DTYPE)
    row = 0
    if lane.key.kind == IDS:
        ids = np.full((rows, width), lane.pad_id, dtype=_MASK_DTYPE)
        if lane.key.pool and rows == len(parts) and all(p.mask is None for p in parts):
            # One text per part (Embed): fill every row's prefix in one vectorised step.
            lengths = np.fromiter((p.width for p in parts), dtype=np.intp, count=rows)
            real = np.arange(width) < lengths[:, None]
            ids[real] = np.fromiter(
                itertools.chain.from_iterable(cast(Sequence[int], p.ids) for p in parts),
                dtype=_MASK_DTYPE,
                count=int(lengths.sum()),
            )
            return _tensor("int64", ids), None, _tensor("int64", real.astype(_MASK_DTYPE))
        for part in parts:
            end = row + part.rows
            ids[row:end, : part.width] = np.asarray(part.ids)
            mask[row:end, : part.width] = 1 if part.mask is None else part.mask
            row = end
        return _tensor("int64", ids), None, _tensor("int64", mask)
    first = parts[0]
    assert first.data is not None
    if len(parts) == 1:
        data = first.data
    else:
        data = np.zeros((rows, width, first.data.shape[2]), dtype=np.uint8)
        for part in parts:
            end = row + part.rows
            data[row:end, : part.width] = part.data
            row = end
    row = 0
    for part in parts:
        end = row + part.rows
        mask[row:end, : part.width] = 1 if part.mask is None else part.mask
        row = end
    hidden_size = int(first.data.shape[2]) // ITEMSIZE[lane.key.kind]
    hidden = common_pb2.Tensor(
        dtype=lane.key.kind, shape=[rows, width, hidden_size], data=data.tobytes()
    )
    return None, hidden, _tensor("int64", mask)


def _tensor(dtype: str, array: np.ndarray) -> common_pb2.Tensor:
    return common_pb2.Tensor(dtype=dtype, shape=list(array.shape), data=array.tobytes())


def _deliver(lane: _Lane, parts: Sequence[_Part], out: common_pb2.Tensor) -> None:
    """Splits one call's answer back into its parts' requests."""
    rows = sum(p.rows for p in parts)
    shape = [int(d) for d in out.shape]
    if lane.key.pool:
        if out.dtype != "float32" or len(shape) != 2 or shape[0] != rows:
            raise ServiceError(f"a worker returned pooled {out.dtype} {shape} for {rows} rows")
        matrix = np.frombuffer(out.data, dtype="<f4")
        if matrix.size != rows * shape[1]:
            raise ServiceError("a worker returned a pooled tensor of the wrong size")
        matrix = matrix.reshape(rows, shape[1])
        for row, part in enumerate(parts):
            request = part.request
            if request.done:
                continue
            if request.rows == 1:  # one text: its row of the answer, no copy
                request.future.set_result(matrix[row : row + 1])
                continue
            if request.result is None:
                request.result = np.empty((request.rows, shape[1]), dtype=np.float32)
            request.result[part.index] = matrix[row]
            request.remaining -= 1
            if request.remaining == 0:
                request.future.set_result(request.result)
        return
    if len(shape) != 3 or shape[0] != rows or out.dtype not in ITEMSIZE:
        raise ServiceError(f"a worker returned {out.dtype} {shape} for {rows} rows")
    width, size = shape[1], shape[2]
    if len(parts) == 1 and parts[0].width == width:
        if not parts[0].request.done:
            parts[0].request.future.set_result(out)
        return
    raw = np.frombuffer(out.data, dtype=np.uint8)
    if raw.size != rows * width * size * ITEMSIZE[out.dtype]:
        raise ServiceError("a worker returned hidden states of the wrong size")
    raw = raw.reshape(rows, width, size * ITEMSIZE[out.dtype])
    row = 0
    for part in parts:
        end = row + part.rows
        if not part.request.done:
            piece = raw[row:end, : part.width]
            part.request.future.set_result(
                common_pb2.Tensor(
                    dtype=out.dtype, shape=[part.rows, part.width, size], data=piece.tobytes()
                )
            )
        row = end


class BatchedEncoder:
    """Tokenizes on a thread, off the event loop, in batches: texts that arrive while one batch
    is being tokenized form the next one. Short inputs that find the thread idle are tokenized
    in place: a long text never holds the event loop, a short one never pays for the hop.
    """

    def __init__(
        self, encode: Callable[[list[str]], list[list[int]]], executor: ThreadPoolExecutor
    ) -> None:
        self._encode = encode
        self._executor = executor
        self._waiting: list[tuple[list[str], asyncio.Future[list[list[int]]]]] = []
        self._running = False

    async def encode(self, texts: list[str]) -> list[list[int]]:
        if not self._running and sum(map(len, texts)) <= INLINE_CHARS:
            # A short text costs less to tokenize (~60 us) than the hop to a thread and back
            # (~45 us of CPU on top of it): it is done here, the loop is held no longer.
            return self._encode(texts)
        future: asyncio.Future[list[list[int]]] = asyncio.get_running_loop().create_future()
        self._waiting.append((texts, future))
        if not self._running:
            self._next()
        return await future

    def _next(self) -> None:
        batch = [(t, f) for t, f in self._waiting if not f.done()]
        self._waiting = []
        if not batch:
            self._running = False
            return
        self._running = True
        flat = [text for texts, _ in batch for text in texts]
        job = asyncio.get_running_loop().run_in_executor(self._executor, self._encode, flat)
        job.add_done_callback(lambda done: self._finish(done, batch))

    def _finish(
        self,
        job: asyncio.Future[list[list[int]]],
        batch: list[tuple[list[str], asyncio.Future[list[list[int]]]]],
    ) -> None:
        error = job.exception()
        start = 0
        for texts, future in batch:
            if future.done():
                start += len(texts)
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(job.result()[start : start + len(texts)])
            start += len(texts)
        self._next()
