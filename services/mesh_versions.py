"""`tessera up`'s side of model versions: start and stop workers as the router asks.

The router keeps which versions should be loaded (`tessera.v1.Models`); the supervisor reads
that once a second and makes the processes match: a version asked to load gets workers with
the spans of the model's workers in the mesh file (same settings, the version's folder, free
ports); a version whose drain the router finished ("unloaded") gets its workers stopped with
SIGTERM (they finish what they hold) and never restarted. Asking for the model's own version
again restarts the mesh file's workers.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from services.cache.launcher import free_port
from services.common.settings import MeshSettings, WorkerSettings
from services.pb.tessera.v1 import models_pb2, models_pb2_grpc

EVERY_S = 1.0


class VersionWorkers:
    """Keeps each version's worker processes in line with what the router wants."""

    def __init__(
        self,
        mesh: MeshSettings,
        router_address: str,
        admin_token: str,
        make_worker: Callable[[WorkerSettings], Any],
        supervise: Callable[[Any, str, str], Any],
    ) -> None:
        self.mesh = mesh
        self.router_address = router_address
        self.metadata = [("authorization", f"Bearer {admin_token}")] if admin_token else []
        self.make_worker = make_worker
        self.supervise = supervise
        self._next = 0.0
        self._channel: grpc.Channel | None = None

    def step(self, entries: list[Any], now: float) -> None:
        """One look at the router's wishes (at most once a second)."""
        if now < self._next:
            return
        self._next = now + EVERY_S
        # Stopped workers of published versions go; the mesh file's stay (they may come back).
        entries[:] = [
            e for e in entries if not (e.retired and e.version and e.child.poll() is not None)
        ]
        try:
            listed = self._list()
        except grpc.RpcError:
            return  # the router is restarting: try again next time
        for model in listed.models:
            for version in model.versions:
                label = "" if version.base else version.label
                mine = [e for e in entries if e.model == model.model and e.version == label]
                if version.desired == "loaded" or (version.base and version.desired == ""):
                    self._load(model.model, label, version.label, mine, entries, now)
                elif version.desired == "unloaded":  # the router finished its drain
                    self._unload(model.model, version.label, mine)

    def _list(self) -> models_pb2.ListVersionsResponse:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.router_address)
        stub = models_pb2_grpc.ModelsStub(self._channel)
        return stub.List(models_pb2.ListVersionsRequest(), timeout=5, metadata=self.metadata)

    def _load(
        self,
        model: str,
        label: str,
        shown: str,
        mine: Sequence[Any],
        entries: list[Any],
        now: float,
    ) -> None:
        live = [e for e in mine if not e.retired]
        if live:
            return
        retired = [e for e in mine if e.retired and e.child.poll() is not None]
        if label == "" and retired:  # the mesh file's workers, asked for again
            for entry in retired:
                entry.retired = False
                entry.start(now)
            _say(f"version {shown} of {model} loading: its workers start again")
            return
        specs = [w for w in self.mesh.workers if w.model == model and not w.version]
        if not specs or label == "":
            return
        for spec in specs:
            worker = dataclasses.replace(spec, version=label, port=free_port())
            child = self.make_worker(worker)
            entries.append(self.supervise(child, model, label))
            entries[-1].start(now)
        _say(f"version {shown} of {model} loading: {len(specs)} workers start")

    def _unload(self, model: str, shown: str, mine: Sequence[Any]) -> None:
        stopping = [e for e in mine if not e.retired]
        for entry in stopping:
            entry.retired = True
            entry.restart_at = None
            entry.child.terminate()
        if stopping:
            _say(f"version {shown} of {model} unloaded: {len(stopping)} workers stop")

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()


def _say(line: str) -> None:
    print(f"tessera up: {line}", file=sys.stderr, flush=True)


def admin_token(mesh: MeshSettings) -> str:
    """A token the supervisor may call tessera.v1.Models with: the mesh file's first admin
    token (none needed when the router has no tokens)."""
    if mesh.router.admin_tokens:
        return mesh.router.admin_tokens[0]
    if mesh.router.admin_token_file:
        try:
            with open(mesh.router.admin_token_file) as handle:
                for line in handle:
                    if line.strip() and not line.startswith("#"):
                        return line.strip().split()[0]
        except OSError:
            pass
    return ""
