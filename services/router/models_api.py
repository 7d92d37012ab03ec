"""`tessera.v1.Models`: versions published, loaded, weighted, promoted, rolled back, unloaded.

The router is the one place that knows a model's traffic (`VersionBook`) and which versions
have ready chains (the routing table); it does not start processes. "Load" records that a
version should be loaded; whoever runs the workers acts on it (`tessera up`'s supervisor starts
the version's workers with the spans of the model's current ones; in Kubernetes an operator
scales the version's Deployments, docs/models.md), and the version becomes "ready" when the
router has admitted (and so probed) a full chain of it. A version not ready within
`load_timeout_s` is "failed" and asked to unload; it never held traffic. "Unload" takes a
version that holds no traffic out of every unpinned draw at once, waits until the requests it
is answering have finished (or `unload_drain_s`), then records that its workers may stop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from grpc import aio

from services.common.errors import FailedPrecondition, NotFound, PermissionDenied, quoted
from services.common.repository import LABEL, published_versions
from services.common.settings import RouterSettings
from services.pb.tessera.v1 import models_pb2, models_pb2_grpc
from services.router.admission import RepositoryPrints
from services.router.callers import Callers
from services.router.pool import WorkerPool
from services.router.publish import publish
from services.router.versions import LOADED, UNLOADED, VersionBook, require_label

log = logging.getLogger(__name__)
SERVICE_NAME = "tessera.v1.Models"
POLL_S = 0.1


class ModelsService(models_pb2_grpc.ModelsServicer):
    def __init__(
        self,
        settings: RouterSettings,
        pool: WorkerPool,
        book: VersionBook,
        callers: Callers,
    ) -> None:
        self.settings = settings
        self.repository = Path(settings.repository)
        self.pool = pool
        self.book = book
        self.callers = callers
        self.prints = RepositoryPrints(self.repository)
        self.failed: dict[tuple[str, str], str] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}

    def _admin(self, context: aio.ServicerContext) -> None:
        if not self.callers.identify(tuple(context.invocation_metadata() or ())).admin:
            raise PermissionDenied("tessera.v1.Models needs an admin token")

    # -- what there is -------------------------------------------------------------------------

    async def _repository_versions(self, model: str) -> list[tuple[str, str, bool]]:
        """(label, fingerprint, base) of every version the repository holds (fingerprints
        cached until a version's files change: List runs every second under `tessera up`)."""
        base = await self.prints.expected(model, "float32")
        listed = [(base.version, base.fingerprint, True)]
        folders = await asyncio.to_thread(published_versions, self.repository, model)
        for folder in folders:
            expected = await self.prints.expected(model, "float32", folder.name)
            listed.append((folder.name, expected.fingerprint, False))
        return listed

    def _models(self) -> list[str]:
        on_disk = {
            p.name
            for p in self.repository.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / "config.json").is_file()
        }
        return sorted(on_disk | set(self.pool.table.models()))

    async def status(self, model: str) -> models_pb2.ModelVersions:
        table = self.pool.table
        book = self.book
        alias = book.aliases.get(model)
        weights = alias.weights if alias else {}
        desired = alias.desired if alias else {}
        listed = await self._repository_versions(model) if self._on_disk(model) else []
        labels = {label: (fingerprint, base) for label, fingerprint, base in listed}
        for fingerprint, label in table.versions(model, healthy_only=False):
            labels.setdefault(label, (fingerprint, False))
        ready = {label for _, label in table.versions(model)}
        chains = table.chains(model)
        members = table.by_model.get(model, ())
        answer = models_pb2.ModelVersions(
            model=model,
            generation=alias.generation if alias else 0,
            stable=alias.stable if alias else [],
            implicit=not weights,
        )
        for label, (fingerprint, base) in labels.items():
            workers = sum(1 for w in members if w.version == label)
            state = self._state(model, label, label in ready, workers, desired.get(label, ""))
            answer.versions.add(
                model=model,
                label=label,
                fingerprint=fingerprint,
                state=state,
                weight=weights.get(label, 0),
                base=base,
                desired=desired.get(label, ""),
                chains_ready=sum(1 for c in chains if c.version == label),
                workers=workers,
                answering=book.running(model, label),
                reason=self.failed.get((model, label), ""),
            )
        return answer

    def _state(self, model: str, label: str, ready: bool, workers: int, desired: str) -> str:
        if (model, label) in self.failed:
            return "failed"
        if self.book.is_draining(model, label):
            return "draining"
        if desired == UNLOADED:
            return "draining" if workers else "unloaded"
        if ready:
            return "ready"
        if desired == LOADED or workers:
            return "loading"
        return "published"

    def _on_disk(self, model: str) -> bool:
        return LABEL.fullmatch(model) is not None and (self.repository / model).is_dir()

    async def _known(self, model: str, label: str) -> models_pb2.VersionStatus:
        require_label(label)
        if not self._on_disk(model) and not self.pool.table.knows(model):
            raise NotFound(f"model {quoted(model)} is not in the model repository")
        for version in (await self.status(model)).versions:
            if version.label == label:
                return version
        raise NotFound(f"model {quoted(model)} has no version {quoted(label)}")

    def _ready(self, model: str) -> set[str]:
        return {label for _, label in self.pool.table.versions(model)}

    # -- RPCs ----------------------------------------------------------------------------------

    async def Publish(
        self, request: models_pb2.PublishRequest, context: aio.ServicerContext
    ) -> models_pb2.VersionStatus:
        self._admin(context)
        if request.label:
            require_label(request.label)
        if not self._on_disk(request.model):
            raise NotFound(f"model {quoted(request.model)} is not in the model repository")
        done = await asyncio.to_thread(
            publish,
            self.repository,
            request.model,
            Path(request.source),
            request.label,
            request.expected_fingerprint,
        )
        log.info(
            "model %s: %s version %s (%s...)",
            request.model,
            "already had" if done.existed else "published",
            done.label,
            done.fingerprint[:16],
        )
        return await self._known(request.model, done.label)

    async def List(
        self, request: models_pb2.ListVersionsRequest, context: aio.ServicerContext
    ) -> models_pb2.ListVersionsResponse:
        self._admin(context)
        self.book.reload()
        if request.model:
            if not self._on_disk(request.model) and not self.pool.table.knows(request.model):
                raise NotFound(f"model {quoted(request.model)} is not in the model repository")
            models = [request.model]
        else:
            models = self._models()
        return models_pb2.ListVersionsResponse(models=[await self.status(m) for m in models])

    async def Load(
        self, request: models_pb2.VersionRequest, context: aio.ServicerContext
    ) -> models_pb2.VersionStatus:
        self._admin(context)
        await self._known(request.model, request.version)
        key = (request.model, request.version)
        self.failed.pop(key, None)
        self.book.end_drain(*key)
        ready = self._ready(request.model) - self.book.excluded(request.model)
        if request.version not in ready:
            self.book.pin_implicit(request.model, ready)  # the new version starts with none
        self.book.set_desired(request.model, request.version, LOADED)
        self._watch(key, self._loading(key))
        log.info("model %s: version %s asked to load", *key)
        return await self._known(*key)

    async def Unload(
        self, request: models_pb2.VersionRequest, context: aio.ServicerContext
    ) -> models_pb2.VersionStatus:
        self._admin(context)
        await self._known(request.model, request.version)
        key = (request.model, request.version)
        alias = self.book.alias(request.model)
        if alias.weights.get(request.version):
            raise FailedPrecondition(
                f"version {request.version!r} of {request.model!r} still has "
                f"{alias.weights[request.version]} % of the traffic; move it first "
                "(traffic, promote or rollback)"
            )
        if not alias.weights and self._ready(request.model) - self.book.excluded(request.model) <= {
            request.version
        }:
            raise FailedPrecondition(
                f"version {request.version!r} is the only ready version of {request.model!r}"
            )
        self.failed.pop(key, None)
        self.book.start_drain(*key)
        self._watch(key, self._draining(key))
        log.info("model %s: version %s draining before it unloads", *key)
        return await self._known(*key)

    async def SetTraffic(
        self, request: models_pb2.SetTrafficRequest, context: aio.ServicerContext
    ) -> models_pb2.ModelVersions:
        self._admin(context)
        weights = {require_label(label): int(w) for label, w in request.weights.items()}
        self.book.reload()
        self.book.set_weights(
            request.model, weights, self._ready(request.model), request.expected_generation
        )
        log.info("model %s: traffic %s", request.model, weights)
        return await self.status(request.model)

    async def Promote(
        self, request: models_pb2.VersionRequest, context: aio.ServicerContext
    ) -> models_pb2.ModelVersions:
        self._admin(context)
        await self._known(request.model, request.version)
        self.book.reload()
        self.book.set_weights(request.model, {request.version: 100}, self._ready(request.model))
        log.info("model %s: version %s promoted", request.model, request.version)
        return await self.status(request.model)

    async def Rollback(
        self, request: models_pb2.RollbackRequest, context: aio.ServicerContext
    ) -> models_pb2.ModelVersions:
        self._admin(context)
        self.book.reload()
        alias = self.book.rollback(request.model, self._ready(request.model))
        log.info("model %s: rolled back to %s", request.model, alias.current)
        return await self.status(request.model)

    # -- background ----------------------------------------------------------------------------

    def _watch(self, key: tuple[str, str], work: Coroutine[Any, Any, None]) -> None:
        """Runs the version's one background task (a newer one replaces it)."""
        previous = self._tasks.pop(key, None)
        if previous is not None:
            previous.cancel()
        task = asyncio.ensure_future(work)
        self._tasks[key] = task

        def done(finished: asyncio.Task[None]) -> None:
            if self._tasks.get(key) is finished:
                del self._tasks[key]

        task.add_done_callback(done)

    async def _loading(self, key: tuple[str, str]) -> None:
        """Marks the version failed (and asks for its workers to stop) unless it is ready in
        time."""
        deadline = time.monotonic() + self.settings.load_timeout_s
        while time.monotonic() < deadline:
            if key[1] in self._ready(key[0]):
                log.info("model %s: version %s is ready", *key)
                return
            await asyncio.sleep(POLL_S)
        reason = f"not ready within {self.settings.load_timeout_s:.0f} s (load_timeout_s)"
        self.failed[key] = reason
        self.book.set_desired(*key, UNLOADED)
        log.warning("model %s: version %s failed to load: %s", *key, reason)

    async def _draining(self, key: tuple[str, str]) -> None:
        """Waits for the version's requests, then lets its workers stop."""
        deadline = time.monotonic() + self.settings.unload_drain_s
        try:
            while self.book.running(*key) and time.monotonic() < deadline:
                await asyncio.sleep(POLL_S)
            left = self.book.running(*key)
            if left:
                log.warning("model %s: version %s unloads with %d requests unfinished", *key, left)
            self.book.set_desired(*key, UNLOADED)
            log.info("model %s: version %s unloaded; its workers may stop", *key)
        finally:
            self.book.end_drain(*key)

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
