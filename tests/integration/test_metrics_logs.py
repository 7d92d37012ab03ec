"""Prometheus metrics scraped after known traffic show the right counts; the access log is one
JSON line per request with no prompt text.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from services.cache.launcher import MemcachedNode, free_port
from services.pb.tessera.v1 import inference_pb2
from tests.mesh import Mesh, Proc, Sample, metric, metrics_address, scrape, wait_until

pytestmark = pytest.mark.timeout(300)

SECRET_WORD = "zebraquokka"  # in every prompt; must never reach a log line
SECRET_EMBED = "wombatlynx"  # in every embedded text
PROMPTS = [f"the cat {SECRET_WORD}", f"hello world {SECRET_WORD}", f"paris is {SECRET_WORD}"]
TEXTS = [[f"{SECRET_EMBED} {c}" for c in "abcd"], [f"{SECRET_EMBED} {c}" for c in "efgh"]]
INFERENCE = "tessera.v1.Inference"


@dataclass
class Observed:
    mesh: Mesh
    cache: MemcachedNode
    router_metrics: str
    llama_metrics: str
    bert_metrics: str
    llama: Proc
    bert: Proc
    generated: list[int] = field(default_factory=list)  # generated_tokens of each miss
    repeat_cached: bool = False


@pytest.fixture(scope="module")
def observed(tiny_repo: Path) -> Iterator[Observed]:
    """A router, a tiny-llama and a tiny-bert replica with metrics on, after known traffic:
    3 greedy Generate (distinct prompts, 5 tokens), 1 repeat of the first (a cache hit),
    2 Embed of 4 distinct texts, 1 Generate of an unknown model, 1 invalid Generate."""
    cache = MemcachedNode().start(port=free_port())
    try:
        with Mesh(tiny_repo, cache_nodes=[cache.address]) as mesh:
            # No periodic re-probe of admitted workers: the counts below hold one admission
            # probe per worker, however slow the machine.
            mesh.env["TESSERA_ROUTER_RECHECK_S"] = "0"
            router = mesh.start_router("--metrics-port", "0")
            env = {"TESSERA_WORKER_METRICS_PORT": "0"}
            llama = mesh.start_worker("tiny-llama", wait=False, env=env)
            bert = mesh.start_worker("tiny-bert", wait=False, env=env)
            llama.wait_ready()
            bert.wait_ready()
            mesh.wait_model("tiny-llama", timeout=60)
            mesh.wait_model("tiny-bert", timeout=60)
            seen = Observed(
                mesh,
                cache,
                metrics_address(router),
                metrics_address(llama),
                metrics_address(bert),
                llama,
                bert,
            )
            stub = mesh.stub()
            for prompt in PROMPTS:
                reply = stub.Generate(
                    inference_pb2.GenerateRequest(
                        model="tiny-llama", prompt=prompt, max_new_tokens=5
                    ),
                    timeout=60,
                )
                assert not reply.cached
                seen.generated.append(reply.generated_tokens)
            seen.repeat_cached = stub.Generate(
                inference_pb2.GenerateRequest(
                    model="tiny-llama", prompt=PROMPTS[0], max_new_tokens=5
                ),
                timeout=60,
            ).cached
            for texts in TEXTS:
                assert (
                    len(
                        stub.Embed(
                            inference_pb2.EmbedRequest(model="tiny-bert", inputs=texts), timeout=60
                        ).embeddings
                    )
                    == 4
                )
            for request, code in (
                (
                    inference_pb2.GenerateRequest(model="no-such-model", prompt=PROMPTS[1]),
                    grpc.StatusCode.NOT_FOUND,
                ),
                (
                    inference_pb2.GenerateRequest(
                        model="tiny-llama", prompt=PROMPTS[2], max_new_tokens=0
                    ),
                    grpc.StatusCode.INVALID_ARGUMENT,
                ),
            ):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Generate(request, timeout=30)
                assert caught.value.code() == code
            yield seen
    finally:
        cache.stop()


def _settled(
    address: str, name: str, want: float, timeout: float = 10.0, **labels: str
) -> list[Sample]:
    """Scrapes until metric `name` reaches `want` (gauges and logs settle after the reply)."""
    samples: list[Sample] = []

    def reached() -> bool:
        samples[:] = scrape(address)
        return metric(samples, name, **labels) == want

    try:
        wait_until(reached, timeout, f"{name}{labels} == {want}")
    except TimeoutError:
        pass  # the caller's assertion shows the value
    return samples


def test_router_request_counts_by_rpc_model_and_code(observed: Observed) -> None:
    samples = _settled(observed.router_metrics, "tessera_requests_in_flight", 0, service=INFERENCE)
    count = "tessera_requests_total"
    assert observed.repeat_cached
    assert (
        metric(samples, count, service=INFERENCE, rpc="Generate", model="tiny-llama", code="OK")
        == 4
    )
    assert (
        metric(
            samples,
            count,
            service=INFERENCE,
            rpc="Generate",
            model="unknown",  # only known model names become label values
            code="NOT_FOUND",
        )
        == 1
    )
    assert (
        metric(
            samples,
            count,
            service=INFERENCE,
            rpc="Generate",
            model="tiny-llama",
            code="INVALID_ARGUMENT",
        )
        == 1
    )
    assert metric(samples, count, service=INFERENCE, rpc="Embed", model="tiny-bert", code="OK") == 2
    assert metric(samples, count, service=INFERENCE, rpc="Generate") == 6
    for code in ("INTERNAL", "UNKNOWN"):
        assert metric(samples, count, code=code) == 0
    # Latency histograms by rpc and model: one observation per request.
    seconds = "tessera_request_duration_seconds"
    assert (
        metric(samples, f"{seconds}_count", service=INFERENCE, rpc="Generate", model="tiny-llama")
        == 5
    )
    assert (
        metric(samples, f"{seconds}_count", service=INFERENCE, rpc="Embed", model="tiny-bert") == 2
    )
    assert metric(samples, f"{seconds}_sum", rpc="Generate", model="tiny-llama") > 0
    assert metric(samples, f"{seconds}_bucket", rpc="Embed", model="tiny-bert", le="+Inf") == 2
    assert metric(samples, "tessera_requests_in_flight", service=INFERENCE) == 0
    # Health probes are not requests.
    assert not [s for s in samples if s.name == count and "Health" in s.labels.get("service", "")]


def test_token_metrics(observed: Observed) -> None:
    samples = scrape(observed.router_metrics)
    total = sum(observed.generated)
    assert 3 <= total <= 15
    assert metric(samples, "tessera_generated_tokens_total", model="tiny-llama") == total
    assert metric(samples, "tessera_time_to_first_token_seconds_count", model="tiny-llama") == 3
    assert metric(samples, "tessera_time_to_first_token_seconds_sum", model="tiny-llama") > 0
    assert (
        metric(samples, "tessera_inter_token_latency_seconds_count", model="tiny-llama")
        == total - 3
    )


def test_stage_call_seconds_per_worker_and_kind(observed: Observed) -> None:
    """The router times each generation step's call to each stage: with the worker's own
    compute time, what the call spent in transport."""
    samples = scrape(observed.router_metrics)
    name = "tessera_router_stage_call_seconds"
    worker = observed.llama.address
    total = sum(observed.generated)
    assert metric(samples, f"{name}_count", worker=worker, kind="prefill") == 3
    assert metric(samples, f"{name}_count", worker=worker, kind="decode") == total - 3
    llama = scrape(observed.llama_metrics)
    compute = metric(
        llama, "tessera_worker_step_seconds_sum", model="tiny-llama", kind="decode", phase="compute"
    )
    assert metric(samples, f"{name}_sum", worker=worker, kind="decode") >= compute > 0


def test_cache_counters_by_tier(observed: Observed) -> None:
    samples = scrape(observed.router_metrics)
    name = "tessera_cache_requests_total"
    assert metric(samples, name, tier="generate", result="miss") == 3
    assert metric(samples, name, tier="generate", result="hit") == 1
    assert metric(samples, name, tier="embed", result="miss") == 8
    assert metric(samples, name, tier="embed", result="hit") == 0
    assert metric(samples, name, result="error") == 0


def test_worker_metrics(observed: Observed) -> None:
    llama = _settled(observed.llama_metrics, "tessera_worker_live_sessions", 0)
    total = sum(observed.generated)
    rows = "tessera_worker_batch_rows"
    # Three generations one after another: each a prefill of one row (its first token), then
    # one decode step of one row per further token.
    assert metric(llama, f"{rows}_count", model="tiny-llama", kind="prefill") == 3
    assert metric(llama, f"{rows}_sum", model="tiny-llama", kind="prefill") == 3
    assert metric(llama, f"{rows}_sum", model="tiny-llama", kind="decode") == total - 3
    assert metric(llama, "tessera_worker_live_sessions", model="tiny-llama") == 0
    assert metric(llama, "tessera_worker_kv_cache_bytes", model="tiny-llama") == 0
    assert any(s.name == "tessera_worker_queue_depth" for s in llama)

    def calls(rpc: str) -> dict[str, float]:
        found = [
            s
            for s in llama
            if s.name == "tessera_requests_total" and s.labels.get("rpc") == rpc and s.value
        ]
        return {s.labels["code"]: s.value for s in found}

    assert calls("Prefill") == {"OK": 3}
    assert calls("Decode") == {"OK": total - 3}
    # Every step's time on the model thread, split into waiting for it and running on it.
    steps = "tessera_worker_step_seconds"
    for kind, count in (("prefill", 3), ("decode", total - 3)):
        for phase in ("queue", "compute"):
            labels = {"model": "tiny-llama", "kind": kind, "phase": phase}
            assert metric(llama, f"{steps}_count", **labels) == count
        assert metric(llama, f"{steps}_sum", model="tiny-llama", kind=kind, phase="compute") > 0
    # Each finished batch is freed: a Clear per generation, never an error.
    assert calls("Clear") == {"OK": 3}
    bert = scrape(observed.bert_metrics)
    # The 8 texts, and the one-row Forward the router ran to admit the worker.
    assert metric(bert, f"{rows}_sum", model="tiny-bert", kind="forward") == 8 + 1
    assert metric(bert, f"{rows}_count", model="tiny-bert", kind="forward") >= 2
    assert (
        metric(
            bert, "tessera_requests_total", service="tessera.v1.Worker", rpc="Forward", code="OK"
        )
        == 2 + 1  # one per Embed, and the admission probe
    )
    for samples in (llama, bert):
        for code in ("INTERNAL", "UNKNOWN"):
            assert metric(samples, "tessera_requests_total", code=code) == 0


def test_metric_names_follow_prometheus_conventions(observed: Observed) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    for address in (observed.router_metrics, observed.llama_metrics):
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
            assert reply.headers["Content-Type"].startswith("text/plain")
            text = reply.read().decode()
        # prometheus_client also exposes `<name>_created` timestamps; they are not ours to name.
        ours = [
            f
            for f in text_string_to_metric_families(text)
            if f.name.startswith("tessera_") and not f.name.endswith("_created")
        ]
        assert len(ours) >= 5
        for family in ours:
            assert re.fullmatch(r"tessera_[a-z0-9_]+", family.name), family.name
            assert family.documentation, f"{family.name} has no help text"
            if family.type == "counter":
                assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
            if "seconds" in family.name or "bytes" in family.name:
                assert family.name.endswith(("_seconds", "_bytes")), family.name


def _json_lines(proc: Proc) -> tuple[list[dict[str, object]], list[str]]:
    entries, other = [], []
    for line in proc.lines:
        try:
            entry = json.loads(line)
        except ValueError:
            other.append(line)
            continue
        if isinstance(entry, dict):
            entries.append(entry)
        else:
            other.append(line)
    return entries, other


def test_access_log_is_one_json_line_per_request(observed: Observed) -> None:
    router = observed.mesh.router
    assert router is not None
    entries, other = _json_lines(router)
    # Not a terminal: every log line is JSON; only the two start-up lines are plain text.
    assert all(line.startswith("tessera router ") for line in other), other
    access = [e for e in entries if e.get("logger") == "tessera.access"]
    generate = [e for e in access if e.get("rpc") == f"/{INFERENCE}/Generate"]
    assert len(generate) == 6, generate
    assert sorted(str(e["code"]) for e in generate) == sorted(
        ["OK"] * 4 + ["NOT_FOUND", "INVALID_ARGUMENT"]
    )
    assert {e["model"] for e in generate} == {"tiny-llama", "unknown"}
    embed = [e for e in access if e.get("rpc") == f"/{INFERENCE}/Embed"]
    assert len(embed) == 2 and all(e["model"] == "tiny-bert" for e in embed)
    for entry in access:
        for key in ("ts", "level", "service", "rpc", "model", "code", "duration_ms", "trace_id"):
            assert key in entry, (key, entry)
        assert isinstance(entry["duration_ms"], (int, float)) and entry["duration_ms"] >= 0
        if entry["trace_id"] is not None:
            assert re.fullmatch(r"[0-9a-f]{32}", str(entry["trace_id"])), entry
    worker_entries, _ = _json_lines(observed.llama)
    worker_access = [e for e in worker_entries if e.get("logger") == "tessera.access"]
    assert len([e for e in worker_access if str(e.get("rpc", "")).endswith("/Prefill")]) == 3


def test_no_prompt_text_in_any_output(observed: Observed) -> None:
    procs = [p for p in (observed.mesh.router, *observed.mesh.workers) if p is not None]
    for proc in procs:
        text = proc.output()
        assert SECRET_WORD not in text, f"prompt text in {proc.args[:3]} output"
        assert SECRET_EMBED not in text, f"embedded text in {proc.args[:3]} output"


def test_cache_errors_are_counted_when_memcached_is_down(observed: Observed) -> None:
    """Runs last: it stops the module's memcached."""
    before = scrape(observed.router_metrics)
    observed.cache.stop()
    stub = observed.mesh.stub()
    reply = stub.Embed(inference_pb2.EmbedRequest(model="tiny-bert", inputs=["x y z"]), timeout=30)
    assert not reply.cached
    after = scrape(observed.router_metrics)
    name = "tessera_cache_requests_total"
    assert metric(after, name, tier="embed", result="error") >= 1
    assert metric(after, name, tier="embed", result="hit") == metric(
        before, name, tier="embed", result="hit"
    )
