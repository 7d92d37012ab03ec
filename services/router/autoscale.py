"""What an autoscaler reads, per model version: load now, chains ready, and chains wanted.

`desired_chains` follows Ray Serve's rule: the requests a version is answering over a target
per chain, rounded up and kept within [min_chains, max_chains]; a change takes effect only once
the wish has held for the upscale (or downscale) delay, so a burst does not flap the gauge and a
lull does not drop capacity a moment before it is needed again. KEDA or an HPA scales each
version's worker Deployments on it (deploy/k8s/autoscaling.yaml).

Series exist only for versions the router has admitted workers of, and go when the version's
last worker leaves: names from requests never reach a label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client import Gauge

from services.common.settings import RouterSettings

LABELS = ["model", "version"]
IN_FLIGHT = Gauge("tessera_version_requests_in_flight", "requests a version is answering", LABELS)
QUEUED = Gauge("tessera_version_queued_requests", "generations waiting for a row", LABELS)
RUNNING = Gauge("tessera_version_running_generations", "generations running", LABELS)
KV = Gauge("tessera_version_kv_utilization", "KV budget held, fullest worker (0-1)", LABELS)
CHAINS_READY = Gauge("tessera_version_chains_ready", "full healthy chains", LABELS)
DESIRED = Gauge("tessera_version_desired_chains", "chains the load asks for", LABELS)
GAUGES = (IN_FLIGHT, QUEUED, RUNNING, KV, CHAINS_READY, DESIRED)


@dataclass(frozen=True)
class ScalePolicy:
    target_per_chain: float
    upscale_delay_s: float
    downscale_delay_s: float
    min_chains: int
    max_chains: int

    @classmethod
    def from_settings(cls, settings: RouterSettings) -> ScalePolicy:
        return cls(
            settings.autoscale_target_per_chain,
            settings.autoscale_upscale_delay_s,
            settings.autoscale_downscale_delay_s,
            settings.autoscale_min_chains,
            settings.autoscale_max_chains,
        )


class DesiredChains:
    """The chains each version wants, with the delays applied."""

    def __init__(self, policy: ScalePolicy) -> None:
        self.policy = policy
        self._current: dict[tuple[str, str], int] = {}
        self._since: dict[tuple[str, str], tuple[int, float]] = {}  # wish direction, since

    def wish(self, ongoing: float) -> int:
        p = self.policy
        return min(p.max_chains, max(p.min_chains, math.ceil(ongoing / p.target_per_chain)))

    def update(self, key: tuple[str, str], ongoing: float, ready: int, now: float) -> int:
        p = self.policy
        current = self._current.setdefault(key, min(p.max_chains, max(p.min_chains, ready)))
        wish = self.wish(ongoing)
        if wish == current:
            self._since.pop(key, None)
            return current
        direction = 1 if wish > current else -1
        pending = self._since.get(key)
        if pending is None or pending[0] != direction:
            self._since[key] = pending = (direction, now)
        delay = p.upscale_delay_s if direction > 0 else p.downscale_delay_s
        if now - pending[1] >= delay:
            self._current[key] = current = wish
            self._since.pop(key, None)
        return current

    def forget(self, key: tuple[str, str]) -> None:
        self._current.pop(key, None)
        self._since.pop(key, None)


class VersionSignals:
    """Sets the per-version gauges from what the router sees (called every second)."""

    def __init__(self, policy: ScalePolicy) -> None:
        self.desired = DesiredChains(policy)
        self._published: set[tuple[str, str]] = set()

    def publish(
        self,
        now: float,
        versions: dict[tuple[str, str], dict[str, float]],
    ) -> None:
        """`versions`: per (model, label) its in_flight, queued, running, kv and chains."""
        for key, values in versions.items():
            IN_FLIGHT.labels(*key).set(values["in_flight"])
            QUEUED.labels(*key).set(values["queued"])
            RUNNING.labels(*key).set(values["running"])
            KV.labels(*key).set(values["kv"])
            CHAINS_READY.labels(*key).set(values["chains"])
            DESIRED.labels(*key).set(
                self.desired.update(key, values["in_flight"], int(values["chains"]), now)
            )
        for key in self._published - set(versions):
            for gauge in GAUGES:
                try:
                    gauge.remove(*key)
                except KeyError:
                    pass
            self.desired.forget(key)
        self._published = set(versions)
