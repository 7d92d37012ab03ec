"""Every request limit is configurable through TESSERA_ROUTER_* and enforced with its status
code and a message that names the limit; the router keeps serving afterwards. Transport limits
(message size, concurrent RPCs, streams per connection) hold on the router and the workers.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common.server import ROUTED_POSITIONS, hidden_message_bytes, text_message_bytes
from services.pb.tessera.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from tests.mesh import Mesh, Proc, service_env, wait_until

pytestmark = pytest.mark.timeout(300)

LIMITS = {
    "TESSERA_ROUTER_MAX_EMBED_INPUTS": "3",
    "TESSERA_ROUTER_MAX_PROMPT_TOKENS": "8",
    "TESSERA_ROUTER_MAX_NEW_TOKENS": "5",
    "TESSERA_ROUTER_MAX_MESSAGE_MB": "1",
    "TESSERA_ROUTER_MAX_STREAMS_PER_CONNECTION": "2",
    "TESSERA_ROUTER_MAX_INPUT_CHARS": "200",
}


@pytest.fixture(scope="module")
def limited(tiny_repo: Path) -> Iterator[Mesh]:
    with Mesh(tiny_repo, env=LIMITS) as mesh:
        mesh.start_router()
        mesh.start_worker("tiny-llama", wait=False)
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


# -- transport limits: gRPC itself refuses, before any handler runs ------------------------------


def _held_stream(channel: grpc.Channel) -> tuple[object, queue.Queue[object]]:
    """A reflection stream kept open (its request side never ends): one RPC in flight, one
    HTTP/2 stream of its connection taken. Put None in the queue to end it."""
    requests: queue.Queue[object] = queue.Queue()
    requests.put(reflection_pb2.ServerReflectionRequest(list_services=""))

    def pending() -> Iterator[object]:
        while (item := requests.get(timeout=60)) is not None:
            yield item

    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        pending(), timeout=60
    )
    next(call)  # answered: the stream is open on the server
    return call, requests


def _own_connection(address: str) -> grpc.Channel:
    # A local subchannel pool gives each channel its own connection.
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def _check(channel: grpc.Channel, timeout: float = 5.0) -> int:
    return int(
        health_pb2_grpc.HealthStub(channel)
        .Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        .status
    )


def _assert_concurrency_limits(address: str, max_rpcs: int) -> None:
    """With max_concurrent_streams = 1 and max_concurrent_rpcs = max_rpcs on the server."""
    channels = [_own_connection(address) for _ in range(max_rpcs + 1)]
    held: list[tuple[object, queue.Queue[object]]] = []
    try:
        held.append(_held_stream(channels[0]))
        # One stream per connection: a second call on the same connection waits for it...
        with pytest.raises(grpc.RpcError) as waited:
            _check(channels[0], timeout=1.0)
        assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # ... while another connection is served at once.
        assert _check(channels[1]) == health_pb2.HealthCheckResponse.SERVING
        # max_rpcs tokenless calls in flight over the server: the next one is refused (the open
        # doors' budget, open_max_calls; gRPC's own limit is that plus max_concurrent_rpcs).
        held += [_held_stream(channel) for channel in channels[1:max_rpcs]]
        refused = _refused(lambda: _check(channels[max_rpcs]))
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details()
        assert "open_max_calls" in (refused.details() or "")
        # A call that ends frees its place (the server counts it out just after its status).
        call, requests = held.pop(0)
        requests.put(None)
        list(call)  # type: ignore[call-overload]

        def served_again() -> bool:
            try:
                return _check(channels[max_rpcs]) == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                return False

        wait_until(served_again, 5.0, "a call served once another ended")
    finally:
        for _, requests in held:
            requests.put(None)
        for channel in channels:
            channel.close()


@pytest.mark.slow
def test_worker_transport_limits(tiny_repo: Path) -> None:
    """A worker with no limits set: the message limit is the largest routed request for its
    model (server.hidden_message_bytes); concurrency limits come from TESSERA_WORKER_*."""
    env = service_env(
        tiny_repo,
        {
            "TESSERA_WORKER_MAX_CONCURRENT_RPCS": "3",
            "TESSERA_WORKER_MAX_CONCURRENT_STREAMS": "1",
            # The held calls carry no token: the open doors' budget is what refuses them.
            "TESSERA_WORKER_OPEN_MAX_CALLS": "3",
            "TESSERA_WORKER_OPEN_MAX_WATCHES": "0",
        },
    )
    args = ["worker", "--model", "tiny-bert", "--port", "0", "--repository", str(tiny_repo)]
    worker = Proc(args, env).start()
    try:
        worker.wait_ready()
        limit = hidden_message_bytes(ROUTED_POSITIONS, 32)
        assert limit == 16_384 * (32 * 4 + 16) + 64 * 1024
        with grpc.insecure_channel(worker.address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)

            def forward(positions: int, data_bytes: int) -> None:
                tensor = common_pb2.Tensor(
                    dtype="float32", shape=[1, positions, 32], data=b"\0" * data_bytes
                )
                stub.Forward(
                    worker_pb2.StageForwardRequest(
                        hidden_states=tensor, span=common_pb2.Span(start=1, end=4)
                    ),
                    timeout=30,
                )

            over = _refused(lambda: forward(1, limit + 1))
            assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, over.details()
            assert str(limit) in (over.details() or ""), over.details()
            # Just under the limit reaches the handler, which judges the tensor itself.
            under = _refused(lambda: forward(1, limit - 1024))
            assert under.code() == grpc.StatusCode.INVALID_ARGUMENT, under.details()
        _assert_concurrency_limits(worker.address, max_rpcs=3)
        assert worker.popen.poll() is None
    finally:
        worker.stop()


@pytest.mark.slow
def test_router_transport_limits(tiny_repo: Path) -> None:
    """The router's message limit follows max_embed_inputs x max_input_chars (4 UTF-8 bytes a
    character at worst): the largest legal Embed passes gRPC, a byte more does not."""
    inputs, chars = 2, 1000
    env = service_env(
        tiny_repo,
        {
            "TESSERA_ROUTER_MAX_EMBED_INPUTS": str(inputs),
            "TESSERA_ROUTER_MAX_INPUT_CHARS": str(chars),
            "TESSERA_ROUTER_MAX_CONCURRENT_RPCS": "2",
            "TESSERA_ROUTER_MAX_CONCURRENT_STREAMS": "1",
            "TESSERA_ROUTER_OPEN_MAX_CALLS": "2",
            "TESSERA_ROUTER_OPEN_MAX_WATCHES": "0",
        },
    )
    router = Proc(["router", "--port", "0", "--repository", str(tiny_repo)], env).start()
    try:
        router.wait_ready()
        limit = text_message_bytes(inputs, chars)
        with grpc.insecure_channel(router.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            # Four-byte characters: the most bytes a legal request can hold.
            widest = inference_pb2.EmbedRequest(model="tiny-bert", inputs=["🙂" * chars] * inputs)
            assert widest.ByteSize() == inputs * (4 * chars + 3) + 11 < limit
            reached = _refused(lambda: stub.Embed(widest, timeout=30))
            # Past gRPC: no worker serves tiny-bert here, so the handler says UNAVAILABLE.
            assert reached.code() == grpc.StatusCode.UNAVAILABLE, reached.details()
            padding = limit + 1 - widest.ByteSize() - 4  # a third input: tag + 3-byte length
            over = inference_pb2.EmbedRequest(
                model="tiny-bert", inputs=[*widest.inputs, "x" * padding]
            )
            assert over.ByteSize() == limit + 1
            refused = _refused(lambda: stub.Embed(over, timeout=30))
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details()
            assert str(limit) in (refused.details() or ""), refused.details()
        _assert_concurrency_limits(router.address, max_rpcs=2)
        assert router.popen.poll() is None
    finally:
        router.stop()
