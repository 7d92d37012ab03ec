"""RoutingTable and Chain: pure planning over WorkerDescriptor values (no sockets)."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Iterable

import grpc
import pytest

from services.common.errors import MissingSpanError, Unavailable
from services.common.types import Hop, ModelKind, Span, WorkerDescriptor
from services.router.routing import (
    MAX_CHAINS_PER_MODEL,
    Chain,
    RoutingTable,
)

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


# -- planning by dynamic programming ---------------------------------------------------------


def _tilings(ws: list[WorkerDescriptor], num_layers: int = L) -> list[tuple[WorkerDescriptor, ...]]:
    """Every tiling by brute force over permutations: the independent reference."""
    found = []
    for n in range(1, len(ws) + 1):
        for combo in itertools.permutations(ws, n):
            if (
                combo[0].span.start == 0
                and combo[-1].span.end == num_layers
                and all(x.span.end == y.span.start for x, y in itertools.pairwise(combo))
                and len({w.fingerprint for w in combo}) == 1
            ):
                found.append(combo)
    return found


def test_route_is_a_least_loaded_chain_and_draws_every_one_of_them() -> None:
    rng = random.Random(7)
    spans = ["0:6", "0:3", "3:6", "0:2", "2:6", "2:4", "4:6", "0:1", "1:3", "3:5", "5:6"]
    for case in range(40):
        ws = [
            worker(f"w{i}", rng.choice(spans), fingerprint=rng.choice(["fp-a", "fp-b"]))
            for i in range(rng.randint(1, 7))
        ]
        load = {w.address: rng.randint(0, 3) for w in ws}
        reference = _tilings(ws)
        t = table(ws)
        if not reference:
            with pytest.raises(MissingSpanError):
                t.route(MODEL, load)
            continue
        cost = {c: sum(load[w.address] for w in c) for c in reference}
        best = min(cost.values())
        cheapest = {tuple(w.address for w in c) for c in reference if cost[c] == best}
        drawn = Counter(t.route(MODEL, load, rng=rng).addresses for _ in range(60 * len(cheapest)))
        assert set(drawn) == cheapest, case
        # Uniform among the cheapest: none drawn far less often than its share.
        assert min(drawn.values()) >= 20, (case, drawn)


def test_listing_is_capped_distinct_and_lists_every_version() -> None:
    # 3 copies of each layer of 6 is 3^6 = 729 chains of version a; version b has 1.
    ws = [
        worker(f"a{layer}-{copy}", f"{layer}:{layer + 1}")
        for layer in range(L)
        for copy in range(3)
    ]
    ws.append(worker("b", "0:6", fingerprint="fp-b"))
    t = table(ws)
    listed = t.all_chains(MODEL)
    assert len(listed) == MAX_CHAINS_PER_MODEL
    assert len(routes(listed)) == len(listed)
    for chain in listed:
        assert_tiles(chain)
    assert {c.fingerprint for c in listed} == {"fp-a", "fp-b"}
    assert {c.fingerprint for c in t.chains(MODEL)} == {"fp-a", "fp-b"}
    assert t.versions(MODEL) == [("fp-a", "fp-a"), ("fp-b", "fp-b")]


def test_versions_lists_only_versions_with_a_full_healthy_chain() -> None:
    ws = [
        worker("a1", "0:3"),
        worker("a2", "3:6"),
        worker("b1", "0:3", fingerprint="fp-b"),  # fp-b never reaches layer 6
        worker("c1", "0:6", fingerprint="fp-c"),
    ]
    t = table(ws, healthy=["a1", "a2", "b1"])
    assert t.versions(MODEL) == [("fp-a", "fp-a")]
    assert t.versions(MODEL, healthy_only=False) == [("fp-a", "fp-a"), ("fp-c", "fp-c")]
    assert t.versions("nope") == []


def test_a_version_pin_routes_on_that_version_only() -> None:
    ws = [
        worker("o1", "0:6", fingerprint="fp-old"),
        worker("n1", "0:3", fingerprint="fp-new"),
        worker("n2", "3:6", fingerprint="fp-new"),
    ]
    t = table(ws)
    load = {"o1": 0, "n1": 5, "n2": 5}  # unpinned, the old replica always wins
    assert all(t.route(MODEL, load).addresses == ("o1",) for _ in range(20))
    assert all(t.route(MODEL, load, version="fp-new").addresses == ("n1", "n2") for _ in range(20))
    # A fingerprint of another version finds nothing under the pin.
    with pytest.raises(MissingSpanError) as info:
        t.route(MODEL, load, fingerprint="fp-old", version="fp-new")
    assert "version 'fp-new'" in info.value.message
    assert t.route(MODEL, load).addresses == ("o1",)
    with pytest.raises(MissingSpanError):
        t.route(MODEL, load, version="fp-none")


def test_a_version_is_picked_once_and_known_versions_serve_the_cache() -> None:
    ws = [
        worker("o1", "0:6", fingerprint="fp-old"),
        worker("n1", "0:3", fingerprint="fp-new"),
        worker("n2", "3:6", fingerprint="fp-new"),
    ]
    load = {"o1": 0, "n1": 5, "n2": 5}
    both = table(ws)
    # Two healthy versions: the least-loaded chain decides, and it comes routed already.
    choice = both.pick_version(MODEL, load)
    assert choice.fingerprint == "fp-old" and choice.chain is not None
    assert choice.chain.addresses == ("o1",)
    assert both.pick_version(MODEL, load, version="fp-new").fingerprint == "fp-new"
    assert both.pick_version(MODEL, load, avoid=frozenset({"fp-old"})).fingerprint == "fp-new"
    # One healthy version: no chain is weighed.
    assert table(ws, healthy={"n1", "n2"}).pick_version(MODEL, load).chain is None
    # None healthy: a version the table knows still names the cache key; routing then fails.
    dead = table(ws, healthy=set())
    assert dead.pick_version(MODEL, load).fingerprint in {"fp-old", "fp-new"}
    with pytest.raises(MissingSpanError):
        dead.route(MODEL, load)
    with pytest.raises(MissingSpanError):
        table([]).pick_version(MODEL, load)


def _two_hundred(num_layers: int = 30) -> list[WorkerDescriptor]:
    """200 overlapping registrations of one model: version a tiles [0, 30) in many ways,
    version b has 4 stages on each of layers 0..24 and nothing that reaches the last layer."""
    ws: list[WorkerDescriptor] = []
    for layer in range(num_layers):
        for copy in range(3):
            ws.append(worker(f"a{layer}.{copy}", f"{layer}:{layer + 1}", num_layers=num_layers))
    for start in range(0, num_layers, 3):
        end = min(start + 3, num_layers)
        ws.append(worker(f"a{start}+{end}", f"{start}:{end}", num_layers=num_layers))
    while len(ws) < 200:
        layer = (len(ws) - 100) // 4
        ws.append(
            worker(
                f"b{layer}.{len(ws)}",
                f"{layer}:{layer + 1}",
                fingerprint="fp-b",
                num_layers=num_layers,
            )
        )
    assert len(ws) == 200 and max(w.span.end for w in ws if w.fingerprint == "fp-b") < 30
    return ws


def _prefixes(ws: list[WorkerDescriptor], fingerprint: str) -> int:
    """How many chain prefixes from layer 0 exist (what exhaustive enumeration opens)."""
    ways = Counter({0: 1})
    total = 0
    for start in range(30):
        for w in ws:
            if w.fingerprint == fingerprint and w.span.start == start and ways[start]:
                ways[w.span.end] += ways[start]
                total += ways[start]
    return total


def test_planning_200_registrations_explores_polynomially_many_paths() -> None:
    ws = _two_hundred()
    t = table(ws)
    # Single-layer stages are busy, the 3-layer ones idle, the dead-end version idlest of all:
    # the one cheapest chain is the ten 3-layer stages; with one of them loaded, its three
    # layers go to single-layer stages instead.
    load = {w.address: 0 if "+" in w.address or w.fingerprint == "fp-b" else 1 for w in ws}
    load["a9+12"] = 5
    routed = [t.route(MODEL, load) for _ in range(100)]
    listed = t.all_chains(MODEL)
    healthy = t.chains(MODEL)
    versions = t.versions(MODEL)
    # Right answers: only version a has chains; route takes the least-loaded one.
    assert versions == [("fp-a", "fp-a")]
    assert {c.fingerprint for c in routed + listed + list(healthy)} == {"fp-a"}
    for chain in routed + listed:
        assert_tiles(chain, 30)
    assert all(sum(load[a] for a in c.addresses) == 3 for c in routed)
    assert all(len(c.workers) == 12 and "a9+12" not in c.addresses for c in routed)
    assert len({c.addresses for c in routed}) > 1  # 27 cheapest chains, drawn at random
    assert len(listed) == MAX_CHAINS_PER_MODEL
    # Cost: each listing opens at most cap x num_layers prefixes (every one completes) ...
    assert t.stats.partial_paths <= 2 * (MAX_CHAINS_PER_MODEL * 30 + 1)
    # ... and each route scans every stage a constant number of times.
    assert t.stats.stages_scanned <= 100 * 3 * 200 + 2 * (200 + MAX_CHAINS_PER_MODEL * 30 * 8) + 200
    # Exhaustive enumeration would open astronomically many prefixes, the dead-end version's
    # alone 4^28-ish: the bound above is what makes 200 registrations cheap.
    assert _prefixes(ws, "fp-b") > 10**15
    assert _prefixes(ws, "fp-b") > 10**9 * t.stats.partial_paths


def test_planning_cost_grows_polynomially_with_layers() -> None:
    """Doubling the dead-end version's depth must not double the work per added layer."""
    work = []
    for depth in (10, 20, 28):
        ws = [worker("r", "0:30", num_layers=30)] + [
            worker(f"b{layer}.{copy}", f"{layer}:{layer + 1}", fingerprint="fp-b", num_layers=30)
            for layer in range(depth)
            for copy in range(4)
        ]
        t = table(ws)
        t.route(MODEL, {})
        t.all_chains(MODEL)
        work.append(t.stats.partial_paths + t.stats.stages_scanned)
    # Linear in the number of registrations (4 per layer), nowhere near 4^depth.
    assert work[2] <= 4 * work[0]
