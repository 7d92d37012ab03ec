"""Workers authenticate their callers: with TESSERA_WORKER_CALLER_TOKENS (or a token file) set,
every tessera.v1.Worker call needs `authorization: Bearer <token>`; the router sends its
TESSERA_ROUTER_WORKER_CALL_TOKEN on every worker call; health and reflection stay open."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.pb.tessera.v1 import common_pb2, inference_pb2, worker_pb2, worker_pb2_grpc
from tests.mesh import Mesh, Proc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ROUTER_TOKEN = "router-call-token-7f3a"
FILE_TOKEN = "rotated-in-token-91c2"


@pytest.fixture(scope="module")
def guarded(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    token_file = tmp_path_factory.mktemp("tokens") / "callers"
    token_file.write_text(f"# tokens of the routers allowed to call\n{FILE_TOKEN}\n")
    env = {
        "TESSERA_ROUTER_WORKER_CALL_TOKEN": ROUTER_TOKEN,
        "TESSERA_WORKER_CALLER_TOKENS": ROUTER_TOKEN,
        "TESSERA_WORKER_CALLER_TOKEN_FILE": str(token_file),
    }
    with Mesh(tiny_repo, env=env) as mesh:
        mesh.start_router()
        mesh.start_worker("tiny-bert")
        mesh.wait_model("tiny-bert", timeout=60)
        yield mesh


def _worker(mesh: Mesh) -> Proc:
    return mesh.workers[0]


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _forward_request() -> worker_pb2.StageForwardRequest:
    ids = np.array([[7, 8, 9]], dtype="<i8")
    return worker_pb2.StageForwardRequest(
        input_ids=common_pb2.Tensor(dtype="int64", shape=[1, 3], data=ids.tobytes())
    )


def test_router_calls_carry_its_token(guarded: Mesh) -> None:
    """Every router -> worker call (probes, Info, Forward) is accepted: the router serves."""
    reply = guarded.stub().Embed(
        inference_pb2.EmbedRequest(model="tiny-bert", inputs=["the cat", "a dog"]), timeout=30
    )
    assert reply.dim == 32 and len(reply.embeddings) == 2


def test_worker_refuses_callers_without_the_token(guarded: Mesh) -> None:
    with grpc.insecure_channel(_worker(guarded).address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        calls = {
            "Info": lambda md: stub.Info(worker_pb2.InfoRequest(), timeout=10, metadata=md),
            "Forward": lambda md: stub.Forward(_forward_request(), timeout=10, metadata=md),
            "Prefill": lambda md: stub.Prefill(
                worker_pb2.PrefillRequest(batch_id="b"), timeout=10, metadata=md
            ),
            "Clear": lambda md: stub.Clear(
                worker_pb2.ClearRequest(batch_ids=["b"]), timeout=10, metadata=md
            ),
            # A method that does not exist is refused the same way: no token, no map.
            "NoSuchMethod": lambda md: channel.unary_unary("/tessera.v1.Worker/NoSuchMethod")(
                b"", timeout=10, metadata=md
            ),
        }
        for name, call in calls.items():
            for metadata in (
                None,
                _bearer("wrong-token"),
                _bearer(ROUTER_TOKEN + "x"),
                (("authorization", ROUTER_TOKEN),),  # no scheme
            ):
                with pytest.raises(grpc.RpcError) as refused:
                    call(metadata)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, metadata)
        # The right token, static or from the file, gets through to the handlers.
        for token in (ROUTER_TOKEN, FILE_TOKEN):
            info = calls["Info"](_bearer(token))
            assert info.model == "tiny-bert"
            out = calls["Forward"](_bearer(token))
            assert list(out.hidden_states.shape) == [1, 3, 32]
    logs = _worker(guarded).output() + (guarded.router.output() if guarded.router else "")
    assert ROUTER_TOKEN not in logs and FILE_TOKEN not in logs


def test_health_and_reflection_stay_open(guarded: Mesh) -> None:
    with grpc.insecure_channel(_worker(guarded).address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="tessera.v1.Worker"), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        listed = next(
            reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
        )
        names = {s.name for s in listed.list_services_response.service}
        assert "tessera.v1.Worker" in names
