"""The interceptor stack of `serve()` on a tiny real server: errors outermost, then auth, then
tracing and metrics; bounded, known-only model labels; error mapping on every handler kind.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc import aio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from services.common.errors import NotFound
from services.common.security import AuthInterceptor, TokenSet
from services.common.server import serve
from services.pb.tessera.v1.inference_pb2 import GenerateRequest

pytestmark = pytest.mark.timeout(120)

SERVICE = "tessera.test.Echo"
TOKEN = "s3cret-interceptor-token"
KNOWN = "known-model"
LEAK = "do-not-leak-this-text"
# Field 1 (model, a string) holding invalid UTF-8: protobuf refuses to decode it.
UNDECODABLE = b"\x0a\x02\xff\xfe"
KINDS = ("Unary", "ServerStream", "ClientStream", "Bidi")


async def _answer(request: GenerateRequest, context: aio.ServicerContext) -> GenerateRequest:
    if request.prompt == "not-found":
        raise NotFound(f"no such thing as {request.model}")
    if request.prompt == "boom":
        raise RuntimeError(LEAK)
    if request.prompt == "abort":
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "aborted by the servicer")
    return request


async def unary(request: GenerateRequest, context: aio.ServicerContext) -> GenerateRequest:
    return await _answer(request, context)


async def server_stream(
    request: GenerateRequest, context: aio.ServicerContext
) -> AsyncIterator[GenerateRequest]:
    yield GenerateRequest(model=request.model, prompt="first")
    yield await _answer(request, context)


async def client_stream(
    requests: AsyncIterator[GenerateRequest], context: aio.ServicerContext
) -> GenerateRequest:
    last = GenerateRequest()
    async for request in requests:
        last = await _answer(request, context)
    return last


async def bidi(
    requests: AsyncIterator[GenerateRequest], context: aio.ServicerContext
) -> AsyncIterator[GenerateRequest]:
    async for request in requests:
        yield await _answer(request, context)


def _add_echo(server: aio.Server) -> None:
    kw: dict[str, Any] = {
        "request_deserializer": GenerateRequest.FromString,
        "response_serializer": GenerateRequest.SerializeToString,
    }
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, **kw),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, **kw),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream, **kw),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi, **kw),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


Call = Callable[[aio.Channel], Awaitable[Any]]


def _call(kind: str, payload: bytes, metadata: tuple[tuple[str, str], ...] = ()) -> Call:
    """One call of `kind` sending `payload` (raw bytes), returning the raw responses."""
    method = f"/{SERVICE}/{kind}"

    async def call(channel: aio.Channel) -> Any:
        md = aio.Metadata(*metadata)
        if kind == "Unary":
            return await channel.unary_unary(method)(payload, metadata=md, timeout=10)
        if kind == "ServerStream":
            return [r async for r in channel.unary_stream(method)(payload, metadata=md, timeout=10)]
        if kind == "ClientStream":
            return await channel.stream_unary(method)(iter([payload]), metadata=md, timeout=10)
        responses = channel.stream_stream(method)(iter([payload]), metadata=md, timeout=10)
        return [r async for r in responses]

    return call


def _request(model: str, prompt: str = "ok") -> bytes:
    return bytes(GenerateRequest(model=model, prompt=prompt).SerializeToString())


AUTH = (("authorization", f"Bearer {TOKEN}"),)


async def _run(*calls: Call) -> list[Any]:
    """Serves the echo service (token-protected) and makes `calls` in order: each result is the
    reply, or the AioRpcError it raised."""
    served = await serve(
        [_add_echo],
        [SERVICE],
        tracer_name="tessera.test",
        interceptors=[AuthInterceptor(TokenSet([TOKEN]), [f"/{SERVICE}/"])],
        known_models=lambda m: m == KNOWN,
    )
    results: list[Any] = []
    try:
        async with aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
            for call in calls:
                try:
                    results.append(await call(channel))
                except aio.AioRpcError as exc:
                    results.append(exc)
    finally:
        await served.server.stop(grace=None)
    return results


def _samples(name: str = "tessera_requests_total") -> list[tuple[dict[str, str], float]]:
    return [
        (dict(s.labels), s.value)
        for family in REGISTRY.collect()
        for s in family.samples
        if s.name == name
    ]


def _count(**labels: str) -> float:
    return sum(
        value
        for got, value in _samples()
        if got.get("service") == SERVICE and all(got.get(k) == v for k, v in labels.items())
    )


def _all_label_values() -> set[str]:
    return {
        value
        for family in REGISTRY.collect()
        if family.name.startswith("tessera_")
        for sample in family.samples
        for value in sample.labels.values()
    }


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """An in-memory exporter on the process's SDK tracer provider (installed once per process)."""
    exporter = InMemorySpanExporter()
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        pytest.skip("another non-SDK tracer provider is installed in this process")
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        dict(getattr(r, "fields", {}))
        for r in caplog.records
        if r.name == "tessera.access" and r.levelno >= logging.INFO
    ]


def test_refused_calls_leave_no_metric_log_or_span(
    caplog: pytest.LogCaptureFixture, spans: InMemorySpanExporter
) -> None:
    unique = f"attacker-{uuid.uuid4().hex}"
    before = _count()
    spans.clear()
    with caplog.at_level(logging.DEBUG):
        results = asyncio.run(
            _run(
                *(_call(kind, _request(unique)) for kind in KINDS),
                *(
                    _call(kind, _request(unique), (("authorization", "Bearer wrong"),))
                    for kind in KINDS
                ),
                _call("NoSuchMethod", _request(unique)),
            )
        )
    for result in results[:4]:
        assert isinstance(result, aio.AioRpcError)
        assert result.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "missing bearer token" in (result.details() or "")
    for result in results[4:8]:
        assert isinstance(result, aio.AioRpcError)
        assert result.code() == grpc.StatusCode.UNAUTHENTICATED
        assert result.details() == "invalid bearer token"
    # A protected method that does not exist is refused the same way, not UNIMPLEMENTED.
    assert results[8].code() == grpc.StatusCode.UNAUTHENTICATED
    assert _count() == before
    assert not [v for v in _all_label_values() if unique in v]
    assert not [r for r in caplog.records if r.name == "tessera.access"]
    assert unique not in caplog.text
    assert not [s for s in spans.get_finished_spans() if SERVICE in s.name]


def test_model_labels_are_known_names_or_unknown(
    caplog: pytest.LogCaptureFixture, spans: InMemorySpanExporter
) -> None:
    unique = f"stranger-{uuid.uuid4().hex}"
    huge = "m" * 20_000
    before_known = _count(rpc="Unary", model=KNOWN, code="OK")
    before_unknown = _count(rpc="Unary", model="unknown", code="OK")
    spans.clear()
    with caplog.at_level(logging.INFO):
        results = asyncio.run(
            _run(
                _call("Unary", _request(KNOWN), AUTH),
                _call("Unary", _request(unique), AUTH),
                _call("Unary", _request(huge), AUTH),
                _call("Unary", _request("../" + KNOWN), AUTH),
                _call("ServerStream", _request(huge), AUTH),
                _call("NoSuchMethod", _request(KNOWN), AUTH),
            )
        )
    assert not any(isinstance(r, Exception) for r in results[:5]), results
    assert results[5].code() == grpc.StatusCode.UNIMPLEMENTED
    assert _count(rpc="Unary", model=KNOWN, code="OK") == before_known + 1
    assert _count(rpc="Unary", model="unknown", code="OK") == before_unknown + 3
    values = _all_label_values()
    assert not [v for v in values if unique in v or "m" * 65 in v]
    assert all(len(v) <= 64 for v in values)
    lines = [line for line in _access_lines(caplog) if str(line["rpc"]).startswith(f"/{SERVICE}/")]
    assert [line["model"] for line in lines] == [KNOWN, "unknown", "unknown", "unknown", "unknown"]
    assert unique not in caplog.text and "m" * 65 not in caplog.text
    for line in lines:
        assert all(len(str(v)) <= 64 for v in line.values()), line
        assert line["code"] == "OK" and line["trace_id"] is not None
    # Authorised calls are traced.
    assert len([s for s in spans.get_finished_spans() if SERVICE in s.name]) == 5


@pytest.mark.parametrize("kind", KINDS)
def test_errors_are_mapped_on_every_handler_kind(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    before = {code: _count(rpc=kind, code=code) for code in ("NOT_FOUND", "INTERNAL")}
    with caplog.at_level(logging.INFO):
        not_found, boom, aborted, undecodable, truncated, fine = asyncio.run(
            _run(
                _call(kind, _request(KNOWN, "not-found"), AUTH),
                _call(kind, _request(KNOWN, "boom"), AUTH),
                _call(kind, _request(KNOWN, "abort"), AUTH),
                _call(kind, UNDECODABLE, AUTH),
                _call(kind, b"\x0a\x05ab", AUTH),  # a length running past the end
                _call(kind, _request(KNOWN), AUTH),
            )
        )
    assert not_found.code() == grpc.StatusCode.NOT_FOUND
    assert not_found.details() == f"no such thing as {KNOWN}"
    assert boom.code() == grpc.StatusCode.INTERNAL
    assert boom.details() == f"internal error in /{SERVICE}/{kind}; see server logs"
    assert LEAK not in (boom.debug_error_string() or "")
    assert aborted.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert aborted.details() == "aborted by the servicer"
    for bad in (undecodable, truncated):
        assert isinstance(bad, aio.AioRpcError)
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert "not a valid protobuf message" in (bad.details() or "")
    assert not isinstance(fine, Exception)
    # The unexpected error's traceback is in the server log, not in what the client got.
    logged = [r for r in caplog.records if r.name == "services.common.errors"]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert LEAK in caplog.text and "Traceback" not in (boom.details() or "")
    # Metrics count what the client saw, though they run inside the error mapping.
    assert _count(rpc=kind, code="NOT_FOUND") == before["NOT_FOUND"] + 1
    assert _count(rpc=kind, code="INTERNAL") == before["INTERNAL"] + 1
    codes = [line["code"] for line in _access_lines(caplog) if line["rpc"] == f"/{SERVICE}/{kind}"]
    expected = ["NOT_FOUND", "INTERNAL", "FAILED_PRECONDITION"]
    # An undecodable unary request is refused before metrics see it; in a client stream it is
    # found when the servicer reads it, and counted like any error the servicer raises.
    if kind in ("ClientStream", "Bidi"):
        expected += ["INVALID_ARGUMENT", "INVALID_ARGUMENT"]
    assert codes == [*expected, "OK"]


def test_health_watch_streams_through_the_interceptors() -> None:
    """grpc's health Watch writes with context.write (no async generator): it must still work."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def main() -> list[int]:
        served = await serve([], [], port=0)
        try:
            await served.set_status("", False)
            async with aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
                call = health_pb2_grpc.HealthStub(channel).Watch(
                    health_pb2.HealthCheckRequest(service=""), timeout=5
                )
                seen = [(await call.read()).status]
                await served.set_status("", True)
                seen.append((await call.read()).status)
                call.cancel()
                return seen
        finally:
            await served.server.stop(0)

    status = health_pb2.HealthCheckResponse
    assert asyncio.run(main()) == [status.NOT_SERVING, status.SERVING]


def test_a_draining_server_is_not_ready_but_stays_alive() -> None:
    """Readiness ("" and each service) goes NOT_SERVING for good on drain; the liveness service
    stays SERVING, so a liveness probe never restarts a process that is finishing its work."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.common.server import LIVENESS

    async def main() -> dict[str, int]:
        served = await serve([], ["tessera.v1.Example"], port=0)
        try:
            for name in ("", "tessera.v1.Example", "some-model"):
                await served.set_status(name, True)
            await served.drain()
            await served.set_status("some-model", True)  # a late update does not revive it
            async with aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                return {
                    name: (
                        await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                    ).status
                    for name in ("", "tessera.v1.Example", "some-model", LIVENESS)
                }
        finally:
            await served.server.stop(0)

    status = health_pb2.HealthCheckResponse
    assert asyncio.run(main()) == {
        "": status.NOT_SERVING,
        "tessera.v1.Example": status.NOT_SERVING,
        "some-model": status.NOT_SERVING,
        LIVENESS: status.SERVING,
    }
