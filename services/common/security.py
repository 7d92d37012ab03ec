"""Transport security (TLS, mutual TLS) and bearer-token authentication.

Paths come from settings; nothing here reads the environment. A server with a certificate but
no client CA speaks TLS; with a client CA it also asks for and verifies client certificates
(mutual TLS). Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
from grpc import aio

log = logging.getLogger(__name__)


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def server_credentials(
    cert: str | None,
    key: str | None,
    client_ca: str | None = None,
    require_client_cert: bool = False,
) -> grpc.ServerCredentials | None:
    """TLS credentials for a server, or None for plaintext (when no certificate is set)."""
    if not cert and not key:
        if client_ca:
            raise ValueError("a client CA needs a server certificate and key too")
        return None
    if not (cert and key):
        raise ValueError("TLS needs both a certificate and a key")
    return grpc.ssl_server_credentials(
        [(_read(key), _read(cert))],
        root_certificates=_read(client_ca),
        require_client_auth=bool(client_ca) and require_client_cert,
    )


def channel_credentials(
    ca: str | None, cert: str | None = None, key: str | None = None
) -> grpc.ChannelCredentials | None:
    """Credentials for dialing a TLS server (with a client certificate for mutual TLS)."""
    if not ca and not cert:
        return None
    if bool(cert) != bool(key):
        raise ValueError("a client certificate needs its key (and the other way round)")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca), private_key=_read(key), certificate_chain=_read(cert)
    )


def open_channel(
    address: str,
    credentials: grpc.ChannelCredentials | None,
    options: Sequence[tuple[str, Any]],
    interceptors: Sequence[aio.ClientInterceptor] = (),
) -> aio.Channel:
    extra = {"interceptors": list(interceptors)} if interceptors else {}
    if credentials is None:
        return aio.insecure_channel(address, options=list(options), **extra)
    return aio.secure_channel(address, credentials, options=list(options), **extra)


class BearerToken(
    aio.UnaryUnaryClientInterceptor,
    aio.UnaryStreamClientInterceptor,
    aio.StreamUnaryClientInterceptor,
    aio.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call of a channel (a router's worker
    calls, checked by the workers' AuthInterceptor)."""

    def __init__(self, token: str) -> None:
        if not token or token != token.strip() or "\n" in token:
            raise ValueError("a bearer token is one non-empty line without surrounding spaces")
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: aio.ClientCallDetails) -> aio.ClientCallDetails:
        metadata = aio.Metadata(*(details.metadata or ()))
        metadata.add(*self._header)
        return aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(
        self, continuation: Any, details: aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._with_token(details), request)

    async def intercept_unary_stream(
        self, continuation: Any, details: aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._with_token(details), request)

    async def intercept_stream_unary(
        self, continuation: Any, details: aio.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await continuation(self._with_token(details), request_iterator)

    async def intercept_stream_stream(
        self, continuation: Any, details: aio.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await continuation(self._with_token(details), request_iterator)


@dataclass(frozen=True)
class Caller:
    """Who a token says its holder is: the tenant it is scheduled as, the highest priority it
    may ask for, how many requests it may have in flight (None: the router's default), and
    whether it is an operator (admin)."""

    tenant: str
    max_priority: int = 0
    max_in_flight: int | None = None
    admin: bool = False


REGISTER, CALL = "register", "call"


def derive_token(secret: str, purpose: str, address: str) -> str:
    """A worker's own credential for `purpose` (REGISTER: what it registers with; CALL: what
    the router calls it with), derived from the mesh's secret and the worker's address: one
    worker's credential is worth nothing at another address."""
    digest = hmac.new(secret.encode(), f"{purpose}:{address}".encode(), hashlib.sha256)
    return digest.hexdigest()


def looks_derived(token: str) -> bool:
    return len(token) == 64 and all(c in "0123456789abcdef" for c in token)


def token_tenant(token: str) -> str:
    """A plain token's own tenant: a digest, so the token itself never appears."""
    return "token-" + hashlib.sha256(token.encode()).hexdigest()[:12]


def _entry(line: str) -> tuple[str, Caller]:
    """`TOKEN [tenant=NAME] [max_priority=N] [max_in_flight=N]` -> (token, caller)."""
    token, *fields = line.split()
    values = dict(f.split("=", 1) for f in fields if "=" in f)
    unknown = set(values) - {"tenant", "max_priority", "max_in_flight"}
    if unknown or len(values) != len(fields):
        raise ValueError(f"unknown token fields {sorted(unknown) or fields}")
    caller = Caller(
        tenant=values.get("tenant") or token_tenant(token),
        max_priority=int(values.get("max_priority", 0)),
        max_in_flight=int(values["max_in_flight"]) if "max_in_flight" in values else None,
    )
    return token, caller


class TokenSet:
    """Accepted bearer tokens: a static list plus a file, re-read when it changes.

    A file line is a token, optionally followed by `tenant=NAME max_priority=N
    max_in_flight=N`; a plain token is its own tenant with priority at most 0. `#` starts a
    comment line."""

    def __init__(
        self,
        tokens: Sequence[str] = (),
        path: str | None = None,
        *,
        default: Callable[[str], Caller] | None = None,
    ) -> None:
        self._default = default or (lambda token: Caller(token_tenant(token)))
        self._static = {t: self._default(t) for t in tokens if t}
        self._path = Path(path) if path else None
        self._from_file: dict[str, Caller] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self._reload()

    @property
    def enabled(self) -> bool:
        return bool(self._static) or self._path is not None

    def _reload(self) -> None:
        if self._path is None:
            return
        try:
            mtime = self._path.stat().st_mtime
        except OSError:
            log.warning("token file %s is unreadable; accepting only static tokens", self._path)
            self._from_file, self._mtime = {}, None
            return
        if mtime == self._mtime:
            return
        entries: dict[str, Caller] = {}
        for number, raw in enumerate(self._path.read_text().splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                token, caller = _entry(line)
            except ValueError as exc:
                log.warning("token file %s line %d ignored: %s", self._path, number, exc)
                continue
            entries[token] = caller if "=" in line else self._default(token)
        self._from_file, self._mtime = entries, mtime
        log.info("loaded %d tokens from %s", len(entries), self._path)

    def caller(self, token: str) -> Caller | None:
        """Who the token's holder is, or None when the token is not accepted."""
        now = time.monotonic()
        if self._path is not None and now - self._checked > 1.0:
            with self._lock:
                self._checked = now
                self._reload()
        # Compare against every token so timing does not tell how close a guess was.
        found: Caller | None = None
        encoded = token.encode()
        for candidate, caller in (*self._static.items(), *self._from_file.items()):
            if hmac.compare_digest(candidate.encode(), encoded):
                found = caller
        return found

    def accepts(self, token: str) -> bool:
        return self.caller(token) is not None

    def shares_a_token_with(self, other: TokenSet) -> bool:
        """Whether one token is in both sets (a user token must never be a worker token)."""
        mine = set(self._static) | set(self._from_file)
        return bool(mine & (set(other._static) | set(other._from_file)))


class Tokens(Protocol):
    """What accepts bearer tokens: a TokenSet, or several (AnyOf)."""

    @property
    def enabled(self) -> bool: ...

    def caller(self, token: str) -> Caller | None: ...

    def accepts(self, token: str) -> bool: ...


class AnyOf:
    """Several token sets read as one: the first that accepts a token says who it is."""

    def __init__(self, *sets: Tokens) -> None:
        self._sets = sets

    @property
    def enabled(self) -> bool:
        return any(s.enabled for s in self._sets)

    def caller(self, token: str) -> Caller | None:
        for tokens in self._sets:
            caller = tokens.caller(token)
            if caller is not None:
                return caller
        return None

    def accepts(self, token: str) -> bool:
        return self.caller(token) is not None


def bearer_token(metadata: Sequence[tuple[str, str | bytes]]) -> tuple[str, str]:
    """(the `authorization` header, its bearer token or "") from a call's metadata."""
    header = ""
    for key, value in metadata:
        if key == "authorization" and isinstance(value, str):
            header = value
    scheme, _, token = header.partition(" ")
    return header, token.strip() if scheme.lower() == "bearer" else ""


class AuthInterceptor(aio.ServerInterceptor):
    """Checks `authorization: Bearer <token>` on protected services; probes stay open.

    Decided from the call's metadata before its request is read: a refused call's body is
    never received or parsed (a streaming-request handler refuses it), so a client without a
    token cannot make the server read large bodies. Installed outside metrics and tracing: a
    refused call leaves no metric sample, no access line and no span, so unauthenticated
    clients cannot grow the label sets or the logs.

    `required` (default: whether `tokens` has any) says whether the prefixes are protected at
    all: the worker Registry stays closed when only user tokens are set. A token of `refused`
    (valid elsewhere, e.g. a user token on the Registry) gets PERMISSION_DENIED and
    `refused_message`; any other missing or unknown token gets UNAUTHENTICATED.
    """

    def __init__(
        self,
        tokens: Tokens,
        protected_prefixes: Sequence[str],
        *,
        required: bool | None = None,
        refused: TokenSet | None = None,
        refused_message: str = "this token is not accepted here",
    ) -> None:
        self._tokens = tokens
        self._prefixes = tuple(protected_prefixes)
        self._required = tokens.enabled if required is None else required
        self._refused = refused
        self._refused_message = refused_message

    def intercepts(self, method: str) -> bool:
        return self._required and method.startswith(self._prefixes)

    def verdict(self, metadata: Sequence[tuple[str, str | bytes]]) -> grpc.RpcMethodHandler | None:
        """None when the call may go on; else the handler that refuses it."""
        header, token = bearer_token(metadata)
        if token and self._tokens.accepts(token):
            return None
        if token and self._refused is not None and self._refused.accepts(token):
            return refusal(grpc.StatusCode.PERMISSION_DENIED, self._refused_message)
        message = (
            "missing bearer token: send metadata 'authorization: Bearer <token>'"
            if not header
            else "invalid bearer token"
        )
        return refusal(grpc.StatusCode.UNAUTHENTICATED, message)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if not self.intercepts(handler_call_details.method):
            return await continuation(handler_call_details)
        refused = self.verdict(tuple(handler_call_details.invocation_metadata or ()))
        if refused is not None:
            # A protected method that does not exist is refused like one that does: without
            # a token a client learns nothing, not even which methods are there.
            return refused
        return await continuation(handler_call_details) or _UNIMPLEMENTED


async def _unimplemented(request: Any, context: aio.ServicerContext) -> Any:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")


_UNIMPLEMENTED = grpc.unary_unary_rpc_method_handler(_unimplemented)


def refusal(status: grpc.StatusCode, why: str) -> grpc.RpcMethodHandler:
    """A handler that refuses a call without reading its request: a streaming-request handler,
    so gRPC does not receive the body first (a unary handler would take all of it)."""

    async def refuse(requests: AsyncIterator[Any], context: aio.ServicerContext) -> None:
        await context.abort(status, why)

    return grpc.stream_unary_rpc_method_handler(refuse)


def make_dev_certs(
    folder: Path, hosts: Sequence[str] = ("localhost", "127.0.0.1")
) -> dict[str, Path]:
    """A local CA plus server and client certificates for development, made with openssl."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        name: folder / name
        for name in ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")
    }

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "365",
        "-keyout",
        str(paths["ca.key"]),
        "-out",
        str(paths["ca.pem"]),
        "-subj",
        "/CN=tessera-dev-ca",
    )
    san = ",".join(
        f"IP:{h}" if h.replace(".", "").isdigit() or ":" in h else f"DNS:{h}" for h in hosts
    )
    for role, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        csr = folder / f"{role}.csr"
        ext = folder / f"{role}.ext"
        ext.write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n")
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(paths[f"{role}.key"]),
            "-out",
            str(csr),
            "-subj",
            f"/CN=tessera-{role}",
        )
        run(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(paths["ca.pem"]),
            "-CAkey",
            str(paths["ca.key"]),
            "-CAcreateserial",
            "-days",
            "365",
            "-out",
            str(paths[f"{role}.pem"]),
            "-extfile",
            str(ext),
        )
        csr.unlink()
        ext.unlink()
    for key in ("ca.key", "server.key", "client.key"):
        os.chmod(paths[key], 0o600)
    return paths
