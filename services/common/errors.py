"""Service errors carrying their gRPC status code, and the interceptor that maps them."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from services.common.interceptors import AroundInterceptor, Call, Deserializer

log = logging.getLogger(__name__)


QUOTE_CHARS = 48


def quoted(value: str, limit: int = QUOTE_CHARS) -> str:
    """A client's string as an error message quotes it: at most `limit` characters (a client
    must not make the router echo megabytes back, or fill its logs)."""
    return repr(value[:limit] + "…") if len(value) > limit else repr(value)


class ServiceError(Exception):
    """An error the client should see, with its status code and a human message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    trailing: tuple[tuple[str, str], ...] = ()  # trailing metadata sent with the status

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(ServiceError):
    """The request is valid but the system is not in a state to do it (say which)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


PREFIX_MISSING_KEY = "tessera-prefix-missing"


class PrefixMissing(FailedPrecondition):
    """A prefill meant to start from cached KV blocks this worker no longer holds (evicted, or
    it restarted): marked, so the router prefills those rows again from their first token."""

    trailing = ((PREFIX_MISSING_KEY, "1"),)


DRAINING_KEY = "tessera-draining"


class Draining(Unavailable):
    """The server is draining: it finishes what it holds and takes no new work.

    UNAVAILABLE (try elsewhere) marked in the trailing metadata, so a caller can tell a server
    that is leaving in good order from one that is gone: the router sends new work elsewhere
    and lets the rows this worker holds finish where they are."""

    trailing = ((DRAINING_KEY, "1"),)


class MissingSpanError(Unavailable):
    """No healthy chain covers a model's layers."""

    def __init__(self, model: str, missing: str) -> None:
        super().__init__(f"no healthy chain for model {model!r}: nothing serves layers {missing}")
        self.model = model


def status_code(error: BaseException) -> grpc.StatusCode | None:
    """The status of a failed call, sync (grpc.Call) or asyncio (AioRpcError, which is not a
    grpc.Call); None when the error carries none."""
    code = getattr(error, "code", None)
    value = code() if callable(code) else None
    return value if isinstance(value, grpc.StatusCode) else None


# Codes of a failed downstream call that the client may act on, so they reach it unchanged.
_PASSED_THROUGH = frozenset(
    {
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
    }
)


def _mapped(exc: Exception) -> tuple[grpc.StatusCode, str] | None:
    """The status of an error the client may see as it is; None for a bug (INTERNAL)."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    if isinstance(exc, aio.AioRpcError):
        # A downstream call failed in a way the handler did not translate: keep its code when
        # it is one the client may act on, never pass INVALID_ARGUMENT (that would be our bug).
        code = exc.code()
        if code in _PASSED_THROUGH:
            return code, exc.details() or code.name
    return None


def _internal(method: str) -> tuple[grpc.StatusCode, str]:
    return grpc.StatusCode.INTERNAL, f"internal error in {method}; see server logs"


def outcome(
    error: BaseException | None, context: aio.ServicerContext, method: str
) -> tuple[grpc.StatusCode, str]:
    """The status and details a call ends with, once its handler returned (`error` None) or
    raised `error`, as the error interceptor reports it to the client.

    Reads only plain attributes of the context (code, details): safe after cancellation.
    """
    if error is None or isinstance(error, (aio.AbortError, aio.UsageError)):
        code = context.code()
        if isinstance(code, grpc.StatusCode):
            return code, str(context.details() or "")
        return (grpc.StatusCode.OK, "") if error is None else _internal(method)
    if isinstance(error, Exception):
        return _mapped(error) or _internal(method)
    # CancelledError, GeneratorExit: the call ended before its handler did.
    return grpc.StatusCode.CANCELLED, ""


async def _abort_for(exc: Exception, context: aio.ServicerContext, method: str) -> None:
    status = _mapped(exc)
    if status is None:
        log.exception("unexpected error in %s", method)
        status = _internal(method)
    trailing = exc.trailing if isinstance(exc, ServiceError) else ()
    await context.abort(*status, trailing_metadata=trailing)


_UNDECODABLE_MESSAGE = "request is not a valid protobuf message (bad wire format or invalid UTF-8)"


@dataclass(frozen=True)
class _Undecodable:
    """What the handler gets instead of a request that could not be decoded."""

    message: str = _UNDECODABLE_MESSAGE


def _safe(deserializer: Deserializer | None) -> Deserializer | None:
    """A deserializer that hands the handler a marker instead of failing inside gRPC (UNKNOWN).
    A deserializer may refuse a request with InvalidArgument (too large, say): its message."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except InvalidArgument as refused:
            return _Undecodable(refused.message)
        except Exception:  # noqa: BLE001 - any decoding failure is the client's bad input
            return _Undecodable()

    return deserialize


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise InvalidArgument(request.message)
        yield request


class ErrorInterceptor(AroundInterceptor):
    """Maps ServiceError to its status; anything unexpected to INTERNAL with a logged traceback.

    Installed outermost, so it also maps what the other interceptors raise. An undecodable
    unary request is refused here, before auth, metrics or tracing see it; in a client stream
    the bad message surfaces where the servicer reads it, like any error the servicer raises.
    """

    def request_deserializer(self, deserializer: Deserializer | None) -> Deserializer | None:
        return _safe(deserializer)

    def requests(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        return _checked(requests)

    @asynccontextmanager
    async def around(self, call: Call) -> AsyncIterator[None]:
        try:
            if isinstance(call.request, _Undecodable):
                raise InvalidArgument(call.request.message)
            yield
        except (aio.AbortError, aio.UsageError):
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary that maps every error
            await _abort_for(exc, call.context, call.method)
            raise  # abort() raises AbortError; should it not, the error still propagates
