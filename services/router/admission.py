"""Admitting a worker: nothing takes traffic before the router has checked it itself.

A registration (or a static address) is only a claim. Before a worker joins any chain the router
(a) calls its health and `Info` over the channel its requests will use, (b) checks the answer
against the registration and against the model repository (model, kind, num_layers, hidden size
and span from the model's config; the fingerprint equal to the repository's or allow-listed; the
version label the repository gives that fingerprint), and (c) runs one real `Forward` of a few
tokens on the worker's span and checks the answer's dtype, shape and values.

The repository's fingerprint of a model is computed once per model and precision (hashing the
weights takes seconds, in a thread) and kept until the model's files change.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import re
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.errors import InvalidArgument, status_code
from services.common.repository import (
    ModelSpec,
    fingerprint,
    model_path,
    model_spec,
    version_of,
)
from services.common.telemetry import outgoing_metadata
from services.common.tensors import from_numpy, to_numpy, validate
from services.common.types import ModelKind, WorkerDescriptor
from services.pb.tessera.v1 import common_pb2, worker_pb2, worker_pb2_grpc

PROBE_TOKENS = 4  # tokens per admission probe
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
MAX_ADDRESS_CHARS = 261  # a 253-character host name, ':' and a 5-digit port; [IPv6] fits too


class Rejected(Exception):
    """A worker failed admission (or a later check); the message says why."""


class Unanswered(Rejected):
    """A check got no answer (down, busy, overloaded): no verdict on the worker's honesty."""


# Answers that say nothing about a worker's honesty, only about its load or reachability.
_NO_VERDICT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    }
)


def _failed(what: str, error: grpc.RpcError) -> Rejected:
    code = status_code(error)
    name = code.name if isinstance(code, grpc.StatusCode) else "no status"
    kind = Unanswered if code in _NO_VERDICT else Rejected
    return kind(f"{what} ({name})")


def check_address(address: str) -> str:
    """`host:port` (a host name, an IPv4 literal or a bracketed IPv6 literal; port 1-65535).

    Anything else (`unix:...`, `dns:///...`, a path, a bare host) is INVALID_ARGUMENT: the
    router must never dial a target string a registration chose.
    """
    if not address or len(address) > MAX_ADDRESS_CHARS or not address.isascii():
        raise InvalidArgument(f"address must be host:port, at most {MAX_ADDRESS_CHARS} characters")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or len(port) > 5 or not 1 <= int(port) <= 65535:
        raise InvalidArgument(f"address {address!r} must be host:port with a port in 1-65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise InvalidArgument(f"address {address!r}: {host} is not an IPv6 literal") from None
        return address
    try:
        ipaddress.IPv4Address(host)
        return address
    except ValueError:
        pass
    labels = host.split(".")
    if (
        len(host) > 253
        or not all(_HOST_LABEL.match(label) for label in labels)
        or labels[-1].isdigit()  # 10.0.0 or 300.1.1.1: a mistyped IP, not a host name
    ):
        raise InvalidArgument(f"address {address!r}: {host!r} is not a host name or an IP literal")
    return address


def dial_target(address: str) -> str:
    """The gRPC target for a checked address: always the DNS resolver, never another scheme
    (a host named `unix` must not become a socket path)."""
    return f"dns:///{address}"


def descriptor_from_info(info: worker_pb2.WorkerInfo, address: str) -> WorkerDescriptor:
    """What a WorkerInfo says, at the address the router dials (raises Rejected if malformed)."""
    try:
        return WorkerDescriptor.from_pb(info, address)
    except ValueError as exc:
        raise Rejected(f"its Info is malformed: {exc}") from None


_IDENTITY = (
    "model",
    "version",
    "fingerprint",
    "precision",
    "span",
    "num_layers",
    "kind",
    "hidden_size",
)


def disagreements(a: WorkerDescriptor, b: WorkerDescriptor) -> list[str]:
    """The identity fields (what it serves, not its address or capacity) that differ."""
    return [
        f"{name} {getattr(a, name)!s:.80} != {getattr(b, name)!s:.80}"
        for name in _IDENTITY
        if getattr(a, name) != getattr(b, name)
    ]


@dataclass(frozen=True, slots=True)
class Expected:
    """The repository's view of one model at one precision."""

    spec: ModelSpec
    fingerprint: str
    version: str


def _signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and mtimes of a model's files: a new value means hash again."""
    found = []
    for file in path.rglob("*"):
        if file.is_file():
            stat = file.stat()
            found.append((file.relative_to(path).as_posix(), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(found))


def _expected(repository: Path, model: str, precision: str, version: str) -> Expected:
    spec = model_spec(repository, model, version)
    digest = fingerprint(spec.path, precision)
    return Expected(spec, digest, version_of(spec.path, digest, precision))


class RepositoryPrints:
    """The repository's fingerprint of each model version and precision, computed once and
    cached until the version's files change."""

    def __init__(self, repository: Path) -> None:
        self.repository = repository
        self._cache: dict[tuple[str, str, Path], tuple[object, Expected]] = {}
        self._locks: dict[tuple[str, str, Path], asyncio.Lock] = {}

    async def expected(self, model: str, precision: str, version: str = "") -> Expected:
        """What the repository says of `model` at `precision`, in the folder of the version
        labelled `version` (a published one; else the model's own folder)."""
        path = model_path(self.repository, model, version)
        key = (model, precision, path)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # concurrent admissions of one version hash its weights once
            signature = await asyncio.to_thread(_signature, path)
            cached = self._cache.get(key)
            if cached is not None and cached[0] == signature:
                return cached[1]
            expected = await asyncio.to_thread(
                _expected, self.repository, model, precision, version
            )
            self._cache[key] = (signature, expected)
            return expected


def check_against_repository(
    worker: WorkerDescriptor, expected: Expected, allowed: frozenset[str]
) -> None:
    """Raises Rejected unless the worker serves what the repository says the model is."""
    spec = expected.spec
    wrong = [
        f"{name} {got} (the repository's config says {want})"
        for name, got, want in (
            ("kind", worker.kind.value, spec.kind.value),
            ("num_layers", worker.num_layers, spec.num_layers),
            ("hidden_size", worker.hidden_size, spec.hidden_size),
        )
        if got != want
    ]
    if wrong:
        raise Rejected("it reports " + "; ".join(wrong))
    if worker.span.end > spec.num_layers:
        raise Rejected(f"its span {worker.span} runs past the model's {spec.num_layers} layers")
    if worker.fingerprint == expected.fingerprint:
        if worker.version != expected.version:
            raise Rejected(
                f"it reports version {worker.version!r:.80} for the repository's fingerprint, "
                f"whose version is {expected.version!r}"
            )
    elif worker.fingerprint not in allowed:
        raise Rejected(
            f"its fingerprint {worker.fingerprint[:16]!r:.20}... is neither the repository's "
            f"({expected.fingerprint[:16]}...) nor in allowed_fingerprints"
        )


def probe_request(worker: WorkerDescriptor) -> worker_pb2.StageForwardRequest:
    """A few tokens on the worker's whole span, with the input its first layer takes: token
    ids at layer 0, fixed hidden states later; pooled when the span ends an encoder."""
    request = worker_pb2.StageForwardRequest(
        span=common_pb2.Span(start=worker.span.start, end=worker.span.end),
        pool=_pooled(worker),
        hidden_dtype="float32",
        attention_mask=from_numpy(np.ones((1, PROBE_TOKENS), dtype=np.int64)),
    )
    if worker.span.start == 0:
        ids = np.arange(1, PROBE_TOKENS + 1, dtype=np.int64).reshape(1, PROBE_TOKENS)
        request.input_ids.CopyFrom(from_numpy(ids))
    else:
        # Not zeros: a layer norm with zero bias maps zeros to zeros, and a pooled zero vector
        # could not be told from a worker that answers nothing.
        count = PROBE_TOKENS * worker.hidden_size
        hidden = np.sin(np.arange(count, dtype=np.float32)).reshape(1, PROBE_TOKENS, -1)
        request.hidden_states.CopyFrom(from_numpy(hidden))
    return request


def _pooled(worker: WorkerDescriptor) -> bool:
    return worker.kind is ModelKind.ENCODER and worker.span.end == worker.num_layers


def check_probe_answer(worker: WorkerDescriptor, answer: worker_pb2.StageForwardResponse) -> None:
    """Raises Rejected unless the answer is float32 of the right shape with finite values
    (and unit vectors when pooled: the router's Embed relies on it)."""
    pooled = _pooled(worker)
    want = (1, worker.hidden_size) if pooled else (1, PROBE_TOKENS, worker.hidden_size)
    try:
        shape = validate(answer.hidden_states, "hidden_states", dtypes=("float32",))
        if shape != want:
            raise Rejected(f"its probe answer has shape {list(shape)}, not {list(want)}")
        values = to_numpy(answer.hidden_states, "hidden_states")
    except InvalidArgument as exc:
        raise Rejected(f"its probe answer is malformed: {exc.message}") from None
    if not np.isfinite(values).all():
        raise Rejected("its probe answer has values that are not finite")
    if pooled:
        norm = float(np.linalg.norm(values[0]))
        if not math.isclose(norm, 1.0, abs_tol=1e-3):
            raise Rejected(f"its pooled probe answer has norm {norm:.4f}, not 1")


class Admission:
    """Checks one worker (health, Info, repository, a real request) over a given channel."""

    def __init__(
        self, repository: Path, allowed_fingerprints: frozenset[str], timeout_s: float
    ) -> None:
        self.prints = RepositoryPrints(repository)
        self.allowed = allowed_fingerprints
        self.timeout_s = timeout_s

    async def identify(
        self, address: str, channel: aio.Channel, stub: worker_pb2_grpc.WorkerStub
    ) -> WorkerDescriptor:
        """Health SERVING, then what its Info says (raises Rejected)."""
        try:
            check = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""),
                timeout=self.timeout_s,
                metadata=outgoing_metadata(),
            )
            if check.status != health_pb2.HealthCheckResponse.SERVING:
                raise Rejected("its health is not SERVING")
            info = await stub.Info(
                worker_pb2.InfoRequest(), timeout=self.timeout_s, metadata=outgoing_metadata()
            )
        except grpc.RpcError as error:
            raise _failed("it did not answer", error) from None
        return descriptor_from_info(info, address)

    async def verify(
        self,
        address: str,
        channel: aio.Channel,
        stub: worker_pb2_grpc.WorkerStub,
        claimed: WorkerDescriptor | None,
    ) -> WorkerDescriptor:
        """The worker's checked descriptor, or Rejected saying what failed."""
        worker = await self.identify(address, channel, stub)
        if claimed is not None:
            differ = disagreements(worker, claimed)
            if differ:
                raise Rejected("its Info disagrees with its registration: " + "; ".join(differ))
        try:
            expected = await self.prints.expected(worker.model, worker.precision, worker.version)
        except Exception as exc:  # noqa: BLE001 - unknown model, bad config, unreadable files
            raise Rejected(
                f"the repository cannot describe model {worker.model!r}: {exc}"
            ) from None
        check_against_repository(worker, expected, self.allowed)
        await self.probe(worker, stub)
        return worker

    async def probe(self, worker: WorkerDescriptor, stub: worker_pb2_grpc.WorkerStub) -> None:
        """One real Forward on the worker's span; raises Rejected unless its answer is sound."""
        try:
            answer = await stub.Forward(
                probe_request(worker), timeout=self.timeout_s, metadata=outgoing_metadata()
            )
        except grpc.RpcError as error:
            raise _failed("its probe request failed", error) from None
        check_probe_answer(worker, answer)
