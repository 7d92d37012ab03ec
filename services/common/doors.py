"""Open doors that cannot be held shut: health and reflection stay open for probes, but callers
without an accepted token draw on a small budget of their own.

gRPC's `maximum_concurrent_rpcs` counts every call alike, so a client with no token could hold
every slot with health Watch streams and starve authenticated calls, Kubernetes probes and the
router's own probes of its workers. Here a call to an open door (grpc.health.v1, reflection)
that presents no accepted token is counted against `open_max_calls` (unary and reflection) or
`open_max_watches` (Watch streams, also capped per peer address), and its request body is held
to `open_max_body_bytes`; past a budget it is refused at once (RESOURCE_EXHAUSTED). The server
sizes gRPC's own limit as the authenticated budget plus these, so tokenless callers can never
take an authenticated call's slot. Callers with an accepted token are not counted here.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from grpc import aio

from services.common.errors import InvalidArgument
from services.common.interceptors import AroundInterceptor, Call, Deserializer
from services.common.security import bearer_token
from services.common.settings import ServerSettings

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
WATCH = "/grpc.health.v1.Health/Watch"


@dataclass(frozen=True)
class DoorLimits:
    """The budget of callers without an accepted token (ServerSettings declares them)."""

    max_calls: int
    max_watches: int
    max_watches_per_peer: int
    max_body_bytes: int

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> DoorLimits:
        return cls(
            max_calls=settings.open_max_calls,
            max_watches=settings.open_max_watches,
            max_watches_per_peer=settings.open_max_watches_per_peer,
            max_body_bytes=settings.open_max_body_bytes,
        )

    @property
    def slots(self) -> int:
        """gRPC call slots these callers can hold at most."""
        return self.max_calls + self.max_watches


def _peer_host(peer: str) -> str:
    """ipv4:1.2.3.4:5678 -> ipv4:1.2.3.4 (every connection of one host is one peer)."""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


class OpenDoors(AroundInterceptor):
    """Budgets the open doors' calls from callers without an accepted token."""

    def __init__(self, limits: DoorLimits, trusted: Callable[[str], bool]) -> None:
        self.limits = limits
        self._trusted = trusted
        self.calls = 0
        self.watches = 0
        self._per_peer: collections.Counter[str] = collections.Counter()

    def intercepts(self, method: str) -> bool:
        return method.startswith(OPEN_PREFIXES)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if self.intercepts(handler_call_details.method):
            _, token = bearer_token(tuple(handler_call_details.invocation_metadata or ()))
            if token and self._trusted(token):
                return await continuation(handler_call_details)
        return await super().intercept_service(continuation, handler_call_details)

    def request_deserializer(self, deserializer: Deserializer | None) -> Deserializer | None:
        if deserializer is None:
            return None
        limit = self.limits.max_body_bytes

        def bounded(data: bytes) -> object:
            if len(data) > limit:
                raise InvalidArgument(
                    f"a request without a token is over {limit} bytes (open_max_body_bytes)"
                )
            return deserializer(data)

        return bounded

    @asynccontextmanager
    async def around(self, call: Call) -> AsyncIterator[None]:
        limits = self.limits
        if call.method == WATCH:
            peer = _peer_host(call.context.peer() or "")
            if self.watches >= limits.max_watches or (
                self._per_peer[peer] >= limits.max_watches_per_peer
            ):
                await call.context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "too many health Watch streams without a token (open_max_watches, "
                    "open_max_watches_per_peer); send a token or use Check",
                )
            self.watches += 1
            self._per_peer[peer] += 1
            try:
                yield
            finally:
                self.watches -= 1
                self._per_peer[peer] -= 1
                if self._per_peer[peer] <= 0:
                    del self._per_peer[peer]
            return
        if self.calls >= limits.max_calls:
            await call.context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "too many calls without a token in flight (open_max_calls)",
            )
        self.calls += 1
        try:
            yield
        finally:
            self.calls -= 1


class BodyLimits(aio.ServerInterceptor):
    """Per-method caps on a request's encoded size, checked before it is parsed: the message
    limit is sized for the largest legal request of any method (an Embed), and parsing a
    12 MB chat of a million messages would hold the event loop for seconds before any check
    could refuse it. Over its cap a request is INVALID_ARGUMENT, naming the settings."""

    def __init__(self, limits: dict[str, tuple[int, str]]) -> None:
        self._limits = limits  # method -> (bytes, the settings that size it)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        limit = self._limits.get(handler_call_details.method)
        if handler is None or limit is None or handler.request_streaming:
            return handler
        size, settings = limit
        deserializer = handler.request_deserializer

        def bounded(data: bytes) -> object:
            if len(data) > size:
                raise InvalidArgument(f"the request is {len(data)} bytes, over {size} ({settings})")
            return deserializer(data) if deserializer is not None else data

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                handler.unary_unary, bounded, handler.response_serializer
            )
        return grpc.unary_stream_rpc_method_handler(
            handler.unary_stream, bounded, handler.response_serializer
        )
