"""Answers the cache tier cannot forge: a real router and memcached, and a client that writes
straight into memcached as any local process can.

Two cached Embed values swapped between their keys, a forged one-float value and a forged
generation are never served: each request gets its own answer, of its model's dimension,
computed again and written back over the bad value; the router counts what it rejected.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pymemcache.client.base import Client

from services.cache.codec import encode_vector
from services.cache.keys import embed_key
from services.cache.launcher import MemcachedNode, free_port, split_address
from services.cache.store import CacheStore
from services.common.repository import model_spec
from services.common.types import SamplingParams
from services.pb.tessera.v1 import inference_pb2
from services.router.frontends import ModelFrontend
from services.router.inputs import GenerateInput
from services.router.outputs import OutputProcessor
from tests.mesh import Mesh, metric, metrics_address, scrape

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cached_mesh(tiny_repo: Path) -> Iterator[tuple[Mesh, Client]]:
    with MemcachedNode().start(port=free_port()) as node:
        env = {"TESSERA_ROUTER_METRICS_PORT": "0", "TESSERA_ROUTER_CACHE_SECRET": "mesh-secret"}
        with Mesh(tiny_repo, cache_nodes=[node.address], env=env) as mesh:
            mesh.start_router()
            mesh.start_worker("tiny-bert")
            mesh.start_worker("tiny-llama")
            mesh.wait_model("tiny-bert")
            mesh.wait_model("tiny-llama")
            client = Client(split_address(node.address), connect_timeout=2, timeout=2)
            yield mesh, client
            client.close()


def _fingerprint(mesh: Mesh, model: str) -> str:
    listed = mesh.stub().ListModels(inference_pb2.ListModelsRequest(), timeout=5)
    return next(m.fingerprint for m in listed.models if m.name == model)


def _embed(mesh: Mesh, text: str) -> tuple[np.ndarray, bool]:
    reply = mesh.stub().Embed(
        inference_pb2.EmbedRequest(model="tiny-bert", inputs=[text]), timeout=30
    )
    return np.array(reply.embeddings[0].values), reply.cached


def _rejected(mesh: Mesh, tier: str) -> float:
    assert mesh.router is not None
    samples = scrape(metrics_address(mesh.router))
    return metric(samples, "tessera_cache_requests_total", tier=tier, result="rejected")


def test_swapped_or_forged_vectors_are_never_served(cached_mesh: tuple[Mesh, Client]) -> None:
    mesh, memcached = cached_mesh
    a_text, b_text = "the cat sat on the mat", "paris is the capital of france"
    a, _ = _embed(mesh, a_text)
    b, _ = _embed(mesh, b_text)
    assert _embed(mesh, a_text)[1] and _embed(mesh, b_text)[1]  # both cached now
    fingerprint = _fingerprint(mesh, "tiny-bert")
    a_key, b_key = (embed_key("tiny-bert", fingerprint, t) for t in (a_text, b_text))
    a_value, b_value = memcached.get(a_key), memcached.get(b_key)
    assert a_value and b_value
    rejected = _rejected(mesh, "embed")

    memcached.set(
        a_key, b_value, noreply=False
    )  # swapped: each key now holds the other's (sealed) vector
    memcached.set(b_key, a_value, noreply=False)
    for text, want in ((a_text, a), (b_text, b)):
        got, cached = _embed(mesh, text)
        assert not cached
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert _rejected(mesh, "embed") >= rejected + 2
    assert memcached.get(a_key) == a_value  # written back over the swapped value

    memcached.set(a_key, encode_vector([0.5]), noreply=False)  # a forged one-float value, unsealed
    got, cached = _embed(mesh, a_text)
    assert not cached and got.shape == a.shape == (32,)
    np.testing.assert_allclose(got, a, rtol=0, atol=1e-6)


def test_a_forged_generation_is_never_served(
    cached_mesh: tuple[Mesh, Client], tiny_repo: Path
) -> None:
    mesh, memcached = cached_mesh
    stub = mesh.stub()
    request = inference_pb2.GenerateRequest(model="tiny-llama", prompt="the cat", max_new_tokens=6)
    first = stub.Generate(request, timeout=30)
    assert stub.Generate(request, timeout=30).cached
    # The key the router wrote it under, computed the way the router computes it.
    frontend = ModelFrontend(model_spec(tiny_repo, "tiny-llama"))
    job = GenerateInput(
        "tiny-llama", frontend, frontend.encode_prompt("the cat"), 6, SamplingParams(), [], 0
    )
    address = ":".join(map(str, memcached.server))
    key = OutputProcessor(CacheStore([address])).generate_key(job, _fingerprint(mesh, "tiny-llama"))
    assert key is not None and memcached.get(key), "the generation is not under its key"
    rejected = _rejected(mesh, "generate")
    forged = inference_pb2.GenerateResponse(
        text="forged", finish_reason="length", prompt_tokens=2, generated_tokens=1, token_ids=[7]
    )
    memcached.set(key, forged.SerializeToString(), noreply=False)
    again = stub.Generate(request, timeout=30)
    assert not again.cached and again.text == first.text and again.token_ids == first.token_ids
    assert _rejected(mesh, "generate") >= rejected + 1
