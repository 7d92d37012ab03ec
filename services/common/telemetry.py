"""OpenTelemetry set-up from the standard OTEL_* variables, and trace propagation over gRPC.

Propagation is just metadata: the client side injects the current context into the call's
metadata, the server side extracts it and opens its span as a child. Health and reflection
calls are not traced.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.common.errors import outcome
from services.common.interceptors import AroundInterceptor, Call

_UNTRACED_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def setup_tracing(service_name: str, environ: Mapping[str, str] | None = None) -> None:
    """Installs a tracer provider when OTEL_TRACES_EXPORTER asks for one (console, otlp, file).

    `file` is Tessera's own: JSON lines appended to TESSERA_TRACE_FILE (see
    services.tracing.fileexport), which `tessera trace FILE` renders as a waterfall.

    With no exporter configured, the API's no-op provider stays and tracing costs nothing.
    """
    env = os.environ if environ is None else environ
    exporter_names = [e.strip() for e in env.get("OTEL_TRACES_EXPORTER", "none").split(",")]
    exporter_names = [e for e in exporter_names if e and e != "none"]
    if not exporter_names:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    for name in exporter_names:
        if name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "file":
            from services.tracing.fileexport import JsonLinesSpanExporter

            path = env.get("TESSERA_TRACE_FILE", "")
            if not path:
                raise ValueError("OTEL_TRACES_EXPORTER=file needs TESSERA_TRACE_FILE=/path")
            provider.add_span_processor(BatchSpanProcessor(JsonLinesSpanExporter(path)))
        else:
            raise ValueError(
                f"OTEL_TRACES_EXPORTER={name!r} is not supported (console, otlp, file)"
            )
    trace.set_tracer_provider(provider)


def shutdown_tracing() -> None:
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if shutdown is not None:
        shutdown()


def outgoing_metadata(extra: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """Metadata carrying the current trace context, for a call to another service."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [*carrier.items(), *extra]


def _traced(method: str) -> bool:
    return not method.startswith(_UNTRACED_PREFIXES)


class ServerTracingInterceptor(AroundInterceptor):
    """Opens one server span per RPC, as a child of the caller's context from metadata."""

    def __init__(self, tracer_name: str) -> None:
        self._tracer_name = tracer_name

    def intercepts(self, method: str) -> bool:
        return _traced(method)

    @asynccontextmanager
    async def around(self, call: Call) -> AsyncIterator[None]:
        metadata = {k: v for k, v in call.metadata if isinstance(v, str)}
        tracer = trace.get_tracer(self._tracer_name)
        with tracer.start_as_current_span(
            call.method.lstrip("/"),
            context=propagate.extract(metadata),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.method": call.method},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            error: BaseException | None = None
            try:
                yield
            except BaseException as exc:
                error = exc
                raise
            finally:
                code, details = outcome(error, call.context, call.method)
                if code != grpc.StatusCode.OK:
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                    span.set_status(Status(StatusCode.ERROR, details))
