"""Admission's pure checks: addresses, the repository comparison and the probe answer (no
sockets), and the pool's load counters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.common.repository import ModelSpec
from services.common.tensors import from_numpy, to_numpy
from services.common.types import ModelKind, Span, WorkerDescriptor
from services.pb.tessera.v1 import common_pb2, worker_pb2
from services.router.admission import (
    PROBE_TOKENS,
    Admission,
    Expected,
    Rejected,
    check_address,
    check_against_repository,
    check_probe_answer,
    descriptor_from_info,
    dial_target,
    disagreements,
    probe_request,
)
from services.router.pool import Holding, WorkerPool

SPEC = ModelSpec("m", Path("/nowhere/m"), "bert", ModelKind.ENCODER, 6, 32, 128)
EXPECTED = Expected(SPEC, "f" * 64, "ffffffffffff")


def descriptor(**changes: object) -> WorkerDescriptor:
    fields: dict[str, object] = dict(
        address="127.0.0.1:50061",
        model="m",
        version="ffffffffffff",
        fingerprint="f" * 64,
        span=Span(0, 6),
        num_layers=6,
        kind=ModelKind.ENCODER,
        capacity=8,
        hidden_size=32,
    )
    fields.update(changes)
    return WorkerDescriptor(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1:50061", "localhost:1", "worker-0.tessera.svc.cluster.local:65535", "[::1]:50061"],
)
def test_host_port_addresses_are_accepted(address: str) -> None:
    assert check_address(address) == address
    assert dial_target(address) == f"dns:///{address}"


@pytest.mark.parametrize(
    "address",
    [
        "",
        "localhost",
        "localhost:0",
        "localhost:65536",
        "localhost:+80",
        "localhost:80 ",
        "unix:/tmp/socket",
        "unix:///tmp/socket",
        "unix-abstract:name",
        "dns:///evil.example:53",
        "ipv4:127.0.0.1:50061",
        "vsock:3:50061",
        "::1:50061",
        "[not-ip]:1",
        "-bad.example:1",
        "a..b:1",
        "300.1.1.1:1",
        "host_name:1",
        "h\u00e9llo:1",
        "a" * 300 + ":1",
        "http://host:1",
        "host:1/path",
    ],
)
def test_other_targets_are_invalid(address: str) -> None:
    with pytest.raises(InvalidArgument):
        check_address(address)


def test_a_host_named_like_a_scheme_is_dialled_through_dns() -> None:
    # "unix:1" is a valid host:port, and gRPC would read it as a socket path: never dial it raw.
    assert check_address("unix:1") == "unix:1"
    assert dial_target("unix:1") == "dns:///unix:1"


def test_the_repository_check_compares_structure_and_fingerprint() -> None:
    check_against_repository(descriptor(), EXPECTED, frozenset())
    check_against_repository(descriptor(span=Span(2, 6)), EXPECTED, frozenset())
    for wrong, words in (
        (descriptor(num_layers=7, span=Span(0, 7)), "num_layers 7"),
        (descriptor(hidden_size=64), "hidden_size 64"),
        (descriptor(kind=ModelKind.CAUSAL_LM), "kind causal-lm"),
        (descriptor(fingerprint="0" * 64), "neither the repository's"),
        (descriptor(version="v-made-up"), "version 'v-made-up'"),
    ):
        with pytest.raises(Rejected) as info:
            check_against_repository(wrong, EXPECTED, frozenset())
        assert words in str(info.value)
    # An allow-listed fingerprint passes, with any version label; structure is still checked.
    other = descriptor(fingerprint="0" * 64, version="v2")
    check_against_repository(other, EXPECTED, frozenset({"0" * 64}))
    with pytest.raises(Rejected):
        check_against_repository(
            descriptor(fingerprint="0" * 64, hidden_size=8), EXPECTED, frozenset({"0" * 64})
        )


def test_disagreements_name_identity_fields_only() -> None:
    assert disagreements(descriptor(), descriptor(capacity=1, kv_token_budget=9)) == []
    differ = disagreements(
        descriptor(), descriptor(fingerprint="e" * 64, span=Span(0, 3), precision="bfloat16")
    )
    assert [d.split()[0] for d in differ] == ["fingerprint", "precision", "span"]


def test_info_becomes_a_descriptor_or_a_rejection() -> None:
    info = worker_pb2.WorkerInfo(
        model="m",
        version="v",
        fingerprint="f" * 64,
        span=common_pb2.Span(start=0, end=6),
        num_layers=6,
        kind="encoder",
        hidden_size=32,
    )
    assert descriptor_from_info(info, "h:1").precision == "float32"  # empty: the default
    info.precision = "bfloat16"
    assert descriptor_from_info(info, "h:1") == descriptor(
        address="h:1", version="v", precision="bfloat16", capacity=0
    )
    for field, value in (("precision", "float8"), ("kind", "vision"), ("span", None)):
        bad = worker_pb2.WorkerInfo()
        bad.CopyFrom(info)
        if field == "span":
            bad.span.start, bad.span.end = 4, 2
        else:
            setattr(bad, field, value)
        with pytest.raises(Rejected):
            descriptor_from_info(bad, "h:1")


def test_probe_requests_take_the_input_of_the_first_layer() -> None:
    first = probe_request(descriptor(span=Span(0, 3)))
    assert first.HasField("input_ids") and not first.HasField("hidden_states")
    assert list(first.input_ids.shape) == [1, PROBE_TOKENS] and not first.pool
    later = probe_request(descriptor(span=Span(3, 6)))
    assert later.HasField("hidden_states") and later.pool  # the last encoder stage pools
    hidden = to_numpy(later.hidden_states)
    assert hidden.shape == (1, PROBE_TOKENS, 32) and np.abs(hidden).sum() > 0
    assert (later.span.start, later.span.end) == (3, 6)
    causal = probe_request(descriptor(kind=ModelKind.CAUSAL_LM, span=Span(0, 6)))
    assert not causal.pool


def _answer(array: np.ndarray) -> worker_pb2.StageForwardResponse:
    return worker_pb2.StageForwardResponse(hidden_states=from_numpy(array))


def test_probe_answers_must_have_the_right_dtype_shape_and_values() -> None:
    stage = descriptor(span=Span(0, 3))
    check_probe_answer(stage, _answer(np.ones((1, PROBE_TOKENS, 32), np.float32)))
    pooled = descriptor()
    unit = np.zeros((1, 32), np.float32)
    unit[0, 0] = 1.0
    check_probe_answer(pooled, _answer(unit))
    nan = np.ones((1, PROBE_TOKENS, 32), np.float32)
    nan[0, 1, 2] = np.nan
    bad = [
        (stage, _answer(np.ones((1, PROBE_TOKENS, 31), np.float32)), "shape"),
        (stage, _answer(np.ones((1, PROBE_TOKENS, 32), np.float16)), "malformed"),
        (stage, _answer(nan), "not finite"),
        (pooled, _answer(np.zeros((1, 32), np.float32)), "norm"),
        (pooled, _answer(np.ones((1, PROBE_TOKENS, 32), np.float32)), "shape"),
        (stage, worker_pb2.StageForwardResponse(), "malformed"),
    ]
    lying = from_numpy(np.ones((1, PROBE_TOKENS, 32), np.float32))
    lying.shape[:] = [0, 2**62, 32]
    bad.append((stage, worker_pb2.StageForwardResponse(hidden_states=lying), "malformed"))
    for worker, answer, words in bad:
        with pytest.raises(Rejected) as info:
            check_probe_answer(worker, answer)
        assert words in str(info.value)


def test_load_counters_never_go_negative_and_vanish_at_zero() -> None:
    pool = WorkerPool([], admission=Admission(Path("/nowhere"), frozenset(), 1.0))
    pool.book.acquire(["a"])
    assert pool.load == {"a": 1} and pool.book.calls("a") == 1
    pool.book.release(["a"])
    assert pool.load == {}
    pool.book.release(["gone"])  # a call that outlived its worker's departure
    assert pool.load == {} and pool.load.get("gone", 0) == 0 and pool.book.calls("gone") == 0


def test_holdings_of_chains_that_share_a_stage_add_up() -> None:
    """Two generation engines on chains through one stage: the book sums what they hold there,
    and each sees only the other's share (what its own admission must leave room for)."""
    book = WorkerPool([], admission=Admission(Path("/nowhere"), frozenset(), 1.0)).book
    first, second = object(), object()
    book.hold(first, Holding(("s0", "shared"), requests=3, rows=2, tokens=100))
    book.hold(second, Holding(("s1", "shared"), requests=1, rows=1, tokens=40))
    assert book.load == {"s0": 3, "s1": 1, "shared": 4}
    assert book.others(first, "shared") == (1, 40)
    assert book.others(second, "shared") == (2, 100)
    assert book.others(first, "s0") == (0, 0)
    book.hold(first, Holding(("s0", "shared"), requests=1, rows=1, tokens=30))  # replaces
    assert book.others(second, "shared") == (1, 30)
    book.hold(first, Holding(("s0", "shared")))  # nothing held: gone from the book
    book.hold(second, Holding(("s1", "shared")))
    assert book.load == {} and book.others(first, "shared") == (0, 0)


def test_static_workers_must_be_host_port() -> None:
    with pytest.raises(ValueError, match="static workers"):
        WorkerPool(["unix:/tmp/x"], admission=Admission(Path("/nowhere"), frozenset(), 1.0))
