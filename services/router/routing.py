"""Pure planning: which workers form chains for a model, and which chain a request takes.

A RoutingTable is an immutable snapshot of the admitted membership; the pool swaps it whole when
membership or health changes. Chains only join stages of the same fingerprint, so during a
rolling update a request runs on a complete old chain or a complete new one, never a mix.

Planning is dynamic programming over layer boundaries, never an enumeration of every path:
- `route` finds the least-loaded chain in one backward pass over a version's workers (cost of
  the cheapest way from each boundary to the last layer, and how many ways reach that cost),
  then walks forward drawing uniformly among the cheapest chains: O(workers) per call.
- `chains` / `all_chains` list at most MAX_CHAINS_PER_MODEL chains (ListModels shows no more:
  the listing is capped, not the routing). The walk only follows stages from whose end the last
  layer is reachable, so every partial path it opens completes: at most cap x num_layers steps,
  however many registrations there are or how many dead ends a version has.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from services.common.errors import MissingSpanError
from services.common.types import Hop, Span, WorkerDescriptor

MAX_CHAINS_PER_MODEL = 64  # chains listed per model (ListModels, health); routing sees them all


@dataclass(frozen=True, slots=True)
class VersionChoice:
    """The version a request runs on, chosen once; `chain` when choosing already routed it."""

    fingerprint: str
    chain: Chain | None = None


@dataclass(frozen=True, slots=True)
class Chain:
    """An ordered list of workers whose spans tile [0, num_layers)."""

    model: str
    fingerprint: str
    version: str
    workers: tuple[WorkerDescriptor, ...]

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(w.address for w in self.workers)

    def hops(self, span: Span | None = None) -> tuple[Hop, ...]:
        """The hops that run `span` (default: every layer), each cut to its part of the span."""
        if span is None:
            return tuple(Hop(w.address, w.span) for w in self.workers)
        hops = []
        for worker in self.workers:
            part = worker.span.intersect(span)
            if part is not None:
                hops.append(Hop(worker.address, part))
        return tuple(hops)

    def describe(self) -> str:
        """Petals-style route text: `0:15 via a => 15:30 via b`."""
        return " => ".join(f"{w.span} via {w.address}" for w in self.workers)


@dataclass
class PlanStats:
    """Work the planner did: what a test of planning cost counts instead of timing it."""

    partial_paths: int = 0  # chain prefixes opened while listing chains
    stages_scanned: int = 0  # (boundary, worker) pairs looked at by the passes


@dataclass(frozen=True)
class _Version:
    """The workers of one model version (fingerprint), indexed by the layer they start at."""

    model: str
    fingerprint: str
    version: str
    num_layers: int
    by_start: Mapping[int, tuple[WorkerDescriptor, ...]]
    starts_desc: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "starts_desc", tuple(sorted(self.by_start, reverse=True)))

    @classmethod
    def of(cls, workers: list[WorkerDescriptor]) -> _Version:
        first = workers[0]
        by_start: dict[int, list[WorkerDescriptor]] = {}
        for worker in sorted(workers, key=lambda w: (w.span.start, w.span.end, w.address)):
            by_start.setdefault(worker.span.start, []).append(worker)
        return cls(
            first.model,
            first.fingerprint,
            first.version,
            first.num_layers,
            {start: tuple(ws) for start, ws in by_start.items()},
        )

    def finishing(
        self, usable: Callable[[WorkerDescriptor], bool], stats: PlanStats
    ) -> frozenset[int]:
        """Boundaries from which usable stages reach the last layer (one backward pass)."""
        done = {self.num_layers}
        for start in self.starts_desc:  # a stage ends after it starts: ends are decided first
            for worker in self.by_start[start]:
                stats.stages_scanned += 1
                if worker.span.end in done and usable(worker):
                    done.add(start)
                    break
        return frozenset(done)

    def chains(
        self, usable: Callable[[WorkerDescriptor], bool], stats: PlanStats
    ) -> Iterator[Chain]:
        """Every chain of usable stages, lazily, never opening a prefix that cannot finish."""
        finishing = self.finishing(usable, stats)
        if 0 not in finishing:
            return
        # Iterative depth-first walk: (prefix, stages left to try at the prefix's end).
        stack: list[tuple[tuple[WorkerDescriptor, ...], Iterator[WorkerDescriptor]]] = [
            ((), iter(self.by_start.get(0, ())))
        ]
        stats.partial_paths += 1
        while stack:
            prefix, candidates = stack[-1]
            for worker in candidates:
                stats.stages_scanned += 1
                if worker.span.end not in finishing or not usable(worker):
                    continue
                path = (*prefix, worker)
                stats.partial_paths += 1
                if worker.span.end == self.num_layers:
                    yield Chain(self.model, self.fingerprint, self.version, path)
                else:
                    stack.append((path, iter(self.by_start.get(worker.span.end, ()))))
                break
            else:
                stack.pop()

    def cheapest(
        self,
        usable: Callable[[WorkerDescriptor], bool],
        load: Mapping[str, int],
        stats: PlanStats,
    ) -> tuple[dict[int, int], dict[int, int]]:
        """For each boundary: the least total load to the last layer, and how many chains
        reach it (one backward pass)."""
        cost = {self.num_layers: 0}
        ways = {self.num_layers: 1}
        for start in self.starts_desc:
            best: int | None = None
            count = 0
            for worker in self.by_start[start]:
                stats.stages_scanned += 1
                end = worker.span.end
                if end not in cost or not usable(worker):
                    continue
                total = load.get(worker.address, 0) + cost[end]
                if best is None or total < best:
                    best, count = total, ways[end]
                elif total == best:
                    count += ways[end]
            if best is not None:
                cost[start], ways[start] = best, count
        return cost, ways

    def draw(
        self,
        usable: Callable[[WorkerDescriptor], bool],
        load: Mapping[str, int],
        cost: dict[int, int],
        ways: dict[int, int],
        rng: random.Random | None = None,
    ) -> Chain:
        """One of the cheapest chains, each equally likely (forward walk over `cost`)."""
        rand = rng or random
        at, path = 0, []
        while at != self.num_layers:
            options = [
                w
                for w in self.by_start[at]
                if w.span.end in cost
                and usable(w)
                and load.get(w.address, 0) + cost[w.span.end] == cost[at]
            ]
            pick = rand.randrange(sum(ways[w.span.end] for w in options))
            for worker in options:
                pick -= ways[worker.span.end]
                if pick < 0:
                    break
            path.append(worker)
            at = worker.span.end
        return Chain(self.model, self.fingerprint, self.version, tuple(path))


def _round_robin(sources: list[Iterator[Chain]], cap: int) -> tuple[Chain, ...]:
    """Up to `cap` chains taken in turn from each version, so every version is listed."""
    found: list[Chain] = []
    live = list(sources)
    while live and len(found) < cap:
        for source in list(live):
            chain = next(source, None)
            if chain is None:
                live.remove(source)
                continue
            found.append(chain)
            if len(found) == cap:
                break
    return tuple(found)


def _missing(workers: Iterable[WorkerDescriptor], num_layers: int) -> str:
    covered = [False] * num_layers
    for worker in workers:
        for layer in range(worker.span.start, min(worker.span.end, num_layers)):
            covered[layer] = True
    gaps: list[str] = []
    layer = 0
    while layer < num_layers:
        if covered[layer]:
            layer += 1
            continue
        start = layer
        while layer < num_layers and not covered[layer]:
            layer += 1
        gaps.append(f"[{start}, {layer})")
    return ", ".join(gaps) or "none (no chain tiles the layers with one fingerprint)"


class RoutingTable:
    """model -> chains over healthy workers; immutable."""

    def __init__(
        self,
        workers: Iterable[WorkerDescriptor],
        healthy: Iterable[str],
        *,
        max_listed: int = MAX_CHAINS_PER_MODEL,
    ) -> None:
        self.workers = tuple(workers)
        self.healthy = frozenset(healthy)
        self.max_listed = max_listed
        self.stats = PlanStats()
        by_model: dict[str, list[WorkerDescriptor]] = {}
        for worker in self.workers:
            by_model.setdefault(worker.model, []).append(worker)
        self.by_model = {m: tuple(ws) for m, ws in by_model.items()}
        self._versions: dict[str, tuple[_Version, ...]] = {}
        for model, members in by_model.items():
            by_print: dict[str, list[WorkerDescriptor]] = {}
            for worker in members:
                by_print.setdefault(worker.fingerprint, []).append(worker)
            self._versions[model] = tuple(_Version.of(by_print[d]) for d in sorted(by_print))
        self._listed: dict[tuple[str, bool], tuple[Chain, ...]] = {}
        self._version_list: dict[tuple[str, bool], list[tuple[str, str]]] = {}

    def models(self) -> list[str]:
        return sorted(self.by_model)

    def knows(self, model: str) -> bool:
        return model in self.by_model

    def _is_healthy(self, worker: WorkerDescriptor) -> bool:
        return worker.address in self.healthy

    def _listing(self, model: str, healthy_only: bool) -> tuple[Chain, ...]:
        key = (model, healthy_only)
        listed = self._listed.get(key)
        if listed is None:
            usable = self._is_healthy if healthy_only else (lambda _: True)
            sources = [v.chains(usable, self.stats) for v in self._versions.get(model, ())]
            listed = self._listed[key] = _round_robin(sources, self.max_listed)
        return listed

    def chains(self, model: str) -> tuple[Chain, ...]:
        """Healthy chains, at most `max_listed` (every version with one is among them)."""
        return self._listing(model, healthy_only=True)

    def all_chains(self, model: str) -> list[Chain]:
        """Chains regardless of health, for ListModels; at most `max_listed`."""
        return list(self._listing(model, healthy_only=False))

    def versions(self, model: str, *, healthy_only: bool = True) -> list[tuple[str, str]]:
        """(fingerprint, version) of each version with a full chain, in fingerprint order."""
        key = (model, healthy_only)
        found = self._version_list.get(key)
        if found is None:
            usable = self._is_healthy if healthy_only else (lambda _: True)
            found = self._version_list[key] = [
                (v.fingerprint, v.version)
                for v in self._versions.get(model, ())
                if 0 in v.finishing(usable, self.stats)
            ]
        return list(found)

    def route(
        self,
        model: str,
        load: Mapping[str, int],
        *,
        exclude: frozenset[str] = frozenset(),
        fingerprint: str | None = None,
        version: str | None = None,
        rng: random.Random | None = None,
    ) -> Chain:
        """The healthy chain with the least outstanding work (uniformly among equals).

        `fingerprint` pins the model version (a resumed generation must not change weights);
        `version` pins it by label (KServe's model_version).
        Raises MissingSpanError naming the uncovered layers when no chain is left.
        """

        def usable(worker: WorkerDescriptor) -> bool:
            return worker.address in self.healthy and worker.address not in exclude

        candidates = [
            v
            for v in self._versions.get(model, ())
            if (fingerprint is None or v.fingerprint == fingerprint)
            and (version is None or v.version == version)
        ]
        plans = [(v, *v.cheapest(usable, load, self.stats)) for v in candidates]
        plans = [(v, cost, ways) for v, cost, ways in plans if 0 in cost]
        if not plans:
            members = [w for v in candidates for ws in v.by_start.values() for w in ws if usable(w)]
            num_layers = self.by_model[model][0].num_layers if model in self.by_model else 0
            missing = _missing(members, num_layers) if num_layers else "all"
            if version is not None:
                missing += f" (of version {version!r})"
            raise MissingSpanError(model, missing)
        best = min(cost[0] for _, cost, _ in plans)
        cheapest = [(v, cost, ways) for v, cost, ways in plans if cost[0] == best]
        rand = rng or random
        pick = rand.randrange(sum(ways[0] for _, _, ways in cheapest))
        for v, cost, ways in cheapest:
            pick -= ways[0]
            if pick < 0:
                return v.draw(usable, load, cost, ways, rng)
        raise AssertionError("unreachable")

    def pick_version(
        self,
        model: str,
        load: Mapping[str, int],
        *,
        version: str | None = None,
        avoid: frozenset[str] = frozenset(),
        skip: frozenset[str] = frozenset(),
    ) -> VersionChoice:
        """The version a request runs on, chosen once before its cache lookup: the only healthy
        one without weighing chains, else the version of the least-loaded chain (routed then).
        With no healthy chain it is a version the table knows (a cached answer may still
        serve); a model the table does not know raises MissingSpanError. `version` pins a
        label; `avoid` holds fingerprints that went away during this request; `skip` labels
        no unpinned request may use (versions being unloaded)."""

        def wanted(fingerprint: str, label: str) -> bool:
            return fingerprint not in avoid and label not in skip and version in (None, label)

        healthy = [f for f, label in self.versions(model) if wanted(f, label)]
        if len(healthy) == 1:
            return VersionChoice(healthy[0])
        if healthy:
            if not skip:
                chain = self.route(model, load, version=version)
                if chain.fingerprint not in avoid:
                    return VersionChoice(chain.fingerprint, chain)
            return VersionChoice(healthy[0])
        known = [f for f, label in self.versions(model, healthy_only=False) if wanted(f, label)]
        if known:
            return VersionChoice(known[0])
        return VersionChoice(self.route(model, load, version=version).fingerprint)
