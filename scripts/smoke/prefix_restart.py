"""Smoke: issue 19's restart figure. `tessera up` serves SmolLM2 as two stages with a memcached
(the shared prefix tier); a chat's first two turns run, the first stage is killed with SIGKILL and
restarted by `tessera up`, and the third turn's time to first token is compared with the same turn
under a system prompt never seen before (its cold twin). Every answer is checked against
transformers' greedy answer to the same messages.

    .venv/bin/python scripts/smoke/prefix_restart.py
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import yaml
from grpc import aio

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from transformers import AutoTokenizer  # noqa: E402

from services.bench.prefix import USER_TURNS, Turn, _reference, ask, messages, system_prompt  # noqa: E402
from services.cache.launcher import free_port  # noqa: E402
from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc  # noqa: E402
from tests.integration.test_up import tessera_up  # noqa: E402

LLM = "smollm2-135m-instruct"
MAX_NEW = 16


def turn(address: str, chat: list[dict[str, str]]) -> Turn:
    async def go() -> Turn:
        async with aio.insecure_channel(address) as channel:
            return await ask(inference_pb2_grpc.InferenceStub(channel), chat, MAX_NEW)

    return asyncio.run(go())


def main() -> int:
    repository = REPO / "model-repository"
    tokenizer = AutoTokenizer.from_pretrained(repository / LLM)
    warm, cold = system_prompt(tokenizer, 40, 1000), system_prompt(tokenizer, 41, 1000)
    port, first_port = free_port(), free_port()
    config = Path("/tmp/tessera-prefix-restart.yaml")
    config.write_text(
        yaml.safe_dump(
            {
                "router": {"port": port, "http_port": 0},
                "cache": {"nodes": [f"127.0.0.1:{free_port()}"]},
                "workers": [
                    {"model": LLM, "layers": "0:15", "port": first_port},
                    {"model": LLM, "layers": "15:30", "port": free_port()},
                ],
            }
        )
    )
    address = f"127.0.0.1:{port}"
    turns: list[Turn] = []
    with tessera_up(config, repository) as up:
        up.wait_ready(600)
        turn(address, messages("Be brief.", ["Hi."], []))  # warm-up
        for number in range(2):
            answers = [t.text for t in turns]
            turns.append(turn(address, messages(warm, USER_TURNS[: number + 1], answers)))
        stage = next(p for p in up.children() if f"--port {first_port}" in " ".join(p.cmdline()))
        os.kill(stage.pid, signal.SIGKILL)
        killed = time.monotonic()
        while True:  # until `tessera up` restarted it and the router takes the chain again
            try:
                with grpc.insecure_channel(address) as channel:
                    inference_pb2_grpc.InferenceStub(channel).Generate(
                        inference_pb2.GenerateRequest(model=LLM, prompt="Hi", max_new_tokens=1),
                        timeout=30,
                    )
                new = [p for p in up.children() if f"--port {first_port}" in " ".join(p.cmdline())]
                if new and new[0].pid != stage.pid:
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() - killed > 300:
                print(up.output())
                return 1
            time.sleep(0.5)
        print(f"first stage killed and back in {time.monotonic() - killed:.1f} s", flush=True)
        answers = [t.text for t in turns]
        turns.append(turn(address, messages(warm, USER_TURNS, answers)))
        turns.append(turn(address, messages(cold, USER_TURNS, answers)))
    want = _reference(str(repository), [t.chat for t in turns], MAX_NEW)
    equal = [t.ids == w for t, w in zip(turns, want, strict=True)]
    names = ["turn 1 (cold)", "turn 2", "turn 3 after the restart", "turn 3's cold twin"]
    for name, t in zip(names, turns, strict=True):
        print(f"{name}: time to first token {t.ttft_s:.2f} s ({t.prompt_tokens} tokens)")
    print(
        f"after the restart, turn 3 / its cold twin = {turns[2].ttft_s / turns[3].ttft_s:.2f} "
        f"(target <= 0.5); answers equal to transformers' greedy: {sum(equal)}/{len(equal)}"
    )
    return 0 if all(equal) else 1


if __name__ == "__main__":
    raise SystemExit(main())
