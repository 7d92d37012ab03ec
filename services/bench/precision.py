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
from collections.abc import Sequence

from grpc import aio

from services.bench import workload
from services.bench.generation import start
from services.bench.load import closed_loop, embed_call
from services.bench.procs import Fleet
from services.pb.tessera.v1 import inference_pb2

ENCODER = "all-minilm-l6-v2"


async def embeds_per_second(
    address: str,
    requests: list[inference_pb2.EmbedRequest],
    seconds: float,
    concurrency: int,
    start_index: int,
) -> float:
    async with aio.insecure_channel(address) as channel:
        outcome = await closed_loop(
            embed_call(channel, requests),
            concurrency=concurrency,
            seconds=seconds,
            start_index=start_index,
        )
    if outcome.errors:
        raise RuntimeError(f"{outcome.errors} Embed calls failed: {dict(outcome.error_kinds)}")
    return outcome.items / outcome.wall_s


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
    requests = [
        inference_pb2.EmbedRequest(model=ENCODER, inputs=[t], packed=True)
        for t in workload.texts(20_000, seed=11)
    ]
    offsets = itertools.count(0, 5_000)  # each line starts on texts no line before it sent
    fleet = Fleet(args.repository, env={"OMP_WAIT_POLICY": "PASSIVE"})
    try:
        exact = start(fleet, [None], threads, model=ENCODER)
        reduced = start(fleet, [None], threads, model=ENCODER, precision=args.precision)
        for address in (exact, reduced):  # warm-up, outside the clock
            asyncio.run(embeds_per_second(address, requests, 2.0, args.concurrency, next(offsets)))
        ratios = []
        for round_ in range(args.rounds):
            base, other = (
                asyncio.run(
                    embeds_per_second(
                        address, requests, args.seconds, args.concurrency, next(offsets)
                    )
                )
                for address in (exact, reduced)
            )
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
