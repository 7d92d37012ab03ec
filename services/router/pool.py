"""Worker membership, channels, health probes and load counters; publishes RoutingTables."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.security import open_channel
from services.common.server import CHANNEL_OPTIONS
from services.common.types import ModelKind, Span, WorkerDescriptor
from services.pb.tessera.v1 import worker_pb2, worker_pb2_grpc
from services.router.routing import RoutingTable

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0
SLOW_PROBES_TO_FAIL = 3


def descriptor_from_info(info: worker_pb2.WorkerInfo, address: str) -> WorkerDescriptor:
    return WorkerDescriptor(
        address=address,
        model=info.model,
        version=info.version,
        fingerprint=info.fingerprint,
        span=Span(info.span.start, info.span.end),
        num_layers=info.num_layers,
        kind=ModelKind(info.kind),
        capacity=info.capacity,
        hidden_size=info.hidden_size,
        kv_token_budget=info.kv_token_budget,
        precision=info.precision or "float32",  # workers from before precisions are float32
    )


@dataclass
class _Member:
    address: str
    static: bool
    descriptor: WorkerDescriptor | None = None
    expires: float = float("inf")  # registrations expire unless renewed
    healthy: bool = False
    failures: int = 0


class WorkerPool:
    """Knows every worker (static or registered), probes their health, holds one channel each."""

    def __init__(
        self,
        static: list[str],
        *,
        probe_interval_s: float = 1.0,
        ttl_s: float = 6.0,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        interceptors: Sequence[aio.ClientInterceptor] = (),
    ) -> None:
        self.probe_interval_s = probe_interval_s
        # On every worker channel: e.g. security.BearerToken, the credential workers require.
        self._interceptors = list(interceptors)
        self.ttl_s = ttl_s
        self._credentials = credentials
        self._options = [(k, v) for k, v in CHANNEL_OPTIONS if "message_length" not in k] + [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._members: dict[str, _Member] = {a: _Member(a, static=True) for a in static}
        self._channels: dict[str, aio.Channel] = {}
        self._stubs: dict[str, worker_pb2_grpc.WorkerStub] = {}
        self.load: dict[str, int] = {}
        self.table = RoutingTable((), ())
        self._listeners: list[Callable[[RoutingTable], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    # -- channels ---------------------------------------------------------------------------

    def stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = open_channel(address, self._credentials, self._options, self._interceptors)
            self._channels[address] = channel
            stub = self._stubs[address] = worker_pb2_grpc.WorkerStub(channel)
        return stub

    # -- membership -------------------------------------------------------------------------

    def on_change(self, listener: Callable[[RoutingTable], None]) -> None:
        self._listeners.append(listener)

    def register(self, info: worker_pb2.WorkerInfo) -> None:
        address = info.address
        member = self._members.get(address)
        if member is None:
            member = self._members[address] = _Member(address, static=False)
            log.info(
                "worker %s joined: %s layers %d:%d",
                address,
                info.model,
                info.span.start,
                info.span.end,
            )
        descriptor = descriptor_from_info(info, address)
        if member.descriptor != descriptor:
            member.descriptor = descriptor
            self._publish()
        if not member.static:
            member.expires = time.monotonic() + self.ttl_s
        if not member.healthy:
            # A registration is a sign of life; the next probe confirms it.
            self._changed.set()

    def deregister(self, address: str) -> None:
        member = self._members.get(address)
        if member is None:
            return
        if member.static:
            member.healthy = False
        else:
            del self._members[address]
        log.info("worker %s left", address)
        self._publish()

    def mark_failed(self, address: str) -> None:
        """A call to this worker failed at the transport: stop routing to it until it answers."""
        member = self._members.get(address)
        if member is not None and member.healthy:
            member.healthy = False
            log.warning("worker %s marked unhealthy after a failed call", address)
            self._publish()
            self._changed.set()

    def _publish(self) -> None:
        workers = [m.descriptor for m in self._members.values() if m.descriptor is not None]
        healthy = [m.address for m in self._members.values() if m.healthy and m.descriptor]
        self.table = RoutingTable(workers, healthy)
        for listener in self._listeners:
            listener(self.table)

    # -- probing ----------------------------------------------------------------------------

    async def _probe(self, member: _Member) -> bool | None:
        """True: serving. False: down or not serving. None: no answer in time (a busy worker)."""
        stub = self.stub(member.address)
        channel = self._channels[member.address]
        try:
            check = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=PROBE_TIMEOUT_S
            )
            if check.status != health_pb2.HealthCheckResponse.SERVING:
                return False
            if member.descriptor is None or member.static:
                info = await stub.Info(worker_pb2.InfoRequest(), timeout=PROBE_TIMEOUT_S)
                member.descriptor = descriptor_from_info(info, member.address)
            return True
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return None
            return False

    async def probe_all(self) -> None:
        now = time.monotonic()
        for address in [a for a, m in self._members.items() if m.expires < now]:
            log.info("worker %s expired (no heartbeat for %.0f s)", address, self.ttl_s)
            del self._members[address]
        members = list(self._members.values())
        before = [(m.address, m.healthy, m.descriptor) for m in members]
        results = await asyncio.gather(*(self._probe(m) for m in members))
        for member, ok in zip(members, results):
            if ok is None:
                # A slow answer is not a dead worker: only several in a row take it out.
                member.failures += 1
                if member.failures >= SLOW_PROBES_TO_FAIL:
                    member.healthy = False
            else:
                member.healthy = ok
                member.failures = 0 if ok else member.failures + 1
        after = [(m.address, m.healthy, m.descriptor) for m in members]
        if before != after or len(members) != len(self.table.workers):
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
        for channel in self._channels.values():
            await channel.close()
