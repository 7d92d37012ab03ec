"""`tessera up`'s restart policy (services.mesh.Backoff): waits that double to a cap, a crash
loop after max_restarts within the window, a fresh start after a long run. No processes."""

from __future__ import annotations

from services.mesh import Backoff, RestartPolicy


def test_waits_double_up_to_the_cap() -> None:
    backoff = Backoff(RestartPolicy(first_delay_s=0.5, max_delay_s=10, max_restarts=100))
    delays = [backoff.next_delay(now=float(i), ran_s=0.1) for i in range(8)]
    assert delays == [0.5, 1, 2, 4, 8, 10, 10, 10]


def test_a_crash_loop_is_the_exit_after_max_restarts_within_the_window() -> None:
    backoff = Backoff(RestartPolicy(max_restarts=5, window_s=60))
    now = 0.0
    for _ in range(5):
        delay = backoff.next_delay(now, ran_s=1.0)
        assert delay is not None
        now += delay + 1.0  # restarted, ran a second, exited again
    assert now < 60
    assert backoff.next_delay(now, ran_s=1.0) is None


def test_restarts_spread_over_more_than_the_window_are_no_loop() -> None:
    backoff = Backoff(RestartPolicy(max_restarts=2, window_s=60))
    assert backoff.next_delay(0.0, ran_s=30) is not None
    assert backoff.next_delay(40.0, ran_s=30) is not None
    # The first restart is more than 60 s ago: only one within the window.
    assert backoff.next_delay(80.0, ran_s=30) is not None
    assert backoff.next_delay(90.0, ran_s=5) is None


def test_a_long_run_starts_the_waits_over() -> None:
    backoff = Backoff(RestartPolicy(first_delay_s=0.5, max_delay_s=10, window_s=60))
    assert [backoff.next_delay(float(i), ran_s=1) for i in range(3)] == [0.5, 1, 2]
    assert backoff.next_delay(1000.0, ran_s=600) == 0.5
