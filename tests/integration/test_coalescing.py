"""Coalescing on the router, against real processes: concurrent Embeds share worker calls,
every answer comes from one version, the cache never blocks the router, and cached texts are
never computed again.

References are independent of Tessera: transformers' AutoModel on each text alone, mean pooling
and L2 normalisation (what sentence-transformers does for these models).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pymemcache.client.base import Client
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer

from services.cache.codec import decode_vector
from services.cache.keys import embed_key
from services.cache.launcher import MemcachedNode, free_port, split_address
from services.cache.seal import Seal
from services.common.repository import fingerprint
from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc
from tests.mesh import Mesh, Proc, metric, metrics_address, scrape, wait_until
from tests.tiny_models import VOCAB

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "tiny-bert"
WORDS = [w for w in VOCAB[7:] if w.isalpha()]
ROWS = "tessera_worker_batch_rows"
# No admission re-checks during a test: their probe requests would add worker rows.
ROUTER_ENV = {"TESSERA_ROUTER_RECHECK_S": "0"}
WORKER_ENV = {"TESSERA_WORKER_METRICS_PORT": "0"}


def distinct_texts(count: int, seed: int) -> list[str]:
    """count distinct texts of 1 to 24 words: lengths vary so calls are padded and grouped."""
    rng = random.Random(seed)
    texts: dict[str, None] = {}
    while len(texts) < count:
        texts[" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 24)))] = None
    return list(texts)


class Reference:
    """One model version, run the way the reference runs it: each text alone."""

    def __init__(self, path: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        out = []
        for text in texts:
            batch = self.tokenizer([text], return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            out.append(torch.nn.functional.normalize(pooled, dim=1)[0].numpy())
        return np.stack(out)


def vectors(reply: inference_pb2.EmbedResponse) -> np.ndarray:
    if reply.vectors:
        return np.frombuffer(reply.vectors, dtype="<f4").reshape(-1, reply.dim)
    return np.array([e.values for e in reply.embeddings], dtype=np.float32)


def worker_counts(address: str) -> tuple[float, float]:
    """(Forward calls answered OK, rows run in forward passes) on a worker so far."""
    samples = scrape(address)
    calls = metric(
        samples, "tessera_requests_total", service="tessera.v1.Worker", rpc="Forward", code="OK"
    )
    return calls, metric(samples, f"{ROWS}_sum", kind="forward")


async def embed_all(address: str, requests: list[list[str]], packed: bool = False) -> list:
    async with aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        return await asyncio.gather(
            *(
                stub.Embed(
                    inference_pb2.EmbedRequest(model=MODEL, inputs=texts, packed=packed),
                    timeout=120,
                )
                for texts in requests
            )
        )


@pytest.fixture(scope="module")
def cache_node() -> Iterator[MemcachedNode]:
    node = MemcachedNode().start(port=free_port())
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def mesh(tiny_repo: Path, cache_node: MemcachedNode) -> Iterator[tuple[Mesh, str]]:
    """A router with the cache and one tiny-bert replica with metrics; (mesh, its metrics)."""
    with Mesh(tiny_repo, cache_nodes=[cache_node.address], env=ROUTER_ENV) as m:
        m.start_router()
        worker = m.start_worker(MODEL, env=WORKER_ENV)
        m.wait_model(MODEL)
        yield m, metrics_address(worker)


@pytest.fixture(scope="module")
def reference(tiny_repo: Path) -> Reference:
    return Reference(tiny_repo / MODEL)


def test_concurrent_one_text_embeds_share_worker_calls(
    mesh: tuple[Mesh, str], reference: Reference
) -> None:
    m, worker = mesh
    texts = distinct_texts(64, seed=1)
    calls_before, rows_before = worker_counts(worker)
    replies = asyncio.run(embed_all(m.address, [[t] for t in texts]))
    calls_after, rows_after = worker_counts(worker)
    calls = calls_after - calls_before
    # Every text was computed once, in far fewer worker calls than requests.
    assert rows_after - rows_before == len(texts)
    assert calls < len(texts) / 2, f"{calls} worker calls for {len(texts)} requests"
    got = np.stack([vectors(r)[0] for r in replies])
    np.testing.assert_allclose(got, reference.embed(texts), rtol=0, atol=1e-5)


def test_one_request_with_many_texts_equals_the_reference(
    mesh: tuple[Mesh, str], reference: Reference
) -> None:
    """More texts than one call holds: cut into calls by the same lanes, answered in order."""
    m, _ = mesh
    texts = distinct_texts(100, seed=2)
    texts = texts + texts[:5]  # repeats are answered too, in place
    packed = asyncio.run(embed_all(m.address, [texts], packed=True))[0]
    plain = asyncio.run(embed_all(m.address, [texts]))[0]
    want = reference.embed(texts)
    assert not packed.embeddings and packed.dim == want.shape[1]
    np.testing.assert_allclose(vectors(packed), want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(vectors(plain), want, rtol=0, atol=1e-5)
    assert plain.cached  # the packed request filled the cache


def test_sixty_cached_and_four_new_computes_four(
    mesh: tuple[Mesh, str], reference: Reference
) -> None:
    m, worker = mesh
    texts = distinct_texts(64, seed=3)
    first = asyncio.run(embed_all(m.address, [texts[:60]]))[0]
    assert first.cached_inputs == 0
    calls_before, rows_before = worker_counts(worker)
    # The first answer was cached before it was sent: every one of its texts is a hit now.
    reply = asyncio.run(embed_all(m.address, [texts]))[0]
    calls_after, rows_after = worker_counts(worker)
    assert reply.cached_inputs == 60 and not reply.cached
    assert rows_after - rows_before == 4
    assert calls_after - calls_before == 1
    np.testing.assert_allclose(vectors(reply), reference.embed(texts), rtol=0, atol=1e-5)


def _other_version(source: Path, target: Path) -> Path:
    """A copy of a model with one weight changed: another version (fingerprint) of it."""
    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    tensors = load_file(weights)
    name = next(n for n in sorted(tensors) if n.endswith("attention.output.dense.weight"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, weights, metadata={"format": "pt"})
    return target


def test_every_answer_comes_from_one_version(
    tiny_repo: Path, tmp_path: Path, cache_node: MemcachedNode
) -> None:
    other_repo = tmp_path / "repo-b"
    other = _other_version(tiny_repo / MODEL, other_repo / MODEL)
    prints = {"a": fingerprint(tiny_repo / MODEL), "b": fingerprint(other)}
    assert prints["a"] != prints["b"]
    references = {"a": Reference(tiny_repo / MODEL), "b": Reference(other)}
    secret = "test-cache-secret"  # to open the values the router sealed
    env = {
        **ROUTER_ENV,
        "TESSERA_ROUTER_ALLOWED_FINGERPRINTS": prints["b"],
        "TESSERA_ROUTER_CACHE_SECRET": secret,
    }
    with Mesh(tiny_repo, cache_nodes=[cache_node.address], env=env) as m:
        m.start_router()
        m.start_worker(MODEL)
        args = ["worker", "--model", MODEL, "--port", "0", "--router", m.address]
        version_b = Proc([*args, "--repository", str(other_repo)], m.env).start()
        m.workers.append(version_b)
        version_b.wait_ready()
        m.wait_model(MODEL, chains=2)
        seen: dict[str, int] = {"a": 0, "b": 0}
        answered: list[tuple[str, list[str]]] = []
        for round_ in range(6):
            # 40 texts per request: more than one call holds, so an answer spans calls.
            requests = [distinct_texts(40, seed=1000 + 10 * round_ + i) for i in range(8)]
            requests = [[f"{t} {round_} {i}" for t in r] for i, r in enumerate(requests)]
            for texts, reply in zip(requests, asyncio.run(embed_all(m.address, requests))):
                got = vectors(reply)
                matches = [
                    v
                    for v, ref in references.items()
                    if np.abs(got - ref.embed(texts)).max() <= 1e-5
                ]
                assert len(matches) == 1, "an answer mixes versions (or matches neither)"
                seen[matches[0]] += 1
                answered.append((matches[0], texts))
            if seen["a"] and seen["b"]:
                break
        assert seen["a"] and seen["b"], f"both versions should have answered: {seen}"
        # Each text is cached under the fingerprint of the version that computed it, only.
        client = Client(split_address(cache_node.address), connect_timeout=2, timeout=2)

        def cached_under(version: str, texts: list[str]) -> dict[str, np.ndarray]:
            keys = {embed_key(MODEL, prints[version], t): t for t in texts}
            found = client.get_many(list(keys))
            return {keys[k]: decode_vector(Seal(secret).unwrap(k, v)) for k, v in found.items()}

        for version, texts in answered:
            other_version = "b" if version == "a" else "a"
            wait_until(lambda: len(cached_under(version, texts)) == len(texts), 10, "cache writes")
            stored = cached_under(version, texts)
            want = references[version].embed(texts)
            np.testing.assert_allclose(
                np.stack([stored[t] for t in texts]), want, rtol=0, atol=1e-5
            )
            assert not cached_under(other_version, texts)


@pytest.fixture
def silent_cache() -> Iterator[tuple[str, threading.Event]]:
    """A TCP server that reads requests and never answers; the event says a request came."""
    heard = threading.Event()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    stop = threading.Event()
    conns: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(0.2)
            conns.append(conn)
            threading.Thread(target=read, args=(conn,), daemon=True).start()

    def read(conn: socket.socket) -> None:
        while not stop.is_set():
            try:
                if conn.recv(4096):
                    heard.set()
                else:
                    return
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}", heard
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in conns:
            conn.close()
        server.close()


CACHE_TIMEOUT_S = 3.0


def test_a_hanging_cache_does_not_block_the_router(
    tiny_repo: Path, silent_cache: tuple[str, threading.Event], reference: Reference
) -> None:
    address, heard = silent_cache
    env = {**ROUTER_ENV, "TESSERA_ROUTER_CACHE_TIMEOUT_S": str(CACHE_TIMEOUT_S)}
    with Mesh(tiny_repo, cache_nodes=[address], env=env) as m:
        m.start_router()
        m.start_worker(MODEL)
        m.wait_model(MODEL)

        async def main() -> None:
            async with aio.insecure_channel(m.address) as channel:
                stub = inference_pb2_grpc.InferenceStub(channel)
                health = health_pb2_grpc.HealthStub(channel)
                embed = asyncio.ensure_future(
                    stub.Embed(
                        inference_pb2.EmbedRequest(model=MODEL, inputs=["the cat sat"]),
                        timeout=60,
                    )
                )
                # The router's cache lookup has reached memcached and waits for an answer that
                # never comes (until its timeout): the router must answer meanwhile.
                deadline = time.monotonic() + 30
                while not heard.is_set():
                    assert time.monotonic() < deadline, "the router never asked the cache"
                    await asyncio.sleep(0.01)
                started = time.monotonic()
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=CACHE_TIMEOUT_S / 3
                )
                listed = await stub.ListModels(
                    inference_pb2.ListModelsRequest(), timeout=CACHE_TIMEOUT_S / 3
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                assert any(model.name == MODEL for model in listed.models)
                assert time.monotonic() - started < CACHE_TIMEOUT_S
                assert not embed.done(), "the Embed should still wait for its cache lookup"
                # A cache that fails is a miss: the Embed is answered, computed.
                answer = await embed
                assert answer.cached_inputs == 0
                np.testing.assert_allclose(
                    vectors(answer), reference.embed(["the cat sat"]), rtol=0, atol=1e-5
                )

        asyncio.run(main())


def test_a_request_past_its_deadline_while_queued_is_never_sent(real_repo: Path) -> None:
    """A one-text Embed queued behind a long one: its deadline passes while it waits, it gets
    DEADLINE_EXCEEDED, and its text never reaches the worker (the worker's rows show it)."""
    model = "all-minilm-l6-v2"
    rng = random.Random(7)
    words = ["river", "station", "report", "garden", "engine", "winter", "market", "signal"]
    # 256 texts past the model's 256 tokens: 8 calls of 32 full-length rows, each a while.
    long_texts = [f"{i} " + " ".join(rng.choice(words) for _ in range(400)) for i in range(256)]
    with Mesh(real_repo, env=ROUTER_ENV) as m:
        m.start_router()
        worker = m.start_worker(model, env=WORKER_ENV)
        m.wait_model(model)
        metrics = metrics_address(worker)

        async def main() -> tuple[object, object]:
            async with aio.insecure_channel(m.address) as channel:
                stub = inference_pb2_grpc.InferenceStub(channel)
                big = asyncio.ensure_future(
                    stub.Embed(
                        inference_pb2.EmbedRequest(model=model, inputs=long_texts), timeout=300
                    )
                )
                await asyncio.sleep(0.5)  # its first calls are in flight, the rest queued
                hurried = stub.Embed(
                    inference_pb2.EmbedRequest(model=model, inputs=["a short text"]), timeout=0.2
                )
                return await asyncio.gather(big, hurried, return_exceptions=True)

        _, rows_before = worker_counts(metrics)
        big, hurried = asyncio.run(main())
        _, rows_after = worker_counts(metrics)
    assert isinstance(big, inference_pb2.EmbedResponse) and big.dim > 0
    assert isinstance(hurried, aio.AioRpcError)
    assert hurried.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert rows_after - rows_before == len(long_texts)
