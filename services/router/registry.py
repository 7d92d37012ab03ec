"""The Registry servicer on the router: workers announce themselves and renew by heartbeat.

A registration is a claim, bounded and validated here, that the pool's admission checks before
the worker takes any traffic. The router's AuthInterceptor lets only worker tokens through
(services/router/main.py); an address stays bound to the credential that registered it, so
another worker token can neither take it over nor deregister it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from grpc import aio

from services.common.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from services.common.security import REGISTER, TokenSet, bearer_token, derive_token
from services.common.types import WorkerDescriptor
from services.pb.tessera.v1 import worker_pb2, worker_pb2_grpc
from services.router.admission import check_address
from services.router.pool import WorkerPool

MAX_LAYERS = 4096
MAX_LABEL_CHARS = 128  # model, version and fingerprint
MAX_HIDDEN_SIZE = 1 << 16
MAX_CAPACITY = 1 << 20
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True, slots=True)
class RegistryLimits:
    """How many registered workers the router keeps (static ones are not counted)."""

    total: int = 1024
    per_model: int = 512
    per_version: int = 256  # per model and fingerprint


def claim_from(info: worker_pb2.WorkerInfo) -> WorkerDescriptor:
    """The registration as a descriptor, every field bounded; raises InvalidArgument."""
    address = check_address(info.address)
    if not info.model or len(info.model) > MAX_LABEL_CHARS or not _MODEL_NAME.match(info.model):
        raise InvalidArgument(
            f"a registration needs a model name of 1 to {MAX_LABEL_CHARS} letters, digits, "
            f"'.', '_' or '-'"
        )
    if (
        not 0 < info.num_layers <= MAX_LAYERS
        or not 0 <= info.span.start < info.span.end <= info.num_layers
    ):
        raise InvalidArgument(
            f"span [{info.span.start}, {info.span.end}) must lie inside "
            f"[0, num_layers] with 0 < num_layers <= {MAX_LAYERS}"
        )
    if not 0 < info.hidden_size <= MAX_HIDDEN_SIZE:
        raise InvalidArgument(f"hidden_size must be in [1, {MAX_HIDDEN_SIZE}]")
    for name in ("version", "fingerprint"):
        value = getattr(info, name)
        if not value or len(value) > MAX_LABEL_CHARS or not value.isprintable():
            raise InvalidArgument(f"{name} must be 1 to {MAX_LABEL_CHARS} printable characters")
    if not 0 <= info.capacity <= MAX_CAPACITY or info.kv_token_budget < 0:
        raise InvalidArgument(f"capacity must be in [0, {MAX_CAPACITY}], kv_token_budget >= 0")
    try:
        return WorkerDescriptor.from_pb(info, address)
    except ValueError as exc:
        raise InvalidArgument(f"a registration is malformed: {exc}") from None


def _credential(context: aio.ServicerContext) -> str:
    """Who is calling: a digest of the bearer token ("" without one), never the token."""
    _, token = bearer_token(tuple(context.invocation_metadata() or ()))
    return hashlib.sha256(token.encode()).hexdigest()[:32] if token else ""


class RegistryService(worker_pb2_grpc.RegistryServicer):
    """Workers announce themselves here and renew by heartbeat."""

    def __init__(
        self,
        pool: WorkerPool,
        heartbeat_s: float,
        repository: Path,
        limits: RegistryLimits | None = None,
        listed: TokenSet | None = None,
        mesh_secret: str = "",
    ) -> None:
        self.pool = pool
        self.heartbeat_s = heartbeat_s
        self.repository = repository
        self.limits = limits or RegistryLimits()
        self._listed = listed or TokenSet()
        self._mesh_secret = mesh_secret

    def _check_credential(self, address: str, context: aio.ServicerContext) -> None:
        """With a mesh secret, a derived credential is good for its own address only (a listed
        worker token is good for any): one worker's credential cannot claim another address."""
        if not self._mesh_secret:
            return
        _, token = bearer_token(tuple(context.invocation_metadata() or ()))
        if self._listed.accepts(token):
            return
        own = derive_token(self._mesh_secret, REGISTER, address)
        if not hmac.compare_digest(own.encode(), token.encode()):
            raise PermissionDenied(f"this credential is not worker {address[:64]}'s")

    def _check_room(self, claim: WorkerDescriptor) -> None:
        claims = self.pool.claims()
        same_model = [c for c in claims if c.model == claim.model]
        same_version = [c for c in same_model if c.fingerprint == claim.fingerprint]
        for count, limit, what in (
            (len(claims), self.limits.total, "registered workers (max_registrations)"),
            (
                len(same_model),
                self.limits.per_model,
                f"workers of model {claim.model!r} (max_registrations_per_model)",
            ),
            (
                len(same_version),
                self.limits.per_version,
                f"workers of this version of {claim.model!r} (max_registrations_per_version)",
            ),
        ):
            if count >= limit:
                raise ResourceExhausted(f"the router already has {limit} {what}")

    def _check_owner(self, address: str, credential: str) -> None:
        owner = self.pool.owner(address)
        if owner is not None and owner != credential:
            raise PermissionDenied(
                f"worker {address} was registered with another credential; only that one may "
                f"renew or deregister it"
            )

    async def Register(
        self, request: worker_pb2.RegisterRequest, context: aio.ServicerContext
    ) -> worker_pb2.RegisterResponse:
        claim = claim_from(request.worker)
        if not (self.repository / claim.model / "config.json").is_file():
            raise NotFound(f"model {claim.model!r} is not in this router's model repository")
        self._check_credential(claim.address, context)
        credential = _credential(context)
        self._check_owner(claim.address, credential)
        if self.pool.state(claim.address) is None:
            self._check_room(claim)
        self.pool.register(claim, credential)
        return worker_pb2.RegisterResponse(heartbeat_seconds=self.heartbeat_s)

    async def Deregister(
        self, request: worker_pb2.DeregisterRequest, context: aio.ServicerContext
    ) -> worker_pb2.DeregisterResponse:
        address = check_address(request.address)
        self._check_credential(address, context)
        self._check_owner(address, _credential(context))
        self.pool.deregister(address)
        return worker_pb2.DeregisterResponse()
