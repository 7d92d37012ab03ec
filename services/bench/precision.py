"""Served throughput of a reduced-precision MiniLM replica against a float32 one, paired.

    python -m services.bench.precision [--precision bfloat16] [--rounds 4] [--seconds 6]

Two routers, each with one MiniLM replica of its own (float32; the given precision), both
loaded at once; then rounds of one-text Embed load at concurrency 64 (distinct texts, packed
answers), float32 then the other, one at a time, so each ratio pairs runs seconds apart on a
machine whose speed drifts. Prints each round and the median ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import time
from collections.abc import Iterator, Sequence

from grpc import aio

from services.bench import workload
from services.bench.generation import start
from services.bench.procs import Fleet
from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc

ENCODER = "all-minilm-l6-v2"


async def embeds_per_second(
    address: str, texts: Iterator[str], seconds: float, concurrency: int
) -> float:
    async with aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        end = time.perf_counter() + seconds
        done = 0

        async def caller() -> None:
            nonlocal done
            while time.perf_counter() < end:
                request = inference_pb2.EmbedRequest(
                    model=ENCODER, inputs=[next(texts)], packed=True
                )
                await stub.Embed(request, timeout=60)
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return done / (time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bfloat16", choices=["bfloat16", "int8"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--repository", default=os.environ.get("TESSERA_MODEL_REPOSITORY", "model-repository")
    )
    args = parser.parse_args(argv)
    threads = os.cpu_count() or 1
    texts = itertools.cycle(workload.texts(20_000, seed=11))
    fleet = Fleet(args.repository, env={"OMP_WAIT_POLICY": "PASSIVE"})
    try:
        exact = start(fleet, [None], threads, model=ENCODER)
        reduced = start(fleet, [None], threads, model=ENCODER, precision=args.precision)
        for address in (exact, reduced):  # warm-up, outside the clock
            asyncio.run(embeds_per_second(address, texts, 2.0, args.concurrency))
        ratios = []
        for round_ in range(args.rounds):
            base = asyncio.run(embeds_per_second(exact, texts, args.seconds, args.concurrency))
            other = asyncio.run(embeds_per_second(reduced, texts, args.seconds, args.concurrency))
            ratios.append(other / base)
            print(
                f"round {round_}: float32 {base:.1f}/s, {args.precision} {other:.1f}/s, "
                f"ratio {other / base:.2f}"
            )
        print(
            f"{args.precision} vs float32, one text per request at c={args.concurrency}: "
            f"median {statistics.median(ratios):.2f}x over {args.rounds} paired rounds"
        )
    finally:
        fleet.stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
