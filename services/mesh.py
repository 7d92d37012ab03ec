"""`tessera up`: one local mesh as child processes; Ctrl-C or SIGTERM stops every one of them."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cache.launcher import MemcachedNode, is_local_address, served_pid, split_address
from services.common.settings import MeshSettings, load_mesh_file

READY_TIMEOUT_S = 300.0


class MeshError(RuntimeError):
    """A mesh that cannot start, with a message for the operator (no traceback)."""


def _probe_host(host: str) -> str:
    """Where to knock to reach a server bound to ``host`` (wildcards are reached on loopback)."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def _port_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _local_cache_node(address: str) -> MemcachedNode | None:
    """Starts memcached on a local address; None when one already answers there.

    Installing Debian's memcached package starts a system memcached on 127.0.0.1:11211, the
    default address: reusing it beats failing, and it is not ours to stop.
    """
    host, port = split_address(address)
    probe = _probe_host(host)
    pid = served_pid(probe, port)
    if pid is not None:
        print(
            f"tessera up: reusing the memcached already running on {address} (pid {pid}); "
            f"it is left running on exit",
            flush=True,
        )
        return None
    if _port_answers(probe, port):
        raise MeshError(
            f"tessera up: cache node {address} is taken by a process that is not "
            f"memcached; free the port or name another node under cache.nodes"
        )
    try:
        return MemcachedNode().start(host=host, port=port)
    except RuntimeError as exc:
        raise MeshError(f"tessera up: cannot start memcached on {address}: {exc}") from exc


def _wait_serving(
    address: str, service: str, deadline: float, procs: list[subprocess.Popen[bytes]]
) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            for proc in procs:
                if proc.poll() is not None:
                    raise MeshError(
                        f"tessera up: {' '.join(map(str, proc.args[2:5]))} exited "
                        f"with {proc.returncode} before the mesh was ready"
                    )
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
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


def _commands(mesh: MeshSettings, repository: str) -> list[tuple[list[str], dict[str, str]]]:
    """One (argv, extra environment) per service: flags for the contract, env for the rest."""
    router = mesh.router
    router_address = f"127.0.0.1:{router.port}"
    python = [sys.executable, "-m", "services.cli"]
    commands = [
        (
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
            ],
            _env_overrides(
                router, "TESSERA_ROUTER_", {"host", "port", "repository", "cache_nodes"}
            ),
        )
    ]
    for worker in mesh.workers:
        command = [
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
            command += ["--layers", worker.layers]
        commands.append(
            (
                command,
                _env_overrides(
                    worker,
                    "TESSERA_WORKER_",
                    {"model", "layers", "host", "port", "routers", "repository"},
                ),
            )
        )
    return commands


def run_mesh(config: str | None, *, repository: str) -> int:
    mesh = load_mesh_file(config)
    nodes: list[MemcachedNode] = []
    procs: list[subprocess.Popen[bytes]] = []
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    # Both explicitly: a shell that starts us in the background leaves SIGINT ignored.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for address in mesh.cache_nodes:
            if is_local_address(address):
                node = _local_cache_node(address)
                if node is not None:
                    nodes.append(node)
        for command, env in _commands(mesh, repository):
            procs.append(subprocess.Popen(command, cwd=Path.cwd(), env={**os.environ, **env}))
        deadline = time.monotonic() + READY_TIMEOUT_S
        router_address = f"127.0.0.1:{mesh.router.port}"
        for model in dict.fromkeys(w.model for w in mesh.workers):
            _wait_serving(router_address, model, deadline, procs)
        _wait_serving(router_address, "", deadline, procs)
        causal = next((w.model for w in mesh.workers if "smollm" in w.model), None)
        print("\ntessera mesh ready: router on " + router_address, flush=True)
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
        while True:
            for proc in procs:
                if proc.poll() is not None:
                    print(
                        f"tessera up: {proc.args[3]} exited with {proc.returncode}; "
                        f"stopping the mesh",
                        file=sys.stderr,
                        flush=True,
                    )
                    return 1
            time.sleep(0.5)
    except MeshError as exc:
        print(exc, file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for node in nodes:
            node.stop()
        print("tessera mesh stopped", flush=True)
