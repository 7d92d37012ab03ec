"""Traces leave the processes: OTLP/gRPC to a real receiver, and the file `tessera trace` reads.

The mesh runs as real processes (router, tiny-llama as stages 0:2 and 2:4, a memcached node),
configured only through the standard OTEL_* variables, exactly as an operator would.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

from services.cache.launcher import MemcachedNode
from services.pb.tessera.v1 import inference_pb2
from services.tracing import waterfall
from tests.mesh import Mesh

pytestmark = pytest.mark.slow  # starts meshes of real processes; not in the fast tier

GENERATE = "tessera.v1.Inference/Generate"
PREFILL = "tessera.v1.Worker/Prefill"
DECODE = "tessera.v1.Worker/Decode"
# Roots of traces that are not client requests to check: worker registration, the router's
# admission of each worker (and its re-checks), health probes' Info calls, the ListModels calls
# the test makes while waiting for the model, and one trace per running batch.
OTHER_ROOTS = (
    "tessera.v1.Registry/",
    "admission",
    "tessera.v1.Worker/Info",
    "tessera.v1.Inference/ListModels",
    "batch",
)
PROMPTS = ("the cat sat on", "what is the capital of france ?")
WAIT_S = 30.0


# -- the receiver ----------------------------------------------------------------------------


@dataclass
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    resource: dict[str, object]
    scope: str
    attributes: dict[str, object]

    @property
    def service(self) -> str:
        return str(self.resource.get("service.name", ""))

    @property
    def process(self) -> tuple[str, str]:
        return self.service, str(self.resource.get("service.instance.id", ""))


def _value(value: common_pb2.AnyValue) -> object:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def _attributes(items: object) -> dict[str, object]:
    return {kv.key: _value(kv.value) for kv in items}  # type: ignore[attr-defined]


@dataclass
class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """The collector's TraceService: keeps every span it is sent."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    exports: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,  # noqa: N802
        context: grpc.ServicerContext,
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            name=span.name,
                            kind=span.kind,
                            resource=resource,
                            scope=scope_spans.scope.name,
                            attributes=_attributes(span.attributes),
                        )
                    )
        with self.lock:
            self.spans.extend(received)
            self.exports += 1
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self) -> list[ReceivedSpan]:
        with self.lock:
            return list(self.spans)


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    servicer = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, port
    finally:
        server.stop(grace=None)


# -- helpers ---------------------------------------------------------------------------------


def _start(mesh: Mesh) -> None:
    mesh.start_router()
    for layers in ("0:2", "2:4"):
        mesh.start_worker("tiny-llama", layers, wait=False)
    for proc in mesh.workers:
        proc.wait_ready()
    mesh.wait_model("tiny-llama")


def _generate(mesh: Mesh, prompt: str) -> inference_pb2.GenerateResponse:
    reply = mesh.stub().Generate(
        inference_pb2.GenerateRequest(
            model="tiny-llama", prompt=prompt, max_new_tokens=3, temperature=0.0
        ),
        timeout=60,
    )
    assert not reply.cached and 1 <= len(reply.token_ids) <= 3
    return reply


def _by_trace(spans: list[ReceivedSpan]) -> dict[str, list[ReceivedSpan]]:
    traces: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        traces.setdefault(span.trace_id, []).append(span)
    return traces


def _roots(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    ids = {s.span_id for s in spans}
    return [s for s in spans if not s.parent_id or s.parent_id not in ids]


def _complete(spans: list[ReceivedSpan]) -> bool:
    """Whether everything one request's trace holds is in: its root, cache get and set, a
    Prefill on each stage with the stage's compute span under it."""
    names = [s.name for s in spans]
    prefills = [s.span_id for s in spans if s.name == PREFILL]
    computes = [s for s in spans if s.name == "stage.prefill" and s.parent_id in prefills]
    return (
        GENERATE in names
        and "cache.get" in names
        and "cache.set" in names
        and len(prefills) == 2
        and len(computes) == 2
    )


def _decode_steps(traces: dict[str, list[ReceivedSpan]]) -> int:
    """Decode steps exported so far, over every batch trace (each step runs on both stages)."""
    return sum(
        s.name == DECODE
        for trace in traces.values()
        for s in trace
        if _roots(trace)[0].name == "batch"
    )


def _logs(mesh: Mesh) -> str:
    """What each process said (heartbeats left out), and whether it is still running."""
    out = []
    for proc in [mesh.router, *mesh.workers]:
        if proc is not None:
            lines = [line for line in proc.lines if "Registry/" not in line]
            out.append(
                f"--- {' '.join(proc.args[:5])} (exit {proc.popen.poll()})\n"
                + "\n".join(lines[-30:])
            )
    return "\n".join(out)


def _describe(spans: list[ReceivedSpan]) -> str:
    return "\n".join(
        f"  {s.trace_id[:8]} {s.span_id} <- {s.parent_id or '-':16} {s.service:28} {s.name}"
        for s in spans
    )


# -- the tests -------------------------------------------------------------------------------


def test_otlp_receiver_gets_one_connected_trace_per_request(
    tiny_repo: Path, memcached: MemcachedNode, receiver: tuple[Receiver, int]
) -> None:
    collector, port = receiver
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    with Mesh(tiny_repo, cache_nodes=[memcached.address], env=env) as mesh:
        _start(mesh)
        replies = [_generate(mesh, prompt) for prompt in PROMPTS]

        # Bounded wait: the batch processors export every 200 ms, server spans of the
        # session streams end just after the client's call returns.
        deadline = time.monotonic() + WAIT_S
        while True:
            traces = _by_trace(collector.snapshot())
            complete = sum(_complete(t) for t in traces.values())
            steps = _decode_steps(traces)
            done = complete == len(replies) and steps >= 2 * sum(
                len(r.token_ids) - 1 for r in replies
            )
            died = any(p.popen.poll() is not None for p in mesh.workers)
            if done or died or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        time.sleep(0.5)  # stray spans of other traces, if any, arrive too
        spans = collector.snapshot()
        assert collector.exports > 0, "the receiver was never called"
        context = "\n" + _describe(spans) + "\n" + _logs(mesh)
        # A process that died took its unexported spans with it: say so first.
        for proc in [mesh.router, *mesh.workers]:
            assert proc is not None and proc.popen.poll() is None, (
                f"{' '.join(proc.args[:5])} died (exit {proc.popen.poll()}){context}"
            )
        incomplete = f"traces incomplete after {WAIT_S:.0f} s: {complete} requests, {steps} steps"
        assert done, incomplete + context

        # Exactly one trace per request; every other trace is background or the test's probes,
        # so no request span was cut off into a trace of its own.
        traces = _by_trace(spans)
        requests = {}
        for trace_id, trace in traces.items():
            roots = _roots(trace)
            assert len(roots) == 1, f"trace {trace_id} is not connected:{context}"
            if roots[0].name == GENERATE:
                requests[trace_id] = trace
            else:
                assert roots[0].name.startswith(OTHER_ROOTS), (
                    f"a stray trace rooted at {roots[0].name}{context}"
                )
        assert len(requests) == 2, context

        all_processes = set()
        for trace in requests.values():
            by_id = {s.span_id: s for s in trace}
            assert len(by_id) == len(trace), f"duplicate span ids{context}"
            [root] = _roots(trace)
            # The router's server span is the root of the trace, with no parent at all.
            assert (
                root.name == GENERATE and root.parent_id == "" and root.service == "tessera-router"
            ), context
            assert root.kind == 2, context  # SPAN_KIND_SERVER
            # Connected: every other span's parent is in this trace.
            for span in trace:
                if span is not root:
                    assert span.parent_id in by_id, f"{span.name} has no parent here{context}"
            assert _complete(trace), context
            names = [s.name for s in trace]
            assert names.count("cache.get") == 1 and names.count("cache.set") == 1, context
            # Three processes: the router and both stage workers.
            processes = {s.process for s in trace}
            assert len(processes) == 3, f"{processes}{context}"
            assert {s.service for s in trace} == {
                "tessera-router",
                "tessera-worker-tiny-llama-0:2",
                "tessera-worker-tiny-llama-2:4",
            }, context
            all_processes |= processes
            # Stage spans hang under worker server spans, in the worker's own process.
            stages = {}
            for server in [s for s in trace if s.name == PREFILL]:
                assert server.kind == 2 and by_id[server.parent_id].service == "tessera-router", (
                    context
                )
                [compute] = [
                    s for s in trace if s.parent_id == server.span_id and s.name == "stage.prefill"
                ]
                assert compute.process == server.process != root.process, context
                assert "tessera.compute_ms" in compute.attributes
                stages[str(compute.attributes["tessera.span"])] = server.process
            assert set(stages) == {"0:2", "2:4"}, context
            assert stages["0:2"] != stages["2:4"], context
        # The decode steps: one connected trace per running batch, router root, both stages.
        batches = [t for t in traces.values() if _roots(t)[0].name == "batch"]
        assert batches, context
        for trace in batches:
            [root] = _roots(trace)
            assert root.service == "tessera-router" and root.parent_id == "", context
            decodes = [s for s in trace if s.name == DECODE]
            assert {s.service for s in decodes} == {
                "tessera-worker-tiny-llama-0:2",
                "tessera-worker-tiny-llama-2:4",
            }, context
            for server in decodes:
                assert server.parent_id == root.span_id, context
                assert any(
                    s.parent_id == server.span_id and s.name == "stage.decode" for s in trace
                )
        assert len(all_processes) == 3, all_processes


def test_file_export_renders_as_a_waterfall(
    tiny_repo: Path, memcached: MemcachedNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "trace.jsonl"
    env = {
        "OTEL_TRACES_EXPORTER": "file",
        "TESSERA_TRACE_FILE": str(path),
        "OTEL_BSP_SCHEDULE_DELAY": "60000",
    }  # nothing leaves before shutdown: tests the flush
    with Mesh(tiny_repo, cache_nodes=[memcached.address], env=env) as mesh:
        _start(mesh)
        reply = _generate(mesh, PROMPTS[0])
        # SIGTERM: each process drains, returns from its loop and shuts its tracer down.
        codes = [proc.stop() for proc in [*mesh.workers, mesh.router]]  # type: ignore[list-item]
        assert codes == [0, 0, 0], "\n".join(p.output()[-2000:] for p in mesh.workers)

    traces = waterfall.group_traces(waterfall.read_spans(path))
    chosen = waterfall.pick_trace(traces)
    names = [s.name for s in traces[chosen]]
    # The request's trace holds its prefill on both stages; its decode steps are in the batch's.
    assert names.count("stage.prefill") == 2, names
    assert len(reply.token_ids) == 3

    assert waterfall.main([str(path), "--width", "160"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith(f"trace {chosen}  {GENERATE}")
    rows = [line for line in lines if line.endswith("|")]
    assert rows[0].startswith("tessera-router ") and f" {GENERATE} " in rows[0]
    assert any(" cache.get " in row for row in rows), out
    assert any(" cache.set " in row for row in rows), out
    split = re.compile(r"\d+\.\d\d/\d+\.\d\d \|")
    for layers in ("0:2", "2:4"):
        steps = [row for row in rows if f"stage.prefill [{layers}]" in row]
        assert len(steps) == 1, out
        for row in steps:
            assert row.startswith(f"tessera-worker-tiny-llama-{layers}"), row
            assert split.search(row), row  # the queue/compute column
            bar = row.rsplit("|", 2)[1]
            assert bar.strip() and set(bar.strip()) <= {"░", "█", "▒"}, row
    assert "queued for a batch" in out
