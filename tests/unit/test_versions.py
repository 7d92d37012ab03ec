"""The version book: weighted draws, compare-and-set, rollback, persistence, drains."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from services.common.errors import FailedPrecondition, InvalidArgument
from services.router.versions import LOADED, UNLOADED, VersionBook


def test_without_weights_no_version_is_drawn(tmp_path: Path) -> None:
    book = VersionBook(tmp_path / "state.json")
    assert book.choose("m", ["v1", "v2"]) is None  # any ready version (least-loaded chain)


def test_pinning_an_implicit_alias_splits_it_over_the_ready_versions(tmp_path: Path) -> None:
    book = VersionBook(tmp_path / "state.json")
    book.pin_implicit("m", ["b", "a", "c"])
    assert book.alias("m").weights == {"a": 34, "b": 33, "c": 33}
    assert book.alias("m").stable == []  # no single version held everything
    book.pin_implicit("m", ["a"])  # already weighted: nothing changes
    assert book.alias("m").weights == {"a": 34, "b": 33, "c": 33}


def test_the_draw_gives_each_version_exactly_its_share(tmp_path: Path) -> None:
    book = VersionBook(tmp_path / "state.json")
    book.set_weights("m", {"v1": 80, "v2": 20}, ready=["v1", "v2"])
    draws = [book.choose("m", ["v1", "v2"]) for _ in range(150)]
    assert Counter(draws) == {"v1": 120, "v2": 30}
    # Smooth: never more than one v2 in a row, and v2 comes every fifth request.
    assert all(not (a == b == "v2") for a, b in zip(draws, draws[1:]))
    # A weighted version that is not ready gets nothing; the others carry on.
    assert {book.choose("m", ["v1"]) for _ in range(10)} == {"v1"}
    # No weighted version ready: none is drawn (the caller answers on any ready one).
    assert book.choose("m", ["v3"]) is None


def test_weights_move_only_to_ready_versions_and_add_up_to_100(tmp_path: Path) -> None:
    book = VersionBook(tmp_path / "state.json")
    with pytest.raises(FailedPrecondition, match="not ready"):
        book.set_weights("m", {"v1": 80, "v2": 20}, ready=["v1"])
    with pytest.raises(InvalidArgument, match="add up to 100"):
        book.set_weights("m", {"v1": 80, "v2": 30}, ready=["v1", "v2"])
    assert book.alias("m").weights == {}


def test_compare_and_set_refuses_a_stale_write(tmp_path: Path) -> None:
    book = VersionBook(tmp_path / "state.json")
    first = book.set_weights("m", {"v1": 100}, ready=["v1", "v2"]).generation
    book.set_weights("m", {"v1": 50, "v2": 50}, ready=["v1", "v2"], expected=first)
    with pytest.raises(FailedPrecondition, match="changed"):
        book.set_weights("m", {"v2": 100}, ready=["v1", "v2"], expected=first)
    assert book.alias("m").weights == {"v1": 50, "v2": 50}


def test_rollback_returns_to_the_last_version_that_held_everything(tmp_path: Path) -> None:
    book = VersionBook(tmp_path / "state.json")
    ready = ["v1", "v2", "v3"]
    # Loading v2 pins what serves now (v1 alone) as the weights, and what rollback returns to.
    book.pin_implicit("m", ["v1"])
    assert book.alias("m").weights == {"v1": 100}
    book.set_weights("m", {"v1": 80, "v2": 20}, ready=["v1", "v2"])
    assert book.rollback("m", ready).weights == {"v1": 100}  # a rollout undone
    book.set_weights("m", {"v2": 100}, ready=ready)  # promoted
    book.set_weights("m", {"v2": 90, "v3": 10}, ready=ready)
    assert book.rollback("m", ready).weights == {"v2": 100}  # back from v3's canary
    assert book.rollback("m", ready).weights == {"v1": 100}  # back from v2's promotion
    with pytest.raises(FailedPrecondition, match="no longer loaded"):
        book.set_weights("m", {"v3": 100}, ready=ready)
        book.rollback("m", ["v3"])


def test_rollback_with_no_history_is_refused(tmp_path: Path) -> None:
    book = VersionBook(tmp_path / "state.json")
    with pytest.raises(FailedPrecondition, match="no earlier version"):
        book.rollback("m", ["v1"])


def test_a_restarted_router_reads_the_same_weights(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    book = VersionBook(path)
    book.set_weights("m", {"v1": 80, "v2": 20}, ready=["v1", "v2"])
    book.set_desired("m", "v3", LOADED)
    again = VersionBook(path)
    alias = again.alias("m")
    assert alias.weights == {"v1": 80, "v2": 20}
    assert alias.desired == {"v1": LOADED, "v2": LOADED, "v3": LOADED}
    assert alias.generation == book.alias("m").generation
    # Another router's write is followed.
    book.set_weights("m", {"v2": 100}, ready=["v1", "v2"])
    assert again.reload() and again.alias("m").weights == {"v2": 100}


def test_an_unreadable_state_file_keeps_what_the_router_has(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    book = VersionBook(path)
    book.set_weights("m", {"v1": 100}, ready=["v1"])
    path.write_text("{not json")
    assert not book.reload()
    assert book.alias("m").weights == {"v1": 100}


def test_a_version_with_traffic_cannot_unload_and_a_draining_one_gets_none(
    tmp_path: Path,
) -> None:
    book = VersionBook(tmp_path / "state.json")
    book.set_weights("m", {"v1": 80, "v2": 20}, ready=["v1", "v2"])
    with pytest.raises(FailedPrecondition, match="20 % of the traffic"):
        book.set_desired("m", "v2", UNLOADED)
    book.set_weights("m", {"v1": 100}, ready=["v1", "v2"])
    book.start_drain("m", "v2")
    assert book.excluded("m") == {"v2"}
    with pytest.raises(FailedPrecondition, match="being unloaded"):
        book.set_weights("m", {"v2": 100}, ready=["v1", "v2"])
    with book.answering("m", "v2"):
        assert book.running("m", "v2") == 1
    assert book.running("m", "v2") == 0
    book.set_desired("m", "v2", UNLOADED)
    book.end_drain("m", "v2")
    assert book.excluded("m") == {"v2"}  # unloaded: still out of every draw
