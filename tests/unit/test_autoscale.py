"""desired_chains: Ray Serve's rule with its delays, and series only for admitted versions."""

from __future__ import annotations

from prometheus_client import REGISTRY

from services.router.autoscale import DesiredChains, ScalePolicy, VersionSignals

POLICY = ScalePolicy(
    target_per_chain=4, upscale_delay_s=2, downscale_delay_s=10, min_chains=1, max_chains=8
)
KEY = ("m", "v1")


def test_the_wish_is_in_flight_over_the_target_within_bounds() -> None:
    desired = DesiredChains(POLICY)
    assert [desired.wish(n) for n in (0, 1, 4, 5, 16, 100)] == [1, 1, 1, 2, 4, 8]


def test_a_rise_waits_for_the_upscale_delay_and_a_fall_for_the_downscale_delay() -> None:
    desired = DesiredChains(POLICY)
    assert desired.update(KEY, 1, ready=1, now=0) == 1
    assert desired.update(KEY, 16, ready=1, now=1) == 1  # wished since 1 s
    assert desired.update(KEY, 16, ready=1, now=2.5) == 1
    assert desired.update(KEY, 16, ready=1, now=3) == 4  # held for the upscale delay
    assert desired.update(KEY, 1, ready=4, now=4) == 4
    assert desired.update(KEY, 1, ready=4, now=13.9) == 4
    assert desired.update(KEY, 1, ready=4, now=14) == 1  # held for the downscale delay


def test_a_burst_shorter_than_the_delay_changes_nothing() -> None:
    desired = DesiredChains(POLICY)
    desired.update(KEY, 1, ready=1, now=0)
    for second in range(1, 30):
        in_flight = 16 if second % 2 else 1  # flapping: never 2 s in one direction
        assert desired.update(KEY, in_flight, ready=1, now=second) == 1


def _series(name: str) -> set[tuple[str, ...]]:
    return {
        tuple(sorted(s.labels.items()))
        for family in REGISTRY.collect()
        for s in family.samples
        if s.name == name
    }


def test_a_version_that_leaves_takes_its_series_with_it() -> None:
    signals = VersionSignals(POLICY)
    values = {"in_flight": 3, "queued": 0, "running": 3, "kv": 0.5, "chains": 1}
    signals.publish(0, {("m-left", "v9"): values})
    assert (("model", "m-left"), ("version", "v9")) in _series("tessera_version_desired_chains")
    signals.publish(1, {})
    assert (("model", "m-left"), ("version", "v9")) not in _series("tessera_version_desired_chains")
