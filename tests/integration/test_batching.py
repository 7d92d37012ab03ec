"""Batching on the workers: concurrent work shares forward passes and answers stay exact."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from grpc import aio

from services.common.repository import model_spec
from services.common.types import Span
from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc
from services.worker.batch import ForwardItem, batched_decode, group_forward_items
from services.worker.stage import StageModel
from tests.mesh import Mesh

# "hello" and "it" are one-token prompts: their first step must not join a decode batch.
PROMPTS = [
    "the cat sat on the mat",
    "hello",
    "what is the capital of france ?",
    "it",
    "the dog",
    "paris is",
    "hello world and the cat",
    "a b c d e f g",
    "it is",
]


@pytest.fixture(scope="module")
def mesh(tiny_repo: Path) -> Iterator[Mesh]:
    with Mesh(tiny_repo) as m:  # no cache: every request reaches the workers
        m.start_router()
        m.start_worker("tiny-llama", "0:2", wait=False)
        m.start_worker("tiny-llama", "2:4", wait=False)
        m.start_worker("tiny-bert", wait=False)
        for proc in m.workers:
            proc.wait_ready()
        m.wait_model("tiny-llama")
        m.wait_model("tiny-bert")
        yield m


def test_concurrent_streams_equal_their_solo_runs(mesh: Mesh) -> None:
    stub = mesh.stub()
    solo = {
        p: list(
            stub.Generate(
                inference_pb2.GenerateRequest(model="tiny-llama", prompt=p, max_new_tokens=16),
                timeout=60,
            ).token_ids
        )
        for p in PROMPTS
    }

    async def together() -> dict[str, list[int]]:
        async with aio.insecure_channel(mesh.address) as channel:
            client = inference_pb2_grpc.InferenceStub(channel)

            async def one(prompt: str) -> list[int]:
                ids: list[int] = []
                async for chunk in client.GenerateStream(
                    inference_pb2.GenerateRequest(
                        model="tiny-llama", prompt=prompt, max_new_tokens=16
                    ),
                    timeout=60,
                ):
                    ids.extend(chunk.token_ids)
                return ids

            results = await asyncio.gather(*(one(p) for p in PROMPTS))
            return dict(zip(PROMPTS, results))

    assert asyncio.run(together()) == solo


def test_concurrent_embeds_equal_single_ones(mesh: Mesh) -> None:
    stub = mesh.stub()
    single = {
        p: np.array(
            stub.Embed(inference_pb2.EmbedRequest(model="tiny-bert", inputs=[p]), timeout=60)
            .embeddings[0]
            .values
        )
        for p in PROMPTS
    }

    async def together() -> list[np.ndarray]:
        async with aio.insecure_channel(mesh.address) as channel:
            client = inference_pb2_grpc.InferenceStub(channel)
            replies = await asyncio.gather(
                *(
                    client.Embed(
                        inference_pb2.EmbedRequest(model="tiny-bert", inputs=[p]), timeout=60
                    )
                    for p in PROMPTS * 4
                )
            )
            return [np.array(r.embeddings[0].values) for r in replies]

    for prompt, got in zip(PROMPTS * 4, asyncio.run(together())):
        np.testing.assert_allclose(got, single[prompt], rtol=0, atol=1e-5)


def test_batched_decode_matches_solo_hidden_states(tiny_repo: Path) -> None:
    spec = model_spec(tiny_repo, "tiny-llama")
    stage = StageModel(spec, Span(0, 4))
    prompts = [[7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18, 19, 20]]
    caches = [stage.new_cache() for _ in prompts]
    for cache, prompt in zip(caches, prompts):
        stage.forward(input_ids=torch.tensor([prompt]), cache=cache)
    solo_caches = [stage.new_cache() for _ in prompts]
    for cache, prompt in zip(solo_caches, prompts):
        stage.forward(input_ids=torch.tensor([prompt]), cache=cache)
    nxt = [torch.tensor([[21]]), torch.tensor([[22]]), torch.tensor([[23]])]
    batched, grown = batched_decode(stage, caches, nxt)
    for row, (cache, token) in enumerate(zip(solo_caches, nxt)):
        alone = stage.forward(input_ids=token, cache=cache)
        torch.testing.assert_close(batched[row : row + 1], alone, rtol=0, atol=1e-4)
        assert grown[row].get_seq_length() == cache.get_seq_length()


def test_grouping_keeps_padding_low() -> None:
    loop = asyncio.new_event_loop()
    try:

        def item(width: int) -> ForwardItem:
            return ForwardItem(
                Span(0, 4),
                torch.ones(1, width, dtype=torch.int64),
                None,
                None,
                True,
                loop.create_future(),
            )

        items = [item(w) for w in (3, 40, 4, 38, 5, 41)]
        groups = group_forward_items(items, max_rows=32, max_tokens=10_000)
        widths = sorted(sorted(i.width for i in g) for g in groups)
        assert widths == [[3, 4, 5], [38, 40, 41]]
        assert len(group_forward_items([item(3) for _ in range(10)], 4, 10_000)) == 3
    finally:
        loop.close()
