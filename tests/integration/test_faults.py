"""Fault injection on real processes (loopback, tiny models): the router keeps serving through
kills, drains, cache outages, membership changes, bursts and deadlines.

Every test counts what its clients sent, what succeeded and what failed; where a healthy chain
remained, nothing may fail.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc import aio

from services.cache.launcher import MemcachedNode, free_port
from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.mesh import Mesh, Proc

pytestmark = pytest.mark.slow  # starts meshes of real processes; not in the fast tier

WORDS = [
    "the",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "hello",
    "world",
    "paris",
    "is",
    "capital",
    "of",
    "france",
    "what",
    "an",
    "and",
    "to",
    "in",
    "it",
]
GREEDY_PROMPT = "a b c"  # tiny-llama's greedy continuation of it runs long without EOS
CALL_TIMEOUT_S = 20.0


# -- helpers --------------------------------------------------------------------------------


def text_for(thread: int, index: int, salt: str = "") -> str:
    """A distinct text per (thread, index), so no request repeats another's work."""
    n = thread * 10_000 + index
    words = [WORDS[(n // len(WORDS) ** k) % len(WORDS)] for k in range(4)]
    return f"{salt}{' '.join(words)} {thread} {index}"


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> float:
    """Polls predicate until true; returns the seconds it took; fails the test on timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start


@dataclass
class StageView:
    address: str
    span: tuple[int, int]
    healthy: bool
    outstanding: int


def stages_of(mesh: Mesh, model: str) -> dict[str, StageView]:
    """Every worker ListModels shows for the model, by address."""
    listed = mesh.stub().ListModels(inference_pb2.ListModelsRequest(), timeout=5)
    found: dict[str, StageView] = {}
    for entry in listed.models:
        if entry.name != model:
            continue
        for chain in entry.chains:
            for stage in chain.stages:
                found[stage.address] = StageView(
                    stage.address,
                    (stage.span.start, stage.span.end),
                    stage.healthy,
                    stage.outstanding,
                )
    return found


def healthy_chains(mesh: Mesh, model: str) -> int:
    listed = mesh.stub().ListModels(inference_pb2.ListModelsRequest(), timeout=5)
    return sum(c.healthy for m in listed.models if m.name == model for c in m.chains)


def worker_info(proc: Proc) -> worker_pb2.WorkerInfo:
    """The worker's own view of itself (tessera.v1.Worker/Info)."""
    with grpc.insecure_channel(proc.address) as channel:
        return worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=5)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def describe(error: grpc.RpcError) -> str:
    return f"{error.code().name}: {error.details()}"


@dataclass
class Load:
    """Client threads that each call `call(thread, index)` in a loop until stopped.

    Counts requests sent, succeeded and failed; `call` raises (grpc.RpcError or AssertionError)
    to fail a request. Stops by itself after `max_requests` so a test stays bounded.
    """

    call: Callable[[int, int], None]
    threads: int = 6
    max_requests: int = 600
    sent: int = 0
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for thread in range(self.threads):
            worker = threading.Thread(target=self._run, args=(thread,), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def failed(self) -> int:
        return len(self.failures)

    def _run(self, thread: int) -> None:
        index = 0
        while not self._stop.is_set():
            with self._lock:
                if self.sent >= self.max_requests:
                    return
                self.sent += 1
            try:
                self.call(thread, index)
            except grpc.RpcError as error:
                with self._lock:
                    self.failures.append(describe(error))
            except Exception as error:  # noqa: BLE001 - a wrong answer is a failure too
                with self._lock:
                    self.failures.append(f"{type(error).__name__}: {error}")
            else:
                with self._lock:
                    self.ok += 1
            index += 1

    def wait_ok(self, count: int, timeout: float = 30.0) -> None:
        """Waits until `count` more requests than now have succeeded."""
        target = self.ok + count
        wait_until(
            lambda: self.ok >= target or self.sent >= self.max_requests,
            timeout,
            f"{count} successful requests",
        )

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=CALL_TIMEOUT_S + 5)
        assert not any(w.is_alive() for w in self._workers), "a client thread hung"

    def check(self) -> None:
        summary = f"sent={self.sent} ok={self.ok} failed={self.failed}: {self.failures[:5]}"
        assert self.failed == 0, summary
        assert self.ok == self.sent, summary


def print_logs(mesh: Mesh) -> None:
    """Prints the services' own logs; pytest shows them with a failure."""
    for proc in [mesh.router, *mesh.workers]:
        if proc is not None:
            print(f"---- {' '.join(proc.args[:5])} (exit {proc.popen.poll()})")
            print("\n".join(proc.lines[-60:]))


@contextmanager
def logs_on_failure(mesh: Mesh) -> Iterator[None]:
    try:
        yield
    except BaseException:
        print_logs(mesh)
        raise


def _diagnose_router(mesh: Mesh) -> None:
    """Prints what the router shows and where its threads are (faulthandler on SIGABRT)."""
    assert mesh.router is not None
    try:
        print(mesh.stub().ListModels(inference_pb2.ListModelsRequest(), timeout=5))
    except grpc.RpcError as error:
        print("ListModels:", describe(error))
    os.kill(mesh.router.popen.pid, signal.SIGABRT)
    time.sleep(2)
    print("---- router (not access lines)")
    print("\n".join(line for line in mesh.router.lines if '"msg": "request"' not in line))


@contextmanager
def mesh_of(
    repo: Path,
    workers: list[tuple[str, str | None]],
    *,
    chains: dict[str, int],
    env: dict[str, str] | None = None,
    cache_nodes: Sequence[str] = (),
) -> Iterator[Mesh]:
    """A router and workers (started in parallel), ready with `chains` healthy chains each."""
    env = {"PYTHONFAULTHANDLER": "1", **(env or {})}  # a crashed service leaves a traceback
    with Mesh(repo, env=env, cache_nodes=cache_nodes) as mesh:
        mesh.start_router()
        for model, layers in workers:
            mesh.start_worker(model, layers, wait=False)
        for proc in mesh.workers:
            proc.wait_ready()
        try:
            for model, count in chains.items():
                mesh.wait_model(model, chains=count)
        except TimeoutError:
            _diagnose_router(mesh)
            raise
        try:
            with logs_on_failure(mesh):
                yield mesh
        finally:
            # Drain every worker at once; Mesh.close() then reaps them and stops the router.
            for proc in mesh.workers:
                if proc.popen.poll() is None:
                    proc.popen.send_signal(signal.SIGTERM)


def embed_call(
    mesh: Mesh, texts_per_request: int = 4, salt: str = ""
) -> Callable[[int, int], None]:
    stub = mesh.stub()

    def call(thread: int, index: int) -> None:
        texts = [
            text_for(thread, index * texts_per_request + k, salt) for k in range(texts_per_request)
        ]
        reply = stub.Embed(
            inference_pb2.EmbedRequest(model="tiny-bert", inputs=texts), timeout=CALL_TIMEOUT_S
        )
        assert len(reply.embeddings) == len(texts) and reply.dim == 32, reply

    return call


def stream_tokens(
    stub: inference_pb2_grpc.InferenceStub, request: inference_pb2.GenerateRequest
) -> tuple[list[int], str]:
    chunks = list(stub.GenerateStream(request, timeout=CALL_TIMEOUT_S))
    return [t for c in chunks for t in c.token_ids], chunks[-1].finish_reason


# -- 1. kill -9 a replica under Embed load --------------------------------------------------


def test_kill_one_of_two_replicas_under_embed_load(tiny_repo: Path) -> None:
    with mesh_of(
        tiny_repo, [("tiny-bert", None), ("tiny-bert", None)], chains={"tiny-bert": 2}
    ) as mesh:
        with Load(embed_call(mesh, texts_per_request=8), threads=6, max_requests=500) as load:
            load.wait_ok(40)
            victim = mesh.workers[0]
            victim.kill()
            load.wait_ok(120)
        load.check()
        assert victim.popen.returncode == -signal.SIGKILL
        # The kill hit live traffic: some request failed on the victim and was retried.
        assert any("failed" in line and victim.address in line for line in mesh.router.lines)
        survivor = mesh.workers[1].address
        view = stages_of(mesh, "tiny-bert")
        assert view[survivor].healthy
        wait_until(
            lambda: (
                not stages_of(mesh, "tiny-bert")
                .get(victim.address, StageView("", (0, 0), False, 0))
                .healthy
            ),
            5,
            "the victim unhealthy",
        )


# -- 2. kill -9 a stage mid-stream, another worker holds its span -----------------------------


def _streams_with_kill(
    mesh: Mesh, requests: Sequence[inference_pb2.GenerateRequest], first_stage: Proc
) -> tuple[list[tuple[list[int], str]], Proc]:
    """Starts the streams together; once each has its first chunk, freezes the only [0, 2) worker
    (so no stream can finish meanwhile), kills a [2, 4) worker that holds them, thaws [0, 2)."""
    by_address = {p.address: p for p in mesh.workers}
    for _ in range(5):
        streams = [mesh.stub().GenerateStream(r, timeout=CALL_TIMEOUT_S) for r in requests]
        tokens = [list(next(s).token_ids) for s in streams]
        os.kill(first_stage.popen.pid, signal.SIGSTOP)
        try:
            busy = [
                s
                for s in stages_of(mesh, "tiny-llama").values()
                if s.span == (2, 4)
                and s.outstanding > 0
                and by_address[s.address].popen.poll() is None
            ]
            victim = by_address[max(busy, key=lambda s: s.outstanding).address] if busy else None
            if victim is not None:
                victim.kill()
        finally:
            os.kill(first_stage.popen.pid, signal.SIGCONT)
        results = []
        for stream, got in zip(streams, tokens, strict=True):
            finish = ""
            for chunk in stream:
                got.extend(chunk.token_ids)
                finish = chunk.finish_reason or finish
            results.append((got, finish))
        if victim is not None:
            return results, victim
    raise AssertionError("every stream ended before the kill could land")


def _resumed(mesh: Mesh) -> list[int]:
    """Tokens each generation had when the router moved it to another chain (from its log)."""
    assert mesh.router is not None
    return [
        int(m.group(1))
        for line in mesh.router.lines
        if (m := re.search(r"failed after (\d+) tokens; resuming", line))
    ]


def test_kill_stage_with_eight_streams_in_flight_completes_all_of_them(tiny_repo: Path) -> None:
    workers = [
        ("tiny-llama", "0:2"),
        ("tiny-llama", "2:4"),
        ("tiny-llama", "2:4"),
        ("tiny-llama", "2:4"),
    ]
    with mesh_of(tiny_repo, workers, chains={"tiny-llama": 3}) as mesh:
        stub = mesh.stub()
        first_stage = mesh.workers[0]
        prompts = [GREEDY_PROMPT, "a b c d", "a b", "b c d e"]
        greedy = [
            inference_pb2.GenerateRequest(model="tiny-llama", prompt=p, max_new_tokens=48)
            for p in prompts
        ]
        # Seeds whose undisturbed sampled runs are long enough for a kill to land inside them.
        seeded: list[inference_pb2.GenerateRequest] = []
        for seed in range(40):
            candidate = inference_pb2.GenerateRequest(
                model="tiny-llama",
                prompt=GREEDY_PROMPT,
                max_new_tokens=48,
                temperature=1.0,
                seed=seed,
            )
            if len(stream_tokens(stub, candidate)[0]) >= 30:
                seeded.append(candidate)
            if len(seeded) == 4:
                break
        assert len(seeded) == 4, "too few seeds give a long sampled run"
        requests = greedy + seeded
        # The undisturbed runs, one at a time.
        want = [stream_tokens(stub, r) for r in requests]
        assert all(finish == "length" for _, finish in want[:4])

        got, victim = _streams_with_kill(mesh, requests, first_stage)
        assert victim.popen.returncode == -signal.SIGKILL
        assert got == want
        # The router moved live generations mid-stream: after some tokens, before the last.
        resumed = _resumed(mesh)
        assert resumed and all(0 < n < 48 for n in resumed), resumed

        # A second kill: the last 2:4 worker takes over and answers stay the undisturbed ones.
        again, second = _streams_with_kill(mesh, requests, first_stage)
        assert second is not victim
        assert again == want
        assert [stream_tokens(stub, r) for r in requests] == want


# -- 3. SIGTERM (drain) under load ----------------------------------------------------------


def test_sigterm_drains_without_failing_accepted_requests(tiny_repo: Path) -> None:
    workers = [
        ("tiny-bert", None),
        ("tiny-bert", None),
        ("tiny-llama", "0:2"),
        ("tiny-llama", "2:4"),
        ("tiny-llama", "2:4"),
    ]
    with mesh_of(tiny_repo, workers, chains={"tiny-bert": 2, "tiny-llama": 2}) as mesh:
        stub = mesh.stub()
        greedy = inference_pb2.GenerateRequest(
            model="tiny-llama", prompt=GREEDY_PROMPT, max_new_tokens=40
        )
        want, _ = stream_tokens(stub, greedy)
        embed = embed_call(mesh, texts_per_request=4)

        def call(thread: int, index: int) -> None:
            if thread < 2:
                got, finish = stream_tokens(stub, greedy)
                assert (got, finish) == (want, "length"), (got, finish)
            else:
                embed(thread, index)

        by_address = {p.address: p for p in mesh.workers}
        with Load(call, threads=6, max_requests=500) as load:
            load.wait_ok(30)
            bert = mesh.workers[0]
            # The 2:4 worker that holds generations right now: the drain must finish them.
            busy: list[StageView] = []
            deadline = time.monotonic() + 10
            while not busy and time.monotonic() < deadline:
                busy = [
                    s
                    for s in stages_of(mesh, "tiny-llama").values()
                    if s.span == (2, 4) and s.outstanding > 0
                ]
                time.sleep(0.01)
            assert busy, "no 2:4 worker held a generation to drain"
            stage = by_address[busy[0].address]
            held = worker_info(stage).live_sessions
            bert.popen.send_signal(signal.SIGTERM)
            stage.popen.send_signal(signal.SIGTERM)
            assert bert.popen.wait(timeout=20) == 0, bert.output()[-2000:]
            assert stage.popen.wait(timeout=20) == 0, stage.output()[-2000:]
            assert held > 0, "the drained stage held no rows: the drain hit no live work"
            wait_until(
                lambda: bert.address not in stages_of(mesh, "tiny-bert"),
                3,
                "the drained replica to leave ListModels",
            )
            wait_until(
                lambda: stage.address not in stages_of(mesh, "tiny-llama"),
                3,
                "the drained stage to leave ListModels",
            )
            load.wait_ok(40)
        load.check()
        assert healthy_chains(mesh, "tiny-bert") == 1
        assert healthy_chains(mesh, "tiny-llama") == 1


# -- 4. memcached stops and restarts under load ---------------------------------------------


def test_memcached_restart_under_load(tiny_repo: Path) -> None:
    port = free_port()
    node = MemcachedNode().start(port=port)
    try:
        with mesh_of(
            tiny_repo,
            [("tiny-bert", None), ("tiny-llama", None)],
            chains={"tiny-bert": 1, "tiny-llama": 1},
            cache_nodes=[node.address],
        ) as mesh:
            stub = mesh.stub()
            fixed_embed = inference_pb2.EmbedRequest(
                model="tiny-bert", inputs=["paris is the capital of france"]
            )
            fixed_generate = inference_pb2.GenerateRequest(
                model="tiny-llama", prompt="the cat sat", max_new_tokens=8
            )
            for request, method in ((fixed_embed, stub.Embed), (fixed_generate, stub.Generate)):
                method(request, timeout=CALL_TIMEOUT_S)
                assert method(request, timeout=CALL_TIMEOUT_S).cached

            embed = embed_call(mesh, texts_per_request=2, salt="m ")

            def call(thread: int, index: int) -> None:
                if thread % 2:
                    reply = stub.Generate(
                        inference_pb2.GenerateRequest(
                            model="tiny-llama", prompt=text_for(thread, index), max_new_tokens=6
                        ),
                        timeout=CALL_TIMEOUT_S,
                    )
                    assert reply.generated_tokens >= 1
                else:
                    embed(thread, index)

            with Load(call, threads=4, max_requests=600) as load:
                load.wait_ok(12)
                node.stop()
                load.wait_ok(20)
                time.sleep(0.5)
                node.start(port=port)

                def hit_again(request: object, method: Callable[..., object]) -> bool:
                    return bool(method(request, timeout=CALL_TIMEOUT_S).cached)

                # The breaker retries the node after its dead timeout (2 s): hits come back.
                wait_until(
                    lambda: hit_again(fixed_embed, stub.Embed),
                    15,
                    "embedding cache hits after the restart",
                    interval=0.2,
                )
                wait_until(
                    lambda: hit_again(fixed_generate, stub.Generate),
                    15,
                    "generation cache hits after the restart",
                    interval=0.2,
                )
                load.wait_ok(10)
            load.check()
    finally:
        node.stop()


# -- 5. live membership: join, leave, expire ------------------------------------------------


def test_membership_join_leave_and_expiry(tiny_repo: Path) -> None:
    # Registrations expire 2 s after their last renewal; workers renew every 0.5 s.
    env = {"TESSERA_ROUTER_WORKER_TTL_S": "2", "TESSERA_WORKER_HEARTBEAT_S": "0.5"}
    with mesh_of(tiny_repo, [("tiny-bert", None)], chains={"tiny-bert": 1}, env=env) as mesh:
        original = mesh.workers[0]
        late = mesh.start_worker("tiny-bert")
        mesh.wait_model("tiny-bert", chains=2)

        # The late worker takes load: the router sends it work (seen as outstanding on it).
        seen: dict[str, int] = {}
        with Load(embed_call(mesh, texts_per_request=8), threads=6, max_requests=300) as load:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and seen.get(late.address, 0) == 0:
                for address, view in stages_of(mesh, "tiny-bert").items():
                    seen[address] = max(seen.get(address, 0), view.outstanding)
                time.sleep(0.01)
            load.wait_ok(20)
        load.check()
        assert seen.get(late.address, 0) > 0, seen

        # A stopped worker (SIGTERM) leaves ListModels.
        third = mesh.start_worker("tiny-bert")
        mesh.wait_model("tiny-bert", chains=3)
        assert third.stop() == 0
        wait_until(
            lambda: third.address not in stages_of(mesh, "tiny-bert"),
            3,
            "the stopped worker to leave ListModels",
        )

        # A SIGKILLed worker disappears after its registration TTL; the late one serves alone.
        with Load(embed_call(mesh, salt="k "), threads=4, max_requests=400) as load:
            load.wait_ok(10)
            original.kill()
            wait_until(
                lambda: original.address not in stages_of(mesh, "tiny-bert"),
                8,
                "the killed worker to expire from ListModels",
                interval=0.1,
            )
            load.wait_ok(20)
        load.check()
        assert list(stages_of(mesh, "tiny-bert")) == [late.address]


# -- 6, 7, 8 share one small causal-LM chain whose router takes 4 requests at once ------------


@pytest.fixture(scope="module")
def capped_mesh(tiny_repo: Path) -> Iterator[Mesh]:
    env = {"TESSERA_ROUTER_MAX_OUTSTANDING": "4"}
    with mesh_of(
        tiny_repo, [("tiny-llama", "0:2"), ("tiny-llama", "2:4")], chains={"tiny-llama": 1}, env=env
    ) as mesh:
        yield mesh


@pytest.fixture
def capped(capped_mesh: Mesh, request: pytest.FixtureRequest) -> Iterator[Mesh]:
    failed_before = request.session.testsfailed
    yield capped_mesh
    if request.session.testsfailed > failed_before:
        print_logs(capped_mesh)


async def _burst(address: str, count: int, max_new: int) -> list[tuple[str, float, str]]:
    async with aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def one(index: int) -> tuple[str, float, str]:
            start = time.monotonic()
            try:
                await stub.Generate(
                    inference_pb2.GenerateRequest(
                        model="tiny-llama", prompt=GREEDY_PROMPT, max_new_tokens=max_new
                    ),
                    timeout=60,
                )
                return "OK", time.monotonic() - start, ""
            except aio.AioRpcError as error:
                return error.code().name, time.monotonic() - start, error.details() or ""

        return await asyncio.gather(*(one(i) for i in range(count)))


def test_burst_above_capacity_is_refused_quickly(capped: Mesh) -> None:
    stub = capped.stub()
    assert stub.Generate(
        inference_pb2.GenerateRequest(model="tiny-llama", prompt=GREEDY_PROMPT, max_new_tokens=24),
        timeout=30,
    ).generated_tokens
    pid = capped.router.popen.pid
    before = rss_kib(pid)
    outcomes: list[tuple[str, float, str]] = []
    for _ in range(3):
        outcomes += asyncio.run(_burst(capped.address, 64, 24))
    after = rss_kib(pid)
    codes = [code for code, _, _ in outcomes]
    refused = [
        (elapsed, details) for code, elapsed, details in outcomes if code == "RESOURCE_EXHAUSTED"
    ]
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, [
        o for o in outcomes if o[0] not in ("OK", "RESOURCE_EXHAUSTED")
    ][:5]
    assert codes.count("OK") >= 3 * 4
    assert len(refused) >= 3 * 32
    assert all("capacity" in details for _, details in refused)
    slowest = max(elapsed for elapsed, _ in refused)
    print(
        f"router RSS {before} -> {after} KiB over {len(outcomes)} requests, "
        f"{codes.count('OK')} OK, {len(refused)} refused in <= {slowest:.3f} s"
    )
    assert slowest < 2.0
    assert after - before < 100 * 1024, f"router RSS grew {before} -> {after} KiB"
    # The router serves normally after the burst.
    assert stub.Generate(
        inference_pb2.GenerateRequest(model="tiny-llama", prompt="the cat", max_new_tokens=4),
        timeout=30,
    ).generated_tokens


def _live_sessions(mesh: Mesh) -> list[int]:
    """Generation rows each live worker holds (WorkerInfo.live_sessions)."""
    return [worker_info(p).live_sessions for p in mesh.workers if p.popen.poll() is None]


def _prefills(proc: Proc) -> int:
    """Prefill calls the worker answered, from its access log."""
    return sum('"rpc": "/tessera.v1.Worker/Prefill"' in line for line in proc.lines)


def _decodes(proc: Proc) -> int:
    """Decode calls the worker answered, from its access log."""
    return sum('"rpc": "/tessera.v1.Worker/Decode"' in line for line in proc.lines)


def test_deadline_shorter_than_the_work_frees_sessions(capped: Mesh) -> None:
    stub = capped.stub()
    request = inference_pb2.GenerateRequest(
        model="tiny-llama", prompt=GREEDY_PROMPT, max_new_tokens=250
    )
    first = capped.workers[0]
    # The undisturbed run: its time and its decode steps are the yardstick.
    start = time.monotonic()
    assert stub.Generate(request, timeout=60).generated_tokens == 250
    undisturbed = time.monotonic() - start
    wait_until(lambda: _live_sessions(capped) == [0, 0], 10, "the undisturbed run's rows freed")
    prefills = sum(_prefills(p) for p in capped.workers)
    decodes = _decodes(first)

    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(request, timeout=undisturbed / 4)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, describe(caught.value)
    assert time.monotonic() - start < undisturbed
    # The request was running on the workers when its deadline passed (prefilled on both) ...
    wait_until(
        lambda: sum(_prefills(p) for p in capped.workers) >= prefills + 2, 5, "the prefills logged"
    )
    # ... and its rows left at the next step: far fewer steps than the whole run took.
    wait_until(lambda: _live_sessions(capped) == [0, 0], 30, "rows freed after the deadline")
    assert _decodes(first) - decodes < 250 * 3 // 4

    # A client that cancels a stream frees the sessions too, as early.
    decodes = _decodes(first)
    stream = stub.GenerateStream(request, timeout=60)
    next(stream)
    assert sum(_live_sessions(capped)) > 0
    stream.cancel()
    wait_until(lambda: _live_sessions(capped) == [0, 0], 30, "rows freed after a cancel")
    assert _decodes(first) - decodes < 250 * 3 // 4
    assert stub.Generate(request, timeout=30).generated_tokens == 250  # the chain still serves


def test_no_chain_left_is_unavailable_naming_the_span(capped: Mesh) -> None:
    """Runs last on the shared mesh: it kills the only [2, 4) worker, then starts a new one."""
    stub = capped.stub()
    request = inference_pb2.GenerateRequest(
        model="tiny-llama", prompt="hello world", max_new_tokens=4
    )
    stub.Generate(request, timeout=30)
    only = [p for p in capped.workers if "2:4" in p.args][0]
    only.kill()

    def unavailable() -> str:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(request, timeout=30)
        error = caught.value
        assert error.code() == grpc.StatusCode.UNAVAILABLE, describe(error)
        assert "tiny-llama" in error.details() and "[2, 4)" in error.details(), describe(error)
        return error.details()

    unavailable()  # before the router has noticed: the call itself finds no chain

    def noticed() -> bool:
        view = stages_of(capped, "tiny-llama").get(only.address)
        return view is None or not view.healthy

    wait_until(noticed, 5, "the router to notice the dead stage")
    unavailable()  # after it has noticed
    # A new [2, 4) worker joins and the model serves again.
    capped.start_worker("tiny-llama", "2:4")
    capped.wait_model("tiny-llama", chains=1)
    assert stub.Generate(request, timeout=30).generated_tokens >= 1
