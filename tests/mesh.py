"""Starting real Tessera processes for integration tests: routers and workers on 127.0.0.1:0.

Every process is a child of the test, is bounded in start-up time, and is stopped (SIGTERM,
then SIGKILL) when the fixture ends.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120.0
_READY = re.compile(r"tessera (router|worker) ready.* on (\S+)")


@dataclass
class Proc:
    """A tessera service process whose output is collected in the background."""

    args: list[str]
    env: dict[str, str]
    prefix: list[str] = field(default_factory=list)  # e.g. `ip netns exec NAME`
    popen: subprocess.Popen[str] = field(init=False)
    address: str = ""
    lines: list[str] = field(default_factory=list)
    _ready: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Proc:
        self.popen = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "services.cli", *self.args],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        return self

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))
            match = _READY.search(line)
            if match and not self._ready.is_set():
                self.address = match.group(2)
                self._ready.set()

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> Proc:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.args[:3]} did not start:\n" + "\n".join(self.lines[-40:])
                )
        return self

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def output(self) -> str:
        return "\n".join(self.lines)


def service_env(repository: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "TESSERA_MODEL_REPOSITORY": str(repository),
            "PYTHONUNBUFFERED": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
        }
    )
    env.update(extra or {})
    return env


class Mesh:
    """A router and workers as real processes. Use as a context manager."""

    def __init__(
        self,
        repository: Path,
        *,
        cache_nodes: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.repository = repository
        self.cache_nodes = list(cache_nodes)
        self.env = service_env(repository, env)
        self.router: Proc | None = None
        self.workers: list[Proc] = []
        self._channel: grpc.Channel | None = None

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_router(self, *flags: str) -> Proc:
        args = ["router", "--port", "0", "--repository", str(self.repository), *flags]
        if self.cache_nodes:
            args += ["--cache", ",".join(self.cache_nodes)]
        self.router = Proc(args, self.env).start().wait_ready()
        return self.router

    def start_worker(
        self,
        model: str,
        layers: str | None = None,
        *,
        wait: bool = True,
        env: dict[str, str] | None = None,
        port: int = 0,
    ) -> Proc:
        assert self.router is not None, "start the router first"
        args = [
            "worker",
            "--model",
            model,
            "--port",
            str(port),
            "--router",
            self.router.address,
            "--repository",
            str(self.repository),
        ]
        if layers:
            args += ["--layers", layers]
        proc = Proc(args, {**self.env, **(env or {})}).start()
        self.workers.append(proc)
        if wait:
            proc.wait_ready()
        return proc

    @property
    def address(self) -> str:
        assert self.router is not None
        return self.router.address

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address)
        return self._channel

    def stub(self) -> inference_pb2_grpc.InferenceStub:
        return inference_pb2_grpc.InferenceStub(self.channel())

    def wait_model(self, model: str, timeout: float = START_TIMEOUT_S, chains: int = 1) -> None:
        """Waits until the router reports SERVING for the model with at least `chains` chains."""
        health = health_pb2_grpc.HealthStub(self.channel())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=model), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    listed = self.stub().ListModels(inference_pb2.ListModelsRequest(), timeout=2)
                    for entry in listed.models:
                        if entry.name == model and sum(c.healthy for c in entry.chains) >= chains:
                            return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        logs = "\n".join(p.output()[-3000:] for p in [self.router, *self.workers] if p)
        raise TimeoutError(f"model {model} not served in time\n{logs}")

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        for proc in reversed(self.workers):
            proc.stop()
        if self.router is not None:
            self.router.stop()


# -- helpers for TLS, auth and metrics tests (added for the production-surface tests) ----------

_METRICS_LINE = re.compile(r"tessera (router|worker) metrics on (\S+)")


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1
) -> None:
    """Polls predicate until it is true; TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not true after {timeout:.0f} s")
        time.sleep(interval)


def secure_channel(
    address: str, ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> grpc.Channel:
    """A TLS channel trusting `ca` (None: the system roots), with a client certificate if given."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    return grpc.secure_channel(address, credentials)


def wait_model_on(
    channel: grpc.Channel,
    model: str,
    *,
    timeout: float = START_TIMEOUT_S,
    metadata: Sequence[tuple[str, str]] | None = None,
    procs: Sequence[Proc] = (),
) -> None:
    """Mesh.wait_model for any channel (TLS, tokens): SERVING and one healthy chain listed."""
    health = health_pb2_grpc.HealthStub(channel)
    stub = inference_pb2_grpc.InferenceStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(service=model), timeout=1.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                listed = stub.ListModels(
                    inference_pb2.ListModelsRequest(), timeout=2, metadata=metadata
                )
                if any(m.name == model and any(c.healthy for c in m.chains) for m in listed.models):
                    return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    logs = "\n".join(p.output()[-3000:] for p in procs)
    raise TimeoutError(f"model {model} not served in time\n{logs}")


def metrics_address(proc: Proc, timeout: float = 30.0) -> str:
    """The host:port a service printed as `tessera <service> metrics on HOST:PORT`."""
    found: list[str] = []

    def printed() -> bool:
        for line in list(proc.lines):
            match = _METRICS_LINE.search(line)
            if match:
                found.append(match.group(2))
                return True
        return False

    wait_until(printed, timeout, f"{proc.args[:3]} printing its metrics address")
    return found[0]


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def scrape(address: str, timeout: float = 5.0) -> list[Sample]:
    """Every sample of http://address/metrics, parsed with prometheus_client's parser."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(f"http://{address}/metrics", timeout=timeout) as reply:
        text = reply.read().decode()
    return [
        Sample(s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def wait_version_gauges(address: str, timeout: float = 10.0) -> None:
    """Waits for the router's first publication of its per-version gauges (once a second), so a
    comparison of scrapes is not upset by their arrival."""
    wait_until(
        lambda: any(s.name == "tessera_version_desired_chains" for s in scrape(address)),
        timeout,
        "the per-version gauges published",
    )


def metric(samples: Sequence[Sample], name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 when none match).

    The series must exist under that name, whatever its labels: an assertion on a misspelt or
    renamed metric fails here instead of passing on a 0 that no service reported."""
    assert any(s.name == name for s in samples), f"no series {name!r} in the scrape"
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )
