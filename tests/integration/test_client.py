"""The Python client package (tessera) against a live tiny mesh: typed results equal to the raw
stubs, streaming, deadlines, retries on UNAVAILABLE through the service config, TLS + token."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from tessera import (
    AsyncClient,
    ChatMessage,
    ChunkResult,
    Client,
    EmbedResult,
    GenerateResult,
    TesseraError,
)

from services.common.security import make_dev_certs
from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.mesh import ROOT, Mesh, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TEXTS = ["the cat sat on the mat", "hello", "paris is the capital of france"]


# A worker frees a generation batch no router steps for BATCH_IDLE_S by itself; the cancel test
# waits at most CANCEL_WAIT_S for the freeing, so a batch the cancel left behind fails it.
BATCH_IDLE_S = 60
CANCEL_WAIT_S = 10.0
assert CANCEL_WAIT_S < BATCH_IDLE_S


@pytest.fixture(scope="module")
def mesh(tiny_repo: Path) -> Iterator[Mesh]:
    """Router + tiny-llama as [0,2) [2,4) + tiny-bert as a replica; no cache tier."""
    with Mesh(tiny_repo, env={"TESSERA_WORKER_BATCH_IDLE_S": str(BATCH_IDLE_S)}) as m:
        m.start_router()
        for model, layers in [("tiny-llama", "0:2"), ("tiny-llama", "2:4"), ("tiny-bert", None)]:
            m.start_worker(model, layers, wait=False)
        for proc in m.workers:
            proc.wait_ready()
        m.wait_model("tiny-llama")
        m.wait_model("tiny-bert")
        yield m


@pytest.fixture
def client(mesh: Mesh) -> Iterator[Client]:
    with Client(mesh.address, timeout=60) as c:
        yield c


def test_generate_returns_the_stubs_answer_typed(mesh: Mesh, client: Client) -> None:
    got = client.generate("tiny-llama", "the cat sat", max_new_tokens=8)
    want = mesh.stub().Generate(
        inference_pb2.GenerateRequest(model="tiny-llama", prompt="the cat sat", max_new_tokens=8),
        timeout=60,
    )
    assert isinstance(got, GenerateResult)
    assert (got.text, got.token_ids, got.finish_reason) == (
        want.text,
        tuple(want.token_ids),
        want.finish_reason,
    )
    assert got.prompt_tokens == want.prompt_tokens and got.generated_tokens == len(got.token_ids)
    sampled = client.generate(
        "tiny-llama",
        "hello world",
        max_new_tokens=6,
        temperature=0.9,
        top_k=20,
        top_p=0.95,
        seed=11,
    )
    again = client.generate(
        "tiny-llama",
        "hello world",
        max_new_tokens=6,
        temperature=0.9,
        top_k=20,
        top_p=0.95,
        seed=11,
    )
    assert sampled.token_ids == again.token_ids
    chat = client.generate(
        "tiny-llama",
        messages=[
            ChatMessage("user", "hello"),
            ("assistant", "world"),
            {"role": "user", "content": "the cat"},
        ],
        max_new_tokens=3,
    )
    assert chat.prompt_tokens > 3 and chat.generated_tokens >= 1
    with pytest.raises(ValueError):
        client.generate("tiny-llama")
    with pytest.raises(ValueError):  # checked when called, not on first iteration
        client.stream("tiny-llama", "hi", messages=[("user", "hi")])


def test_stream_yields_chunks_that_add_up(client: Client) -> None:
    whole = client.generate("tiny-llama", "hello world", max_new_tokens=10, temperature=0.8, seed=7)
    chunks = list(
        client.stream("tiny-llama", "hello world", max_new_tokens=10, temperature=0.8, seed=7)
    )
    assert chunks and all(isinstance(c, ChunkResult) for c in chunks)
    assert "".join(c.text for c in chunks) == whole.text
    assert tuple(t for c in chunks for t in c.token_ids) == whole.token_ids
    assert chunks[-1].last and chunks[-1].finish_reason == whole.finish_reason
    assert not any(c.last for c in chunks[:-1])


def test_embed_equals_the_stub(mesh: Mesh, client: Client) -> None:
    got = client.embed("tiny-bert", TEXTS)
    want = mesh.stub().Embed(
        inference_pb2.EmbedRequest(model="tiny-bert", inputs=TEXTS), timeout=60
    )
    assert isinstance(got, EmbedResult) and got.dim == want.dim == 32
    matrix = got.numpy()
    assert matrix.shape == (3, 32) and matrix.dtype == np.float32
    np.testing.assert_array_equal(
        matrix, np.array([e.values for e in want.embeddings], dtype=np.float32)
    )
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)
    assert client.embed("tiny-bert", "hello").numpy().shape == (1, 32)


def test_forward_in_two_ranges_equals_one(client: Client) -> None:
    first = client.forward("tiny-llama", text="the cat sat", start=0, end=2)
    assert (first.start, first.end) == (0, 2) and first.input_ids
    assert first.hidden_states.shape[:2] == (1, len(first.input_ids))
    rest = client.forward(
        "tiny-llama",
        hidden_states=first.hidden_states,
        start=2,
        attention_mask=first.attention_mask,
    )
    whole = client.forward("tiny-llama", text="the cat sat")
    assert (rest.start, rest.end) == (2, 4)
    np.testing.assert_allclose(rest.hidden_states, whole.hidden_states, atol=1e-5, rtol=0)


def test_list_models_and_ready(client: Client) -> None:
    models = {m.name: m for m in client.list_models()}
    llama, bert = models["tiny-llama"], models["tiny-bert"]
    assert llama.kind == "causal-lm" and bert.kind == "encoder"
    assert llama.healthy and llama.num_layers == 4 and len(llama.fingerprint) == 64
    assert [[(s.start, s.end) for s in c.stages] for c in llama.chains] == [[(0, 2), (2, 4)]]
    assert all(s.healthy for s in llama.chains[0].stages)
    assert client.ready() and client.ready("tiny-llama") and not client.ready("no-such-model")


def test_errors_are_typed_and_deadlines_apply(client: Client) -> None:
    with pytest.raises(TesseraError) as caught:
        client.generate("no-such-model", "hi")
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert isinstance(caught.value, grpc.RpcError) and "no-such-model" in caught.value.details()
    with pytest.raises(TesseraError) as caught:
        client.embed("tiny-bert", [])
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(TesseraError) as caught:
        client.generate("tiny-llama", "the cat sat on the mat", max_new_tokens=200, timeout=0.001)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(TesseraError) as caught:
        list(client.stream("tiny-llama", "the cat", max_new_tokens=200, timeout=0.001))
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    # The client-wide default applies when a call names no timeout.
    with Client(client.address, timeout=0.001) as hurried:
        with pytest.raises(TesseraError) as caught:
            hurried.embed("tiny-bert", TEXTS)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def test_async_client(mesh: Mesh, client: Client) -> None:
    async def run() -> None:
        async with AsyncClient(mesh.address, timeout=60) as aclient:
            got, embedded, models = await asyncio.gather(
                aclient.generate("tiny-llama", "the cat sat", max_new_tokens=8),
                aclient.embed("tiny-bert", TEXTS),
                aclient.list_models(),
            )
            assert got == client.generate("tiny-llama", "the cat sat", max_new_tokens=8)
            np.testing.assert_array_equal(
                embedded.numpy(), client.embed("tiny-bert", TEXTS).numpy()
            )
            assert {m.name for m in models} >= {"tiny-llama", "tiny-bert"}
            chunks = [
                c async for c in aclient.stream("tiny-llama", "the cat sat", max_new_tokens=8)
            ]
            assert "".join(c.text for c in chunks) == got.text and chunks[-1].last
            forward = await aclient.forward("tiny-llama", text="hello world", end=1)
            assert forward.hidden_states.shape[:2] == (1, len(forward.input_ids))
            assert await aclient.ready("tiny-bert")
            with pytest.raises(TesseraError) as caught:
                await aclient.generate("tiny-llama", "the cat", max_new_tokens=200, timeout=0.001)
            assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            with pytest.raises(TesseraError) as caught:
                async for _ in aclient.stream("nope", "hi"):
                    pass
            assert caught.value.code() is grpc.StatusCode.NOT_FOUND

    asyncio.run(run())


def test_python_examples_run(mesh: Mesh) -> None:
    examples = ROOT / "examples" / "python"
    done = subprocess.run(
        [
            sys.executable,
            str(examples / "generate.py"),
            mesh.address,
            "--model",
            "tiny-llama",
            "--embed-model",
            "tiny-bert",
            "--prompt",
            "the cat sat",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tiny-llama (causal-lm, 4 layers" in done.stdout
    assert "embed:    2 vectors of 32" in done.stdout and "errors:   NOT_FOUND" in done.stdout
    done = subprocess.run(
        [sys.executable, str(examples / "async_stream.py"), mesh.address, "--model", "tiny-llama"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(done.stdout.splitlines()) == 3


def _live_sessions(mesh: Mesh, model: str = "tiny-llama") -> list[int]:
    """Each of the model's workers' generation rows held now (internal Worker/Info)."""
    held = []
    for worker in mesh.workers:
        if worker.args[2] == model:
            with grpc.insecure_channel(worker.address) as channel:
                info = worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=5)
            held.append(info.live_sessions)
    return held


def test_leaving_a_stream_early_cancels_it(mesh: Mesh, client: Client) -> None:
    """Last of the mesh tests: it cancels a generation in flight, and both stages free it."""
    prompt, length = "the dog", 200
    # Greedy, this prompt runs its whole length (no EOS), so the stream below is still generating
    # when the loop looks at the workers and leaves.
    started = time.monotonic()
    assert client.generate("tiny-llama", prompt, max_new_tokens=length).finish_reason == "length"
    whole_s = time.monotonic() - started
    wait_until(lambda: _live_sessions(mesh) == [0, 0], CANCEL_WAIT_S, "earlier generations freed")
    during: list[int] = []
    for _ in client.stream("tiny-llama", prompt, max_new_tokens=length):
        during = _live_sessions(mesh)
        break
    left = time.monotonic()
    assert during == [1, 1], f"the stream was not live on both stages: {during}"
    wait_until(
        lambda: _live_sessions(mesh) == [0, 0],
        CANCEL_WAIT_S,
        "both stages freeing the cancelled generation",
        interval=0.05,
    )
    # Freed by the cancel, not by the generation running to its end (a step or two, not 200).
    freed_s = time.monotonic() - left
    assert freed_s < whole_s / 2, (
        f"freed after {freed_s:.2f} s; the whole run takes {whole_s:.2f} s"
    )
    assert client.generate("tiny-llama", "hi", max_new_tokens=1).generated_tokens == 1
    assert all(w.popen.poll() is None for w in mesh.workers), "a worker died"


# -- retries -----------------------------------------------------------------------------------


def test_service_config_retries_unavailable() -> None:
    client = Client("127.0.0.1:1", retries=3)
    options = dict(client.options)
    client.close()
    assert options["grpc.enable_retries"] == 1
    config = json.loads(options["grpc.service_config"])
    method = config["methodConfig"][0]
    assert {"service": "tessera.v1.Inference"} in method["name"]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert method["retryPolicy"]["maxAttempts"] == 4
    with pytest.raises(ValueError):
        Client("127.0.0.1:1", retries=5)


class _Flaky(inference_pb2_grpc.InferenceServicer):
    """Answers UNAVAILABLE `failures` times, then an empty model list."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.lock = threading.Lock()

    def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        with self.lock:
            self.calls += 1
            failing = self.calls <= self.failures
        if failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return inference_pb2.ListModelsResponse()


def test_unavailable_is_retried_by_grpc() -> None:
    flaky = _Flaky(failures=2)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    inference_pb2_grpc.add_InferenceServicer_to_server(flaky, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", retries=3, timeout=20) as retrying:
            assert retrying.list_models() == ()
        assert flaky.calls == 3
        flaky.calls, flaky.failures = 0, 1
        with Client(f"127.0.0.1:{port}", retries=0, timeout=20) as once:
            with pytest.raises(TesseraError) as caught:
                once.list_models()
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE and flaky.calls == 1
    finally:
        server.stop(grace=None)


# -- TLS and tokens ----------------------------------------------------------------------------


def test_mutual_tls_and_bearer_token(tiny_repo: Path, tmp_path: Path) -> None:
    certs = make_dev_certs(tmp_path / "certs")
    env = {
        "TESSERA_ROUTER_TLS_CERT": str(certs["server.pem"]),
        "TESSERA_ROUTER_TLS_KEY": str(certs["server.key"]),
        "TESSERA_ROUTER_TLS_CLIENT_CA": str(certs["ca.pem"]),
        "TESSERA_ROUTER_AUTH_TOKENS": "sdk-secret",
    }
    with Mesh(tiny_repo, env=env) as m:
        m.start_router()
        address = f"localhost:{m.router.port}" if m.router else ""
        tls = {"ca": certs["ca.pem"], "cert": certs["client.pem"], "key": certs["client.key"]}
        with Client(address, token="sdk-secret", timeout=20, **tls) as secure:
            assert secure.list_models() == ()
            assert secure.ready()
        with Client(address, token="wrong", timeout=20, **tls) as wrong:
            with pytest.raises(TesseraError) as caught:
                wrong.list_models()
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with Client(address, token="sdk-secret", timeout=5, retries=0) as plaintext:
            with pytest.raises(TesseraError) as caught:
                plaintext.list_models()
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE

        async def run() -> None:
            async with AsyncClient(address, token="sdk-secret", timeout=20, **tls) as aclient:
                assert await aclient.list_models() == ()

        asyncio.run(run())
    with pytest.raises(ValueError):
        Client("localhost:1", cert=certs["client.pem"])
