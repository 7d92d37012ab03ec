"""`tessera up --config FILE` as an operator runs it: a whole mesh from a YAML file, answers,
then a signal that stops every process it started — and nothing else. `up` supervises: a
child killed under load is restarted while the rest serves, a crash loop is given up on, and no
child outlives `up`, even a SIGKILLed one."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cache.launcher import MemcachedNode, free_port
from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.mesh import ROOT, metric, scrape, service_env, wait_until

pytestmark = pytest.mark.slow  # starts meshes of real processes; not in the fast tier

READY_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 30.0


class Up:
    """One `tessera up` process in its own session, its output collected in the background."""

    def __init__(self, config: Path, repository: Path) -> None:
        self.lines: list[str] = []
        self._ready = threading.Event()
        # Its own session: whatever happens, the finally below can kill the whole group.
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up", "--config", str(config)],
            cwd=ROOT,
            env=service_env(repository),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))
            if "tessera mesh ready" in line:
                self._ready.set()

    def output(self) -> str:
        return "\n".join(self.lines[-60:])

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"tessera up not ready (rc {self.popen.poll()}):\n" + self.output()
                )

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.popen.pid).children(recursive=True)

    def stop(self, sig: int) -> int:
        """Sends `sig`; the exit code, which must come within STOP_TIMEOUT_S."""
        self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"tessera up ignored {sig!r}:\n{self.output()}") from None

    def kill_all(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(timeout=10)
        self._pump.join(timeout=5)


@contextmanager
def tessera_up(config: Path, repository: Path) -> Iterator[Up]:
    up = Up(config, repository)
    try:
        yield up
    finally:
        up.kill_all()


def _write_mesh(
    path: Path, router_port: int, cache_nodes: Sequence[str], workers: Sequence[dict[str, object]]
) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                # Any free port for the HTTP front: tests may run beside a mesh on 8000.
                "router": {"port": router_port, "http_port": 0},
                "cache": {"nodes": list(cache_nodes)},
                "workers": list(workers),
            }
        )
    )
    return path


def _assert_stops_cleanly(up: Up, sig: int, children: list[psutil.Process]) -> None:
    assert up.stop(sig) == 0, up.output()
    up._pump.join(timeout=5)
    assert "tessera mesh stopped" in up.output()
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"left running after {sig!r}: {[p.pid for p in alive]}"


def _wait_router(address: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"router {address} never served")


@pytest.mark.timeout(360)
def test_up_serves_the_real_models_and_sigint_stops_every_child(
    real_repo: Path, tmp_path: Path
) -> None:
    router_port, cache_port = free_port(), free_port()
    config = _write_mesh(
        tmp_path / "mesh.yaml",
        router_port,
        [f"127.0.0.1:{cache_port}"],
        [
            {"model": "smollm2-135m-instruct", "layers": "0:15", "port": free_port()},
            {"model": "smollm2-135m-instruct", "layers": "15:30", "port": free_port()},
            {"model": "all-minilm-l6-v2", "port": free_port()},
        ],
    )
    with tessera_up(config, real_repo) as up:
        up.wait_ready()
        address = f"127.0.0.1:{router_port}"
        with grpc.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            request = inference_pb2.GenerateRequest(
                model="smollm2-135m-instruct",
                max_new_tokens=24,
                messages=[
                    inference_pb2.ChatMessage(role="user", content="What is the capital of France?")
                ],
            )
            first = stub.Generate(request, timeout=120)
            assert "Paris" in first.text and not first.cached, first.text
            second = stub.Generate(request, timeout=60)
            assert second.cached and second.text == first.text
            embedded = stub.Embed(
                inference_pb2.EmbedRequest(
                    model="all-minilm-l6-v2", inputs=["hello world", "Paris is in France."]
                ),
                timeout=60,
            )
        values = np.array([e.values for e in embedded.embeddings])
        assert embedded.dim == 384 and values.shape == (2, 384)
        np.testing.assert_allclose(np.linalg.norm(values, axis=1), 1.0, atol=1e-5)

        children = up.children()
        names = " ".join(" ".join(p.cmdline()) for p in children)
        assert len(children) >= 5 and "memcached" in names, names  # router, 3 workers, cache
        _assert_stops_cleanly(up, signal.SIGINT, children)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("squatter", ["memcached", "other"])
def test_up_never_adopts_a_cache_it_did_not_start(
    tiny_repo: Path, tmp_path: Path, squatter: str
) -> None:
    """Whatever holds the configured cache address (a memcached anything on the machine could
    have started, or another program), `up` starts its own memcached on a free port, leaves
    the squatter alone, and SIGTERM stops only what `up` started."""
    router_port = free_port()
    with contextlib.ExitStack() as stack:
        if squatter == "memcached":
            outside = stack.enter_context(MemcachedNode().start(port=free_port()))
            address, outside_pid = outside.address, outside.pid
        else:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            address, outside_pid = f"127.0.0.1:{sock.getsockname()[1]}", os.getpid()
        # The router alone: the SIGINT test above covers workers, which `up` stops the same way.
        config = _write_mesh(tmp_path / "mesh.yaml", router_port, [address], [])
        with tessera_up(config, tiny_repo) as up:
            up.wait_ready(timeout=120)
            assert f"{address} is taken by a process this mesh did not start" in up.output()
            _wait_router(f"127.0.0.1:{router_port}")
            children = up.children()
            names = [" ".join(p.cmdline()) for p in children]
            assert len(children) == 2 and any("memcached" in n for n in names), names
            assert outside_pid not in {p.pid for p in children}
            assert not any(f"-p {address.rsplit(':', 1)[1]}" in n for n in names), names
            _assert_stops_cleanly(up, signal.SIGTERM, children)
        if squatter == "memcached":
            assert outside.running


# -- supervision: children restarted, crash loops given up on, nothing outlives `up` -----------


def _child_on_port(up: Up, port: int) -> psutil.Process | None:
    """The child of `up` started for `--port PORT` (a worker or the router), if one runs."""
    for child in up.children():
        try:
            args = child.cmdline()
        except psutil.Error:
            continue
        if "--port" in args and args[args.index("--port") + 1] == str(port):
            return child
    return None


def _listens_on(pid: int, port: int) -> bool:
    try:
        return any(
            c.laddr.port == port and c.status == psutil.CONN_LISTEN
            for c in psutil.Process(pid).net_connections(kind="tcp")
        )
    except psutil.Error:
        return False


def _serving(address: str, service: str = "") -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1
            )
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def _healthy_chains(address: str, model: str) -> int:
    try:
        with grpc.insecure_channel(address) as channel:
            listed = inference_pb2_grpc.InferenceStub(channel).ListModels(
                inference_pb2.ListModelsRequest(), timeout=2
            )
    except grpc.RpcError:
        return 0
    return sum(c.healthy for m in listed.models if m.name == model for c in m.chains)


def _forward_rows(metrics_port: int) -> float:
    """Rows the worker behind `metrics_port` ran through Forward (the Embed path)."""
    samples = scrape(f"127.0.0.1:{metrics_port}")
    return metric(samples, "tessera_worker_batch_rows_sum", kind="forward")


class EmbedLoad:
    """Threads sending Embed calls of never-repeated texts (no cache hit hides a failure)."""

    def __init__(self, address: str, threads: int = 2) -> None:
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._channel = grpc.insecure_channel(address)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, index: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            request = inference_pb2.EmbedRequest(
                model="all-minilm-l6-v2", inputs=[f"load {index}-{n} at {time.monotonic_ns()}"]
            )
            try:
                reply = self._stub.Embed(request, timeout=30)
                assert len(reply.embeddings) == 1 and reply.dim == 384
                self.ok += 1
            except grpc.RpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()}")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=40)
        assert not any(t.is_alive() for t in self._threads)
        self._channel.close()


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_a_killed_replica_is_restarted_and_serves_again_with_no_failed_request(
    real_repo: Path, tmp_path: Path
) -> None:
    """kill -9 of one of two MiniLM replicas under Embed load: the router fails over to the
    other (no request fails), `up` restarts the killed one, and the new process serves."""
    router_port, cache_port = free_port(), free_port()
    ports = [free_port(), free_port()]
    metrics = [free_port(), free_port()]
    config = _write_mesh(
        tmp_path / "mesh.yaml",
        router_port,
        [f"127.0.0.1:{cache_port}"],
        [
            {"model": "all-minilm-l6-v2", "port": p, "metrics_port": m}
            for p, m in zip(ports, metrics, strict=True)
        ],
    )
    address = f"127.0.0.1:{router_port}"
    with tessera_up(config, real_repo) as up:
        up.wait_ready()
        wait_until(
            lambda: _healthy_chains(address, "all-minilm-l6-v2") == 2, 60, "two healthy replicas"
        )
        victim, survivor = _child_on_port(up, ports[0]), _child_on_port(up, ports[1])
        assert victim is not None and survivor is not None, up.output()
        load = EmbedLoad(address)
        try:
            wait_until(lambda: load.ok >= 20, 60, "Embed load running")
            victim.kill()
            killed_at = time.monotonic()
            victim.wait(timeout=10)

            def restarted() -> bool:
                child = _child_on_port(up, ports[0])
                return (
                    child is not None
                    and child.pid != victim.pid
                    and _listens_on(child.pid, ports[0])
                    and _serving(f"127.0.0.1:{ports[0]}")
                    and _healthy_chains(address, "all-minilm-l6-v2") == 2
                )

            wait_until(restarted, 30, "the killed replica restarted, listening and healthy")
            back_after = time.monotonic() - killed_at
            reborn = _child_on_port(up, ports[0])
            assert reborn is not None
            # The new process takes its share of the load: its own metrics count the rows.
            wait_until(lambda: _forward_rows(metrics[0]) >= 5, 30, "the restarted replica serving")
        finally:
            load.stop()
        assert not load.failures, load.failures[:5]
        assert load.ok > 20
        print(f"\nreplica back after {back_after:.1f} s; {load.ok} Embed calls, none failed")
        assert up.popen.poll() is None, up.output()
        assert survivor.is_running() and _child_on_port(up, ports[1]).pid == survivor.pid  # type: ignore[union-attr]
        output = "\n".join(up.lines)  # all of it: the access log lines are many
        name = f"worker all-minilm-l6-v2 replica on 127.0.0.1:{ports[0]}"
        assert f"{name} exited with exit code -9 (SIGKILL); restarting it in 0.5 s" in output
        assert f"{name} restarted (pid {reborn.pid})" in output
        _assert_stops_cleanly(up, signal.SIGTERM, up.children())


def _tiny_mesh(tmp_path: Path) -> tuple[Path, int, int]:
    router_port, worker_port = free_port(), free_port()
    config = _write_mesh(
        tmp_path / "mesh.yaml",
        router_port,
        [f"127.0.0.1:{free_port()}"],
        [{"model": "tiny-bert", "port": worker_port}],
    )
    return config, router_port, worker_port


def _assert_only_the_router_calls_the_workers(router_port: int, worker_port: int) -> None:
    """`up` gives its router a fresh caller token for its workers and a fresh worker token for
    its registry: the router's calls work, anyone else's are UNAUTHENTICATED (health stays open),
    and nobody else can register a worker with the router."""
    with grpc.insecure_channel(f"127.0.0.1:{router_port}") as channel:
        reply = inference_pb2_grpc.InferenceStub(channel).Embed(
            inference_pb2.EmbedRequest(model="tiny-bert", inputs=["the cat"]), timeout=30
        )
        assert reply.dim == 32
    assert _serving(f"127.0.0.1:{worker_port}")
    with grpc.insecure_channel(f"127.0.0.1:{worker_port}") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    rogue = worker_pb2.WorkerInfo(
        model="tiny-bert",
        version="v",
        fingerprint="f" * 64,
        num_layers=4,
        kind="encoder",
        hidden_size=32,
        address="127.0.0.1:1",
        span={"start": 0, "end": 4},
    )
    with grpc.insecure_channel(f"127.0.0.1:{router_port}") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            worker_pb2_grpc.RegistryStub(channel).Register(
                worker_pb2.RegisterRequest(worker=rogue), timeout=10
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP], ids=["SIGKILL", "SIGHUP"])
def test_no_child_outlives_up(tiny_repo: Path, tmp_path: Path, sig: int) -> None:
    """SIGKILL of `tessera up` (no handler runs): the kernel kills every child within 5 s.
    SIGHUP (the terminal closed): stopped in order, like SIGTERM."""
    config, router_port, worker_port = _tiny_mesh(tmp_path)
    with tessera_up(config, tiny_repo) as up:
        up.wait_ready(timeout=120)
        children = up.children()
        names = " ".join(" ".join(p.cmdline()) for p in children)
        assert len(children) == 3 and "memcached" in names, names  # memcached, router, worker
        if sig == signal.SIGHUP:
            _assert_only_the_router_calls_the_workers(router_port, worker_port)
            _assert_stops_cleanly(up, sig, children)
            return
        up.popen.kill()
        up.popen.wait(timeout=10)
        _, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, f"left running after SIGKILL of tessera up: {alive}"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_crash_looping_child_is_reported_and_given_up_on(tiny_repo: Path, tmp_path: Path) -> None:
    """memcached killed six times within a minute: restarted five times with growing waits,
    then reported with its exit code and given up on; the router keeps serving (uncached)."""
    router_port, cache_port = free_port(), free_port()
    config = _write_mesh(tmp_path / "mesh.yaml", router_port, [f"127.0.0.1:{cache_port}"], [])
    with tessera_up(config, tiny_repo) as up:
        up.wait_ready(timeout=120)
        pids: list[int] = []

        def memcached() -> psutil.Process | None:
            return next((p for p in up.children() if "memcached" in p.name()), None)

        started = time.monotonic()
        for _ in range(6):
            wait_until(
                lambda: (m := memcached()) is not None and m.pid not in pids,
                15,
                "memcached (re)started",
            )
            node = memcached()
            assert node is not None
            pids.append(node.pid)
            node.kill()
            node.wait(timeout=5)
        address = f"127.0.0.1:{cache_port}"
        wait_until(lambda: "crash-looping" in up.output(), 5, "the crash loop reported")
        took = time.monotonic() - started
        assert took < 60, took
        output = up.output()
        assert output.count(f"memcached on {address} exited with exit code -9 (SIGKILL)") == 5
        assert (
            f"memcached on {address} is crash-looping (exit code -9 (SIGKILL), 5 restarts within "
            f"60 s): giving up on it; the rest of the mesh keeps serving"
        ) in output, output
        assert "its last output:" in output
        # Waits of 0.5, 1, 2, 4 and 8 s between the six starts.
        assert took > 0.5 + 1 + 2 + 4 + 8, took
        time.sleep(1.0)
        assert memcached() is None, "given up: not started again"
        assert up.popen.poll() is None and _serving(f"127.0.0.1:{router_port}")
        # Stopped on request, but it lost a child: exit code 1.
        assert up.stop(signal.SIGTERM) == 1, up.output()
