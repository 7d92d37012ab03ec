"""Typed results of the Tessera client: frozen dataclasses, no gRPC types leak out."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
import numpy as np


class TesseraError(grpc.RpcError):
    """A failed call: the gRPC status code and the server's human message.

    It is a grpc.RpcError, so `except grpc.RpcError` and `.code()` / `.details()` keep working.
    """

    def __init__(self, code: grpc.StatusCode, message: str, method: str = "") -> None:
        super().__init__(f"{code.name}: {message}" + (f" ({method})" if method else ""))
        self.status = code
        self.message = message
        self.method = method

    def code(self) -> grpc.StatusCode:
        return self.status

    def details(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system", "user", "assistant" or "tool"
    content: str


@dataclass(frozen=True, slots=True)
class GenerateResult:
    text: str
    finish_reason: str  # "length", "eos" or "stop"
    prompt_tokens: int
    generated_tokens: int
    cached: bool  # served from the cache tier
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ChunkResult:
    """One piece of a streamed generation; the last one carries finish_reason."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None  # None until the last chunk
    prompt_tokens: int
    generated_tokens: int  # tokens generated so far
    cached: bool

    @property
    def last(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class EmbedResult:
    embeddings: tuple[tuple[float, ...], ...]  # one vector per input, in input order
    dim: int
    cached_inputs: int  # inputs served from the cache tier
    cached: bool  # every input came from the cache tier
    # The same vectors as received (a packed answer), so numpy() needs no conversion.
    _matrix: np.ndarray | None = field(default=None, repr=False, compare=False)

    def numpy(self) -> np.ndarray:
        """The embeddings as a float32 [N, dim] array."""
        if self._matrix is not None:
            return self._matrix.copy()
        return np.asarray(self.embeddings, dtype=np.float32).reshape(len(self.embeddings), self.dim)


@dataclass(frozen=True, slots=True, eq=False)
class ForwardResult:
    hidden_states: np.ndarray  # [batch, seq, hidden] at the end of the layer range
    attention_mask: np.ndarray | None
    start: int
    end: int
    input_ids: tuple[int, ...] = ()  # the token ids when the input was text


@dataclass(frozen=True, slots=True)
class StageInfo:
    address: str
    start: int
    end: int
    healthy: bool
    outstanding: int  # requests in flight on this worker


@dataclass(frozen=True, slots=True)
class ChainInfo:
    stages: tuple[StageInfo, ...]
    healthy: bool


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    version: str
    fingerprint: str
    num_layers: int
    kind: str  # "causal-lm" or "encoder"
    healthy: bool  # a full healthy chain exists
    chains: tuple[ChainInfo, ...] = field(default=())
