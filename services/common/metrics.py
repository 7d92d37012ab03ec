"""Prometheus metrics for every service, and the interceptor that records requests.

Names follow Prometheus conventions: snake_case, a `tessera_` prefix, base units (seconds,
bytes) in the name, `_total` on counters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio
from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

REQUESTS = Counter(
    "tessera_requests_total", "RPCs handled, by outcome", ["service", "rpc", "model", "code"]
)
REQUEST_SECONDS = Histogram(
    "tessera_request_duration_seconds",
    "RPC latency",
    ["service", "rpc", "model"],
    buckets=_LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge("tessera_requests_in_flight", "RPCs being handled", ["service"])
QUEUE_DEPTH = Gauge(
    "tessera_worker_queue_depth", "work items waiting for the model thread", ["model", "span"]
)
BATCH_ROWS = Histogram(
    "tessera_worker_batch_rows",
    "rows per forward pass",
    ["model", "span", "kind"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
LIVE_SESSIONS = Gauge("tessera_worker_live_sessions", "generation sessions held", ["model", "span"])
KV_CACHE_BYTES = Gauge("tessera_worker_kv_cache_bytes", "bytes of KV cache held", ["model", "span"])
GENERATED_TOKENS = Counter("tessera_generated_tokens_total", "tokens generated", ["model"])
TIME_TO_FIRST_TOKEN = Histogram(
    "tessera_time_to_first_token_seconds",
    "request start to first token",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
INTER_TOKEN_SECONDS = Histogram(
    "tessera_inter_token_latency_seconds",
    "time between consecutive tokens",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
CACHE_REQUESTS = Counter(
    "tessera_cache_requests_total", "cache lookups by tier and result", ["tier", "result"]
)

_UNOBSERVED = ("/grpc.health.v1.", "/grpc.reflection.")
access_log = logging.getLogger("tessera.access")


def start_metrics_server(port: int, host: str = "0.0.0.0") -> int:
    """Serves /metrics over HTTP; returns the bound port (port 0 picks one)."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)


def _split(method: str) -> tuple[str, str]:
    service, _, rpc = method.lstrip("/").rpartition("/")
    return service, rpc


class ObserveInterceptor(aio.ServerInterceptor):
    """Counts and times every RPC and writes one access-log line per request (no payloads)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_UNOBSERVED):
            return handler
        service, rpc = _split(method)

        def finish(
            model: str,
            started: float,
            context: aio.ServicerContext,
            peer: str,
            error: BaseException | None,
        ) -> None:
            # Only plain attributes of the context are read here: once a call is cancelled,
            # methods that reach into the C call (peer(), time_remaining()) may touch freed memory.
            if isinstance(error, asyncio.CancelledError):
                code = grpc.StatusCode.CANCELLED
            else:
                code = context.code()
            if code is None:
                code = grpc.StatusCode.CANCELLED if error is not None else grpc.StatusCode.OK
            if (
                isinstance(error, Exception)
                and not isinstance(error, aio.AbortError)
                and code == grpc.StatusCode.OK
            ):
                code = grpc.StatusCode.INTERNAL
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            elapsed = time.perf_counter() - started
            REQUESTS.labels(service, rpc, model, name).inc()
            REQUEST_SECONDS.labels(service, rpc, model).observe(elapsed)
            IN_FLIGHT.labels(service).dec()
            span_context = trace.get_current_span().get_span_context()
            # Heartbeats every few seconds would drown the request lines.
            level = logging.DEBUG if service == "tessera.v1.Registry" else logging.INFO
            access_log.log(
                level,
                "request",
                extra={
                    "fields": {
                        "rpc": method,
                        "model": model,
                        "code": name,
                        "duration_ms": round(elapsed * 1e3, 3),
                        "trace_id": format(span_context.trace_id, "032x")
                        if span_context.is_valid
                        else None,
                        "peer": peer,
                    }
                },
            )

        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: aio.ServicerContext) -> Any:
                IN_FLIGHT.labels(service).inc()
                started = time.perf_counter()
                peer = context.peer()
                error: BaseException | None = None
                try:
                    return await inner_uu(request, context)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    finish(str(getattr(request, "model", "")), started, context, peer, error)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: aio.ServicerContext) -> Any:
                IN_FLIGHT.labels(service).inc()
                started = time.perf_counter()
                peer = context.peer()
                error: BaseException | None = None
                try:
                    async for item in inner_us(request, context):
                        yield item
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    finish(str(getattr(request, "model", "")), started, context, peer, error)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_stream:
            inner_ss = handler.stream_stream

            async def stream_stream(request_iterator: Any, context: aio.ServicerContext) -> Any:
                IN_FLIGHT.labels(service).inc()
                started = time.perf_counter()
                peer = context.peer()
                error: BaseException | None = None
                try:
                    async for item in inner_ss(request_iterator, context):
                        yield item
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    finish("", started, context, peer, error)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler
