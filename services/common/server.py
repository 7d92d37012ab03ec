"""Building a grpc.aio server the same way for every service: interceptors, health, reflection."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.doors import OpenDoors
from services.common.errors import ErrorInterceptor
from services.common.metrics import ObserveInterceptor
from services.common.telemetry import ServerTracingInterceptor

# Long-lived HTTP/2 connections would pin a client to one server forever behind a balancer;
# keepalive pings stop meshes from cutting long generation streams.
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Connections are recycled every 5 minutes (calls in flight get 10 more minutes) so clients
    # re-resolve and spread over new pods instead of pinning to the first ones forever.
    ("grpc.max_connection_age_ms", 300_000),
    ("grpc.max_connection_age_grace_ms", 600_000),
]
# A health service that is SERVING while the process runs, draining included: what liveness
# probes ask, apart from readiness ("" and each service, NOT_SERVING while loading or draining).
LIVENESS = "tessera.liveness"
# Framing and the small fields of a text request (model name, options): a margin on top of the
# text itself when sizing the largest legal message.
MESSAGE_MARGIN_BYTES = 64 * 1024
# Hidden-state positions in the largest message a router sends a worker: an Embed segment of
# embed_segment_size (32) texts x 512 positions (BERT's limit) = 16,384; a prefill is at most
# max_prefill_tokens (8,192) or one prompt of max_prompt_tokens (4,096).
ROUTED_POSITIONS = 32 * 512
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def text_message_bytes(texts: int, chars: int) -> int:
    """The largest protobuf message carrying ``texts`` strings of ``chars`` characters each:
    4 UTF-8 bytes per character at worst, a tag and a length varint per string, and the margin.

    The router's largest legal request is an Embed of max_embed_inputs x max_input_chars: with
    the defaults 256 x (4 x 32,768 + 6) + 64 KiB = 32.1 MiB (8.4 MB if every character is
    ASCII). A prompt or a chat is at most max_input_chars per text and max_prompt_tokens in
    all, far below that.
    """
    return texts * (4 * chars + 6) + MESSAGE_MARGIN_BYTES


def hidden_message_bytes(positions: int, hidden_size: int) -> int:
    """The largest worker message: ``positions`` float32 hidden states of ``hidden_size``, with
    their int64 attention mask and ids, and the margin. SmolLM2 (576) at ROUTED_POSITIONS:
    16,384 x (576 x 4 + 16) + 64 KiB = 36.3 MiB; all-MiniLM-L6-v2 (384): 24.3 MiB."""
    return positions * (hidden_size * 4 + 16) + MESSAGE_MARGIN_BYTES


@dataclass
class Served:
    server: aio.Server
    health: health.aio.HealthServicer
    port: int
    names: set[str] = field(default_factory=set)  # health services whose status was set
    draining: bool = False

    async def set_status(self, service: str, serving: bool) -> None:
        if serving and self.draining and service != LIVENESS:
            return  # once draining, nothing is ready again
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.names.add(service)
        await self.health.set(service, status)

    async def drain(self) -> None:
        """NOT_SERVING for everything (readiness fails, callers go elsewhere) but LIVENESS:
        a draining process is alive, and a liveness probe must not restart it mid-drain."""
        self.draining = True
        for name in self.names - {LIVENESS}:
            await self.set_status(name, False)


async def serve(
    add_servicers: Iterable[Callable[[aio.Server], None]],
    service_names: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tracer_name: str = "tessera",
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[aio.ServerInterceptor] = (),
    known_models: Callable[[str], bool] | None = None,
    max_message_bytes: int = 64 * 1024 * 1024,
    max_concurrent_rpcs: int | None = None,
    max_concurrent_streams: int | None = None,
    doors: OpenDoors | None = None,
    longest_call_s: float = 0.0,
) -> Served:
    """Starts a server with tracing, metrics, access logs, error mapping, health (NOT_SERVING
    until told) and reflection. Port 0 picks a free port; the real one is in Served.port.

    `interceptors` (authentication) run inside error mapping and outside tracing and metrics,
    so a refused call is never counted, logged or traced. `known_models` says which requested
    model names may appear in metric labels and access lines; any other is `unknown` (with
    None, every name is).

    Transport limits, all enforced by gRPC itself before any handler runs: a message over
    `max_message_bytes` (either way) and a call beyond `max_concurrent_rpcs` in flight (every
    method, probes included) get RESOURCE_EXHAUSTED; `max_concurrent_streams` is HTTP/2's
    SETTINGS_MAX_CONCURRENT_STREAMS per connection (a gRPC client queues calls beyond it until
    a stream ends; an HTTP/2 peer that ignores it has its streams refused).

    `doors` budgets health and reflection calls from callers without an accepted token
    (services/common/doors.py); gRPC's own limit is then `max_concurrent_rpcs` plus that
    budget, so such callers never take an accepted caller's slot.

    `longest_call_s`: the longest a call may run (the router's request_timeout_s). A recycled
    connection's calls get at least that long (plus a minute) to finish, so recycling never
    cuts a call its deadline allows.
    """
    grace_ms = max(dict(SERVER_OPTIONS)["grpc.max_connection_age_grace_ms"], 0)
    grace_ms = max(grace_ms, int((longest_call_s + 60) * 1000) if longest_call_s else 0)
    options: list[tuple[str, int]] = [
        (k, v)
        for k, v in SERVER_OPTIONS
        if "message_length" not in k and k != "grpc.max_connection_age_grace_ms"
    ]
    options.append(("grpc.max_connection_age_grace_ms", grace_ms))
    options += [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    if max_concurrent_streams is not None:
        options.append(("grpc.max_concurrent_streams", max_concurrent_streams))
    server = aio.server(
        # grpc.aio runs interceptors in list order, the first outermost.
        interceptors=[
            ErrorInterceptor(),
            *([doors] if doors is not None else []),
            *interceptors,
            ServerTracingInterceptor(tracer_name),
            ObserveInterceptor(known_models),
        ],
        options=options,
        maximum_concurrent_rpcs=(
            max_concurrent_rpcs + doors.limits.slots
            if max_concurrent_rpcs is not None and doors is not None
            else max_concurrent_rpcs
        ),
    )
    for add in add_servicers:
        add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    address = f"{host}:{port}"
    bound = (
        server.add_secure_port(address, credentials)
        if credentials is not None
        else server.add_insecure_port(address)
    )
    if bound == 0:
        raise OSError(f"cannot bind {address}")
    await server.start()
    served = Served(server, health_servicer, bound)
    await served.set_status("", False)
    for name in service_names:
        await served.set_status(name, False)
    await served.set_status(LIVENESS, True)  # the process answers: alive, ready or not
    return served
