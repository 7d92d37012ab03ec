"""Transport security and authentication with real processes: TLS on the router's public port,
mutual TLS between router and workers, bearer tokens (static and from a reloaded file).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common.security import make_dev_certs
from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.mesh import (
    Mesh,
    metrics_address,
    scrape,
    secure_channel,
    wait_model_on,
    wait_until,
    wait_version_gauges,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HI = inference_pb2.GenerateRequest(model="tiny-llama", prompt="hello world", max_new_tokens=3)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_dev_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A second, unrelated CA with its own server and client certificates."""
    return make_dev_certs(tmp_path_factory.mktemp("other-certs"))


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value.code()


def test_dev_certs_are_usable_files(certs: dict[str, Path]) -> None:
    for name in ("ca.pem", "server.pem", "client.pem"):
        assert certs[name].read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    for name in ("ca.key", "server.key", "client.key"):
        assert b"PRIVATE KEY" in certs[name].read_bytes()
        assert certs[name].stat().st_mode & 0o077 == 0, f"{name} is readable by others"


# -- (a) TLS on the router's public port -------------------------------------------------------


def test_router_tls_accepts_the_right_ca_and_refuses_others(
    tiny_repo: Path, certs: dict[str, Path], other_certs: dict[str, Path]
) -> None:
    env = {
        "TESSERA_ROUTER_TLS_CERT": str(certs["server.pem"]),
        "TESSERA_ROUTER_TLS_KEY": str(certs["server.key"]),
    }
    with Mesh(tiny_repo, env=env) as mesh:
        router = mesh.start_router()
        # The worker registers over TLS: it must trust the router's CA.
        worker = mesh.start_worker(
            "tiny-llama", env={"TESSERA_WORKER_ROUTER_CA": str(certs["ca.pem"])}
        )
        good = secure_channel(mesh.address, certs["ca.pem"])
        try:
            wait_model_on(good, "tiny-llama", timeout=60, procs=[router, worker])
            reply = inference_pb2_grpc.InferenceStub(good).Generate(HI, timeout=30)
            assert reply.generated_tokens >= 1
            # The certificate names localhost too.
            port = mesh.address.rsplit(":", 1)[1]
            by_name = secure_channel(f"localhost:{port}", certs["ca.pem"])
            try:
                health = health_pb2_grpc.HealthStub(by_name).Check(
                    health_pb2.HealthCheckRequest(), timeout=10
                )
                assert health.status == health_pb2.HealthCheckResponse.SERVING
            finally:
                by_name.close()
        finally:
            good.close()

        wrong = secure_channel(mesh.address, other_certs["ca.pem"])
        try:
            assert (
                _code(lambda: inference_pb2_grpc.InferenceStub(wrong).Generate(HI, timeout=10))
                == grpc.StatusCode.UNAVAILABLE
            )
        finally:
            wrong.close()
        plain = grpc.insecure_channel(mesh.address)
        try:
            assert (
                _code(lambda: inference_pb2_grpc.InferenceStub(plain).Generate(HI, timeout=10))
                == grpc.StatusCode.UNAVAILABLE
            )
            assert (
                _code(
                    lambda: health_pb2_grpc.HealthStub(plain).Check(
                        health_pb2.HealthCheckRequest(), timeout=10
                    )
                )
                == grpc.StatusCode.UNAVAILABLE
            )
        finally:
            plain.close()
        assert router.popen.poll() is None, "a failed handshake must not stop the router"


def test_router_tls_with_client_ca_requires_a_client_certificate(
    tiny_repo: Path, certs: dict[str, Path], other_certs: dict[str, Path]
) -> None:
    """TESSERA_ROUTER_TLS_CLIENT_CA: mutual TLS on the public port, workers register with
    their client certificate."""
    env = {
        "TESSERA_ROUTER_TLS_CERT": str(certs["server.pem"]),
        "TESSERA_ROUTER_TLS_KEY": str(certs["server.key"]),
        "TESSERA_ROUTER_TLS_CLIENT_CA": str(certs["ca.pem"]),
    }
    with Mesh(tiny_repo, env=env) as mesh:
        router = mesh.start_router()
        worker = mesh.start_worker(
            "tiny-llama",
            env={
                "TESSERA_WORKER_ROUTER_CA": str(certs["ca.pem"]),
                "TESSERA_WORKER_CLIENT_CERT": str(certs["client.pem"]),
                "TESSERA_WORKER_CLIENT_KEY": str(certs["client.key"]),
            },
        )
        good = secure_channel(
            mesh.address, certs["ca.pem"], certs["client.pem"], certs["client.key"]
        )
        try:
            wait_model_on(good, "tiny-llama", timeout=60, procs=[router, worker])
            assert (
                inference_pb2_grpc.InferenceStub(good).Generate(HI, timeout=30).generated_tokens
                >= 1
            )
        finally:
            good.close()
        for cert, key in ((None, None), (other_certs["client.pem"], other_certs["client.key"])):
            channel = secure_channel(mesh.address, certs["ca.pem"], cert, key)
            try:
                assert (
                    _code(
                        lambda: inference_pb2_grpc.InferenceStub(channel).Generate(HI, timeout=10)
                    )
                    == grpc.StatusCode.UNAVAILABLE
                )
            finally:
                channel.close()


# -- (b) mutual TLS between router and workers ------------------------------------------------


def _mtls_worker_env(certs: dict[str, Path]) -> dict[str, str]:
    return {
        "TESSERA_WORKER_TLS_CERT": str(certs["server.pem"]),
        "TESSERA_WORKER_TLS_KEY": str(certs["server.key"]),
        "TESSERA_WORKER_TLS_CLIENT_CA": str(certs["ca.pem"]),
    }


def test_mutual_tls_between_router_and_workers(
    tiny_repo: Path, certs: dict[str, Path], other_certs: dict[str, Path]
) -> None:
    env = {
        "TESSERA_ROUTER_WORKER_CA": str(certs["ca.pem"]),
        "TESSERA_ROUTER_CLIENT_CERT": str(certs["client.pem"]),
        "TESSERA_ROUTER_CLIENT_KEY": str(certs["client.key"]),
    }
    with Mesh(tiny_repo, env=env) as mesh:
        router = mesh.start_router()
        stages = [
            mesh.start_worker("tiny-llama", layers, wait=False, env=_mtls_worker_env(certs))
            for layers in ("0:2", "2:4")
        ]
        for stage in stages:
            stage.wait_ready()
        mesh.wait_model("tiny-llama", timeout=60)
        stub = mesh.stub()
        reply = stub.Generate(HI, timeout=30)
        assert reply.generated_tokens >= 1
        chunks = list(stub.GenerateStream(HI, timeout=30))
        assert [t for c in chunks for t in c.token_ids] == list(reply.token_ids)
        forward = stub.Forward(
            inference_pb2.ForwardRequest(model="tiny-llama", start=0, end=4, text="the cat"),
            timeout=30,
        )
        assert list(forward.hidden_states.shape) == [1, 2, 32]

        # Calling a worker directly: only with a client certificate of the right CA.
        address = stages[0].address
        for label, cert, key, ca in (
            ("no client cert", None, None, certs["ca.pem"]),
            (
                "client cert of another CA",
                other_certs["client.pem"],
                other_certs["client.key"],
                certs["ca.pem"],
            ),
        ):
            channel = secure_channel(address, ca, cert, key)
            try:
                code = _code(
                    lambda: worker_pb2_grpc.WorkerStub(channel).Info(
                        worker_pb2.InfoRequest(), timeout=10
                    )
                )
                assert code == grpc.StatusCode.UNAVAILABLE, label
            finally:
                channel.close()
        plain = grpc.insecure_channel(address)
        try:
            assert (
                _code(
                    lambda: worker_pb2_grpc.WorkerStub(plain).Info(
                        worker_pb2.InfoRequest(), timeout=10
                    )
                )
                == grpc.StatusCode.UNAVAILABLE
            )
        finally:
            plain.close()
        with_cert = secure_channel(
            address, certs["ca.pem"], certs["client.pem"], certs["client.key"]
        )
        try:
            info = worker_pb2_grpc.WorkerStub(with_cert).Info(worker_pb2.InfoRequest(), timeout=10)
            assert info.model == "tiny-llama"
        finally:
            with_cert.close()

        # Routers that cannot authenticate to the workers (no client certificate, or a
        # certificate the workers' CA did not sign, or plaintext) never get to use them.
        workers = ",".join(s.address for s in stages)
        for label, bad_env in (
            ("no client cert", {"TESSERA_ROUTER_WORKER_CA": str(certs["ca.pem"])}),
            (
                "client cert of another CA",
                {
                    "TESSERA_ROUTER_WORKER_CA": str(certs["ca.pem"]),
                    "TESSERA_ROUTER_CLIENT_CERT": str(other_certs["client.pem"]),
                    "TESSERA_ROUTER_CLIENT_KEY": str(other_certs["client.key"]),
                },
            ),
            ("plaintext", {}),
        ):
            with Mesh(tiny_repo, env=bad_env) as other:
                other.start_router("--workers", workers)
                health = health_pb2_grpc.HealthStub(other.channel())
                deadline = time.monotonic() + 4.0
                while time.monotonic() < deadline:
                    try:
                        status = health.Check(
                            health_pb2.HealthCheckRequest(service="tiny-llama"), timeout=2
                        ).status
                    except grpc.RpcError as exc:
                        assert exc.code() == grpc.StatusCode.NOT_FOUND, label
                        status = None
                    assert status != health_pb2.HealthCheckResponse.SERVING, label
                    time.sleep(0.3)
                code = _code(lambda: other.stub().Generate(HI, timeout=10))
                assert code == grpc.StatusCode.UNAVAILABLE, label
        # The good router still works after those refused handshakes.
        assert stub.Generate(HI, timeout=30).generated_tokens >= 1
        assert router.popen.poll() is None


# -- (c) bearer tokens -------------------------------------------------------------------------

STATIC_TOKENS = ("s3cret-static-one-Q7", "s3cret-static-two-Z4")
FILE_TOKEN_OLD = "s3cret-file-old-K2"
FILE_TOKEN_NEW = "s3cret-file-new-W9"
WORKER_TOKEN = "s3cret-worker-M5"


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.fixture(scope="module")
def token_mesh(
    tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Mesh, Path]]:
    token_file = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    token_file.write_text(f"# comment lines are ignored\n{FILE_TOKEN_OLD}\n")
    env = {
        "TESSERA_ROUTER_AUTH_TOKENS": ",".join(STATIC_TOKENS),
        "TESSERA_ROUTER_AUTH_TOKEN_FILE": str(token_file),
        # Registration takes a worker token, never a user token (test_registry.py).
        "TESSERA_ROUTER_WORKER_TOKENS": WORKER_TOKEN,
    }
    with Mesh(tiny_repo, env=env) as mesh:
        router = mesh.start_router("--metrics-port", "0")
        worker = mesh.start_worker("tiny-llama", env={"TESSERA_WORKER_ROUTER_TOKEN": WORKER_TOKEN})
        wait_model_on(
            mesh.channel(),
            "tiny-llama",
            timeout=60,
            metadata=_bearer(STATIC_TOKENS[0]),
            procs=[router, worker],
        )
        yield mesh, token_file


def test_missing_or_wrong_token_is_unauthenticated(token_mesh: tuple[Mesh, Path]) -> None:
    mesh, _ = token_mesh
    stub = mesh.stub()
    embed = inference_pb2.EmbedRequest(model="tiny-bert", inputs=["x"])
    for metadata in (
        None,
        _bearer("wrong-token"),
        [("authorization", STATIC_TOKENS[0])],
        [("authorization", f"Basic {STATIC_TOKENS[0]}")],
        [("authorization", "Bearer ")],
        _bearer(STATIC_TOKENS[0] + "x"),
        _bearer(STATIC_TOKENS[0][:-1]),
    ):
        for call in (
            lambda: stub.Generate(HI, timeout=10, metadata=metadata),
            lambda: list(stub.GenerateStream(HI, timeout=10, metadata=metadata)),
            lambda: stub.Embed(embed, timeout=10, metadata=metadata),
            lambda: stub.ListModels(
                inference_pb2.ListModelsRequest(), timeout=10, metadata=metadata
            ),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
            assert "token" in (caught.value.details() or "")
    # The registry is protected too: a registration without a token is refused.
    registry = worker_pb2_grpc.RegistryStub(mesh.channel())
    with pytest.raises(grpc.RpcError) as caught:
        registry.Register(
            worker_pb2.RegisterRequest(
                worker=worker_pb2.WorkerInfo(
                    address="127.0.0.1:1",
                    model="tiny-llama",
                    kind="causal-lm",
                    span={"start": 0, "end": 4},
                    num_layers=4,
                )
            ),
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_unauthenticated_calls_leave_the_metrics_unchanged(token_mesh: tuple[Mesh, Path]) -> None:
    """300 calls with no token (or a wrong one) and unique 20 kB model names: not one series or
    value of the router's tessera_* metrics changes (but the worker's heartbeats to the
    registry, which go on meanwhile)."""
    mesh, _ = token_mesh
    assert mesh.router is not None
    address = metrics_address(mesh.router)

    def tessera_samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for s in scrape(address)
            if s.name.startswith("tessera_") and s.labels.get("service") != "tessera.v1.Registry"
        }

    wait_version_gauges(address)  # published once a second, from the first
    before = tessera_samples()
    stub = mesh.stub()
    refused = 0
    for i in range(300):
        name = f"attacker-{i}-" + "m" * 20_000
        metadata = None if i % 2 else _bearer("wrong-token")
        with pytest.raises(grpc.RpcError) as caught:
            if i % 3:
                stub.Embed(
                    inference_pb2.EmbedRequest(model=name, inputs=["x"]),
                    timeout=10,
                    metadata=metadata,
                )
            else:
                stub.Generate(
                    inference_pb2.GenerateRequest(model=name), timeout=10, metadata=metadata
                )
        refused += caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert refused == 300
    after = tessera_samples()
    assert after == before, {k: v for k, v in after.items() if before.get(k) != v}
    assert not any("attacker" in v for _, labels in after for _, v in labels)


def test_right_tokens_work(token_mesh: tuple[Mesh, Path]) -> None:
    mesh, _ = token_mesh
    stub = mesh.stub()
    for token in STATIC_TOKENS:
        assert stub.Generate(HI, timeout=30, metadata=_bearer(token)).generated_tokens >= 1
        chunks = list(stub.GenerateStream(HI, timeout=30, metadata=_bearer(token)))
        assert chunks and chunks[-1].finish_reason
    # The scheme is case-insensitive (RFC 7235).
    assert stub.ListModels(
        inference_pb2.ListModelsRequest(),
        timeout=10,
        metadata=[("authorization", f"bearer {STATIC_TOKENS[1]}")],
    ).models


def test_health_and_reflection_need_no_token(token_mesh: tuple[Mesh, Path]) -> None:
    mesh, _ = token_mesh
    health = health_pb2_grpc.HealthStub(mesh.channel())
    for service in ("", "tessera.v1.Inference", "tiny-llama"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    reflection = reflection_pb2_grpc.ServerReflectionStub(mesh.channel())
    replies = list(
        reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
    )
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"tessera.v1.Inference", "grpc.health.v1.Health"} <= names


def test_token_file_is_reloaded_on_change(token_mesh: tuple[Mesh, Path]) -> None:
    mesh, token_file = token_mesh
    stub = mesh.stub()

    def accepted(token: str) -> bool:
        try:
            stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10, metadata=_bearer(token))
            return True
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
            return False

    assert accepted(FILE_TOKEN_OLD)
    assert not accepted(FILE_TOKEN_NEW)
    token_file.write_text(f"{FILE_TOKEN_NEW}\n")
    time.sleep(1.5)
    wait_until(
        lambda: accepted(FILE_TOKEN_NEW) and not accepted(FILE_TOKEN_OLD),
        5.0,
        "the new file token replacing the old one",
    )
    assert stub.Generate(HI, timeout=30, metadata=_bearer(FILE_TOKEN_NEW)).generated_tokens >= 1
    assert accepted(STATIC_TOKENS[0]), "static tokens stay valid when the file changes"


def test_worker_without_token_cannot_register(token_mesh: tuple[Mesh, Path]) -> None:
    mesh, _ = token_mesh
    worker = mesh.start_worker("tiny-bert")
    try:
        wait_until(
            lambda: "UNAUTHENTICATED" in worker.output(),
            15.0,
            "the worker reporting its refused registration",
        )
        listed = mesh.stub().ListModels(
            inference_pb2.ListModelsRequest(), timeout=10, metadata=_bearer(STATIC_TOKENS[0])
        )
        assert "tiny-bert" not in {m.name for m in listed.models}
    finally:
        worker.stop()
        mesh.workers.remove(worker)


def test_tokens_never_appear_in_output(token_mesh: tuple[Mesh, Path]) -> None:
    mesh, _ = token_mesh
    stub = mesh.stub()
    # Some traffic with good and bad tokens first, so there is something to log.
    stub.Generate(HI, timeout=30, metadata=_bearer(STATIC_TOKENS[0]))
    with pytest.raises(grpc.RpcError):
        stub.Generate(HI, timeout=30, metadata=_bearer("s3cret-bad-guess-R1"))
    time.sleep(0.5)
    procs = [p for p in (mesh.router, *mesh.workers) if p is not None]
    for proc in procs:
        text = proc.output()
        assert "access" in text or proc is not mesh.router
        for token in (
            *STATIC_TOKENS,
            FILE_TOKEN_OLD,
            FILE_TOKEN_NEW,
            WORKER_TOKEN,
            "s3cret-bad-guess-R1",
        ):
            assert token not in text, f"{token} leaked into {proc.args[0]} output"
