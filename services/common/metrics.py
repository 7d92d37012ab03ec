"""Prometheus metrics for every service, and the interceptor that records requests.

Names follow Prometheus conventions: snake_case, a `tessera_` prefix, base units (seconds,
bytes) in the name, `_total` on counters.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from services.common.errors import outcome
from services.common.interceptors import AroundInterceptor, Call

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
# Where a generation step's time goes (services.bench.generation splits it with these): on the
# worker, waiting for the model thread (queue) and running on it (compute); on the router, the
# whole call to one stage (compute + queue + transport + (de)serialisation on both ends).
STEP_SECONDS = Histogram(
    "tessera_worker_step_seconds",
    "a generation step on a worker, by phase: queue (for the model thread) or compute",
    ["model", "span", "kind", "phase"],
    buckets=_LATENCY_BUCKETS,
)
STAGE_CALL_SECONDS = Histogram(
    "tessera_router_stage_call_seconds",
    "a generation step's call to one stage, as the router saw it",
    ["worker", "kind"],
    buckets=_LATENCY_BUCKETS,
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
# What an autoscaler or an inference gateway reads (the Gateway API Inference Extension's
# model-server protocol): per model on the router, per worker on the workers. The vllm:* names
# are the ones that protocol's endpoint picker reads by default.
MODEL_QUEUED = Gauge("tessera_model_queued_requests", "generations waiting", ["model"])
MODEL_RUNNING = Gauge("tessera_model_running_requests", "generations running", ["model"])
MODEL_KV = Gauge("tessera_model_kv_utilization", "KV budget held, fullest worker (0-1)", ["model"])
WORKER_KV = Gauge("tessera_worker_kv_utilization", "KV budget held (0-1)", ["model", "span"])
VLLM_WAITING = Gauge("vllm:num_requests_waiting", "requests waiting", ["model_name"])
VLLM_RUNNING = Gauge("vllm:num_requests_running", "requests running", ["model_name"])
VLLM_KV = Gauge("vllm:kv_cache_usage_perc", "KV cache usage (0-1)", ["model_name"])
CACHE_REQUESTS = Counter(
    "tessera_cache_requests_total", "cache lookups by tier and result", ["tier", "result"]
)
# Per model version (labels only from admitted workers): a new version starts cold.
VERSION_CACHE = Counter(
    "tessera_version_cache_lookups_total",
    "cache lookups per model version: hit or miss",
    ["model", "version", "result"],
)

_UNOBSERVED = ("/grpc.health.v1.", "/grpc.reflection.")
access_log = logging.getLogger("tessera.access")

MAX_LABEL_CHARS = 64  # longest label value or access-log field taken from a request
UNKNOWN_MODEL = "unknown"  # the label of any model name the service does not know
# A model name is a repository folder name (see services.router.frontends): checked before the
# service's predicate sees it, so a predicate may look the name up on disk safely.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def start_metrics_server(port: int, host: str = "0.0.0.0") -> int:
    """Serves /metrics over HTTP; returns the bound port (port 0 picks one)."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)


def _bounded(value: str) -> str:
    return value[:MAX_LABEL_CHARS]


def _split(method: str) -> tuple[str, str]:
    service, _, rpc = method.lstrip("/").rpartition("/")
    return _bounded(service), _bounded(rpc)


def model_label(model: str, known: Callable[[str], bool] | None) -> str:
    """The label for a requested model name: the name itself only when `known` says the service
    knows it, `unknown` otherwise; "" for a request without one. Each distinct label value is a
    time series kept forever, so a client must not be able to make new ones."""
    if not model:
        return ""
    if known is None or not _MODEL_NAME.fullmatch(model) or not known(model):
        return UNKNOWN_MODEL
    return _bounded(model)


class ObserveInterceptor(AroundInterceptor):
    """Counts and times every RPC by service, rpc, model and code, and writes its access line.

    `known_models` says which model names may become label values (see `model_label`).
    """

    def __init__(self, known_models: Callable[[str], bool] | None = None) -> None:
        self._known = known_models

    def intercepts(self, method: str) -> bool:
        return not method.startswith(_UNOBSERVED)

    @asynccontextmanager
    async def around(self, call: Call) -> AsyncIterator[None]:
        service, rpc = _split(call.method)
        requested = getattr(call.request, "model", "") if call.request is not None else ""
        model = model_label(requested if isinstance(requested, str) else "", self._known)
        # Read now: once a call is cancelled, context methods that reach into the C call
        # (peer(), time_remaining()) may touch freed memory; only plain attributes are read later.
        peer = _bounded(call.context.peer() or "")
        IN_FLIGHT.labels(service).inc()
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            elapsed = time.perf_counter() - started
            code = outcome(error, call.context, call.method)[0].name
            REQUESTS.labels(service, rpc, model, code).inc()
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
                        "rpc": _bounded(call.method),
                        "model": model,
                        "code": code,
                        "duration_ms": round(elapsed * 1e3, 3),
                        "trace_id": format(span_context.trace_id, "032x")
                        if span_context.is_valid
                        else None,
                        "peer": peer,
                    }
                },
            )
