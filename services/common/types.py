"""Frozen value types of the request path, and their conversions to and from the wire. No I/O.

Each type that crosses a wire converts itself (`from_pb` / `to_pb`) and validates itself, so the
router and the worker read one rule set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from services.common.errors import InvalidArgument
from services.pb.tessera.v1 import inference_pb2, worker_pb2


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

    @classmethod
    def from_pb(cls, info: worker_pb2.WorkerInfo, address: str | None = None) -> WorkerDescriptor:
        """What a WorkerInfo says, dialled at `address` (default: the address it names).

        Raises ValueError naming the first field that is malformed."""
        precision = info.precision or "float32"
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision[:32]!r}")
        return cls(
            address=info.address if address is None else address,
            model=info.model,
            version=info.version,
            fingerprint=info.fingerprint,
            span=Span(info.span.start, info.span.end),
            num_layers=info.num_layers,
            kind=ModelKind(info.kind),
            capacity=info.capacity,
            hidden_size=info.hidden_size,
            kv_token_budget=info.kv_token_budget,
            precision=precision,
        )

    def to_pb(self) -> worker_pb2.WorkerInfo:
        """The identity and capacity fields of a WorkerInfo (live counters are the worker's)."""
        info = worker_pb2.WorkerInfo(
            model=self.model,
            version=self.version,
            fingerprint=self.fingerprint,
            num_layers=self.num_layers,
            kind=self.kind.value,
            capacity=self.capacity,
            hidden_size=self.hidden_size,
            address=self.address,
            kv_token_budget=self.kv_token_budget,
            precision=self.precision,
        )
        info.span.start, info.span.end = self.span.start, self.span.end
        return info


PRECISIONS = ("float32", "bfloat16", "int8")  # float32 is the default and the exact one


@dataclass(frozen=True, slots=True)
class Hop:
    """One stage of a chain: the worker to call and the part of its span to run."""

    address: str
    span: Span


MAX_TEMPERATURE = 100.0
MAX_TOP_LOGPROBS = 20
MAX_SCHEMA_CHARS = 64 * 1024


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How the last stage picks each token. Invalid values cannot be constructed."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off; in (0, 1]
    seed: int | None = None  # seeded draws depend only on (seed, position)
    logprobs: bool = False  # each token's log-probability comes back with it
    top_logprobs: int = 0  # ... with this many alternatives
    json_schema: str = ""  # the answer must be JSON matching this schema ("" = free text)

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise InvalidArgument(
                f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}"
            )
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}"
            )
        if len(self.json_schema) > MAX_SCHEMA_CHARS:
            raise InvalidArgument(f"a JSON schema is at most {MAX_SCHEMA_CHARS} characters")

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def deterministic(self) -> bool:
        return self.greedy or self.seed is not None

    @classmethod
    def from_request(cls, request: inference_pb2.GenerateRequest) -> SamplingParams:
        """A public GenerateRequest's sampling fields (unset = the defaults above)."""
        return cls(
            temperature=float(request.temperature) if request.HasField("temperature") else 0.0,
            top_k=int(request.top_k) if request.HasField("top_k") else 0,
            top_p=float(request.top_p) if request.HasField("top_p") else 1.0,
            seed=int(request.seed) if request.HasField("seed") else None,
            logprobs=request.logprobs,
            top_logprobs=int(request.top_logprobs) if request.HasField("top_logprobs") else 0,
            json_schema=_schema_of(request.response_format),
        )

    @classmethod
    def from_pb(cls, sampling: worker_pb2.Sampling) -> SamplingParams:
        """The worker wire form: every field is sent (to_pb), so none has a default here."""
        return cls(
            temperature=float(sampling.temperature),
            top_k=int(sampling.top_k),
            top_p=float(sampling.top_p),
            seed=int(sampling.seed) if sampling.HasField("seed") else None,
            logprobs=sampling.logprobs,
            top_logprobs=int(sampling.top_logprobs),
            json_schema=sampling.json_schema,
        )

    def to_pb(self) -> worker_pb2.Sampling:
        sampling = worker_pb2.Sampling(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs,
            json_schema=self.json_schema,
        )
        if self.seed is not None:
            sampling.seed = self.seed
        return sampling


JSON_OBJECT_SCHEMA = '{"type": "object"}'


def _schema_of(response_format: inference_pb2.ResponseFormat) -> str:
    """The JSON schema a response format asks for ("" for free text)."""
    kind = response_format.type or "text"
    if kind == "text":
        if response_format.json_schema:
            raise InvalidArgument('response_format.json_schema needs type "json_schema"')
        return ""
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA
    if kind == "json_schema":
        if not response_format.json_schema:
            raise InvalidArgument('response_format type "json_schema" needs a json_schema')
        return response_format.json_schema
    raise InvalidArgument(
        f"response_format.type must be text, json_object or json_schema, got "
        f"{response_format.type[:32]!r}"
    )
