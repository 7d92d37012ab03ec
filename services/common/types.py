"""Frozen value types of the request path. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ModelKind(StrEnum):
    CAUSAL_LM = "causal-lm"
    ENCODER = "encoder"


@dataclass(frozen=True, slots=True)
class Span:
    """A half-open layer range [start, end) of a model."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"span [{self.start}, {self.end}) is empty or negative")

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"

    def __len__(self) -> int:
        return self.end - self.start

    def contains(self, other: Span) -> bool:
        return self.start <= other.start and other.end <= self.end

    def intersect(self, other: Span) -> Span | None:
        start, end = max(self.start, other.start), min(self.end, other.end)
        return Span(start, end) if start < end else None

    @classmethod
    def parse(cls, text: str, num_layers: int | None = None) -> Span:
        """Parses "START:END"; an empty END means num_layers."""
        start_text, sep, end_text = text.partition(":")
        if not sep:
            raise ValueError(f"layers must look like START:END, got {text!r}")
        start = int(start_text or 0)
        if end_text:
            end = int(end_text)
        elif num_layers is not None:
            end = num_layers
        else:
            raise ValueError(f"layers {text!r} need an END")
        return cls(start, end)


@dataclass(frozen=True, slots=True)
class WorkerDescriptor:
    """What a worker serves, as announced to the router."""

    address: str
    model: str
    version: str
    fingerprint: str
    span: Span
    num_layers: int
    kind: ModelKind
    capacity: int
    hidden_size: int
    kv_token_budget: int = 0  # KV token slots (rows x columns) the worker holds at most
    precision: str = "float32"  # float32 | bfloat16 | int8 (part of the fingerprint)


@dataclass(frozen=True, slots=True)
class Hop:
    """One stage of a chain: the worker to call and the part of its span to run."""

    address: str
    span: Span


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def deterministic(self) -> bool:
        return self.greedy or self.seed is not None
