"""Worker membership, admission, channels, health probes and load counters; publishes
RoutingTables.

Every worker (registered or static) goes through one state machine:

    PENDING --admission passes--> ADMITTED --its answers disagree--> REJECTED
       ^                             |                                 |
       +---- re-registered as -------+                                 |
       |     something else                                            |
       +------------------- after a backoff ---------------------------+

Only ADMITTED workers are in the RoutingTable (healthy or not); PENDING and REJECTED ones never
see a request. Admission (services/router/admission.py) runs in its own task per worker, so a
slow or silent worker never holds up the probe round. A registered worker that is not renewed
expires; a departed worker's channel is closed after a grace period (calls in flight finish),
and its stub and load counter are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace

from services.common.errors import status_code
from services.common.security import BearerToken, open_channel
from services.common.server import CHANNEL_OPTIONS
from services.common.types import WorkerDescriptor
from services.pb.tessera.v1 import worker_pb2, worker_pb2_grpc
from services.router.admission import (
    Admission,
    Rejected,
    Unanswered,
    check_address,
    descriptor_from_info,
    dial_target,
    disagreements,
)
from services.router.faults import Blame, Fault
from services.router.routing import RoutingTable

log = logging.getLogger(__name__)
tracer = trace.get_tracer("tessera.router")

PROBE_TIMEOUT_S = 2.0
SLOW_PROBES_TO_FAIL = 3
RETIRE_GRACE_S = 30.0  # a departed worker's channel stays open this long after its last work
MAX_RETRY_S = 30.0  # the longest wait before a refused worker is checked again


class State(StrEnum):
    PENDING = "pending"  # known, not yet checked: takes no traffic
    ADMITTED = "admitted"  # checked: in the routing table
    REJECTED = "rejected"  # failed a check: takes no traffic, checked again after a backoff


@dataclass
class _Member:
    address: str
    static: bool
    owner: str = ""  # who registered it (a digest of the credential); "" for static ones
    claimed: WorkerDescriptor | None = None  # what its registration says
    descriptor: WorkerDescriptor | None = None  # what admission verified (ADMITTED only)
    state: State = State.PENDING
    expires: float = float("inf")  # registrations expire unless renewed
    healthy: bool = False
    failures: int = 0
    rejections: int = 0  # in a row: the backoff doubles with each
    retry_at: float = 0.0
    reason: str = ""
    checked_at: float = 0.0  # when a real request last went through admission's checks
    task: asyncio.Task[None] | None = None  # its admission or recheck in progress


class _Counts(dict[str, int]):
    """Counts per worker. A missing worker counts 0; counters never go negative and vanish at
    0, so work that outlives its worker's departure leaves nothing behind."""

    def __missing__(self, address: str) -> int:
        return 0

    def add(self, addresses: Iterable[str], delta: int) -> None:
        for address in addresses:
            value = self[address] + delta
            if value > 0:
                self[address] = value
            else:
                self.pop(address, None)


@dataclass(frozen=True)
class Holding:
    """What one generation engine holds on each worker of its chain."""

    addresses: tuple[str, ...]
    requests: int = 0  # generations it runs or queues (what routing balances)
    rows: int = 0  # rows in its batches on the workers
    tokens: int = 0  # KV token slots of its batches on the workers


class LoadBook:
    """The one ledger of outstanding work per worker, which routing and admission read.

    Stateless calls (coalesced Embed and Forward) are acquired and released per call; each
    generation engine sets its `Holding` whenever what it holds changes. `load` (what routing
    balances) is calls in flight plus generations; `rows` and `tokens` let chains that share a
    stage share its capacity and KV budget."""

    def __init__(self) -> None:
        self._load = _Counts()
        self._calls = _Counts()
        self._rows = _Counts()
        self._tokens = _Counts()
        self._holdings: dict[object, Holding] = {}

    @property
    def load(self) -> Mapping[str, int]:
        return self._load

    def acquire(self, addresses: Sequence[str]) -> None:
        """A stateless call to these workers starts."""
        self._calls.add(addresses, 1)
        self._load.add(addresses, 1)

    def release(self, addresses: Sequence[str]) -> None:
        self._calls.add(addresses, -1)
        self._load.add(addresses, -1)

    def calls(self, address: str) -> int:
        """Stateless calls in flight on the worker."""
        return self._calls[address]

    def hold(self, holder: object, holding: Holding) -> None:
        """What `holder` (a generation engine) holds now, replacing what it held before."""
        before = self._holdings.pop(holder, None)
        if before is not None:
            self._apply(before, -1)
        if holding.requests or holding.rows or holding.tokens:
            self._holdings[holder] = holding
            self._apply(holding, 1)

    def _apply(self, holding: Holding, sign: int) -> None:
        for address in holding.addresses:
            self._load.add([address], sign * holding.requests)
            self._rows.add([address], sign * holding.rows)
            self._tokens.add([address], sign * holding.tokens)

    def tokens(self, address: str) -> int:
        """KV token slots every holder has on the worker."""
        return self._tokens[address]

    def others(self, holder: object, address: str) -> tuple[int, int]:
        """(rows, tokens) that holders other than `holder` have on the worker."""
        own = self._holdings.get(holder)
        rows, tokens = self._rows[address], self._tokens[address]
        if own is not None and address in own.addresses:
            rows -= own.rows
            tokens -= own.tokens
        return rows, tokens


class WorkerPool:
    """Knows every worker (static or registered), admits them, probes their health, holds one
    channel each."""

    def __init__(
        self,
        static: list[str],
        *,
        admission: Admission,
        probe_interval_s: float = 1.0,
        ttl_s: float = 6.0,
        recheck_s: float = 60.0,
        retire_s: float = RETIRE_GRACE_S,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        call_token: Callable[[str], str] = lambda _: "",
    ) -> None:
        self.admission = admission
        self.probe_interval_s = probe_interval_s
        # The bearer token each worker requires of its callers (its own, or one shared).
        self._call_token = call_token
        self.ttl_s = ttl_s
        self.recheck_s = recheck_s
        self.retire_s = retire_s
        self._credentials = credentials
        self._options = [(k, v) for k, v in CHANNEL_OPTIONS if "message_length" not in k] + [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # A worker back from an outage is dialled again within seconds, not gRPC's 2 min.
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 5_000),
        ]
        try:
            self._members: dict[str, _Member] = {
                check_address(a): _Member(a, static=True) for a in static
            }
        except Exception as exc:
            raise ValueError(f"static workers: {exc}") from None
        self._channels: dict[str, aio.Channel] = {}
        self._stubs: dict[str, worker_pb2_grpc.WorkerStub] = {}
        self._retiring: dict[str, float] = {}  # address -> when its channel is closed
        self._closing: set[asyncio.Task[None]] = set()
        self.book = LoadBook()
        self.table = RoutingTable((), ())
        self._listeners: list[Callable[[RoutingTable], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    # -- channels ---------------------------------------------------------------------------

    def stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        stub = self._stubs.get(address)
        if stub is None:
            target = dial_target(address)
            token = self._call_token(address)
            interceptors = [BearerToken(token)] if token else []
            channel = open_channel(target, self._credentials, self._options, interceptors)
            self._channels[address] = channel
            stub = self._stubs[address] = worker_pb2_grpc.WorkerStub(channel)
        if address in self._members:
            self._retiring.pop(address, None)
        elif address not in self._retiring:
            # A call to a worker that already left (a generation finishing its steps).
            self._retiring[address] = time.monotonic() + self.retire_s
        return stub

    def _channel(self, address: str) -> aio.Channel:
        self.stub(address)
        return self._channels[address]

    def _drop_channel(self, address: str) -> None:
        """Closes the worker's channel (its calls end CANCELLED); the next call dials anew."""
        self._stubs.pop(address, None)
        self._retiring.pop(address, None)
        channel = self._channels.pop(address, None)
        if channel is not None:
            task = asyncio.get_running_loop().create_task(channel.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def has_channel(self, address: str) -> bool:
        return address in self._channels

    def _retire(self, address: str, grace_s: float) -> None:
        if address in self._channels:
            self._retiring[address] = time.monotonic() + grace_s

    async def _close_retired(self) -> None:
        now = time.monotonic()
        for address in [a for a, at in self._retiring.items() if at <= now]:
            if self.book.load.get(address, 0):
                # Generations still hold rows there (a drain finishing them) or calls are in
                # flight: the channel stays until retire_s after the last of them.
                self._retiring[address] = now + self.retire_s
                continue
            del self._retiring[address]
            self._stubs.pop(address, None)
            channel = self._channels.pop(address, None)
            if channel is not None:
                await channel.close()

    # -- membership -------------------------------------------------------------------------

    def on_change(self, listener: Callable[[RoutingTable], None]) -> None:
        self._listeners.append(listener)

    def state(self, address: str) -> State | None:
        member = self._members.get(address)
        return member.state if member is not None else None

    def owner(self, address: str) -> str | None:
        """Who registered `address` (None: not registered; static workers are not)."""
        member = self._members.get(address)
        return member.owner if member is not None and not member.static else None

    def claims(self) -> list[WorkerDescriptor]:
        """What every registered (not static) worker claims, admitted or not."""
        return [m.claimed for m in self._members.values() if m.claimed is not None]

    def register(self, claim: WorkerDescriptor, owner: str = "") -> None:
        """A registration or its renewal: a claim that admission checks before any traffic."""
        address = claim.address
        member = self._members.get(address)
        if member is None:
            self._members[address] = _Member(
                address,
                static=False,
                owner=owner,
                claimed=claim,
                expires=time.monotonic() + self.ttl_s,
            )
            log.info(
                "worker %s registered: %s %s layers %s; admitting it",
                address,
                claim.model,
                claim.version,
                claim.span,
            )
            self._changed.set()
            return
        if member.static:
            # A static worker announcing itself: only a sign of life.
            if member.state is State.ADMITTED and not member.healthy:
                self._changed.set()
            return
        member.expires = time.monotonic() + self.ttl_s
        if member.claimed is not None and disagreements(member.claimed, claim):
            log.info("worker %s re-registered as %s layers %s", address, claim.model, claim.span)
            member.claimed = claim
            self._reset(member)
            return
        member.claimed = claim
        if member.state is State.ADMITTED and not member.healthy:
            # A registration is a sign of life; the next probe confirms it.
            self._changed.set()

    def deregister(self, address: str) -> None:
        member = self._members.get(address)
        if member is None:
            return
        if member.static:
            if member.healthy:
                member.healthy = False
                self._publish()
        else:
            self._forget(address)
        log.info("worker %s left", address)

    @property
    def load(self) -> Mapping[str, int]:
        """Outstanding work per worker (the book's), which chain choice balances."""
        return self.book.load

    def apply_blame(self, fault: Fault) -> None:
        """The one consequence a fault has for the worker it came from (faults.py's table)."""
        if fault.reconnect:
            self._drop_channel(fault.address)
        if fault.blame is Blame.DOWN:
            self.mark_failed(fault.address, str(fault))
        elif fault.blame is Blame.DRAINING:
            self.mark_draining(fault.address)
        elif fault.blame is Blame.REJECT:
            self.reject(fault.address, fault.detail)

    def mark_failed(self, address: str, reason: str = "a call failed") -> None:
        """A call to this worker failed at the transport or got stuck: stop routing to it
        until a probe finds it serving."""
        member = self._members.get(address)
        if member is not None and member.healthy:
            member.healthy = False
            log.warning("worker %s marked unhealthy: %s", address, reason)
            self._publish()
            self._changed.set()

    def mark_draining(self, address: str) -> None:
        """The worker is draining: new work goes elsewhere; what it holds finishes there."""
        member = self._members.get(address)
        if member is not None and member.healthy:
            member.healthy = False
            log.info("worker %s is draining: no new work goes to it", address)
            self._publish()

    def reject(self, address: str, reason: str) -> None:
        """A worker answered what no honest worker would: out of every chain until admitted
        again (after a backoff)."""
        member = self._members.get(address)
        if member is not None and member.state is not State.REJECTED:
            self._refuse(member, reason)

    # -- state changes ----------------------------------------------------------------------

    def _reset(self, member: _Member) -> None:
        """Back to PENDING (its registration changed): out of the table, admitted afresh."""
        was_listed = member.descriptor is not None
        self._cancel(member)
        member.state, member.descriptor, member.healthy = State.PENDING, None, False
        member.rejections, member.retry_at = 0, 0.0
        if was_listed:
            self._publish()
        self._changed.set()

    def _refuse(self, member: _Member, reason: str) -> None:
        was_listed = member.descriptor is not None
        member.rejections += 1
        wait = min(MAX_RETRY_S, max(self.probe_interval_s, 0.5) * 2 ** (member.rejections - 1))
        first = member.state is not State.REJECTED or reason != member.reason
        member.state, member.descriptor, member.healthy = State.REJECTED, None, False
        member.retry_at, member.reason = time.monotonic() + wait, reason
        (log.warning if first else log.debug)(
            "worker %s %s: %s; checking it again in %.0f s",
            member.address,
            "dropped" if was_listed else "not admitted",
            reason,
            wait,
        )
        self._retire(member.address, self.retire_s if was_listed else 0.0)
        if was_listed:
            self._publish()

    def _admit(self, member: _Member, descriptor: WorkerDescriptor) -> None:
        member.state, member.descriptor = State.ADMITTED, descriptor
        member.healthy, member.failures, member.rejections = True, 0, 0
        member.checked_at, member.reason = time.monotonic(), ""
        log.info(
            "worker %s admitted: %s %s layers %s",
            member.address,
            descriptor.model,
            descriptor.version,
            descriptor.span,
        )
        self._publish()

    def _forget(self, address: str) -> None:
        member = self._members.pop(address, None)
        if member is None:
            return
        self._cancel(member)
        self._retire(address, self.retire_s)
        if member.descriptor is not None:
            self._publish()

    @staticmethod
    def _cancel(member: _Member) -> None:
        if member.task is not None:
            member.task.cancel()
            member.task = None

    def _publish(self) -> None:
        listed = [m for m in self._members.values() if m.state is State.ADMITTED and m.descriptor]
        workers = [m.descriptor for m in listed if m.descriptor is not None]
        self.table = RoutingTable(workers, [m.address for m in listed if m.healthy])
        for listener in self._listeners:
            listener(self.table)

    # -- admission --------------------------------------------------------------------------

    def _start(self, member: _Member, work: Callable[[_Member], Coroutine[Any, Any, None]]) -> None:
        task = asyncio.create_task(work(member))
        member.task = task

        def done(_: asyncio.Future[None]) -> None:
            if member.task is task:
                member.task = None

        task.add_done_callback(done)

    def _current(self, member: _Member) -> bool:
        return self._members.get(member.address) is member

    async def _check_new(self, member: _Member) -> None:
        claim = member.claimed
        address = member.address
        try:
            stub = self.stub(address)
            # One trace per admission: its Health, Info and probe Forward are children of it.
            with tracer.start_as_current_span("admission", attributes={"tessera.worker": address}):
                descriptor = await self.admission.verify(
                    address, self._channels[address], stub, claim
                )
        except Rejected as rejected:
            if self._current(member) and member.claimed == claim:
                self._refuse(member, str(rejected))
            return
        except Exception as exc:  # noqa: BLE001 - a bug here must not admit it or kill the pool
            log.exception("admitting worker %s failed", address)
            if self._current(member):
                self._refuse(member, f"its admission failed ({type(exc).__name__})")
            return
        if self._current(member) and member.claimed == claim and member.state is not State.ADMITTED:
            self._admit(member, descriptor)

    async def _recheck(self, member: _Member) -> None:
        descriptor = member.descriptor
        if descriptor is None:
            return
        try:
            with tracer.start_as_current_span(
                "admission.recheck", attributes={"tessera.worker": member.address}
            ):
                await self.admission.probe(descriptor, self.stub(member.address))
        except Unanswered:
            member.checked_at = time.monotonic()  # busy or down: health probes judge that
            return
        except Rejected as rejected:
            if self._current(member) and member.descriptor == descriptor:
                self._refuse(member, str(rejected))
            return
        member.checked_at = time.monotonic()

    # -- probing ----------------------------------------------------------------------------

    async def alive(self, address: str) -> bool:
        """Whether the worker answers a health check in time (serving or draining: a worker
        busy with long work still answers, since checks never wait for its model thread)."""
        try:
            await health_pb2_grpc.HealthStub(self._channel(address)).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=PROBE_TIMEOUT_S
            )
        except grpc.RpcError as error:
            code = status_code(error)
            return code not in (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.CANCELLED,
            )
        return True

    async def _probe(self, member: _Member) -> bool | None:
        """True: serving. False: down or not serving. None: no answer in time (a busy worker).
        A worker whose Info no longer matches what was admitted is dropped here."""
        stub = self.stub(member.address)
        channel = self._channels[member.address]
        try:
            check = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=PROBE_TIMEOUT_S
            )
            if check.status != health_pb2.HealthCheckResponse.SERVING:
                return False
            info = await stub.Info(worker_pb2.InfoRequest(), timeout=PROBE_TIMEOUT_S)
        except grpc.RpcError as error:
            code = status_code(error)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                self.reject(member.address, "it no longer answers Info (UNIMPLEMENTED)")
            return False
        admitted = member.descriptor
        if admitted is None or member.state is not State.ADMITTED:
            return False
        try:
            now = descriptor_from_info(info, member.address)
        except Rejected as rejected:
            self.reject(member.address, str(rejected))
            return False
        differ = disagreements(now, admitted)
        if differ:
            self.reject(member.address, "its Info changed since admission: " + "; ".join(differ))
            return False
        if now != admitted:  # capacity or KV budget: not identity, just news
            member.descriptor = now
        return True

    async def probe_all(self) -> None:
        now = time.monotonic()
        for address in [a for a, m in self._members.items() if m.expires < now]:
            log.info("worker %s expired (no heartbeat for %.0f s)", address, self.ttl_s)
            self._forget(address)
        await self._close_retired()
        for member in list(self._members.values()):
            if member.task is not None:
                continue
            if member.state is State.PENDING or (
                member.state is State.REJECTED and member.retry_at <= now
            ):
                self._start(member, self._check_new)
            elif (
                member.state is State.ADMITTED
                and member.healthy
                and self.recheck_s > 0
                and now - member.checked_at >= self.recheck_s
            ):
                self._start(member, self._recheck)
        members = [m for m in self._members.values() if m.state is State.ADMITTED]
        before = [(m.address, m.healthy, m.descriptor) for m in members]
        results = await asyncio.gather(*(self._probe(m) for m in members))
        for member, ok in zip(members, results):
            if member.state is not State.ADMITTED:
                continue  # dropped while probing
            if ok is None:
                # A slow answer is not a dead worker: only several in a row take it out.
                member.failures += 1
                if member.failures >= SLOW_PROBES_TO_FAIL:
                    member.healthy = False
            else:
                member.healthy = ok
                member.failures = 0 if ok else member.failures + 1
        after = [(m.address, m.healthy, m.descriptor) for m in members]
        if before != after:
            self._publish()

    async def _loop(self) -> None:
        while True:
            try:
                await self.probe_all()
            except Exception:  # noqa: BLE001 - the probe loop must outlive any one failure
                log.exception("health probe round failed")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=self.probe_interval_s)
            except TimeoutError:
                pass

    async def start(self) -> None:
        await self.probe_all()
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        tasks = [m.task for m in self._members.values() if m.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in self._channels.values():
            await channel.close()
