"""One client request is one trace: router -> cache -> each stage, parented across servers.

A generation's prefill runs in its request's trace; its decode steps serve every row of a
batch at once, so they form one trace per running batch, linked from each request's trace.

Everything runs in one event loop in this process (real gRPC servers on 127.0.0.1:0, real
sockets, a real memcached), exporting to an InMemorySpanExporter. The trace context still has
to cross each hop through gRPC metadata: every server handler runs in its own task and starts
from an empty context, so only what the caller injected can parent its spans.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.cache.launcher import MemcachedNode
from services.common.settings import RouterSettings, WorkerSettings
from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc
from services.router.main import run_router
from services.worker.main import run_worker

START_TIMEOUT_S = 120.0
GENERATE = "tessera.v1.Inference/Generate"
EMBED = "tessera.v1.Inference/Embed"
PREFILL = "tessera.v1.Worker/Prefill"
DECODE = "tessera.v1.Worker/Decode"
FORWARD = "tessera.v1.Worker/Forward"
# Background RPCs (worker heartbeats, probes) are their own traces, not part of a request.
BACKGROUND = ("tessera.v1.Registry/", "tessera.v1.Worker/Info")


def _install_exporter() -> InMemorySpanExporter:
    """Adds an in-memory exporter to the process's SDK provider (set once per process)."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())  # a no-op with a warning if already set
        provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        pytest.skip("another non-SDK tracer provider is installed in this process")
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = _install_exporter()
    yield exporter
    exporter.clear()
    exporter.shutdown()  # later spans in this process are dropped, not kept in memory


# -- the in-process mesh ---------------------------------------------------------------------


@dataclass
class _Service:
    name: str
    task: asyncio.Task[int]
    stop: asyncio.Event


@contextlib.asynccontextmanager
async def _mesh(repository: Path, cache_address: str) -> AsyncIterator[tuple[str, list[_Service]]]:
    """A router, tiny-llama as stages 0:2 and 2:4, and a tiny-bert replica, all in this loop."""
    services: list[_Service] = []

    async def start(name: str, coro_factory, ready: asyncio.Event, stop: asyncio.Event) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.create_task(coro_factory(), name=name)
        services.append(_Service(name, task, stop))
        waiter = asyncio.create_task(ready.wait())
        done, _ = await asyncio.wait(
            {task, waiter}, timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        if waiter not in done:
            waiter.cancel()
            if task.done():
                task.result()  # raises what the service died of
            raise TimeoutError(f"{name} did not start in {START_TIMEOUT_S:.0f} s")

    try:
        ready, stop, port_out = asyncio.Event(), asyncio.Event(), []
        settings = RouterSettings(
            port=0,
            cache_nodes=[cache_address],
            repository=str(repository),
            health_interval_s=0.5,
            drain_s=2.0,
        )
        await start(
            "router",
            lambda: run_router(settings, ready=ready, stop=stop, port_out=port_out),
            ready,
            stop,
        )
        router = f"127.0.0.1:{port_out[0]}"
        for model, layers in (("tiny-llama", "0:2"), ("tiny-llama", "2:4"), ("tiny-bert", None)):
            w_ready, w_stop = asyncio.Event(), asyncio.Event()
            w_settings = WorkerSettings(
                model=model,
                layers=layers,
                port=0,
                routers=[router],
                repository=str(repository),
                heartbeat_s=1.0,
                drain_s=2.0,
            )
            await start(
                f"worker {model} {layers or 'replica'}",
                lambda s=w_settings, r=w_ready, st=w_stop: run_worker(s, ready=r, stop=st),
                w_ready,
                w_stop,
            )
        yield router, services
    finally:
        # Workers first (they deregister from the router), then the router.
        for group in (services[1:], services[:1]):
            for service in group:
                service.stop.set()
            results = await asyncio.wait_for(
                asyncio.gather(*(s.task for s in group), return_exceptions=True), timeout=30
            )
            for service, result in zip(group, results, strict=True):
                assert result == 0, f"{service.name} ended with {result!r}"


async def _wait_served(channel: aio.Channel, models: Iterable[str]) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    stub = inference_pb2_grpc.InferenceStub(channel)
    deadline = time.monotonic() + START_TIMEOUT_S
    pending = set(models)
    while pending and time.monotonic() < deadline:
        for model in list(pending):
            try:
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service=model), timeout=1.0
                )
            except grpc.RpcError:
                continue
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                listed = await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=2.0)
                if any(m.name == model and m.healthy for m in listed.models):
                    pending.discard(model)
        await asyncio.sleep(0.1)
    assert not pending, f"not served in time: {sorted(pending)}"


# -- span helpers ----------------------------------------------------------------------------


def _request_spans(spans: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in spans if not s.name.startswith(BACKGROUND)]


def _scope(span: ReadableSpan) -> str:
    return span.instrumentation_scope.name if span.instrumentation_scope else ""


def _parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def _children(spans: Iterable[ReadableSpan], parent: ReadableSpan, name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name and _parent_id(s) == parent.context.span_id]


def _ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[ReadableSpan]:
    chain = []
    parent = _parent_id(span)
    while parent is not None and parent in by_id:
        chain.append(by_id[parent])
        parent = _parent_id(by_id[parent])
    return chain


async def _collect(
    exporter: InMemorySpanExporter,
    ready,
    timeout: float = 10.0,  # type: ignore[no-untyped-def]
) -> list[ReadableSpan]:
    """Waits until ready(spans) holds: server spans of streams end after the client is done."""
    deadline = time.monotonic() + timeout
    while True:
        spans = _request_spans(exporter.get_finished_spans())
        if ready(spans) or time.monotonic() > deadline:
            return spans
        await asyncio.sleep(0.05)


def _describe(spans: Iterable[ReadableSpan]) -> str:
    return "\n".join(
        f"  {s.name} [{_scope(s)}] trace={s.context.trace_id:032x} "
        f"id={s.context.span_id:016x} parent="
        f"{_parent_id(s) and format(_parent_id(s), '016x')} {dict(s.attributes or {})}"
        for s in spans
    )


# -- the checks ------------------------------------------------------------------------------


def _check_generate_trace(
    spans: list[ReadableSpan], generated: int, *, prefilled_here: bool = True
) -> None:
    """The request's own trace, then the batch trace its decode steps ran in."""
    roots = [s for s in spans if s.name == GENERATE]
    assert len(roots) == 1, _describe(spans)
    root = roots[0]
    context = "\n" + _describe(spans)
    own = [s for s in spans if s.context.trace_id == root.context.trace_id]
    by_id = {s.context.span_id: s for s in own}
    assert len(by_id) == len(own)
    # The router's server span is the root, and nothing in the trace is left unparented.
    assert root.kind is SpanKind.SERVER and _scope(root) == "tessera.router", context
    assert [s for s in own if s.parent is None or s.parent.span_id not in by_id] == [root]
    for span in own:
        for parent in _ancestors(span, by_id)[:1]:
            assert parent.start_time <= span.start_time, context
    generate = _children(own, root, "generate")
    assert len(generate) == 1, context
    assert generate[0].attributes["tessera.model"] == "tiny-llama"
    # The route taken is recorded on the generate span (as an attribute or a "route" event).
    routes = [generate[0].attributes.get("tessera.route")] + [
        e.attributes.get("tessera.route") for e in generate[0].events if e.attributes
    ]
    assert any(r and r.count("=>") == 1 for r in routes), context
    for name in ("cache.get", "cache.set"):
        found = [s for s in own if s.name == name]
        assert len(found) == 1, f"{name}{context}"
        assert _scope(found[0]) == "tessera.cache"
    # The prefill: a router span under generate, then one Prefill server span per stage.
    prefill = _children(own, generate[0], "prefill")
    assert len(prefill) == (1 if prefilled_here else 0), context
    if prefilled_here:
        servers = _children(own, prefill[0], PREFILL)
        assert len(servers) == 2, context
        stages = set()
        for server in servers:
            assert server.kind is SpanKind.SERVER and _scope(server) == "tessera.worker", context
            [compute] = _children(own, server, "stage.prefill")
            stages.add(compute.attributes["tessera.span"])
        assert stages == {"0:2", "2:4"}, context
    if generated < 2:
        return
    # The decode steps: in a batch trace that links back to this request's generate span.
    wanted = generate[0].context.span_id
    batches = [
        s
        for s in spans
        if s.name == "batch" and any(link.context.span_id == wanted for link in s.links)
    ]
    assert len(batches) == 1, context
    batch = batches[0]
    assert batch.parent is None and _scope(batch) == "tessera.router", context
    steps = [s for s in spans if s.name == DECODE and _parent_id(s) == batch.context.span_id]
    assert len(steps) >= 2 * (generated - 1), context  # every step on both stages
    for step in steps:
        assert step.kind is SpanKind.SERVER and step.context.trace_id == batch.context.trace_id
        assert len(_children(spans, step, "stage.decode")) == 1, context


def _check_embed_trace(spans: list[ReadableSpan], *, cached: bool) -> None:
    context = "\n" + _describe(spans)
    roots = [s for s in spans if s.name == EMBED]
    assert len(roots) == 1, context
    root = roots[0]
    assert {s.context.trace_id for s in spans} == {root.context.trace_id}, context
    by_id = {s.context.span_id: s for s in spans}
    assert [s for s in spans if s.parent is None or s.parent.span_id not in by_id] == [root]
    gets = _children(spans, root, "cache.get_many")
    assert len(gets) == 1, context
    forwards = [s for s in spans if s.name == FORWARD]
    if cached:
        assert forwards == [] and not [s for s in spans if s.name == "cache.set_many"], context
        return
    sets = _children(spans, root, "cache.set_many")
    assert len(sets) == 1, context
    assert len(forwards) == 1, context
    server = forwards[0]
    assert server.kind is SpanKind.SERVER and _scope(server) == "tessera.worker"
    parent = by_id.get(_parent_id(server))  # type: ignore[arg-type]
    assert parent is not None and _scope(parent) == "tessera.router", context
    assert root in _ancestors(server, by_id), context
    computes = _children(spans, server, "stage.forward")
    assert len(computes) == 1, f"stage.forward not under {FORWARD}{context}"
    assert computes[0].attributes["tessera.span"] == "0:4"


# -- the test --------------------------------------------------------------------------------


def test_one_request_is_one_trace(
    exporter: InMemorySpanExporter, tiny_repo: Path, memcached: MemcachedNode
) -> None:
    async def main() -> None:
        async with (
            _mesh(tiny_repo, memcached.address) as (router, _services),
            aio.insecure_channel(router) as channel,
        ):
            await _wait_served(channel, ["tiny-llama", "tiny-bert"])
            stub = inference_pb2_grpc.InferenceStub(channel)

            exporter.clear()
            reply = await stub.Generate(
                inference_pb2.GenerateRequest(
                    model="tiny-llama", prompt="the cat sat on", max_new_tokens=3, temperature=0.0
                ),
                timeout=60,
            )
            assert not reply.cached and 1 <= len(reply.token_ids) <= 3
            generated = len(reply.token_ids)
            spans = await _collect(
                exporter,
                lambda ss: (
                    sum(s.name == "stage.prefill" for s in ss) >= 2
                    and any(s.name == "batch" for s in ss)
                    and any(s.name == GENERATE for s in ss)
                ),
            )
            _check_generate_trace(spans, generated)
            # One request alone: its batch stepped exactly once per token after the first.
            assert sum(s.name == DECODE for s in spans) == 2 * (generated - 1), _describe(spans)

            # The same request again is a cache hit: one trace, no stage work.
            exporter.clear()
            again = await stub.Generate(
                inference_pb2.GenerateRequest(
                    model="tiny-llama", prompt="the cat sat on", max_new_tokens=3, temperature=0.0
                ),
                timeout=60,
            )
            assert again.cached and list(again.token_ids) == list(reply.token_ids)
            spans = await _collect(exporter, lambda ss: any(s.name == GENERATE for s in ss))
            assert {s.name for s in spans} == {GENERATE, "cache.get"}, _describe(spans)
            assert len({s.context.trace_id for s in spans}) == 1

            exporter.clear()
            texts = ["the cat sat on the mat", "hello world"]
            embedded = await stub.Embed(
                inference_pb2.EmbedRequest(model="tiny-bert", inputs=texts), timeout=60
            )
            assert len(embedded.embeddings) == 2 and not embedded.cached
            spans = await _collect(
                exporter,
                lambda ss: (
                    any(s.name == EMBED for s in ss) and any(s.name == "stage.forward" for s in ss)
                ),
            )
            _check_embed_trace(spans, cached=False)

            exporter.clear()
            embedded = await stub.Embed(
                inference_pb2.EmbedRequest(model="tiny-bert", inputs=texts), timeout=60
            )
            assert embedded.cached
            spans = await _collect(exporter, lambda ss: any(s.name == EMBED for s in ss))
            _check_embed_trace(spans, cached=True)

    asyncio.run(main())


def test_separate_requests_are_separate_traces(
    exporter: InMemorySpanExporter, tiny_repo: Path, memcached: MemcachedNode
) -> None:
    """Two concurrent requests never share a trace or parent each other's spans."""

    async def main() -> None:
        async with (
            _mesh(tiny_repo, memcached.address) as (router, _services),
            aio.insecure_channel(router) as channel,
        ):
            await _wait_served(channel, ["tiny-llama"])
            stub = inference_pb2_grpc.InferenceStub(channel)
            exporter.clear()
            replies = await asyncio.gather(
                *(
                    stub.Generate(
                        inference_pb2.GenerateRequest(
                            model="tiny-llama", prompt=prompt, max_new_tokens=3
                        ),
                        timeout=60,
                    )
                    for prompt in ("hello world", "what is the capital of france ?")
                )
            )
            spans = await _collect(
                exporter,
                lambda ss: (
                    sum(s.name == GENERATE for s in ss) == 2
                    and sum(s.name == "stage.prefill" for s in ss) >= 2
                    and any(s.name == "batch" for s in ss)
                ),
            )
            roots = [s for s in spans if s.name == GENERATE]
            assert len(roots) == 2, _describe(spans)
            assert roots[0].context.trace_id != roots[1].context.trace_id
            batch_traces = {s.context.trace_id for s in spans if s.name == "batch"}
            assert {s.context.trace_id for s in spans} == {
                r.context.trace_id for r in roots
            } | batch_traces
            prefilled = 0
            for reply in replies:
                # The prompts differ in length: the generate span says which is which.
                generate = [
                    s
                    for s in spans
                    if s.name == "generate"
                    and s.attributes["tessera.prompt_tokens"] == reply.prompt_tokens
                ]
                assert len(generate) == 1, _describe(spans)
                here = any(
                    s.name == "prefill" and s.context.trace_id == generate[0].context.trace_id
                    for s in spans
                )
                prefilled += here
                own = [
                    s
                    for s in spans
                    if s.context.trace_id in {generate[0].context.trace_id, *batch_traces}
                ]
                _check_generate_trace(own, len(reply.token_ids), prefilled_here=here)
            # Prefilled together (one prefill, linked from the other trace) or one each.
            assert prefilled >= 1
            prefills = [s for s in spans if s.name == "prefill"]
            linked = {link.context.span_id for p in prefills for link in p.links}
            generates = [s for s in spans if s.name == "generate"]
            assert all(
                any(p.context.trace_id == g.context.trace_id for p in prefills)
                or g.context.span_id in linked
                for g in generates
            ), _describe(spans)

    asyncio.run(main())
