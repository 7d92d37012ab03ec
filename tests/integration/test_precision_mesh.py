"""Precision through a real mesh: it is part of the version, so chains never mix precisions.

A float32 stage [0, 2) and a bfloat16 stage [2, 4) of tiny-llama do not form a chain (their
fingerprints differ): the model has no healthy chain until a float32 [2, 4) joins. A bfloat16
tiny-bert replica shows its precision in ListModels and its vectors equal transformers' own model
with every Linear computed in bfloat16 (1e-5), a reference float32 is told apart from.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from services.pb.tessera.v1 import inference_pb2
from tests.mesh import Mesh, wait_until
from tests.unit.test_precision import _bf16_linear, _cast_like

pytestmark = pytest.mark.slow

TEXTS = ["the cat sat on the mat", "hello world", "what is the capital of france ?"]


@pytest.fixture(scope="module")
def mesh(tiny_repo: Path) -> Iterator[Mesh]:
    with Mesh(tiny_repo) as m:
        m.start_router()
        m.start_worker("tiny-llama", "0:2", wait=False)
        m.start_worker(
            "tiny-llama", "2:4", wait=False, env={"TESSERA_WORKER_PRECISION": "bfloat16"}
        )
        m.start_worker("tiny-bert", wait=False, env={"TESSERA_WORKER_PRECISION": "bfloat16"})
        for proc in m.workers:
            proc.wait_ready()
        m.wait_model("tiny-bert")
        yield m


def _listed(mesh: Mesh, model: str) -> list[inference_pb2.ModelStatus]:
    reply = mesh.stub().ListModels(inference_pb2.ListModelsRequest(), timeout=10)
    return [m for m in reply.models if m.name == model]


def _references(path: Path, linear: object | None) -> np.ndarray:
    """transformers' own tiny-bert (every Linear through `linear` when given), mean-pooled."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    if linear is not None:
        _cast_like(model, linear)
    vectors = []
    with torch.inference_mode():
        for text in TEXTS:
            hidden = model(**tokenizer([text], return_tensors="pt")).last_hidden_state[0].mean(0)
            vectors.append((hidden / hidden.norm()).numpy())
    return np.array(vectors)


def test_a_bfloat16_replica_says_so_and_computes_in_bfloat16(mesh: Mesh, tiny_repo: Path) -> None:
    [status] = _listed(mesh, "tiny-bert")
    assert status.precision == "bfloat16" and status.version.endswith("+bfloat16")
    reply = mesh.stub().Embed(
        inference_pb2.EmbedRequest(model="tiny-bert", inputs=TEXTS), timeout=30
    )
    got = np.array([e.values for e in reply.embeddings])
    float32 = _references(tiny_repo / "tiny-bert", None)
    bfloat16 = _references(tiny_repo / "tiny-bert", _bf16_linear)
    # The references lie more than twice the tolerance apart, so a worker that said bfloat16 but
    # computed float32 could not pass the equality below.
    assert np.abs(float32 - bfloat16).max() > 2e-5
    np.testing.assert_allclose(got, bfloat16, rtol=0, atol=1e-5)
    assert (np.sum(got * float32, axis=1) > 0.999).all()


def test_stages_of_different_precisions_never_form_a_chain(mesh: Mesh) -> None:
    # Both stages are admitted (each matches the repository for its own precision) ...
    wait_until(lambda: len(_listed(mesh, "tiny-llama")) == 1, 30, "tiny-llama listed")
    # ... but no chain joins a float32 [0, 2) to a bfloat16 [2, 4): the model is unavailable.
    with pytest.raises(grpc.RpcError) as caught:
        mesh.stub().Generate(
            inference_pb2.GenerateRequest(model="tiny-llama", prompt="the cat", max_new_tokens=4),
            timeout=30,
        )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    assert not any(c.healthy for m in _listed(mesh, "tiny-llama") for c in m.chains)
    # A float32 [2, 4) completes a float32 chain, and generation runs on it.
    mesh.start_worker("tiny-llama", "2:4")
    mesh.wait_model("tiny-llama")
    reply = mesh.stub().Generate(
        inference_pb2.GenerateRequest(model="tiny-llama", prompt="the cat", max_new_tokens=4),
        timeout=30,
    )
    assert reply.generated_tokens > 0
    [status] = _listed(mesh, "tiny-llama")
    assert status.precision == "float32"
