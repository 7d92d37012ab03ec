"""The hop relay: one call per stage, in order, each stage's hidden states into the next.

Forward (coalesced Embed and Forward calls) and the generation steps (Prefill, Decode) all go
through `relay`: it calls each worker, turns a failed call into its `Fault` (faults.py) and an
answer of the wrong shape into `StageMisbehaved`, and reports how long each worker took. It
changes nobody's standing; its caller applies the fault's consequences.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from grpc import aio
from opentelemetry import trace

from services.common.errors import InvalidArgument
from services.common.telemetry import outgoing_metadata
from services.common.tensors import validate
from services.pb.tessera.v1 import common_pb2
from services.router.faults import Abandoned, StageMisbehaved, StageStuck, classify
from services.router.pool import WorkerPool

log = logging.getLogger(__name__)
tracer = trace.get_tracer("tessera.router")

PROBE_EVERY_S = 1.0  # health checks of a worker whose call is overdue
MISSED_PROBES = 2  # checks in a row it leaves unanswered before its call counts as stuck

# (index of the hop, hidden states the previous hop answered) -> the request for this hop
Build = Callable[[int, common_pb2.Tensor | None], Any]
# (index of the hop, its answer) -> what is wrong with the answer ("" if nothing)
Check = Callable[[int, Any], str]


async def relay(
    pool: WorkerPool,
    addresses: Sequence[str],
    method: str,
    build: Build,
    check: Check,
    *,
    timeout: Callable[[str], float],
    timeout_is_stuck: bool,
    stuck_after: Callable[[str], float],
    observe: Callable[[str, float], None] | None = None,
    hop_spans: Sequence[str] = (),
    wanted: Callable[[], bool] | None = None,
) -> Any:
    """Calls `method` on each address in order; returns the last answer.

    `timeout(address)` bounds each call: the stuck-stage ceiling for generation steps
    (`timeout_is_stuck`), the caller's remaining deadline otherwise. A call not answered after
    `stuck_after(address)` seconds (learnt from observed times) has its worker's health checked;
    a worker that answers neither is stuck (`StageStuck`), one that answers is busy and is
    waited for. `hop_spans` names a span per hop (Forward's); generation steps are traced by
    their caller. `wanted()` false before a later hop abandons the work (`Abandoned`)."""
    hidden: common_pb2.Tensor | None = None
    answer: Any = None
    for index, address in enumerate(addresses):
        if index and wanted is not None and not wanted():
            raise Abandoned(address, "every row left before this hop")
        request = build(index, hidden)
        span = (
            tracer.start_as_current_span(hop_spans[index], attributes={"tessera.worker": address})
            if hop_spans
            else nullcontext()
        )
        started = time.perf_counter()
        with span:
            call = getattr(pool.stub(address), method)(
                request, timeout=timeout(address), metadata=outgoing_metadata()
            )
            watchdog = _Watchdog(pool, address, call, stuck_after(address))
            try:
                answer = await call
            except aio.AioRpcError as error:
                if watchdog.stuck:
                    raise watchdog.fault() from None
                raise classify(error, address, timeout_is_stuck=timeout_is_stuck) from None
            except asyncio.CancelledError:
                if watchdog.stuck:
                    raise watchdog.fault() from None
                raise
            finally:
                watchdog.stop()
        if observe is not None:
            observe(address, time.perf_counter() - started)
        problem = check(index, answer)
        if problem:
            raise StageMisbehaved(address, problem)
        hidden = getattr(answer, "hidden_states", None)
    return answer


@dataclass(frozen=True)
class StuckPolicy:
    """When a call that has not been answered makes the router check its worker's health, and
    how long a worker that stays healthy may take before its call counts as stuck anyway."""

    min_s: float = 2.0  # never check before this (and the first call of a kind waits this long)
    factor: float = 10.0  # times the slowest recent call of its kind, per unit of work
    max_s: float = 120.0  # a call of a healthy worker (a deadlocked model thread) fails here


class StepTimes:
    """Observed call times per worker and kind of call, and when the next one is overdue:
    `factor` x the slowest recent seconds per unit of work x its work, at least `min_s` (and
    `min_s` before any call of its kind was observed: an overdue call only gets its worker's
    health checked, so checking early costs a health check, never a failure)."""

    WINDOW = 32  # recent steps remembered per worker and kind

    def __init__(self, policy: StuckPolicy = StuckPolicy()) -> None:
        self.policy = policy
        self._rates: dict[tuple[str, str], collections.deque[float]] = {}

    def overdue(self, address: str, kind: str, work: int) -> float:
        """Seconds after which a call of this kind and work is overdue on the worker."""
        rates = self._rates.get((address, kind))
        policy = self.policy
        if not rates:
            return policy.min_s
        return min(policy.max_s, max(policy.min_s, policy.factor * max(rates) * max(1, work)))

    def observe(self, address: str, kind: str, work: int, seconds: float) -> None:
        key = (address, kind)
        rates = self._rates.get(key)
        if rates is None:
            rates = self._rates[key] = collections.deque(maxlen=self.WINDOW)
        rates.append(seconds / max(1, work))

    def typical(self, address: str, kind: str) -> float | None:
        """The median recent seconds per unit of work of this kind on the worker, if any."""
        rates = self._rates.get((address, kind))
        return statistics.median(rates) if rates else None

    def forget(self, address: str) -> None:
        for key in [k for k in self._rates if k[0] == address]:
            del self._rates[key]


class _Watchdog:
    """Watches one call: once it has run `after` seconds, checks the worker's health every
    PROBE_EVERY_S; MISSED_PROBES checks in a row unanswered cancel the call as stuck. A timer
    until then, so a call answered in time costs no task."""

    def __init__(self, pool: WorkerPool, address: str, call: Any, after: float) -> None:
        self._pool = pool
        self._address = address
        self._call = call
        self._started = time.monotonic()
        self.stuck = False
        self._task: asyncio.Task[None] | None = None
        self._timer = asyncio.get_running_loop().call_later(after, self._start)

    def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        log.info("a call to worker %s is overdue; checking its health", self._address)
        missed = 0
        while True:
            missed = 0 if await self._pool.alive(self._address) else missed + 1
            if missed >= MISSED_PROBES:
                self.stuck = True
                self._call.cancel()
                return
            await asyncio.sleep(PROBE_EVERY_S)

    def fault(self) -> StageStuck:
        waited = time.monotonic() - self._started
        return StageStuck(
            self._address, f"no answer for {waited:.1f} s and none to {MISSED_PROBES} health checks"
        )

    def stop(self) -> None:
        self._timer.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()


def malformed(tensor: common_pb2.Tensor, rows: int, width: int | None, dtype: str) -> str:
    """What is wrong with hidden states answered for `rows` x `width` inputs ('' if nothing):
    pooled answers (width None) are [rows, H], others [rows, width, H], all in `dtype`."""
    try:
        shape = validate(tensor, "hidden_states", dtypes=(dtype,))
    except InvalidArgument as exc:
        return exc.message[:200]
    want = (rows,) if width is None else (rows, width)
    if len(shape) != len(want) + 1 or shape[: len(want)] != want or shape[-1] <= 0:
        wanted = [*want, "H"]
        return f"has shape {list(shape)[:8]}, not {wanted}"
    return ""
