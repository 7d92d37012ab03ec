"""Batching of stateless work (Embed) on the workers: concurrent requests share forward passes and
answers stay exact. Generation batching is tested in test_generation.py and test_stage_batch.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from grpc import aio

from services.common.types import Span
from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc
from services.worker.forwarding import ForwardItem, group_forward_items
from tests.mesh import Mesh, wait_until

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
        m.start_worker("tiny-bert", wait=False)
        for proc in m.workers:
            proc.wait_ready()
        m.wait_model("tiny-bert")
        yield m


def _reference(path: Path, texts: list[str]) -> dict[str, np.ndarray]:
    """Mean pooling + L2 normalisation over the unbatched transformers model, one text at a time."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    out = {}
    with torch.inference_mode():
        for text in texts:
            hidden = model(**tokenizer([text], return_tensors="pt")).last_hidden_state[0]
            pooled = hidden.mean(dim=0)
            out[text] = (pooled / pooled.norm()).numpy()
    return out


def test_concurrent_embeds_equal_the_reference(mesh: Mesh, tiny_repo: Path) -> None:
    single = _reference(tiny_repo / "tiny-bert", PROMPTS)

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

    calls_before = _forward_calls(mesh)
    for prompt, got in zip(PROMPTS * 4, asyncio.run(together())):
        np.testing.assert_allclose(got, single[prompt], rtol=0, atol=1e-5)
    # 36 concurrent one-text requests: the worker answered them in fewer calls than requests.
    wait_until(lambda: _forward_calls(mesh) > calls_before, 10, "the worker's access lines")
    calls = _forward_calls(mesh) - calls_before
    assert calls < len(PROMPTS) * 4, calls


def _forward_calls(mesh: Mesh) -> int:
    """Forward calls the worker answered (its access log has one line per call)."""
    return sum('"rpc": "/tessera.v1.Worker/Forward"' in line for line in mesh.workers[0].lines)


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
