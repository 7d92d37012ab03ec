"""Pure planning: which workers form chains for a model, and which chain a request takes.

A RoutingTable is an immutable snapshot of the live membership; the pool swaps it whole when
membership or health changes. Chains only join stages of the same fingerprint, so during a
rolling update a request runs on a complete old chain or a complete new one, never a mix.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from services.common.errors import MissingSpanError
from services.common.types import Hop, Span, WorkerDescriptor

MAX_CHAINS_PER_MODEL = 64


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


def _tilings(
    workers: list[WorkerDescriptor], num_layers: int
) -> list[tuple[WorkerDescriptor, ...]]:
    by_start: dict[int, list[WorkerDescriptor]] = {}
    for worker in workers:
        by_start.setdefault(worker.span.start, []).append(worker)
    found: list[tuple[WorkerDescriptor, ...]] = []

    def extend(prefix: tuple[WorkerDescriptor, ...], at: int) -> None:
        if len(found) >= MAX_CHAINS_PER_MODEL:
            return
        if at == num_layers:
            found.append(prefix)
            return
        for worker in by_start.get(at, ()):
            extend(prefix + (worker,), worker.span.end)

    extend((), 0)
    return found


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

    def __init__(self, workers: Iterable[WorkerDescriptor], healthy: Iterable[str]) -> None:
        self.workers = tuple(workers)
        healthy_set = set(healthy)
        self.healthy = frozenset(healthy_set)
        self._chains: dict[str, tuple[Chain, ...]] = {}
        by_model: dict[str, list[WorkerDescriptor]] = {}
        for worker in self.workers:
            by_model.setdefault(worker.model, []).append(worker)
        self.by_model = {m: tuple(ws) for m, ws in by_model.items()}
        for model, members in by_model.items():
            chains: list[Chain] = []
            by_print: dict[str, list[WorkerDescriptor]] = {}
            for worker in members:
                if worker.address in healthy_set:
                    by_print.setdefault(worker.fingerprint, []).append(worker)
            for digest, group in sorted(by_print.items()):
                num_layers = group[0].num_layers
                for tiling in _tilings(group, num_layers):
                    chains.append(Chain(model, digest, group[0].version, tiling))
            self._chains[model] = tuple(chains)

    def models(self) -> list[str]:
        return sorted(self.by_model)

    def knows(self, model: str) -> bool:
        return model in self.by_model

    def chains(self, model: str) -> tuple[Chain, ...]:
        return self._chains.get(model, ())

    def all_chains(self, model: str) -> list[Chain]:
        """Every tiling regardless of health, for ListModels."""
        members = self.by_model.get(model, ())
        chains = []
        by_print: dict[str, list[WorkerDescriptor]] = {}
        for worker in members:
            by_print.setdefault(worker.fingerprint, []).append(worker)
        for digest, group in sorted(by_print.items()):
            for tiling in _tilings(group, group[0].num_layers):
                chains.append(Chain(model, digest, group[0].version, tiling))
        return chains

    def route(
        self,
        model: str,
        load: Mapping[str, int],
        *,
        exclude: frozenset[str] = frozenset(),
        fingerprint: str | None = None,
    ) -> Chain:
        """The healthy chain with the least outstanding work (random among equals).

        `fingerprint` pins the model version (a resumed generation must not change weights).
        Raises MissingSpanError naming the uncovered layers when no chain is left.
        """
        candidates = [
            c
            for c in self.chains(model)
            if not exclude.intersection(c.addresses)
            and (fingerprint is None or c.fingerprint == fingerprint)
        ]
        if not candidates:
            members = [
                w
                for w in self.by_model.get(model, ())
                if w.address in self.healthy and w.address not in exclude
            ]
            num_layers = self.by_model[model][0].num_layers if model in self.by_model else 0
            raise MissingSpanError(model, _missing(members, num_layers) if num_layers else "all")
        best = min(sum(load.get(a, 0) for a in c.addresses) for c in candidates)
        return random.choice(
            [c for c in candidates if sum(load.get(a, 0) for a in c.addresses) == best]
        )
