"""A multi-turn chat under a long system prompt: time to first token with prefix reuse, per turn,
against the same turn under a system prompt never seen before, side by side in one run.

    python -m services.bench.prefix [--conversations 3] [--system-tokens 1000] [--out FILE]

A router and SmolLM2 as the default mesh's two stages [0,15) [15,30) (threads = cores / 2 each), no
result cache. Each conversation has its own ~1,000-token system prompt and three user turns; each
turn resends the whole conversation (what chat clients do). After its third turn, the same third
turn (same messages and answers) under a fresh system prompt of the same token length is sent: the
cold twin; then the third turn twice more, sent at once with two strangers' turns (under system
prompts never seen before), alternating. Reported: each turn's time to first token, turn 3 over its
cold twin (the target is <= 0.3), and whether every answer equals transformers' greedy answer to
the same messages (computed after the mesh is stopped, so it does not share the cores with it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpc import aio

from services.bench.generation import LLM, start
from services.bench.procs import Fleet
from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc

USER_TURNS = [
    "What is the capital of France?",
    "And what is the capital of Germany?",
    "Which of those two cities is larger?",
]
WORDS = (
    "the river city market bridge morning winter garden library station museum history music "
    "people travel summer evening mountain village coffee window street harbor light forest "
    "season language science machine teacher student doctor island desert ocean weather"
).split()


@dataclass
class Turn:
    """One streamed chat turn as the client saw it."""

    ttft_s: float
    ids: list[int]
    text: str
    prompt_tokens: int
    chat: list[dict[str, str]]


def system_prompt(tokenizer: Any, seed: int, tokens: int) -> str:
    """Plain sentences of common words, cut to `tokens` tokens of the model's tokenizer."""
    rng = random.Random(seed)
    text = ""
    while len(tokenizer(text)["input_ids"]) < tokens:
        words = [rng.choice(WORDS) for _ in range(12)]
        text += " ".join(words).capitalize() + ". "
    ids = tokenizer(text)["input_ids"][:tokens]
    return "You are a helpful assistant. Background notes: " + str(tokenizer.decode(ids))


def messages(system: str, turns: Sequence[str], answers: Sequence[str]) -> list[dict[str, str]]:
    found = [{"role": "system", "content": system}]
    for index, user in enumerate(turns):
        found.append({"role": "user", "content": user})
        if index < len(answers):
            found.append({"role": "assistant", "content": answers[index]})
    return found


async def ask(
    stub: inference_pb2_grpc.InferenceStub, chat: list[dict[str, str]], max_new: int
) -> Turn:
    """One streamed chat turn, timed to its first token."""
    request = inference_pb2.GenerateRequest(
        model=LLM,
        messages=[inference_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in chat],
        max_new_tokens=max_new,
    )
    sent = time.perf_counter()
    first = 0.0
    ids: list[int] = []
    text, prompt_tokens = "", 0
    async for chunk in stub.GenerateStream(request, timeout=600):
        if chunk.token_ids and not first:
            first = time.perf_counter() - sent
        ids.extend(chunk.token_ids)
        text += chunk.text
        prompt_tokens = chunk.prompt_tokens or prompt_tokens
    return Turn(first, ids, text, prompt_tokens, chat)


async def _conversations(
    address: str, systems: list[tuple[str, str, str, str]], max_new: int, mixed: list[list[Turn]]
) -> list[list[Turn]]:
    """Per conversation: its turns, then the cold twin of its last turn; into `mixed`, its last
    turn twice more sent at once with two strangers' (cold prompts of the same length)."""
    found: list[list[Turn]] = []
    async with aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        await ask(stub, messages("Be brief.", ["Hi."], []), 1)  # warm-up
        for warm, cold, *others in systems:
            turns: list[Turn] = []
            for number in range(len(USER_TURNS)):
                answers = [t.text for t in turns]
                turns.append(
                    await ask(stub, messages(warm, USER_TURNS[: number + 1], answers), max_new)
                )
            answers = [t.text for t in turns[:-1]]
            turns.append(await ask(stub, messages(cold, USER_TURNS, answers), max_new))
            found.append(turns)
            strangers = [messages(other, USER_TURNS, answers) for other in others]
            chats = [turns[-2].chat, strangers[0], turns[-2].chat, strangers[1]]
            mixed.append(list(await asyncio.gather(*(ask(stub, c, max_new) for c in chats))))
    return found


def _reference(repository: str, chats: list[list[dict[str, str]]], max_new: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(repository) / LLM
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    answers = []
    with torch.inference_mode():
        for chat in chats:
            text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            ids = torch.tensor([tokenizer(str(text), add_special_tokens=False)["input_ids"]])
            out = model.generate(ids, max_new_tokens=max_new, do_sample=False)
            answers.append(out[0, ids.shape[1] :].tolist())
    return answers


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=3)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--max-new", type=int, default=16)
    parser.add_argument(
        "--repository", default=os.environ.get("TESSERA_MODEL_REPOSITORY", "model-repository")
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(args.repository) / LLM)
    systems = [
        (
            system_prompt(tokenizer, 4 * c, args.system_tokens),
            system_prompt(tokenizer, 4 * c + 1, args.system_tokens),
            system_prompt(tokenizer, 4 * c + 2, args.system_tokens),
            system_prompt(tokenizer, 4 * c + 3, args.system_tokens),
        )
        for c in range(args.conversations)
    ]
    cores = os.cpu_count() or 1
    fleet = Fleet(args.repository, env={"OMP_WAIT_POLICY": "PASSIVE"})
    try:
        address = start(fleet, ["0:15", "15:30"], max(1, cores // 2))
        mixed: list[list[Turn]] = []
        found = asyncio.run(_conversations(address, systems, args.max_new, mixed))
    finally:
        fleet.stop_all()
    turns = [t for conversation in [*found, *mixed] for t in conversation]
    want = _reference(args.repository, [t.chat for t in turns], args.max_new)
    equal = [t.ids == w for t, w in zip(turns, want, strict=True)]
    ratios = []
    for index, conversation in enumerate(found):
        *warm, twin = conversation
        line = ", ".join(
            f"turn {n + 1} {t.ttft_s:.2f} s ({t.prompt_tokens} tokens)" for n, t in enumerate(warm)
        )
        ratios.append(warm[-1].ttft_s / twin.ttft_s)
        print(
            f"conversation {index + 1}: {line}; its cold twin {twin.ttft_s:.2f} s "
            f"({twin.prompt_tokens} tokens): turn 3 / cold = {ratios[-1]:.2f}",
            flush=True,
        )
    for index, together in enumerate(mixed):
        warm, cold = together[0::2], together[1::2]
        print(
            f"conversation {index + 1}, its turn 3 twice and two strangers at once: turn 3 "
            + ", ".join(f"{t.ttft_s:.2f}" for t in warm)
            + " s, strangers "
            + ", ".join(f"{t.ttft_s:.2f}" for t in cold)
            + " s",
            flush=True,
        )
    print(
        f"time to first token, turn 3 over its cold twin: median {statistics.median(ratios):.2f} "
        f"(target <= 0.3); answers equal to transformers' greedy: {sum(equal)}/{len(equal)}",
        flush=True,
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "cores": cores,
            "turn3_over_cold": ratios,
            "equal": equal,
            "ttft_s": [[t.ttft_s for t in c] for c in found],
            "mixed_ttft_s": [[t.ttft_s for t in c] for c in mixed],
        }
        args.out.write_text(json.dumps(summary, indent=2))
    return 0 if all(equal) else 1


if __name__ == "__main__":
    raise SystemExit(main())
