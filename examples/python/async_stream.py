"""The asyncio client: several generations streamed concurrently over one channel.

python examples/python/async_stream.py [ADDRESS] [--model NAME]
"""

from __future__ import annotations

import argparse
import asyncio

from tessera import AsyncClient

PROMPTS = ["Once upon a time", "The three primary colours are", "def fibonacci(n):"]


async def run(address: str, model: str) -> None:
    async with AsyncClient(address, timeout=120) as client:

        async def one(prompt: str) -> str:
            parts = [chunk.text async for chunk in client.stream(model, prompt, max_new_tokens=24)]
            return prompt + "".join(parts)

        for text in await asyncio.gather(*(one(p) for p in PROMPTS)):
            print(repr(text))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default="localhost:50051")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    asyncio.run(run(args.address, args.model))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
