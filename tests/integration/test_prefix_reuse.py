"""Prefix reuse through real routers and workers: a conversation's next turn runs only its new part
on every stage, answers the unsplit transformers model's greedy tokens, goes to the chain that holds
its history, is still answered (from its first token) when a stage evicted that history, and
starts warm on a stage restarted empty when the stages share their blocks through memcached.

That a turn reused is read from the router's `tessera_prefix_tokens_total{source="cached"}`, which
rises only when every stage of the chain accepted a prefill that starts after the cached columns
(a stage without them refuses it).
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.cache.launcher import MemcachedNode
from services.common.prefix import BLOCK_TOKENS
from services.pb.tessera.v1 import inference_pb2
from tests.integration.test_generation import greedy_reference, info
from tests.mesh import Mesh, metric, metrics_address, scrape

pytestmark = pytest.mark.slow

CHAINS = {
    "llama-1": [None],
    "llama-2": ["0:2", "2:4"],
    "llama-3": ["0:1", "1:3", "3:4"],
    "llama-twin": [None, None],  # two replicas of one version: affinity picks between them
}
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MAX_NEW = 8
ENV = {"TESSERA_ROUTER_METRICS_PORT": "0"}


def system_prompt(seed: int, words: int = 3 * BLOCK_TOKENS) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(LETTERS) for _ in range(words))


@pytest.fixture(scope="module")
def repo(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prefix-repo")
    for name in CHAINS:
        shutil.copytree(tiny_repo / "tiny-llama", root / name)
    return root


@pytest.fixture(scope="module")
def mesh(repo: Path) -> Iterator[Mesh]:
    with Mesh(repo, env=ENV) as m:  # no result cache: every turn reaches the workers
        m.start_router()
        for model, spans in CHAINS.items():
            for span in spans:
                m.start_worker(model, span, wait=False)
        for proc in m.workers:
            proc.wait_ready()
        for model, spans in CHAINS.items():
            m.wait_model(model, chains=len(spans) if spans == [None, None] else 1)
        yield m


@pytest.fixture(scope="module")
def reference(repo: Path) -> tuple[AutoTokenizer, AutoModelForCausalLM]:
    path = repo / "llama-1"
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()


@contextmanager
def two_stages(repo: Path, env: dict[str, str]) -> Iterator[Mesh]:
    """A mesh of its own: a router and llama-2 as two stages, with `env` for every process."""
    with Mesh(repo, env={**ENV, **env}) as m:
        m.start_router()
        for span in CHAINS["llama-2"]:
            m.start_worker("llama-2", span, wait=False)
        for proc in m.workers:
            proc.wait_ready()
        m.wait_model("llama-2")
        yield m


def cached_tokens(mesh: Mesh, model: str) -> float:
    assert mesh.router is not None
    samples = scrape(metrics_address(mesh.router))
    return metric(samples, "tessera_prefix_tokens_total", model=model, source="cached")


def generate(mesh: Mesh, model: str, prompt: str, max_new: int = MAX_NEW) -> list[int]:
    reply = mesh.stub().Generate(
        inference_pb2.GenerateRequest(model=model, prompt=prompt, max_new_tokens=max_new),
        timeout=60,
    )
    return list(reply.token_ids)


def check(reference: tuple, prompt: str, got: list[int], max_new: int = MAX_NEW) -> None:
    want = greedy_reference(reference, prompt, max_new)
    assert got == want[: len(got)], (got, want)
    assert len(got) == max_new or got[-1] == 6  # tiny-llama's EOS ends a stream early


@pytest.mark.parametrize("model", ["llama-1", "llama-2", "llama-3"])
def test_each_turn_reuses_the_history_on_every_stage_and_equals_the_unsplit_model(
    mesh: Mesh, reference: tuple, model: str
) -> None:
    system = system_prompt(seed=len(model) + ord(model[-1]))
    turns = [system + " what is the capital of france ?"]
    turns.append(turns[0] + " paris is the capital . what is the cat ?")
    turns.append(turns[1] + " the cat sat on the mat . hello world")
    tokenizer = reference[0]
    generate(mesh, model, "hello", max_new=1)  # shorter than a block: nothing to keep
    before = cached_tokens(mesh, model)
    for number, prompt in enumerate(turns):
        got = generate(mesh, model, prompt)
        check(reference, prompt, got)
        now = cached_tokens(mesh, model)
        if number == 0:
            assert now == before  # nothing seen before: nothing reused
        else:
            # The previous turn's whole blocks, all of them (its prompt is this one's start).
            held = len(tokenizer(turns[number - 1])["input_ids"]) // BLOCK_TOKENS * BLOCK_TOKENS
            assert now - before == held, (number, now - before, held)
        before = now


def test_a_turn_goes_to_the_replica_that_holds_its_history(mesh: Mesh, reference: tuple) -> None:
    """Two replicas of one version, equally idle: routing alone picks either; each second turn
    must land where its first turn ran (every one of them reuses its whole history)."""
    tokenizer = reference[0]
    for seed in range(4):
        first = system_prompt(seed=100 + seed) + " hello"
        second = first + " world and the cat"
        generate(mesh, "llama-twin", first)
        before = cached_tokens(mesh, "llama-twin")
        got = generate(mesh, "llama-twin", second)
        check(reference, second, got)
        held = len(tokenizer(first)["input_ids"]) // BLOCK_TOKENS * BLOCK_TOKENS
        assert cached_tokens(mesh, "llama-twin") - before == held, seed


def test_a_history_the_stages_evicted_is_prefilled_from_the_start(
    repo: Path, reference: tuple
) -> None:
    """A 1 MiB KV budget: other prompts push the conversation's blocks out of the stages'
    stores while the router still lists them. The next turn is refused by the stage that lost
    them, prefilled from its first token instead, and still the unsplit model's answer."""
    with two_stages(repo, {"TESSERA_WORKER_MAX_KV_MB": "1"}) as m:
        first = system_prompt(seed=7) + " hello"
        generate(m, "llama-2", first)
        budget = min(info(p).kv_token_budget for p in m.workers)
        rng = random.Random(8)
        filler_words = 6 * BLOCK_TOKENS + 10
        for _ in range(budget // (6 * BLOCK_TOKENS) + 2):  # more blocks than the budget holds
            filler = " ".join(rng.choice(LETTERS) for _ in range(filler_words))
            generate(m, "llama-2", filler, max_new=1)
        before = cached_tokens(m, "llama-2")
        second = first + " world and the cat"
        got = generate(m, "llama-2", second)
        check(reference, second, got)
        assert cached_tokens(m, "llama-2") == before  # nothing was reused after all
        assert m.router is not None
        assert any("prefill from the start" in line for line in list(m.router.lines)), (
            "the stage's refusal never reached the router"
        )


def test_a_restarted_stage_reads_the_history_back_from_the_prefix_tier(
    repo: Path, reference: tuple, memcached: MemcachedNode
) -> None:
    """Both stages write the blocks they keep to memcached. The first stage is killed (-9) and
    started again at its address, empty; the next turn still starts after the history (the new
    process fetched its blocks before prefilling) and answers the unsplit model's tokens."""
    tier = {
        "TESSERA_WORKER_PREFIX_NODES": memcached.address,
        "TESSERA_WORKER_PREFIX_SECRET": "prefix-secret",
    }
    with two_stages(repo, tier) as m:
        first = system_prompt(seed=21) + " hello"
        check(reference, first, generate(m, "llama-2", first))
        tokenizer = reference[0]
        held = len(tokenizer(first)["input_ids"]) // BLOCK_TOKENS * BLOCK_TOKENS

        stage = m.workers[0]
        port = stage.port
        stage.kill()
        m.workers.remove(stage)
        m.start_worker("llama-2", CHAINS["llama-2"][0], port=port)
        deadline = time.monotonic() + 60
        while True:  # until the router dials the new process (a short prompt: nothing kept)
            try:
                generate(m, "llama-2", "hello", max_new=1)
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "the restarted stage was never taken back"
                time.sleep(0.5)
        before = cached_tokens(m, "llama-2")
        second = first + " world and the cat"
        check(reference, second, generate(m, "llama-2", second))
        assert cached_tokens(m, "llama-2") - before == held
