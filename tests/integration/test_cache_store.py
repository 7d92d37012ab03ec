"""CacheStore against real memcached processes started on free ports by the tests."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pymemcache.client.base import Client

from services.cache.launcher import MemcachedNode, free_port, split_address
from services.cache.seal import Seal
from services.cache.store import CacheStats, CacheStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

DEAD_TIMEOUT_S = 0.5


@pytest.fixture
def node() -> Iterator[MemcachedNode]:
    with MemcachedNode().start(port=free_port(), memory_mb=16) as started:
        yield started


@pytest.fixture
def second_node() -> Iterator[MemcachedNode]:
    with MemcachedNode().start(port=free_port(), memory_mb=16) as started:
        yield started


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP server that accepts connections and never answers: every call times out."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield f"127.0.0.1:{server.getsockname()[1]}"


def keys(n: int, tag: str = "k") -> list[str]:
    return [f"test:{tag}:{i}" for i in range(n)]


def raw_client(node: MemcachedNode) -> Client:
    return Client(split_address(node.address), connect_timeout=1, timeout=1)


def test_round_trip_on_one_node(node: MemcachedNode) -> None:
    with CacheStore([node.address]) as store:
        assert store.get("test:a") is None
        store.set("test:a", b"\x00value\xff")
        assert store.get("test:a") == b"\x00value\xff"
        store.set_many({k: k.encode() for k in keys(20)})
        found = store.get_many(keys(20) + ["test:absent"])
        assert found == {k: k.encode() for k in keys(20)}
        assert store.stats == CacheStats(hits=21, misses=2, errors=0)


def test_keys_spread_over_two_nodes(node: MemcachedNode, second_node: MemcachedNode) -> None:
    items = {k: k.encode() for k in keys(200)}
    seal = Seal("spread")
    with CacheStore([node.address, second_node.address], seal=seal) as store:
        store.set_many(dict(list(items.items())[:100]))
        for key, value in list(items.items())[100:]:
            store.set(key, value)
        assert store.get_many(list(items)) == items
        assert all(store.get(key) == value for key, value in items.items())
        assert store.stats.errors == 0
    on_first = raw_client(node).get_many(list(items))
    on_second = raw_client(second_node).get_many(list(items))
    assert on_first and on_second
    assert set(on_first).isdisjoint(on_second)
    both = {**on_first, **on_second}
    assert {key: seal.unwrap(key, value) for key, value in both.items()} == items


def test_values_over_the_store_bound_are_not_stored(node: MemcachedNode) -> None:
    with CacheStore([node.address], max_value_bytes=64) as store:
        store.set("test:small", b"x" * 64)
        store.set_many({"test:large": b"x" * 65, "test:fits": b"y"})
        assert store.get_many(["test:small", "test:large", "test:fits"]) == {
            "test:small": b"x" * 64,
            "test:fits": b"y",
        }
        assert store.stats.errors == 0


def test_values_are_sealed_to_their_keys(node: MemcachedNode) -> None:
    """What memcached holds is the sealed value: another store with another secret, or the
    right value moved to another key, is a miss counted as rejected."""
    with CacheStore([node.address], seal=Seal("one")) as store:
        store.set("test:sealed", b"value")
        raw = raw_client(node).get("test:sealed")
        assert raw != b"value" and Seal("one").unwrap("test:sealed", raw) == b"value"
        raw_client(node).set("test:moved", raw, noreply=False)
        assert store.get("test:moved") is None and store.stats.rejected == 1
    with CacheStore([node.address], seal=Seal("two")) as other:
        assert other.get("test:sealed") is None and other.stats.rejected == 1


def test_disabled_store() -> None:
    with CacheStore([]) as store:
        assert not store.enabled
        store.set("test:a", b"x")
        store.set_many({"test:b": b"y"})
        assert store.get("test:a") is None
        assert store.get_many(["test:a", "test:b"]) == {}
        assert store.stats == CacheStats(hits=0, misses=3, errors=0, rejected=0)


def test_bad_requests_are_counted_not_raised(node: MemcachedNode) -> None:
    # No size bound of the store's own: memcached's item limit (-I 4m as launched) refuses it.
    with CacheStore([node.address], max_value_bytes=8 << 20) as store:
        store.set("test:big", b"x" * (6 << 20))  # over memcached's 4 MiB item limit
        assert store.get("test:big") is None
        assert store.get("key with spaces") is None
        assert store.stats.errors == 2
        # A rejected request must not take the healthy node out of rotation.
        store.set("test:ok", b"fine")
        assert store.get("test:ok") == b"fine"


def test_dead_node_is_fast_and_recovers(node: MemcachedNode) -> None:
    store = CacheStore([node.address], dead_timeout_s=DEAD_TIMEOUT_S)
    store.set("test:a", b"1")
    assert store.get("test:a") == b"1"
    host, port = split_address(node.address)
    node.stop()

    started = time.monotonic()
    for i in range(200):
        assert store.get(f"test:{i}") is None
        store.set(f"test:{i}", b"x")
        assert store.get_many(["test:a", f"test:{i}"]) == {}
        store.set_many({f"test:{i}": b"x"})
    assert time.monotonic() - started < 5.0
    assert store.stats.errors >= 800  # every call could not be served

    with MemcachedNode().start(host=host, port=port, memory_mb=16):
        deadline = time.monotonic() + 10 * DEAD_TIMEOUT_S
        while True:
            store.set("test:back", b"again")
            if store.get("test:back") == b"again":
                break
            assert time.monotonic() < deadline, "cache did not recover after restart"
            time.sleep(0.05)
        errors = store.stats.errors
        store.set_many({"test:m1": b"1", "test:m2": b"2"})
        assert store.get_many(["test:m1", "test:m2"]) == {"test:m1": b"1", "test:m2": b"2"}
        assert store.stats.errors == errors
    store.close()


def test_restart_between_calls_costs_nothing(node: MemcachedNode) -> None:
    with CacheStore([node.address], dead_timeout_s=30) as store:
        store.set("test:a", b"1")
        assert store.get("test:a") == b"1"
        host, port = split_address(node.address)
        node.kill()
        with MemcachedNode().start(host=host, port=port, memory_mb=16):
            # The pooled connection is stale; the store must reconnect, not open the breaker.
            assert store.get("test:a") is None
            store.set("test:a", b"2")
            assert store.get("test:a") == b"2"
        assert store.stats.errors == 0


def test_dead_node_keys_move_to_live_node(node: MemcachedNode, second_node: MemcachedNode) -> None:
    items = {k: k.encode() for k in keys(100)}
    with CacheStore([node.address, second_node.address], dead_timeout_s=30) as store:
        store.set_many(items)
        node.kill()
        found = store.get_many(list(items))  # trips the breaker for the dead node
        assert 0 < len(found) < len(items)
        assert store.stats.errors == 1
        store.set_many(items)
        assert store.get_many(list(items)) == items
        assert store.stats.errors == 1


def test_unresponsive_node_times_out_once_then_is_skipped(silent_server: str) -> None:
    with CacheStore([silent_server], timeout_s=0.1, dead_timeout_s=30) as store:
        started = time.monotonic()
        assert store.get("test:a") is None
        assert 0.05 < time.monotonic() - started < 1.0
        started = time.monotonic()
        for _ in range(200):
            assert store.get("test:a") is None
            store.set("test:a", b"x")
        assert time.monotonic() - started < 1.0
        assert store.stats.errors == 401


def test_concurrent_threads(node: MemcachedNode) -> None:
    store = CacheStore([node.address])
    failures: list[BaseException] = []

    def worker(tag: str) -> None:
        try:
            for key in keys(100, tag):
                store.set(key, key.encode())
                assert store.get(key) == key.encode()
            assert len(store.get_many(keys(100, tag))) == 100
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(f"t{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    store.close()
    assert not failures
    assert store.stats == CacheStats(hits=8 * 200, misses=0, errors=0)


def test_spans(node: MemcachedNode) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with CacheStore([node.address], tracer=provider.get_tracer("test")) as store:
        store.set("test:a", b"1")
        store.set_many({"test:b": b"2", "test:c": b"3"})
        store.get("test:a")
        store.get("test:zzz")
        store.get_many(["test:a", "test:b", "test:zzz"])
        node.kill()
        store.get("test:a")
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == [
        "cache.set",
        "cache.set_many",
        "cache.get",
        "cache.get",
        "cache.get_many",
        "cache.get",
    ]
    attrs = [dict(s.attributes or {}) for s in spans]
    assert attrs[1]["cache.keys"] == 2
    assert attrs[2]["cache.hit"] is True and attrs[3]["cache.hit"] is False
    assert attrs[4]["cache.keys"] == 3 and attrs[4]["cache.hits"] == 2
    assert "error" not in attrs[2]
    assert attrs[5]["error"] is True and attrs[5]["cache.hit"] is False


def test_node_reports_a_port_in_use(node: MemcachedNode) -> None:
    _, port = split_address(node.address)
    with pytest.raises(RuntimeError, match="memcached"):
        MemcachedNode().start(port=port, memory_mb=16)
    assert node.running


def test_tessera_cache_stops_its_nodes_on_sigterm() -> None:
    """`tessera cache` as its own process: SIGTERM stops it (exit 0) and its memcached."""
    import re
    import signal
    import subprocess
    import sys
    import time

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "cache", f"127.0.0.1:{port}", "10.1.2.3:11211"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
            any("ready on" in line for line in lines) and any("not local" in line for line in lines)
        ):
            lines.append(proc.stdout.readline())
        ready = next(line for line in lines if "ready on" in line)
        assert f"ready on 127.0.0.1:{port}" in ready
        assert any("10.1.2.3:11211 is not local" in line for line in lines)
        memcached = int(re.search(r"pid (\d+)", ready).group(1))  # type: ignore[union-attr]
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    with pytest.raises(ProcessLookupError):
        os.kill(memcached, 0)


def test_async_calls_round_trip_in_order(node: MemcachedNode) -> None:
    async def main() -> None:
        with CacheStore([node.address]) as store:
            items = {k: k.encode() for k in keys(50, "async")}
            await store.set_many_async(items)
            assert await store.get_many_async(list(items) + ["test:absent"]) == items
            # Asked for in this order, run in this order: the read sees the write before it.
            writes = [store.set_many_async({"test:order": str(i).encode()}) for i in range(20)]
            read = store.get_many_async(["test:order"])
            *_, found = await asyncio.gather(*writes, read)
            assert found == {"test:order": b"19"}
            assert store.stats == CacheStats(hits=51, misses=1, errors=0)

    asyncio.run(main())


def test_async_calls_on_a_disabled_or_closed_store() -> None:
    async def main() -> None:
        with CacheStore([]) as store:
            await store.set_many_async({"test:a": b"x"})
            assert await store.get_many_async(["test:a"]) == {}

    asyncio.run(main())


def test_async_get_does_not_block_the_event_loop(silent_server: str) -> None:
    """memcached that never answers: the loop keeps running until the call times out, and
    the answer is a miss counted as an error."""
    timeout_s = 1.0

    async def main() -> None:
        with CacheStore([silent_server], timeout_s=timeout_s, dead_timeout_s=30) as store:
            ticks = 0
            lookup = asyncio.ensure_future(store.get_many_async(["test:a"]))
            while not lookup.done():
                await asyncio.sleep(0.01)
                ticks += 1
            assert await lookup == {}
            # Blocking would have frozen the loop for the whole timeout: no tick at all.
            assert ticks >= 10, f"the event loop ran {ticks} times during a {timeout_s} s call"
            assert store.stats.errors == 1

    asyncio.run(main())


def test_async_spans_are_children_of_the_caller(node: MemcachedNode) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")

    async def main() -> None:
        with CacheStore([node.address], tracer=tracer) as store:
            with tracer.start_as_current_span("request"):
                await store.set_many_async({"test:a": b"1"})
                await store.get_many_async(["test:a"])

    asyncio.run(main())
    spans = {s.name: s for s in exporter.get_finished_spans()}
    request = spans["request"]
    for name in ("cache.set_many", "cache.get_many"):
        assert spans[name].parent is not None
        assert spans[name].parent.span_id == request.context.span_id
