"""The OpenAI HTTP front against the gRPC API of the same router, side by side in one run.

    python -m services.bench.openai_front [--quick] [--out FILE]

One router (http_port on, no cache) with a SmolLM2 replica and a MiniLM replica (each with
torch threads = cores; only one is busy at a time). Each comparison alternates its two sides
(A B B A ...) so drift on a shared machine falls on both:

- chat: 16 simultaneous chat streams, greedy, max 64 tokens: aggregate tokens/s over SSE
  (`stream_options.include_usage` counts the tokens) vs gRPC GenerateStream (token ids counted).
- embeddings: one text per request, 64 callers in a closed loop: requests/s and latency
  p50/p99 of `/v1/embeddings` (float JSON) vs gRPC Embed (repeated float).
- structured: chat streams with `response_format: json_schema` vs the same without, over HTTP:
  the time per generated token after the first (decode), one stream and eight at once.

Both clients are thin (aiohttp and grpc.aio in this process), so the ratios price the servers'
protocol paths, not a client library.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from grpc import aio

from services.bench.generation import prompts, start
from services.bench.procs import Fleet
from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc

LLM = "smollm2-135m-instruct"
ENCODER = "all-minilm-l6-v2"
_HTTP = re.compile(r"tessera router http on (\S+)")
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string"},
        "hobbies": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}


@dataclass
class Run:
    tokens: int = 0
    seconds: float = 0.0
    errors: int = 0
    gaps: list[float] = field(default_factory=list)  # seconds per token after the first

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def _messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def http_chats(
    session: aiohttp.ClientSession,
    base: str,
    texts: Sequence[str],
    max_tokens: int,
    **extra: object,
) -> Run:
    """`texts` as simultaneous SSE chat streams."""
    run = Run()

    async def one(text: str) -> int:
        body = {
            "model": LLM,
            "messages": _messages(text),
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **extra,
        }
        first = last = 0.0
        chunks = tokens = 0
        async with session.post(f"{base}/v1/chat/completions", json=body) as response:
            if response.status != 200:
                run.errors += 1
                return 0
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                elif event["choices"] and event["choices"][0]["delta"].get("content"):
                    last = time.perf_counter()
                    first = first or last
                    chunks += 1
        if chunks > 1:
            run.gaps.append((last - first) / (tokens - 1))
        return tokens

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(t) for t in texts))
    run.seconds = time.perf_counter() - started
    run.tokens = sum(counts)
    return run


async def grpc_chats(
    stub: inference_pb2_grpc.InferenceStub, texts: Sequence[str], max_tokens: int
) -> Run:
    """`texts` as simultaneous GenerateStream calls (the same chat requests)."""
    run = Run()

    async def one(text: str) -> int:
        request = inference_pb2.GenerateRequest(
            model=LLM,
            messages=[inference_pb2.ChatMessage(role="user", content=text)],
            max_new_tokens=max_tokens,
        )
        count = 0
        try:
            async for chunk in stub.GenerateStream(request, timeout=600):
                count += len(chunk.token_ids)
        except aio.AioRpcError:
            run.errors += 1
        return count

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(t) for t in texts))
    run.seconds = time.perf_counter() - started
    run.tokens = sum(counts)
    return run


@dataclass
class Loop:
    requests: int = 0
    seconds: float = 0.0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def closed_loop(call: Callable[[int], Awaitable[None]], callers: int, total: int) -> Loop:
    loop = Loop()
    counter = iter(range(total))

    async def caller() -> None:
        for index in counter:
            sent = time.perf_counter()
            try:
                await call(index)
            except Exception:  # noqa: BLE001 - counted, and the run says how many
                loop.errors += 1
                continue
            loop.latencies.append(time.perf_counter() - sent)
            loop.requests += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    loop.seconds = time.perf_counter() - started
    return loop


def _text(index: int, side: str) -> str:
    # Distinct texts (the router runs without a cache anyway), of similar length on both sides.
    return f"Sentence {index} ({side}) about {prompts(16)[index % 16][24:]}"


async def measure(router: str, base: str, quick: bool) -> dict[str, object]:
    repeats = 1 if quick else 2
    texts = [t.removesuffix(":") for t in prompts(16)]
    total = 320 if quick else 1280
    results: dict[str, object] = {}
    timeout = aiohttp.ClientTimeout(total=900)
    connector = aiohttp.TCPConnector(limit=0)
    async with (
        aiohttp.ClientSession(timeout=timeout, connector=connector) as session,
        aio.insecure_channel(router) as channel,
    ):
        stub = inference_pb2_grpc.InferenceStub(channel)
        # Warm-up: both paths, both models, and 16 pooled HTTP connections (the gRPC side has
        # its one channel open): neither side pays connection setup inside a measurement.
        await http_chats(session, base, texts, 4)
        await grpc_chats(stub, texts, 4)

        async def http_embed(index: int) -> None:
            body = {"model": ENCODER, "input": _text(index, "http")}
            async with session.post(f"{base}/v1/embeddings", json=body) as response:
                answer = await response.json()
                if response.status != 200 or len(answer["data"][0]["embedding"]) != 384:
                    raise RuntimeError(response.status)

        async def grpc_embed(index: int) -> None:
            request = inference_pb2.EmbedRequest(model=ENCODER, inputs=[_text(index, "grpc")])
            reply = await stub.Embed(request, timeout=120)
            if len(reply.embeddings[0].values) != 384:
                raise RuntimeError("wrong dimension")

        await closed_loop(http_embed, 8, 32)
        await closed_loop(grpc_embed, 8, 32)

        chat: dict[str, list[Run]] = {"http": [], "grpc": []}
        embed: dict[str, list[Loop]] = {"http": [], "grpc": []}
        structured: dict[str, list[Run]] = {
            f"{kind}_{n}": [] for kind in ("free", "schema") for n in (1, 8)
        }
        schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
        asks = [f"Describe a fictional person from {t[24:]} as JSON." for t in texts]
        for repeat in range(repeats):
            order = ("grpc", "http") if repeat % 2 == 0 else ("http", "grpc")
            for side in order:
                if side == "http":
                    chat["http"].append(await http_chats(session, base, texts, 64))
                else:
                    chat["grpc"].append(await grpc_chats(stub, texts, 64))
            for side in order:
                call = http_embed if side == "http" else grpc_embed
                embed[side].append(await closed_loop(call, 64, total))
            for kind in ("free", "schema") if repeat % 2 == 0 else ("schema", "free"):
                extra = {"response_format": schema} if kind == "schema" else {}
                for n in (1, 8):
                    run = await http_chats(session, base, asks[:n], 64, **extra)
                    structured[f"{kind}_{n}"].append(run)

    def median(values: Sequence[float]) -> float:
        return statistics.median(values) if values else float("nan")

    http_rate = median([r.rate for r in chat["http"]])
    grpc_rate = median([r.rate for r in chat["grpc"]])
    results["chat"] = {
        "http_tok_s": round(http_rate, 1),
        "grpc_tok_s": round(grpc_rate, 1),
        "ratio": round(http_rate / grpc_rate, 3),
        "per_run": [round(h.rate / g.rate, 3) for h, g in zip(chat["http"], chat["grpc"])],
        "errors": sum(r.errors for r in chat["http"] + chat["grpc"]),
    }
    sides = {}
    for side, loops in embed.items():
        sides[side] = {
            "req_s": round(median([lp.rate for lp in loops]), 1),
            "p50_ms": round(1000 * median([lp.quantile(0.5) for lp in loops]), 1),
            "p99_ms": round(1000 * median([lp.quantile(0.99) for lp in loops]), 1),
            "errors": sum(lp.errors for lp in loops),
        }
    results["embeddings"] = {
        **sides,
        "ratio": round(sides["http"]["req_s"] / sides["grpc"]["req_s"], 3),
        "requests_per_run": total,
    }
    per_token = {k: median([g for r in runs for g in r.gaps]) for k, runs in structured.items()}
    results["structured"] = {
        **{f"{k}_ms_per_token": round(1000 * v, 2) for k, v in per_token.items()},
        "ratio_1": round(per_token["schema_1"] / per_token["free_1"], 3),
        "ratio_8": round(per_token["schema_8"] / per_token["free_8"], 3),
        "errors": sum(r.errors for runs in structured.values() for r in runs),
    }
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--repository", default=os.environ.get("TESSERA_MODEL_REPOSITORY", "model-repository")
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    env = {"OMP_WAIT_POLICY": "PASSIVE", "TESSERA_ROUTER_HTTP_PORT": "0"}
    fleet = Fleet(args.repository, env=env)
    try:
        router = start(fleet, [None], cores)
        start_encoder = fleet.worker("encoder", ENCODER, [router], threads=cores)
        start_encoder.wait_ready(time.monotonic() + 300)
        lines = fleet.children[0].lines
        http = next(g.group(1) for line in lines if (g := _HTTP.search(line)))
        deadline = time.monotonic() + 60
        while True:  # the encoder admitted on the router
            try:
                asyncio.run(_embed_once(router))
                break
            except aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        results = asyncio.run(measure(router, f"http://{http}", args.quick))
    finally:
        fleet.stop_all()
    results["cores"] = cores
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


async def _embed_once(router: str) -> None:
    async with aio.insecure_channel(router) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        await stub.Embed(inference_pb2.EmbedRequest(model=ENCODER, inputs=["x"]), timeout=10)


if __name__ == "__main__":
    raise SystemExit(main())
