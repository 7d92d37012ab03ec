"""Router memory under many distinct tenants (issue 16): does per-tenant state stay bounded?

    python -m services.bench.tenants [--requests 100000] [--out FILE]

A router without tokens (so the `x-tessera-tenant` header names the tenant) and one SmolLM2
replica. Each request is a one-token generation of a two-word prompt, so every one goes through
admission, the tenant's in-flight count and the scheduler's share table. The router's RSS is read
from /proc after a warm-up of 5,000 requests from 64 tenants (allocator and caches settled), then
after `--requests` requests that each name a tenant never seen before.
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
from services.bench.procs import Fleet
from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc

LLM = "smollm2-135m-instruct"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def flood(address: str, tenants: Sequence[str], callers: int = 64) -> Counter[str]:
    """One request per entry of `tenants`, `callers` at a time; the status codes seen."""
    codes: Counter[str] = Counter()
    request = inference_pb2.GenerateRequest(model=LLM, prompt="Hello there", max_new_tokens=1)
    todo = iter(tenants)
    async with aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def caller() -> None:
            for tenant in todo:
                try:
                    await stub.Generate(
                        request, timeout=120, metadata=[("x-tessera-tenant", tenant)]
                    )
                    codes["OK"] += 1
                except aio.AioRpcError as error:
                    codes[error.code().name] += 1

        await asyncio.gather(*(caller() for _ in range(callers)))
    return codes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument(
        "--repository", default=os.environ.get("TESSERA_MODEL_REPOSITORY", "model-repository")
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    fleet = Fleet(args.repository, env={"OMP_WAIT_POLICY": "PASSIVE"})
    try:
        address = start(fleet, [None], max(1, (os.cpu_count() or 2) // 2))
        router = fleet.children[0]
        assert router.popen is not None
        pid = router.popen.pid
        warm = asyncio.run(flood(address, [f"warm-{i % 64}" for i in range(5_000)]))
        before = rss_mib(pid)
        started = time.monotonic()
        codes = asyncio.run(flood(address, [f"tenant-{i}" for i in range(args.requests)]))
        seconds = time.monotonic() - started
        after = rss_mib(pid)
    finally:
        fleet.stop_all()
    result = {
        "warm_up": dict(warm),
        "requests": args.requests,
        "codes": dict(codes),
        "seconds": round(seconds, 1),
        "router_rss_mib_before": round(before, 1),
        "router_rss_mib_after": round(after, 1),
        "growth_mib": round(after - before, 1),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0 if set(codes) == {"OK"} and after - before < 20 else 1


if __name__ == "__main__":
    raise SystemExit(main())
