"""OpenTelemetry set-up from the standard OTEL_* variables, and trace propagation over gRPC.

Propagation is just metadata: the client side injects the current context into the call's
metadata, the server side extracts it and opens its span as a child. Health and reflection
calls are not traced.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc
from grpc import aio
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

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


class ServerTracingInterceptor(aio.ServerInterceptor):
    """Opens one server span per RPC, as a child of the caller's context from metadata."""

    def __init__(self, tracer_name: str) -> None:
        self._tracer_name = tracer_name

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not _traced(method):
            return handler
        tracer_name = self._tracer_name
        metadata = {
            k: v for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)
        }

        def start_span() -> Any:
            parent = propagate.extract(metadata)
            tracer = trace.get_tracer(tracer_name)
            return tracer.start_as_current_span(
                method.lstrip("/"),
                context=parent,
                kind=SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.method": method},
                record_exception=False,
                set_status_on_exception=False,
            )

        def mark(span: trace.Span, context: aio.ServicerContext) -> None:
            code = context.code()  # a plain attribute: safe after cancellation
            if code is not None and code != grpc.StatusCode.OK:
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                span.set_status(Status(StatusCode.ERROR, str(context.details() or "")))

        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: aio.ServicerContext) -> Any:
                with start_span() as span:
                    try:
                        return await inner_uu(request, context)
                    finally:
                        mark(span, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: aio.ServicerContext) -> Any:
                with start_span() as span:
                    try:
                        async for item in inner_us(request, context):
                            yield item
                    finally:
                        mark(span, context)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_stream:
            inner_ss = handler.stream_stream

            async def stream_stream(request_iterator: Any, context: aio.ServicerContext) -> Any:
                with start_span() as span:
                    try:
                        async for item in inner_ss(request_iterator, context):
                            yield item
                    finally:
                        mark(span, context)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


def current_context() -> otel_context.Context:
    return otel_context.get_current()
