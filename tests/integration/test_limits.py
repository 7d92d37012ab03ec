"""Every request limit is configurable through TESSERA_ROUTER_* and enforced with its status
code and a message that names the limit; the router keeps serving afterwards.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc
from tests.mesh import Mesh

pytestmark = pytest.mark.timeout(300)

LIMITS = {
    "TESSERA_ROUTER_MAX_EMBED_INPUTS": "3",
    "TESSERA_ROUTER_MAX_PROMPT_TOKENS": "8",
    "TESSERA_ROUTER_MAX_NEW_TOKENS": "5",
    "TESSERA_ROUTER_MAX_MESSAGE_MB": "1",
    "TESSERA_ROUTER_MAX_STREAMS_PER_CONNECTION": "2",
    "TESSERA_ROUTER_MAX_INPUT_CHARS": "200",
}
SLOW_STEP_MS = 150  # the llama worker waits this long for company before each batch


@pytest.fixture(scope="module")
def limited(tiny_repo: Path) -> Iterator[Mesh]:
    with Mesh(tiny_repo, env=LIMITS) as mesh:
        mesh.start_router()
        # A slow decode step keeps generation streams open long enough to overlap.
        mesh.start_worker(
            "tiny-llama", wait=False, env={"TESSERA_WORKER_MAX_WAIT_MS": str(SLOW_STEP_MS)}
        )
        mesh.start_worker("tiny-bert", wait=False)
        for proc in mesh.workers:
            proc.wait_ready()
        mesh.wait_model("tiny-llama", timeout=60)
        mesh.wait_model("tiny-bert", timeout=60)
        yield mesh


def _assert_still_serving(mesh: Mesh) -> None:
    stub = mesh.stub()
    reply = stub.Generate(
        inference_pb2.GenerateRequest(model="tiny-llama", prompt="hello world", max_new_tokens=2),
        timeout=30,
    )
    assert reply.generated_tokens >= 1
    assert (
        stub.Embed(
            inference_pb2.EmbedRequest(model="tiny-bert", inputs=["the cat"]), timeout=30
        ).dim
        == 32
    )
    assert mesh.router is not None and mesh.router.popen.poll() is None


def _refused(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def test_max_embed_inputs(limited: Mesh) -> None:
    stub = limited.stub()
    ok = stub.Embed(
        inference_pb2.EmbedRequest(model="tiny-bert", inputs=["a", "b", "c"]), timeout=30
    )
    assert len(ok.embeddings) == 3
    error = _refused(
        lambda: stub.Embed(
            inference_pb2.EmbedRequest(model="tiny-bert", inputs=["a", "b", "c", "d"]), timeout=30
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_embed_inputs" in error.details() and "3" in error.details()
    _assert_still_serving(limited)


def test_max_prompt_tokens(limited: Mesh) -> None:
    stub = limited.stub()
    eight = " ".join(["the"] * 8)
    assert (
        stub.Generate(
            inference_pb2.GenerateRequest(model="tiny-llama", prompt=eight, max_new_tokens=1),
            timeout=30,
        ).prompt_tokens
        == 8
    )
    for request in (
        inference_pb2.GenerateRequest(model="tiny-llama", prompt=eight + " cat", max_new_tokens=1),
        inference_pb2.GenerateRequest(
            model="tiny-llama",
            max_new_tokens=1,
            messages=[inference_pb2.ChatMessage(role="user", content=eight)],
        ),
    ):
        for method in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
            error = _refused(lambda: method(request, timeout=30))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "max_prompt_tokens" in error.details() and "8" in error.details()
    _assert_still_serving(limited)


def test_max_new_tokens(limited: Mesh) -> None:
    stub = limited.stub()
    reply = stub.Generate(
        inference_pb2.GenerateRequest(model="tiny-llama", prompt="the cat", max_new_tokens=5),
        timeout=30,
    )
    assert 1 <= reply.generated_tokens <= 5
    for too_many in (6, 1000, 2**31 - 1):
        request = inference_pb2.GenerateRequest(
            model="tiny-llama", prompt="the cat", max_new_tokens=too_many
        )
        for method in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
            error = _refused(lambda: method(request, timeout=30))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "max_new_tokens" in error.details() and "5" in error.details()
    _assert_still_serving(limited)


def test_max_input_chars(limited: Mesh) -> None:
    stub = limited.stub()
    long_text = "a " * 101  # 202 characters, 101 tokens
    calls = [
        lambda: stub.Generate(
            inference_pb2.GenerateRequest(model="tiny-llama", prompt=long_text, max_new_tokens=1),
            timeout=30,
        ),
        lambda: stub.Generate(
            inference_pb2.GenerateRequest(
                model="tiny-llama",
                max_new_tokens=1,
                messages=[inference_pb2.ChatMessage(role="user", content=long_text)],
            ),
            timeout=30,
        ),
        lambda: stub.Embed(
            inference_pb2.EmbedRequest(model="tiny-bert", inputs=["ok", long_text]), timeout=30
        ),
        lambda: stub.Forward(
            inference_pb2.ForwardRequest(model="tiny-bert", start=0, text=long_text), timeout=30
        ),
    ]
    for call in calls:
        error = _refused(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_input_chars" in error.details() and "200" in error.details()
    _assert_still_serving(limited)


def test_max_message_mb(limited: Mesh) -> None:
    stub = limited.stub()
    # The message is over 1 MiB: gRPC itself refuses it before any handler sees it.
    big = inference_pb2.EmbedRequest(model="tiny-bert", inputs=["x" * (600 * 1024)] * 2)
    assert big.ByteSize() > 1024 * 1024
    error = _refused(lambda: stub.Embed(big, timeout=30))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1048576" in (error.details() or ""), error.details()
    huge_prompt = inference_pb2.GenerateRequest(model="tiny-llama", prompt="y" * (1100 * 1024))
    error = _refused(lambda: list(stub.GenerateStream(huge_prompt, timeout=30)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Just under the limit is accepted by gRPC (and then judged by the handler).
    under = inference_pb2.EmbedRequest(model="tiny-bert", inputs=["x" * (1000 * 1024)])
    error = _refused(lambda: stub.Embed(under, timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "max_input_chars" in error.details()
    _assert_still_serving(limited)


def _burst(channels: list[grpc.Channel], request: inference_pb2.GenerateRequest) -> list[object]:
    """Starts one GenerateStream per entry at the same moment; finish reasons or errors."""
    outcomes: list[object] = [None] * len(channels)
    barrier = threading.Barrier(len(channels))

    def run(index: int) -> None:
        stub = inference_pb2_grpc.InferenceStub(channels[index])
        barrier.wait(timeout=30)
        try:
            outcomes[index] = list(stub.GenerateStream(request, timeout=60))[-1].finish_reason
        except grpc.RpcError as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(channels))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert not any(t.is_alive() for t in threads)
    return outcomes


def test_max_streams_per_connection(limited: Mesh) -> None:
    request = inference_pb2.GenerateRequest(
        model="tiny-llama", prompt="the cat sat", max_new_tokens=5
    )
    # A local subchannel pool gives each channel its own connection (gRPC otherwise shares
    # one connection between channels to the same target).
    own_connection = [("grpc.use_local_subchannel_pool", 1)]
    one = grpc.insecure_channel(limited.address, options=own_connection)
    other = grpc.insecure_channel(limited.address, options=own_connection)
    try:
        # Connect both channels first: each is one HTTP/2 connection for all its streams.
        grpc.channel_ready_future(one).result(timeout=10)
        grpc.channel_ready_future(other).result(timeout=10)
        outcomes = _burst([one, one, one, other], request)
        refused = [r for r in outcomes[:3] if isinstance(r, grpc.RpcError)]
        assert len(refused) == 1, outcomes
        assert refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_streams_per_connection" in refused[0].details()
        assert "2" in refused[0].details()
        # Another connection is not limited by the first one's streams.
        assert isinstance(outcomes[3], str) and outcomes[3], outcomes
        # The count goes down when streams end: two at once on the same connection work again.
        again = _burst([one, one], request)
        assert all(isinstance(r, str) and r for r in again), again
    finally:
        one.close()
        other.close()
    _assert_still_serving(limited)
