"""Which version of a model answers: a model name is an alias over immutable versions.

A version is a label ("v2", or "v2+bfloat16" at a reduced precision) whose workers all carry
one fingerprint. Each model's `Alias` holds the traffic weights (percent per label), the labels
that held 100 % in turn (what `rollback` returns to), a generation number for compare-and-set,
and which versions should be loaded. An alias with no weights (a mesh nobody has rolled out on)
sends traffic to every ready version, the least-loaded chain first, as before aliases existed.

`VersionBook` keeps the aliases (persisted as one JSON file, written atomically, so a restarted
router comes back with the same weights; re-read when another router changes it), draws the
version of each unpinned request by smooth weighted round robin over the weighted versions that
are ready (exact shares, no streaks), and counts the requests each version is answering, which
an unload waits on.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger(__name__)

LOADED = "loaded"
UNLOADED = "unloaded"
MAX_HISTORY = 16  # labels kept in an alias's stable history


@dataclass
class Alias:
    """One model's traffic: weights over version labels and what rollback returns to."""

    weights: dict[str, int] = field(default_factory=dict)  # label -> percent; {} = implicit
    stable: list[str] = field(default_factory=list)  # labels that held 100 %, oldest first
    generation: int = 0  # bumped by every write (compare-and-set)
    desired: dict[str, str] = field(default_factory=dict)  # label -> LOADED | UNLOADED

    def to_json(self) -> dict[str, object]:
        return {
            "weights": self.weights,
            "stable": self.stable,
            "generation": self.generation,
            "desired": self.desired,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Alias:
        weights = data.get("weights") or {}
        stable = data.get("stable") or []
        desired = data.get("desired") or {}
        generation = data.get("generation") or 0
        if not (
            isinstance(weights, dict)
            and isinstance(stable, list)
            and isinstance(desired, dict)
            and isinstance(generation, int)
        ):
            raise ValueError("malformed alias")
        return cls(
            {str(k): int(v) for k, v in weights.items()},
            [str(x) for x in stable],
            generation,
            {str(k): str(v) for k, v in desired.items()},
        )

    @property
    def current(self) -> str | None:
        """The label holding 100 %, if one does."""
        full = [label for label, weight in self.weights.items() if weight == 100]
        return full[0] if full else None


def check_weights(weights: dict[str, int]) -> None:
    if not weights:
        raise InvalidArgument("weights must name at least one version")
    if any(not 0 <= w <= 100 for w in weights.values()):
        raise InvalidArgument("every weight must be in [0, 100]")
    if sum(weights.values()) != 100:
        raise InvalidArgument(f"weights must add up to 100, not {sum(weights.values())}")


class VersionBook:
    """Every model's alias, persisted in `path`; the version draw; requests per version."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.aliases: dict[str, Alias] = {}
        self._credit: dict[str, dict[str, float]] = {}  # model -> label -> smooth-WRR credit
        self._running: dict[tuple[str, str], int] = {}  # (model, label) -> requests answering
        self._draining: dict[tuple[str, str], float] = {}  # (model, label) -> since
        self._stamp: tuple[int, int] | None = None
        self.reload()

    # -- persistence ---------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-reads the file if it changed (another router wrote it); True when it did."""
        if self.path is None:
            return False
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return False
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return False
        try:
            data = json.loads(self.path.read_text())
            aliases = {str(m): Alias.from_json(a) for m, a in data.get("models", {}).items()}
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.error(
                "version state %s is unreadable (%s); keeping what this router has", self.path, exc
            )
            self._stamp = stamp
            return False
        self.aliases = aliases
        self._credit.clear()
        self._stamp = stamp
        return True

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps(
            {"models": {m: a.to_json() for m, a in sorted(self.aliases.items())}}, indent=2
        )
        # Atomic: a router reading it (or one restarting) sees the old file or the new one.
        handle, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
        try:
            with os.fdopen(handle, "w") as out:
                out.write(body)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        stat = self.path.stat()
        self._stamp = (stat.st_mtime_ns, stat.st_size)

    def alias(self, model: str) -> Alias:
        return self.aliases.setdefault(model, Alias())

    # -- writes --------------------------------------------------------------------------------

    def set_weights(
        self, model: str, weights: dict[str, int], ready: Iterable[str], expected: int = 0
    ) -> Alias:
        """Moves traffic (every version with a weight must be ready); `expected` > 0 is the
        generation the caller read (compare-and-set)."""
        check_weights(weights)
        alias = self.alias(model)
        if expected and expected != alias.generation:
            raise FailedPrecondition(
                f"model {model!r}'s traffic changed (generation {alias.generation}, you read "
                f"{expected}); read it again"
            )
        ready = set(ready)
        for label, weight in weights.items():
            if weight and label not in ready:
                raise FailedPrecondition(
                    f"version {label!r} of {model!r} is not ready (loaded, admitted and "
                    f"warmed); traffic moves only to ready versions"
                )
            if weight and self.is_draining(model, label):
                raise FailedPrecondition(f"version {label!r} of {model!r} is being unloaded")
        alias.weights = {label: w for label, w in weights.items() if w}
        alias.generation += 1
        if alias.current is not None and (not alias.stable or alias.stable[-1] != alias.current):
            alias.stable.append(alias.current)
            del alias.stable[:-MAX_HISTORY]
        for label in alias.weights:
            alias.desired[label] = LOADED
        self._credit.pop(model, None)
        self.save()
        return alias

    def pin_implicit(self, model: str, ready: Iterable[str]) -> None:
        """Before another version loads: a model with no weights yet (every ready version
        shares its traffic) gets weights over the versions ready now, so the new one starts
        with none."""
        alias = self.alias(model)
        labels = sorted(set(ready))
        if alias.weights or not labels:
            return
        share, extra = divmod(100, len(labels))
        alias.weights = {label: share + (i < extra) for i, label in enumerate(labels)}
        if alias.current is not None:
            alias.stable.append(alias.current)
        alias.generation += 1
        self._credit.pop(model, None)
        self.save()

    def rollback(self, model: str, ready: Iterable[str]) -> Alias:
        """Back to the last version that held 100 %: the one before a rollout in progress, or
        the one before the last promotion. It must still be loaded (rollback never waits)."""
        alias = self.alias(model)
        stable = list(alias.stable)
        if alias.current is not None and stable and stable[-1] == alias.current:
            stable.pop()  # undo the promotion itself
        if not stable:
            raise FailedPrecondition(f"model {model!r} has no earlier version to roll back to")
        target = stable[-1]
        if target not in set(ready):
            raise FailedPrecondition(
                f"version {target!r} of {model!r} is no longer loaded; load it first"
            )
        alias.stable = stable
        alias.weights = {target: 100}
        alias.generation += 1
        self._credit.pop(model, None)
        self.save()
        return alias

    def set_desired(self, model: str, label: str, state: str) -> Alias:
        alias = self.alias(model)
        if state == UNLOADED and alias.weights.get(label):
            raise FailedPrecondition(
                f"version {label!r} of {model!r} still has {alias.weights[label]} % of the "
                f"traffic; move it first (traffic, promote or rollback)"
            )
        alias.desired[label] = state  # not a traffic change: the generation stays
        self.save()
        return alias

    # -- the draw ------------------------------------------------------------------------------

    def choose(self, model: str, ready: Iterable[str]) -> str | None:
        """The label an unpinned request runs on, or None: any ready version (no weights, or
        no weighted version is ready; the mesh keeps answering)."""
        alias = self.aliases.get(model)
        if alias is None or not alias.weights:
            return None
        ready = set(ready)
        weighted = {k: w for k, w in alias.weights.items() if w and k in ready}
        if not weighted:
            return None
        credit = self._credit.setdefault(model, {})
        total = sum(weighted.values())
        for label, weight in weighted.items():
            credit[label] = credit.get(label, 0.0) + weight
        chosen = max(weighted, key=lambda k: (credit[k], k))
        credit[chosen] -= total
        return chosen

    def excluded(self, model: str) -> set[str]:
        """Labels no unpinned request may run on: being unloaded, or unloaded."""
        alias = self.aliases.get(model)
        gone = {label for (m, label) in self._draining if m == model}
        if alias is not None:
            gone |= {label for label, state in alias.desired.items() if state == UNLOADED}
        return gone

    # -- requests per version ------------------------------------------------------------------

    @contextmanager
    def answering(self, model: str, label: str) -> Iterator[None]:
        """Counts one request answering on the version while it runs."""
        key = (model, label)
        self._running[key] = self._running.get(key, 0) + 1
        try:
            yield
        finally:
            self._running[key] -= 1
            if not self._running[key]:
                del self._running[key]

    def running(self, model: str, label: str) -> int:
        return self._running.get((model, label), 0)

    def start_drain(self, model: str, label: str) -> None:
        self._draining.setdefault((model, label), time.monotonic())

    def end_drain(self, model: str, label: str) -> None:
        self._draining.pop((model, label), None)

    def is_draining(self, model: str, label: str) -> bool:
        return (model, label) in self._draining


def require_label(label: str, what: str = "version") -> str:
    from services.common.repository import LABEL

    if not LABEL.fullmatch(label):
        raise InvalidArgument(f"{what} must be a label like v2 ([A-Za-z0-9._-], up to 64)")
    return label


def unknown_version(model: str, version: str) -> NotFound:
    from services.common.errors import quoted

    return NotFound(f"model {quoted(model)} has no version {quoted(version)}")
