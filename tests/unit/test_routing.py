"""RoutingTable and Chain: pure planning over WorkerDescriptor values (no sockets)."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable

import grpc
import pytest

from services.common.errors import MissingSpanError, Unavailable
from services.common.types import Hop, ModelKind, Span, WorkerDescriptor
from services.router.routing import Chain, RoutingTable

L = 6
MODEL = "tiny-llama"


def worker(
    address: str, span: str, *, model: str = MODEL, fingerprint: str = "fp-a", num_layers: int = L
) -> WorkerDescriptor:
    return WorkerDescriptor(
        address=address,
        model=model,
        version=fingerprint[:6],
        fingerprint=fingerprint,
        span=Span.parse(span, num_layers),
        num_layers=num_layers,
        kind=ModelKind.CAUSAL_LM,
        capacity=8,
        hidden_size=32,
    )


def table(
    workers: Iterable[WorkerDescriptor], healthy: Iterable[str] | None = None
) -> RoutingTable:
    workers = list(workers)
    return RoutingTable(workers, [w.address for w in workers] if healthy is None else healthy)


def assert_tiles(chain: Chain, num_layers: int = L) -> None:
    """The chain's spans are contiguous, start at 0, end at num_layers, one fingerprint."""
    at = 0
    for w in chain.workers:
        assert w.span.start == at, chain.describe()
        at = w.span.end
    assert at == num_layers, chain.describe()
    assert {w.fingerprint for w in chain.workers} == {chain.fingerprint}
    assert {w.model for w in chain.workers} == {chain.model}


def routes(chains: Iterable[Chain]) -> set[tuple[str, ...]]:
    return {c.addresses for c in chains}


# -- chains ----------------------------------------------------------------------------------


def test_chains_tile_every_layer() -> None:
    ws = [
        worker("a", "0:3"),
        worker("b", "3:6"),
        worker("r", "0:6"),
        worker("c", "0:1"),
        worker("d", "1:3"),
        worker("e", "3:5"),
        worker("f", "5:6"),
    ]
    chains = table(ws).chains(MODEL)
    for chain in chains:
        assert_tiles(chain)
    # Every combination of stages that tiles [0, 6) is found, and nothing else.
    expected = set()
    for n in range(1, len(ws) + 1):
        for combo in itertools.permutations(ws, n):
            edges = [w.span for w in combo]
            if (
                edges[0].start == 0
                and edges[-1].end == L
                and all(x.end == y.start for x, y in itertools.pairwise(edges))
            ):
                expected.add(tuple(w.address for w in combo))
    assert routes(chains) == expected
    assert ("r",) in expected and ("a", "b") in expected and ("c", "d", "e", "f") in expected
    assert len(chains) == len(expected)  # no duplicates


def test_overlapping_or_gapped_spans_make_no_chain() -> None:
    t = table([worker("a", "0:4"), worker("b", "3:6"), worker("c", "0:2"), worker("d", "3:6")])
    assert t.chains(MODEL) == ()
    with pytest.raises(MissingSpanError) as info:
        t.route(MODEL, {})
    # Layers are all covered, but no tiling exists.
    assert "no chain tiles" in str(info.value)


def test_fingerprints_never_mix() -> None:
    old = [worker("o1", "0:2", fingerprint="old"), worker("o2", "2:6", fingerprint="old")]
    new = [worker("n1", "0:4", fingerprint="new"), worker("n2", "4:6", fingerprint="new")]
    chains = table(old + new).chains(MODEL)
    assert routes(chains) == {("o1", "o2"), ("n1", "n2")}
    for chain in chains:
        assert_tiles(chain)
        assert chain.version == chain.fingerprint[:6]
    # A tiling that exists only across fingerprints is not a chain.
    mixed = [worker("o1", "0:2", fingerprint="old"), worker("n2", "2:6", fingerprint="new")]
    t = table(mixed)
    assert t.chains(MODEL) == ()
    with pytest.raises(MissingSpanError) as info:
        t.route(MODEL, {})
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    # Two complete chains of different fingerprints, or none: never a half of each.
    both = table(
        mixed + [worker("o2", "2:6", fingerprint="old"), worker("n1", "0:2", fingerprint="new")]
    )
    assert routes(both.chains(MODEL)) == {("o1", "o2"), ("n1", "n2")}
    for _ in range(50):
        chain = both.route(MODEL, {})
        assert len({w.fingerprint for w in chain.workers}) == 1


def test_models_are_planned_separately() -> None:
    ws = [
        worker("a", "0:6"),
        worker("b", "0:3", model="other", num_layers=3),
        worker("c", "0:3", model="tiny-llama"),
    ]
    t = table(ws)
    assert t.models() == sorted([MODEL, "other"])
    assert t.knows("other") and not t.knows("nope")
    assert routes(t.chains(MODEL)) == {("a",)}
    assert routes(t.chains("other")) == {("b",)}
    assert t.route("other", {}).addresses == ("b",)


# -- missing spans ---------------------------------------------------------------------------


def test_missing_span_names_the_uncovered_layers() -> None:
    t = table([worker("a", "0:1"), worker("b", "3:4"), worker("c", "5:6")])
    with pytest.raises(MissingSpanError) as info:
        t.route(MODEL, {})
    error = info.value
    assert isinstance(error, Unavailable)
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert MODEL in error.message
    assert "[1, 3)" in error.message and "[4, 5)" in error.message
    assert "[0," not in error.message and "[3, 4)" not in error.message


def test_unknown_model_is_missing_everything() -> None:
    with pytest.raises(MissingSpanError) as info:
        table([worker("a", "0:6")]).route("nope", {})
    assert "'nope'" in info.value.message


def test_unhealthy_workers_are_excluded() -> None:
    ws = [worker("a", "0:3"), worker("b", "3:6"), worker("b2", "3:6"), worker("r", "0:6")]
    t = table(ws, healthy=["a", "b2", "r"])
    assert routes(t.chains(MODEL)) == {("a", "b2"), ("r",)}
    for _ in range(50):
        assert "b" not in t.route(MODEL, {}).addresses
    # all_chains (for ListModels) still shows every tiling.
    assert routes(t.all_chains(MODEL)) == {("a", "b"), ("a", "b2"), ("r",)}
    # Only the unhealthy stage's layers are reported missing.
    t2 = table(ws[:2], healthy=["a"])
    with pytest.raises(MissingSpanError) as info:
        t2.route(MODEL, {})
    assert "[3, 6)" in info.value.message and "[0, 3)" not in info.value.message
    assert table(ws, healthy=[]).chains(MODEL) == ()


# -- choosing a chain ------------------------------------------------------------------------


def test_least_loaded_chain_wins() -> None:
    ws = [worker("a", "0:3"), worker("b", "3:6"), worker("r1", "0:6"), worker("r2", "0:6")]
    t = table(ws)
    load = {"a": 1, "b": 1, "r1": 3, "r2": 5}
    assert all(t.route(MODEL, load).addresses == ("a", "b") for _ in range(30))
    load = {"a": 4, "b": 0, "r1": 3, "r2": 5}
    assert all(t.route(MODEL, load).addresses == ("r1",) for _ in range(30))
    # A missing entry counts as idle.
    assert all(t.route(MODEL, {"a": 1, "r1": 1}).addresses == ("r2",) for _ in range(30))


def test_ties_are_spread() -> None:
    t = table([worker("r1", "0:6"), worker("r2", "0:6"), worker("r3", "0:6")])
    picks = Counter(t.route(MODEL, {"r3": 2}).addresses[0] for _ in range(400))
    assert set(picks) == {"r1", "r2"}
    assert min(picks.values()) > 100


def test_exclude_skips_chains_through_a_worker() -> None:
    ws = [worker("a", "0:3"), worker("b", "3:6"), worker("r", "0:6")]
    t = table(ws)
    assert all(t.route(MODEL, {}, exclude=frozenset({"b"})).addresses == ("r",) for _ in range(20))
    assert all(
        t.route(MODEL, {"a": 0, "r": 0}, exclude=frozenset({"r"})).addresses == ("a", "b")
        for _ in range(20)
    )
    with pytest.raises(MissingSpanError) as info:
        t.route(MODEL, {}, exclude=frozenset({"b", "r"}))
    assert "[3, 6)" in info.value.message and "[0, 3)" not in info.value.message


# -- hops and text ---------------------------------------------------------------------------


def test_hops_cut_the_span_to_each_stage() -> None:
    chain = table([worker("a", "0:2"), worker("b", "2:5"), worker("c", "5:6")]).chains(MODEL)[0]
    assert chain.addresses == ("a", "b", "c")
    assert chain.hops() == (Hop("a", Span(0, 2)), Hop("b", Span(2, 5)), Hop("c", Span(5, 6)))
    assert chain.hops(Span(0, 6)) == chain.hops()
    assert chain.hops(Span(1, 4)) == (Hop("a", Span(1, 2)), Hop("b", Span(2, 4)))
    assert chain.hops(Span(3, 4)) == (Hop("b", Span(3, 4)),)
    assert chain.hops(Span(2, 5)) == (Hop("b", Span(2, 5)),)
    assert chain.hops(Span(4, 6)) == (Hop("b", Span(4, 5)), Hop("c", Span(5, 6)))
    assert chain.hops(Span(0, 1)) == (Hop("a", Span(0, 1)),)
    # The hops of any sub-span tile it exactly.
    for start in range(L):
        for end in range(start + 1, L + 1):
            hops = chain.hops(Span(start, end))
            assert hops[0].span.start == start and hops[-1].span.end == end
            assert all(x.span.end == y.span.start for x, y in itertools.pairwise(hops))


def test_describe_reads_like_a_route() -> None:
    t = table([worker("10.0.0.1:50061", "0:4"), worker("10.0.0.2:50062", "4:6")])
    chain = t.route(MODEL, {})
    assert chain.describe() == "0:4 via 10.0.0.1:50061 => 4:6 via 10.0.0.2:50062"
    replica = table([worker("h:1", "0:6")]).route(MODEL, {})
    assert replica.describe() == "0:6 via h:1"


def test_table_is_a_snapshot() -> None:
    ws = [worker("a", "0:6")]
    healthy = ["a"]
    t = table(ws, healthy)
    ws.append(worker("b", "0:6"))
    healthy.append("b")
    assert routes(t.chains(MODEL)) == {("a",)}
    with pytest.raises(AttributeError):
        t.chains(MODEL)[0].model = "x"  # type: ignore[misc]
