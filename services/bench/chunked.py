"""Running streams while a long prompt is prefilled: one pass vs chunks, side by side in one run.

    python -m services.bench.chunked [--chunks 0,128,256] [--prompt-words 2800] [--out FILE]

For each `prefill_chunk_tokens` (0 = one pass) in turn, a router and SmolLM2 as the default
mesh's two stages [0,15) [15,30) (threads = cores / 2 each): 8 greedy streams run; once each has
10 tokens, one Generate with a ~3,000-token prompt is sent, and 0.5 s later a short one. Reported
per setting: the streams' median gap between tokens before the long prompt came, their worst gap
while it was prefilled (and its ratio to that median), the long prompt's time to its answer and
the short one's time to its first token (against the same short request on the idle mesh).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from grpc import aio

from services.bench.generation import LLM, prompts, start
from services.bench.procs import Fleet
from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc

STREAMS = 8


async def _scenario(address: str, long_prompt: str) -> dict[str, float]:
    async with aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        short = inference_pb2.GenerateRequest(model=LLM, prompt="Say hi.", max_new_tokens=1)

        async def timed(request: inference_pb2.GenerateRequest) -> float:
            sent = time.perf_counter()
            await stub.Generate(request, timeout=600)
            return time.perf_counter() - sent

        await timed(short)  # warm-up
        idle_short = statistics.median([await timed(short) for _ in range(3)])
        arrivals: list[list[float]] = [[] for _ in range(STREAMS)]

        async def one(index: int, text: str) -> None:
            request = inference_pb2.GenerateRequest(model=LLM, prompt=text, max_new_tokens=400)
            async for chunk in stub.GenerateStream(request, timeout=600):
                arrivals[index].extend([time.perf_counter()] * len(chunk.token_ids))

        running = [asyncio.create_task(one(i, t)) for i, t in enumerate(prompts(STREAMS))]
        while min(len(a) for a in arrivals) < 10:
            await asyncio.sleep(0.01)
        sent = time.perf_counter()
        long_task = asyncio.create_task(
            timed(inference_pb2.GenerateRequest(model=LLM, prompt=long_prompt, max_new_tokens=1))
        )
        await asyncio.sleep(0.5)
        behind = await timed(short)
        long_s = await long_task
        done = sent + long_s
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    def gaps(times: list[float], lo: float, hi: float) -> list[float]:
        return [b - a for a, b in zip(times, times[1:], strict=False) if lo <= b and a <= hi]

    before = [g for a in arrivals for g in gaps(a, 0.0, sent)]
    during = [g for a in arrivals for g in gaps(a, sent, done)]
    median = statistics.median(before)
    worst = max(during) if during else float("nan")
    return {
        "median_gap_s": median,
        "worst_gap_during_s": worst,
        "worst_over_median": worst / median,
        "long_prompt_s": long_s,
        "short_behind_s": behind,
        "short_idle_s": idle_short,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", default="0,128,256")
    parser.add_argument("--prompt-words", type=int, default=2800)
    parser.add_argument(
        "--repository", default=os.environ.get("TESSERA_MODEL_REPOSITORY", "model-repository")
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    words = "the quick brown fox jumps over the lazy dog while the cat sleeps".split()
    long_prompt = " ".join(words[i % len(words)] for i in range(args.prompt_words))
    results: dict[str, object] = {"cores": cores, "streams": STREAMS}
    for chunk in [int(c) for c in args.chunks.split(",")]:
        env = {"OMP_WAIT_POLICY": "PASSIVE", "TESSERA_ROUTER_PREFILL_CHUNK_TOKENS": str(chunk)}
        fleet = Fleet(args.repository, env=env)
        try:
            address = start(fleet, ["0:15", "15:30"], max(1, cores // 2))
            r = asyncio.run(_scenario(address, long_prompt))
        finally:
            fleet.stop_all()
        results[f"chunk_{chunk}"] = r
        print(
            f"prefill_chunk_tokens {chunk:4d}: streams' median gap {r['median_gap_s'] * 1e3:.0f} "
            f"ms, worst while the long prompt was prefilled {r['worst_gap_during_s'] * 1e3:.0f} "
            f"ms = {r['worst_over_median']:.1f}x; long prompt answered in "
            f"{r['long_prompt_s']:.2f} s; a short request behind it {r['short_behind_s']:.2f} s "
            f"(idle {r['short_idle_s']:.2f} s)",
            flush=True,
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
