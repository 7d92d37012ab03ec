"""`tessera up`: one local mesh as supervised child processes.

Every child (memcached, the router, each worker) runs in its own process group and is SIGKILLed
by the kernel if `tessera up` dies, whatever kills it (PR_SET_PDEATHSIG; see
services.cache.launcher.die_with_parent). SIGINT, SIGTERM and SIGHUP stop them in order.

Once the mesh is ready, a child that exits is restarted after a backoff (0.5 s, doubling to
10 s; back to 0.5 s once it has run for a minute) while the rest keeps serving: the router
fails over from a dead worker as from any other, workers re-register with a restarted router,
and the router serves uncached while memcached is down. A child that exits 5 times within 60 s
is crash-looping: `tessera up` reports it (name, exit code, last output lines) and gives up on
it. Without a worker or the cache the mesh still serves everything else (that model answers
UNAVAILABLE), so it keeps running; without the router nothing can be served, so the mesh stops.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cache.launcher import (
    MemcachedNode,
    die_with_parent,
    free_port,
    is_local_address,
    split_address,
)
from services.common.security import CALL, REGISTER, derive_token
from services.common.settings import MeshSettings, WorkerSettings, load_mesh_file
from services.mesh_versions import VersionWorkers, admin_token

READY_TIMEOUT_S = 300.0
DEFAULT_HTTP_PORT = 8000  # the OpenAI-compatible front of `tessera up`'s router
STOP_GRACE_S = 15.0  # SIGTERM, then this long to drain and exit, then SIGKILL
POLL_S = 0.2
TAIL_LINES = 10  # last output lines shown when a child exits


class MeshError(RuntimeError):
    """A mesh that cannot start, with a message for the operator (no traceback)."""


# -- restarts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestartPolicy:
    first_delay_s: float = 0.5  # wait before the first restart
    max_delay_s: float = 10.0  # the wait doubles up to this
    max_restarts: int = 5  # restarts within window_s; one more exit is a crash loop
    window_s: float = 60.0  # also: a child that ran this long starts over at first_delay_s


@dataclass
class Backoff:
    """When to restart a child that exited, or that it is crash-looping. No processes here."""

    policy: RestartPolicy = field(default_factory=RestartPolicy)
    delay_s: float = 0.0
    restarts: collections.deque[float] = field(default_factory=collections.deque)

    def __post_init__(self) -> None:
        self.delay_s = self.policy.first_delay_s

    def next_delay(self, now: float, ran_s: float) -> float | None:
        """Seconds to wait before restarting a child that ran ``ran_s`` and exited at ``now``;
        None when it already restarted max_restarts times within the window."""
        policy = self.policy
        while self.restarts and now - self.restarts[0] > policy.window_s:
            self.restarts.popleft()
        if ran_s >= policy.window_s:
            self.delay_s = policy.first_delay_s  # a crash after a long run, not a loop
        if len(self.restarts) >= policy.max_restarts:
            return None
        delay, self.delay_s = self.delay_s, min(self.delay_s * 2, policy.max_delay_s)
        self.restarts.append(now)
        return delay


# -- children --------------------------------------------------------------------------------


class Child:
    """One service of the mesh as a child process: started in its own process group, killed
    with `tessera up`, its output copied to ours and its last lines kept for reports."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self._argv = argv
        self._env = env
        self._popen: subprocess.Popen[bytes] | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._pump: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    def start(self) -> None:
        self._tail.clear()
        self._popen = subprocess.Popen(
            die_with_parent(self._argv),
            cwd=Path.cwd(),
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
        assert self._popen.stdout is not None
        self._pump = threading.Thread(
            target=self._copy, args=(self._popen.stdout,), name=f"out {self.name}", daemon=True
        )
        self._pump.start()

    def _copy(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            self._tail.append(line)
            try:
                print(line, flush=True)
            except (OSError, ValueError):
                pass  # our own stdout is gone; keep draining the child's pipe

    def poll(self) -> int | None:
        return self._popen.poll() if self._popen is not None else None

    def tail(self) -> list[str]:
        if self._pump is not None and self._popen is not None and self._popen.poll() is not None:
            self._pump.join(timeout=1.0)  # its last lines are still in the pipe
        return list(self._tail)

    def terminate(self) -> None:
        if self._popen is not None and self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)

    def wait(self, until: float) -> None:
        """Waits until ``until`` (monotonic) for the exit, then SIGKILLs its process group."""
        if self._popen is None:
            return
        try:
            self._popen.wait(timeout=max(0.0, until - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self._popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._popen.wait()


MESH_CACHE_MB = 1024


class CacheChild:
    """A memcached node of the mesh, supervised like the other children."""

    def __init__(self, address: str) -> None:
        self.name = f"memcached on {address}"
        self.address = address
        self._host, self._port = split_address(address)
        self._node = MemcachedNode(die_with_parent=True)

    @property
    def pid(self) -> int | None:
        return self._node.pid

    def start(self) -> None:
        # Answers and the workers' prompt KV blocks (tens of MiB per long prompt) share it.
        self._node.start(host=self._host, port=self._port, memory_mb=MESH_CACHE_MB)

    def poll(self) -> int | None:
        return self._node.poll()

    def tail(self) -> list[str]:
        return self._node.output_tail(TAIL_LINES)

    def terminate(self) -> None:
        pass  # stopped last, by wait(): the router keeps using it until then

    def wait(self, until: float) -> None:
        self._node.stop()


Service = Child | CacheChild


@dataclass
class Supervised:
    """A child and its restart state."""

    child: Service
    essential: bool  # without it nothing can be served: giving up on it stops the mesh
    backoff: Backoff = field(default_factory=Backoff)
    started_at: float = 0.0
    restart_at: float | None = None
    given_up: bool = False
    model: str = ""  # a worker's model ...
    version: str | None = None  # ... and version label ("" = the model's own folder)
    retired: bool = False  # stopped on purpose (its version unloaded): never restarted

    def start(self, now: float) -> None:
        self.started_at = now
        self.restart_at = None
        self.child.start()


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"exit code {code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return f"exit code {code}"


def _report(line: str, tail: Sequence[str]) -> None:
    shown = "\n".join(f"    | {t}" for t in tail) if tail else "    | (no output)"
    print(f"{line}\n  its last output:\n{shown}", file=sys.stderr, flush=True)


def supervise_once(services: Sequence[Supervised], now: float) -> Supervised | None:
    """One round: restarts children whose backoff is over, schedules restarts for children that
    exited, gives up on crash loops. Returns an essential child given up on, if any."""
    for s in services:
        if s.given_up or s.retired:
            continue
        if s.restart_at is not None:
            if now >= s.restart_at:
                try:
                    s.start(now)
                    print(
                        f"tessera up: {s.child.name} restarted (pid {s.child.pid})",
                        file=sys.stderr,
                        flush=True,
                    )
                except (OSError, RuntimeError) as exc:
                    # Counted like an exit: the next round sees the old exit code again.
                    print(
                        f"tessera up: cannot restart {s.child.name}: {exc}",
                        file=sys.stderr,
                        flush=True,
                    )
            continue
        code = s.child.poll()
        if code is None:
            continue
        delay = s.backoff.next_delay(now, now - s.started_at)
        policy = s.backoff.policy
        if delay is None:
            s.given_up = True
            consequence = (
                "stopping the mesh: nothing can be served without it"
                if s.essential
                else "giving up on it; the rest of the mesh keeps serving"
            )
            _report(
                f"tessera up: {s.child.name} is crash-looping ({_exit_text(code)}, "
                f"{policy.max_restarts} restarts within {policy.window_s:.0f} s): {consequence}",
                s.child.tail(),
            )
            if s.essential:
                return s
            continue
        s.restart_at = now + delay
        _report(
            f"tessera up: {s.child.name} exited with {_exit_text(code)}; restarting it in "
            f"{delay:.1f} s (restart {len(s.backoff.restarts)} of {policy.max_restarts} "
            f"allowed within {policy.window_s:.0f} s)",
            s.child.tail(),
        )
    return None


# -- the mesh ----------------------------------------------------------------------------------


def _probe_host(host: str) -> str:
    """Where to knock to reach a server bound to ``host`` (wildcards are reached on loopback)."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def _port_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _local_cache_node(address: str) -> CacheChild:
    """Starts memcached on a local address, or on a free port of that host when the address
    is taken: never adopts a memcached it did not start (anything on the machine could have
    started one there; installing Debian's package starts a system one on 127.0.0.1:11211)."""
    host, port = split_address(address)
    if _port_answers(_probe_host(host), port):
        taken = address
        address = f"{host}:{free_port()}"
        print(
            f"tessera up: {taken} is taken by a process this mesh did not start; "
            f"starting this mesh's memcached on {address} instead",
            flush=True,
        )
    node = CacheChild(address)
    try:
        node.start()
    except RuntimeError as exc:
        raise MeshError(f"tessera up: cannot start memcached on {address}: {exc}") from exc
    return node


def _wait_serving(
    address: str, service: str, deadline: float, services: Sequence[Supervised]
) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            for s in services:
                code = s.child.poll()
                if code is not None:
                    tail = "\n".join(f"    | {t}" for t in s.child.tail()) or "    | (no output)"
                    raise MeshError(
                        f"tessera up: {s.child.name} exited with {_exit_text(code)} before the "
                        f"mesh was ready; its last output:\n{tail}"
                    )
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(POLL_S)
    raise MeshError(f"tessera up: {address} did not report SERVING for {service!r} in time")


def _env_overrides(settings: object, prefix: str, skip: set[str]) -> dict[str, str]:
    """Settings from the mesh file that differ from the defaults, as TESSERA_* variables."""
    defaults = type(settings)()
    env: dict[str, str] = {}
    for f in dataclasses.fields(settings):  # type: ignore[arg-type]
        value = getattr(settings, f.name)
        if f.name in skip or value == getattr(defaults, f.name):
            continue
        env[f"{prefix}{f.name.upper()}"] = (
            ",".join(map(str, value)) if isinstance(value, list) else str(value)
        )
    return env


def _mesh_tokens(
    mesh: MeshSettings,
) -> tuple[dict[str, str], Callable[[WorkerSettings], dict[str, str]]]:
    """(router env, worker env per worker): fresh secrets per run, so only this mesh's processes
    talk to each other and its cache values are its own.

    Anything on this machine can reach the loopback ports. Unless the mesh file configures
    worker credentials, the router gets a fresh mesh secret and each worker the two credentials
    derived from it for its own address: what it registers with, and what the router must call
    it with. A worker's credentials are worth nothing at another address, so no worker can take
    over another's registration or learn the token another takes calls with. The cache secret
    seals the values this mesh's router writes to memcached; the prefix secret, the prompt KV
    blocks its workers share there.
    """
    router: dict[str, str] = {}
    if not mesh.router.cache_secret:
        router["TESSERA_ROUTER_CACHE_SECRET"] = secrets.token_urlsafe(32)
    tier = _prefix_tier(mesh)
    credentials = _worker_credentials(mesh, router)
    return router, lambda worker: {**tier(worker), **credentials(worker)}


def _prefix_tier(mesh: MeshSettings) -> Callable[[WorkerSettings], dict[str, str]]:
    """Every worker shares the mesh's memcached nodes as its prefix tier, with one secret."""
    secret = secrets.token_urlsafe(32)

    def env(worker: WorkerSettings) -> dict[str, str]:
        if worker.prefix_nodes or not mesh.cache_nodes:
            return {}
        found = {"TESSERA_WORKER_PREFIX_NODES": ",".join(mesh.cache_nodes)}
        if not worker.prefix_secret:
            found["TESSERA_WORKER_PREFIX_SECRET"] = secret
        return found

    return env


def _worker_credentials(
    mesh: MeshSettings, router: dict[str, str]
) -> Callable[[WorkerSettings], dict[str, str]]:
    configured = (
        mesh.router.mesh_secret
        or mesh.router.worker_call_token
        or mesh.router.worker_tokens
        or mesh.router.worker_token_file
        or any(w.caller_tokens or w.caller_token_file or w.router_token for w in mesh.workers)
    )
    if configured:
        return lambda _: {}
    secret = secrets.token_urlsafe(32)
    router["TESSERA_ROUTER_MESH_SECRET"] = secret

    def worker_env(worker: WorkerSettings) -> dict[str, str]:
        address = worker.advertise or f"{worker.host}:{worker.port}"
        return {
            "TESSERA_WORKER_ROUTER_TOKEN": derive_token(secret, REGISTER, address),
            "TESSERA_WORKER_CALLER_TOKENS": derive_token(secret, CALL, address),
        }

    return worker_env


def _children(
    mesh: MeshSettings,
    repository: str,
    router_token: dict[str, str],
    worker_token: Callable[[WorkerSettings], dict[str, str]],
) -> list[Child]:
    """The router and one child per worker: flags for the contract, env for the rest."""
    router = mesh.router
    router_address = f"127.0.0.1:{router.port}"
    python = [sys.executable, "-m", "services.cli"]
    children = [
        Child(
            f"router on {router.host}:{router.port}",
            [
                *python,
                "router",
                "--host",
                router.host,
                "--port",
                str(router.port),
                "--repository",
                repository,
                "--cache",
                ",".join(mesh.cache_nodes),
                # The OpenAI-compatible front: 8000 unless the mesh file sets http_port.
                "--http-port",
                str(DEFAULT_HTTP_PORT if router.http_port is None else router.http_port),
            ],
            {
                **os.environ,
                **_env_overrides(
                    router,
                    "TESSERA_ROUTER_",
                    {"host", "port", "http_port", "repository", "cache_nodes"},
                ),
                **router_token,
            },
        )
    ]
    for worker in mesh.workers:
        children.append(worker_child(worker, repository, router_address, worker_token))
    return children


def worker_child(
    worker: WorkerSettings,
    repository: str,
    router_address: str,
    worker_token: Callable[[WorkerSettings], dict[str, str]],
) -> Child:
    """A worker of the mesh as a child: flags for the contract, env for the rest."""
    python = [sys.executable, "-m", "services.cli"]
    argv = [
        *python,
        "worker",
        "--model",
        worker.model,
        "--host",
        worker.host,
        "--port",
        str(worker.port),
        "--router",
        router_address,
        "--repository",
        repository,
    ]
    if worker.layers:
        argv += ["--layers", worker.layers]
    if worker.version:
        argv += ["--version", worker.version]
    env = _env_overrides(
        worker,
        "TESSERA_WORKER_",
        {"model", "version", "layers", "host", "port", "routers", "repository"},
    )
    version = f" {worker.version}" if worker.version else ""
    return Child(
        f"worker {worker.model}{version} {worker.layers or 'replica'} on "
        f"{worker.host}:{worker.port}",
        argv,
        {**os.environ, **env, **worker_token(worker)},
    )


def _print_ready(mesh: MeshSettings, router_address: str) -> None:
    causal = next((w.model for w in mesh.workers if "smollm" in w.model), None)
    print("\ntessera mesh ready: router on " + router_address, flush=True)
    http_port = DEFAULT_HTTP_PORT if mesh.router.http_port is None else mesh.router.http_port
    if causal and http_port > 0:
        print(
            f"OpenAI-compatible API on http://127.0.0.1:{http_port}/v1, e.g.:\n"
            f"  curl http://127.0.0.1:{http_port}/v1/chat/completions -H "
            f'\'Content-Type: application/json\' -d \'{{"model": "{causal}", "messages": '
            f'[{{"role": "user", "content": "Hello!"}}]}}\'',
            flush=True,
        )
    if causal:
        print(
            'try:\n  .venv/bin/grpcurl -plaintext -d \'{"model":"'
            + causal
            + '","messages":[{"role":"user","content":"What is the capital of '
            'France?"}],"max_new_tokens":24}\' '
            + router_address
            + " tessera.v1.Inference/Generate",
            flush=True,
        )
    print("Ctrl-C stops every process.", flush=True)


def _stop(services: Sequence[Supervised]) -> None:
    """SIGTERM to the router and the workers at once, up to STOP_GRACE_S for them to drain,
    SIGKILL for any left; memcached last (the router uses it until it is gone)."""
    processes = [s.child for s in services if isinstance(s.child, Child)]
    for child in reversed(processes):
        child.terminate()
    until = time.monotonic() + STOP_GRACE_S
    for child in reversed(processes):
        child.wait(until)
    for s in services:
        if isinstance(s.child, CacheChild):
            s.child.wait(until)


def run_mesh(config: str | None, *, repository: str) -> int:
    """Starts the mesh, supervises it until SIGINT/SIGTERM/SIGHUP, stops it. 0 after a signal
    with every child still supervised; 1 if the mesh could not start, lost the router, or gave
    up on a child."""
    mesh = load_mesh_file(config)
    services: list[Supervised] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # Set explicitly: a shell that starts us in the background leaves SIGINT ignored. SIGHUP
    # (the terminal went away) stops the mesh like SIGTERM does.
    stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for sig in stop_signals:
        signal.signal(sig, on_signal)
    try:
        nodes = []
        for address in mesh.cache_nodes:
            if is_local_address(address):
                node = _local_cache_node(address)
                services.append(Supervised(node, essential=False, started_at=time.monotonic()))
                address = node.address
            nodes.append(address)
        mesh.cache_nodes = nodes
        router_token, worker_token = _mesh_tokens(mesh)
        for index, child in enumerate(_children(mesh, repository, router_token, worker_token)):
            supervised = Supervised(child, essential=index == 0)
            if index:
                supervised.model, supervised.version = mesh.workers[index - 1].model, ""
            services.append(supervised)
            supervised.start(time.monotonic())
        deadline = time.monotonic() + READY_TIMEOUT_S
        router_address = f"127.0.0.1:{mesh.router.port}"
        for model in dict.fromkeys(w.model for w in mesh.workers):
            _wait_serving(router_address, model, deadline, services)
        _wait_serving(router_address, "", deadline, services)
        _print_ready(mesh, router_address)
        versions = VersionWorkers(
            mesh,
            router_address,
            admin_token(mesh),
            lambda worker: worker_child(worker, repository, router_address, worker_token),
            lambda child, model, label: Supervised(
                child,
                essential=False,
                model=model,
                version=label,
            ),
        )
        try:
            while supervise_once(services, time.monotonic()) is None:
                versions.step(services, time.monotonic())
                time.sleep(POLL_S)
        finally:
            versions.close()
        return 1
    except MeshError as exc:
        print(exc, file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 1 if any(s.given_up for s in services) else 0
    finally:
        for sig in stop_signals:
            signal.signal(sig, signal.SIG_IGN)
        _stop(services)
        print("tessera mesh stopped", flush=True)
