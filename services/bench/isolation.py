"""One request never hurts another, on the real SmolLM2 (issue 15's acceptance scenarios).

    python -m services.bench.isolation [deadlines] [shared-kv] [drain] [--out FILE]

- deadlines: the default mesh's shape (router, stages 0:15 and 15:30). Four chat streams of up
  to 300 tokens run while other clients send ~3,000-token prompts with 0.5, 1 and 2 s deadlines.
  Every stream must end normally and no worker may be marked unhealthy or lose its rows.
- shared-kv: two 0:15 stages share one 15:30 stage whose max_kv_mb is 24; 48 staggered streams
  of up to 400 tokens. None may end INTERNAL (or fail at all: they wait for room).
- drain: stage 0:15 and two 15:30 stages (two chains); 40 streams, then SIGTERM to the 15:30
  stage that holds rows, while 8 more arrive. Nothing may fail and nothing may be replayed.

Each scenario starts its own processes (log level warning, so the router's log holds every
worker it marked or moved) and prints what the clients saw and what the router logged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from grpc import aio

from services.bench.generation import start
from services.bench.procs import Child, Fleet
from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc

LLM = "smollm2-135m-instruct"
BLAME = ("marked unhealthy", "lost a stage", "resuming on another chain", "is draining")
FAILURES: list[str] = []  # what every failed stream of the scenario running now was told
TOPICS = ("bees", "bridges", "the moon", "chess", "volcanoes", "paper", "rivers", "trains")


def chat(topic: str, max_new: int) -> inference_pb2.GenerateRequest:
    content = f"Write a long essay about {topic}."
    return inference_pb2.GenerateRequest(
        model=LLM,
        messages=[inference_pb2.ChatMessage(role="user", content=content)],
        max_new_tokens=max_new,
    )


async def streams(
    address: str, requests: Sequence[inference_pb2.GenerateRequest], stagger_s: float = 0.0
) -> list[str]:
    """Each request as a GenerateStream: its finish reason, or the status it ended with."""
    async with aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def one(index: int, request: inference_pb2.GenerateRequest) -> str:
            await asyncio.sleep(index * stagger_s)
            finish = ""
            try:
                async for chunk in stub.GenerateStream(request, timeout=1800):
                    finish = chunk.finish_reason or finish
            except aio.AioRpcError as error:
                FAILURES.append(f"{error.code().name}: {(error.details() or '')[:160]}")
                return error.code().name
            return finish

        return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))


def router_lines(router: Child) -> list[str]:
    """What the router logged about blaming or moving (its warnings and above are kept)."""
    return [line for line in router.lines if any(word in line for word in BLAME)]


def deadlines(repository: str) -> dict[str, object]:
    fleet = Fleet(repository, log_level="info", env={"OMP_WAIT_POLICY": "PASSIVE"})
    try:
        address = start(fleet, ["0:15", "15:30"], max(1, (os.cpu_count() or 2) // 2))
        router = fleet.children[0]
        heavy = inference_pb2.GenerateRequest(
            model=LLM, prompt="The quick brown fox jumps over the lazy dog. " * 300
        )

        async def run() -> tuple[list[str], list[str]]:
            running = asyncio.create_task(streams(address, [chat(t, 300) for t in TOPICS[:4]]))
            codes: list[str] = []
            async with aio.insecure_channel(address) as channel:
                stub = inference_pb2_grpc.InferenceStub(channel)
                for deadline in (0.5, 1.0, 2.0):
                    await asyncio.sleep(1.0)
                    try:
                        await stub.Generate(heavy, timeout=deadline)
                        codes.append("OK")
                    except aio.AioRpcError as error:
                        codes.append(error.code().name)
            return await running, codes

        started = time.monotonic()
        finishes, codes = asyncio.run(run())
        return {
            "streams": finishes,
            "short_deadline_requests": codes,
            "router_blamed_or_moved": router_lines(router),
            "seconds": round(time.monotonic() - started, 1),
            "ok": all(f in ("length", "eos") for f in finishes) and not router_lines(router),
        }
    finally:
        fleet.stop_all()


def shared_kv(repository: str) -> dict[str, object]:
    threads = max(1, (os.cpu_count() or 2) // 2)
    # 48 x 400 tokens through a 24 MiB stage takes minutes on 2 cores: the streams may wait
    # that long (the router caps every deadline at request_timeout_s, 120 s by default).
    env = {"OMP_WAIT_POLICY": "PASSIVE", "TESSERA_ROUTER_REQUEST_TIMEOUT_S": "1800"}
    fleet = Fleet(repository, log_level="info", env=env)
    try:
        router = fleet.router("router")
        router.wait_ready(time.monotonic() + 120)
        address = router.address
        small = {"TESSERA_WORKER_MAX_KV_MB": "24"}
        workers = [
            fleet.worker("w-0", LLM, [address], layers="0:15", threads=threads),
            fleet.worker("w-1", LLM, [address], layers="0:15", threads=threads),
            fleet.worker("w-shared", LLM, [address], layers="15:30", threads=threads, env=small),
        ]
        for worker in workers:
            worker.wait_ready(time.monotonic() + 300)
        _wait_chains(address, 2)
        requests = [chat(TOPICS[i % len(TOPICS)] + f", part {i}", 400) for i in range(48)]
        started = time.monotonic()
        finishes = asyncio.run(streams(address, requests, stagger_s=0.25))
        counts = Counter(finishes)
        return {
            "outcomes": dict(counts),
            "router_blamed_or_moved": router_lines(router),
            "seconds": round(time.monotonic() - started, 1),
            "ok": set(counts) <= {"length", "eos"},
        }
    finally:
        fleet.stop_all()


def drain(repository: str) -> dict[str, object]:
    threads = max(1, (os.cpu_count() or 2) // 3)
    # A drain long enough for the rows a stage holds to finish there (the 60 s).
    env = {"OMP_WAIT_POLICY": "PASSIVE", "TESSERA_WORKER_DRAIN_S": "60"}
    fleet = Fleet(repository, log_level="info", env=env)
    try:
        address = start(fleet, ["0:15", "15:30", "15:30"], threads)
        router = fleet.children[0]
        _wait_chains(address, 2)
        seconds = [c for c in fleet.children if c.name.endswith(("-1", "-2"))]
        requests = [chat(TOPICS[i % len(TOPICS)] + f", part {i}", 120) for i in range(40)]
        late = [chat(t, 40) for t in TOPICS]

        async def run() -> tuple[list[str], list[str], int, str]:
            running = asyncio.create_task(streams(address, requests))
            victim, held = None, 0
            for _ in range(3000):
                for child in seconds:
                    held = await _rows(child.address)
                    if held:
                        victim = child
                        break
                if victim is not None:
                    break
                await asyncio.sleep(0.05)
            assert victim is not None, "no 15:30 stage held rows"
            victim.terminate()
            arriving = await streams(address, late, stagger_s=0.1)
            return await running, arriving, held, victim.name

        started = time.monotonic()
        finishes, arriving, held, victim = asyncio.run(run())
        child = next(c for c in fleet.children if c.name == victim)
        child.wait_or_kill(120)
        code = child.popen.returncode if child.popen else None
        return {
            "victim": victim,
            "rows_it_held": held,
            "victim_exit": code,
            "running": dict(Counter(finishes)),
            "arriving": dict(Counter(arriving)),
            "router_blamed_or_moved": router_lines(router),
            "seconds": round(time.monotonic() - started, 1),
            "ok": set(finishes) | set(arriving) <= {"length", "eos"}
            and not any("resuming" in line for line in router_lines(router))
            and code == 0,
        }
    finally:
        fleet.stop_all()


async def _rows(address: str) -> int:
    async with aio.insecure_channel(address) as channel:
        info = await worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=5)
        return int(info.live_sessions)


def _wait_chains(address: str, count: int, timeout: float = 120) -> None:
    import grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        while time.monotonic() < deadline:
            listed = stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
            if any(sum(c.healthy for c in m.chains) >= count for m in listed.models):
                return
            time.sleep(0.2)
    raise RuntimeError(f"{count} chains never became healthy")


SCENARIOS = {"deadlines": deadlines, "shared-kv": shared_kv, "drain": drain}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", help=f"any of {', '.join(SCENARIOS)} (all)")
    parser.add_argument(
        "--repository", default=os.environ.get("TESSERA_MODEL_REPOSITORY", "model-repository")
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    results = {}
    for name in args.scenarios or list(SCENARIOS):
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}")
        FAILURES.clear()
        results[name] = SCENARIOS[name](args.repository)
        results[name]["failures"] = dict(Counter(FAILURES))
        print(name, json.dumps(results[name], indent=2), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
