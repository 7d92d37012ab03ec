"""One request never hurts another (real processes, loopback).

- Clients with deadlines far shorter than their prompts' prefill get DEADLINE_EXCEEDED, and the
  streams running beside them on the same chain end normally, with their undisturbed tokens;
  no healthy worker is marked unhealthy and nothing is moved (the real SmolLM2, two stages).
- Two first stages share one second stage whose KV budget holds a fraction of the streams:
  every stream ends normally (the chains share the stage's budget; nothing is INTERNAL).
- SIGTERM to one stage of two chains: the rows it holds finish there (nothing is replayed),
  new work goes to the other chain, nothing fails.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
from grpc import aio

from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc
from tests.integration.test_faults import GREEDY_PROMPT, mesh_of, stream_tokens, worker_info
from tests.mesh import Mesh, Proc

pytestmark = pytest.mark.slow

MOVED = ("resuming on another chain", "lost a stage", "marked unhealthy")


def _moves(mesh: Mesh) -> list[str]:
    """Router log lines that say a worker was blamed or a generation moved."""
    assert mesh.router is not None
    return [line for line in mesh.router.lines if any(word in line for word in MOVED)]


async def _streams(
    address: str, requests: list[inference_pb2.GenerateRequest], stagger_s: float
) -> list[tuple[list[int], str] | str]:
    """The requests as GenerateStreams started `stagger_s` apart: (tokens, finish) or the
    status name each ended with."""
    async with aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def one(index: int, request: inference_pb2.GenerateRequest) -> tuple | str:
            await asyncio.sleep(index * stagger_s)
            tokens: list[int] = []
            finish = ""
            try:
                async for chunk in stub.GenerateStream(request, timeout=120):
                    tokens.extend(chunk.token_ids)
                    finish = chunk.finish_reason or finish
            except aio.AioRpcError as error:
                return f"{error.code().name}: {error.details()}"
            return tokens, finish

        return await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))


# -- deadlines shorter than a prefill (the real SmolLM2, two stages) ---------------------------


def _prefill_durations(proc: Proc) -> list[float]:
    """The seconds each Prefill call took the worker, in the order they ended (its access log)."""
    return [
        float(line.split('"duration_ms": ')[1].split(",")[0]) / 1000
        for line in list(proc.lines)
        if '"rpc": "/tessera.v1.Worker/Prefill"' in line
    ]


def test_short_deadlines_cost_only_their_own_requests(real_repo: Path) -> None:
    llm = "smollm2-135m-instruct"
    # Newcomers join a running batch at its next step, so a short deadline passes mid-prefill;
    # each long prompt goes in one pass (no chunks), and whole (no prefix reuse: the same long
    # prompt is sent four times): the longest a step can hold the chain.
    env = {
        "TESSERA_ROUTER_MAX_WAITING_STEPS": "1",
        "TESSERA_ROUTER_PREFILL_CHUNK_TOKENS": "0",
        "TESSERA_ROUTER_PREFIX_REUSE": "0",
    }
    stages = [(llm, "0:15"), (llm, "15:30")]
    with mesh_of(real_repo, stages, chains={llm: 1}, env=env) as mesh:
        stub = mesh.stub()
        chat = [
            inference_pb2.GenerateRequest(
                model=llm,
                messages=[inference_pb2.ChatMessage(role="user", content=f"Tell me about {t}.")],
                max_new_tokens=60,
            )
            for t in ("bees", "bridges", "the moon", "chess")
        ]
        long_prompt = "The quick brown fox jumps over the lazy dog. " * 150  # ~1,500 tokens
        heavy = inference_pb2.GenerateRequest(model=llm, prompt=long_prompt, max_new_tokens=1)
        # The yardsticks, undisturbed: each stream alone, and the long prompt's prefill.
        want = [stream_tokens(stub, r) for r in chat]
        start = time.monotonic()
        stub.Generate(heavy, timeout=120)
        prefill_s = time.monotonic() - start

        first = mesh.workers[0]

        def heavy_prefills() -> list[float]:
            """The first stage's prefills of the long prompt (the chat prompts' take a few
            hundredths of its time; its own, about half of prefill_s)."""
            return [s for s in _prefill_durations(first) if s >= prefill_s * 0.25]

        async def storm() -> tuple[list, list[str], int]:
            running = asyncio.create_task(_streams(mesh.address, chat, 0.0))
            codes: list[str] = []
            hit = 0
            async with aio.insecure_channel(mesh.address) as channel:
                client = inference_pb2_grpc.InferenceStub(channel)
                # One at a time, each after the last one's prefill has left the first stage, so
                # each deadline passes while its own prompt is being prefilled there.
                for fraction in (0.15, 0.25, 0.35):
                    await asyncio.sleep(0.2)
                    seen = len(heavy_prefills())
                    deadline_s = prefill_s * fraction
                    try:
                        await client.Generate(heavy, timeout=deadline_s)
                        codes.append("OK")
                    except aio.AioRpcError as error:
                        codes.append(error.code().name)
                    give_up = time.monotonic() + prefill_s * 2
                    while len(heavy_prefills()) == seen and time.monotonic() < give_up:
                        await asyncio.sleep(0.05)
                    # The router plans no prefill for an expired row, so a prefill of this
                    # prompt that outlasted the deadline was running when the deadline passed.
                    hit += any(s >= deadline_s for s in heavy_prefills()[seen:])
            return await running, codes, hit

        got, codes, hit = asyncio.run(storm())
        assert codes.count("DEADLINE_EXCEEDED") >= 2, codes
        assert hit >= 2, (hit, codes)  # the short deadlines hit live work
        assert got == want  # every stream ended normally, with its undisturbed tokens
        assert _moves(mesh) == [], _moves(mesh)


# -- chains that share a stage share its KV budget -----------------------------------------------


def test_chains_sharing_a_small_stage_budget_never_fail_a_stream(tiny_repo: Path) -> None:
    """Two 0:2 stages, one 2:4 stage holding ~4,000 token slots; 48 streams of ~200 tokens
    need ~10,000: they wait their turn, and each ends with its undisturbed tokens."""
    workers = [("tiny-llama", "0:2"), ("tiny-llama", "0:2")]
    with mesh_of(tiny_repo, workers, chains={}) as mesh:
        mesh.start_worker("tiny-llama", "2:4", env={"TESSERA_WORKER_MAX_KV_MB": "1"})
        mesh.wait_model("tiny-llama", chains=2)
        stub = mesh.stub()
        prompts = [GREEDY_PROMPT, "a b c d", "the cat sat", "hello world", "b c d e", "it is"]
        requests = [
            inference_pb2.GenerateRequest(
                model="tiny-llama", prompt=prompts[i % len(prompts)], max_new_tokens=200
            )
            for i in range(48)
        ]
        want = {r.prompt: stream_tokens(stub, r) for r in requests[: len(prompts)]}
        got = asyncio.run(_streams(mesh.address, requests, 0.01))
        failed = [g for g in got if isinstance(g, str)]
        assert failed == [], failed[:5]
        assert [want[r.prompt] for r in requests] == got
        assert _moves(mesh) == [], _moves(mesh)


# -- a draining stage finishes its rows ----------------------------------------------------------


def test_sigterm_to_a_stage_lets_its_rows_finish_where_they_are(tiny_repo: Path) -> None:
    workers = [("tiny-llama", "0:2"), ("tiny-llama", "2:4"), ("tiny-llama", "2:4")]
    env = {"TESSERA_WORKER_DRAIN_S": "60"}
    with mesh_of(tiny_repo, workers, chains={"tiny-llama": 2}, env=env) as mesh:
        stub = mesh.stub()
        prompts = [GREEDY_PROMPT, "a b c d", "the cat sat", "b c d e"]
        requests = [
            inference_pb2.GenerateRequest(
                model="tiny-llama", prompt=prompts[i % len(prompts)], max_new_tokens=150
            )
            for i in range(40)
        ]
        want = {r.prompt: stream_tokens(stub, r) for r in requests[: len(prompts)]}
        late = [
            inference_pb2.GenerateRequest(model="tiny-llama", prompt=p, max_new_tokens=30)
            for p in prompts
        ]
        late_want = {r.prompt: stream_tokens(stub, r) for r in late}
        second_stages = [p for p in mesh.workers if "2:4" in p.args]

        async def scenario() -> tuple[list, list, int, Proc]:
            running = asyncio.create_task(_streams(mesh.address, requests, 0.0))
            busy = []
            for _ in range(500):  # until both second stages hold rows (bounded)
                busy = [p for p in second_stages if worker_info(p).live_sessions > 0]
                if len(busy) == 2:
                    break
                await asyncio.sleep(0.01)
            victim = busy[0]
            held = worker_info(victim).live_sessions
            victim.popen.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            arriving = await _streams(mesh.address, late, 0.05)
            return await running, arriving, held, victim

        got, arriving, held, victim = asyncio.run(scenario())
        assert held > 0, "the drained stage held no rows: the drain hit no live work"
        assert [g for g in got if isinstance(g, str)] == []
        assert [want[r.prompt] for r in requests] == got
        assert [late_want[r.prompt] for r in late] == arriving
        assert victim.popen.wait(timeout=60) == 0, victim.output()[-2000:]
        assert mesh.router is not None
        assert any(f"worker {victim.address} left" in line for line in mesh.router.lines)
        assert _moves(mesh) == [], _moves(mesh)
