"""`tessera up --config FILE` as an operator runs it: a whole mesh from a YAML file, answers,
then a signal that stops every process it started — and nothing else."""

from __future__ import annotations

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
from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc
from tests.mesh import ROOT, service_env

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
                "router": {"port": router_port},
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
def test_up_reuses_a_running_memcached_and_sigterm_stops_only_its_own(
    tiny_repo: Path, tmp_path: Path
) -> None:
    """A memcached already on the configured address (Debian starts one on 11211) is reused,
    and left running on exit; SIGTERM stops what `up` did start."""
    router_port = free_port()
    with MemcachedNode().start(port=free_port()) as outside:
        # The router alone: the SIGINT test above covers workers, which `up` stops the same way.
        config = _write_mesh(tmp_path / "mesh.yaml", router_port, [outside.address], [])
        with tessera_up(config, tiny_repo) as up:
            up.wait_ready(timeout=120)
            assert f"reusing the memcached already running on {outside.address}" in up.output()
            _wait_router(f"127.0.0.1:{router_port}")
            children = up.children()
            assert len(children) == 1, [p.cmdline() for p in children]  # the router
            assert outside.pid not in {p.pid for p in children}
            _assert_stops_cleanly(up, signal.SIGTERM, children)
        assert outside.running


@pytest.mark.timeout(60)
def test_up_fails_clearly_when_the_cache_port_is_not_memcached(
    tiny_repo: Path, tmp_path: Path
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        address = f"127.0.0.1:{squatter.getsockname()[1]}"
        config = _write_mesh(tmp_path / "mesh.yaml", free_port(), [address], [])
        with tessera_up(config, tiny_repo) as up:
            rc = up.popen.wait(timeout=STOP_TIMEOUT_S)
            up._pump.join(timeout=5)
            assert rc == 1, up.output()
            assert f"{address} is taken by a process that is not memcached" in up.output()
            assert "Traceback" not in up.output()
