"""Trust boundaries with real processes: callers are who their token says, open doors cannot be
held shut, every input is bounded before it costs anything, and workers prove who they are.

The mesh: a router with a user token file (a plain token, a tenant with a priority ceiling), an
admin token and a mesh secret; workers that derive their credentials from that secret.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.security import REGISTER, derive_token
from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.mesh import ROOT, Mesh, service_env, wait_model_on, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PLAIN = "plain-user-token-1"  # its own tenant, priority at most 0
BULK = "bulk-user-token-2"  # tenant "bulk", may ask for the highest priority
ADMIN = "admin-token-3"
SECRET = "mesh-secret-for-tests"
STREAM = inference_pb2.GenerateRequest(model="tiny-llama", prompt="a b c", max_new_tokens=200)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.fixture(scope="module")
def mesh(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tokens = tmp_path_factory.mktemp("tokens") / "users"
    tokens.write_text(f"{PLAIN}\n{BULK} tenant=bulk max_priority=100 max_in_flight=400\n")
    env = {
        "TESSERA_ROUTER_AUTH_TOKEN_FILE": str(tokens),
        "TESSERA_ROUTER_ADMIN_TOKENS": ADMIN,
        "TESSERA_ROUTER_MESH_SECRET": SECRET,
        "TESSERA_ROUTER_AGING_SHARE": "0.1",
        "TESSERA_ROUTER_MAX_TENANT_IN_FLIGHT": "8",
        "TESSERA_WORKER_MESH_SECRET": SECRET,
        "TESSERA_WORKER_MAX_ROWS": "8",
    }
    with Mesh(tiny_repo, env=env) as m:
        m.start_router()
        m.start_worker("tiny-llama", wait=False)
        m.start_worker("tiny-bert", wait=False)
        for proc in m.workers:
            proc.wait_ready()
        for model in ("tiny-llama", "tiny-bert"):
            wait_model_on(m.channel(), model, metadata=bearer(ADMIN), procs=[m.router, *m.workers])
        yield m


def _stub(mesh: Mesh) -> inference_pb2_grpc.InferenceStub:
    return mesh.stub()


# -- callers are who their token says --------------------------------------------------------


def test_worker_addresses_are_shown_to_operators_only(mesh: Mesh) -> None:
    def addresses(token: str) -> set[str]:
        reply = _stub(mesh).ListModels(
            inference_pb2.ListModelsRequest(), timeout=10, metadata=bearer(token)
        )
        return {s.address for m in reply.models for c in m.chains for s in c.stages}

    assert addresses(PLAIN) == {""}
    assert addresses(ADMIN) == {p.address for p in mesh.workers}


def test_a_token_cannot_ask_for_more_priority_than_it_was_given(mesh: Mesh) -> None:
    urgent = inference_pb2.GenerateRequest(
        model="tiny-llama", prompt="hello", max_new_tokens=2, priority=50
    )
    with pytest.raises(grpc.RpcError) as caught:
        _stub(mesh).Generate(urgent, timeout=30, metadata=bearer(PLAIN))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "priority 50" in caught.value.details()
    assert _stub(mesh).Generate(urgent, timeout=30, metadata=bearer(BULK)).generated_tokens == 2


def test_a_tenants_requests_in_flight_are_bounded(mesh: Mesh) -> None:
    """Plain tokens may hold 8 requests in flight (max_tenant_in_flight); the ninth is refused
    while another tenant is served."""

    async def run() -> tuple[list[str], str]:
        async with aio.insecure_channel(mesh.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            held = [
                stub.GenerateStream(STREAM, timeout=60, metadata=bearer(PLAIN)) for _ in range(8)
            ]
            for call in held:
                await call.read()
            codes = []
            try:
                await stub.Generate(STREAM, timeout=30, metadata=bearer(PLAIN))
                codes.append("OK")
            except aio.AioRpcError as error:
                codes.append(f"{error.code().name}: {error.details()}")
            other = await stub.Generate(
                inference_pb2.GenerateRequest(model="tiny-llama", prompt="hi", max_new_tokens=2),
                timeout=30,
                metadata=bearer(BULK),
            )
            for call in held:
                call.cancel()
            return codes, str(other.generated_tokens)

    codes, other = asyncio.run(run())
    assert codes[0].startswith("RESOURCE_EXHAUSTED") and "max_tenant_in_flight" in codes[0]
    assert other == "2"


def test_priority_zero_is_served_beside_a_flood_at_the_highest_priority(mesh: Mesh) -> None:
    """Tenant bulk keeps 64 streams at priority 100 in flight (the worker holds 8 rows); a
    plain token's priority-0 request still finishes within its 20 s deadline: its priority
    rises with its wait (aging_share 0.1: the highest after 2 s) and then it ties with the
    best and goes first as the tenant with the smaller share."""

    async def run() -> tuple[float, int]:
        async with aio.insecure_channel(mesh.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            flood = inference_pb2.GenerateRequest(
                model="tiny-llama", prompt="a b c", max_new_tokens=150, priority=100
            )
            stop = asyncio.Event()
            started = 0

            async def keep_flooding() -> None:
                nonlocal started
                while not stop.is_set() and started < 2000:
                    started += 1
                    try:
                        await stub.Generate(flood, timeout=120, metadata=bearer(BULK))
                    except aio.AioRpcError:
                        pass

            floods = [asyncio.create_task(keep_flooding()) for _ in range(64)]
            await asyncio.sleep(1.0)  # the flood fills every row and the queue
            began = asyncio.get_running_loop().time()
            low = inference_pb2.GenerateRequest(model="tiny-llama", prompt="hi", max_new_tokens=4)
            reply = await stub.Generate(low, timeout=20, metadata=bearer(PLAIN))
            waited = asyncio.get_running_loop().time() - began
            stop.set()
            for task in floods:
                task.cancel()
            await asyncio.gather(*floods, return_exceptions=True)
            return waited, reply.generated_tokens

    waited, generated = asyncio.run(run())
    assert generated == 4 and waited < 20


# -- open doors cannot be held shut ------------------------------------------------------------


def test_tokenless_watch_streams_never_take_authenticated_slots(mesh: Mesh) -> None:
    """1,152 tokenless health Watch streams on the router (9 connections x 128) and 640 on a
    worker: most are refused at once, the rest are held, and authenticated Embed and health
    Check (with a token, as the router's own probes of its workers have) answer in time."""
    worker = next(p for p in mesh.workers if "tiny-llama" in p.args)

    async def run() -> tuple[int, int, float, float]:
        channels = [
            aio.insecure_channel(mesh.address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(9)
        ]
        channels += [
            aio.insecure_channel(worker.address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(5)
        ]
        calls = [
            health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            for channel in channels
            for _ in range(128)
        ]
        refused = held = 0

        async def first(call: aio.UnaryStreamCall) -> None:
            nonlocal refused, held
            try:
                await asyncio.wait_for(call.read(), 30)
                held += 1
            except aio.AioRpcError as error:
                # RESOURCE_EXHAUSTED from the budget (a few are reset by HTTP/2 instead).
                refused += error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        await asyncio.gather(*(first(c) for c in calls))
        async with aio.insecure_channel(mesh.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            began = time.monotonic()
            reply = await stub.Embed(
                inference_pb2.EmbedRequest(model="tiny-bert", inputs=["hello"]),
                timeout=2,
                metadata=bearer(PLAIN),
            )
            embed_s = time.monotonic() - began
            assert reply.dim == 32
            began = time.monotonic()
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2, metadata=bearer(PLAIN)
            )
            check_s = time.monotonic() - began
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close()
        return refused, held, embed_s, check_s

    refused, held, embed_s, check_s = asyncio.run(run())
    # Each server holds what its budget allows one peer (8 streams) and refuses the rest at once.
    assert held == 16 and refused >= 14 * 128 - held - 32, (held, refused)
    assert embed_s < 2 and check_s < 2
    # The router kept its workers: its probes were never refused.
    reply = _stub(mesh).ListModels(
        inference_pb2.ListModelsRequest(), timeout=5, metadata=bearer(ADMIN)
    )
    assert all(m.healthy for m in reply.models)


# -- every input bounded before it costs anything --------------------------------------------


def _chat_bytes(messages: int) -> bytes:
    """A GenerateRequest of `messages` user messages "hi", encoded by hand (fast)."""
    message = b"\x0a\x04user\x12\x02hi"  # role = 1, content = 2
    one = b"\x1a" + bytes([len(message)]) + message  # messages = 3
    head = b"\x0a\x0atiny-llama"  # model = 1
    return head + one * messages


def test_a_million_message_chat_is_refused_at_once_and_costs_nobody(mesh: Mesh) -> None:
    flood = _chat_bytes(1_000_000)

    async def run() -> tuple[str, float, float]:
        async with aio.insecure_channel(mesh.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            gaps: list[float] = []

            async def live() -> None:
                last = time.monotonic()
                async for _ in stub.GenerateStream(STREAM, timeout=60, metadata=bearer(BULK)):
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

            stream = asyncio.create_task(live())
            await asyncio.sleep(0.3)
            raw = channel.unary_unary("/tessera.v1.Inference/Generate")
            began = time.monotonic()
            try:
                await raw(flood, timeout=30, metadata=bearer(BULK))
                outcome = "OK"
            except aio.AioRpcError as error:
                outcome = f"{error.code().name}: {error.details()}"
            refused_s = time.monotonic() - began
            await stream
            return outcome, refused_s, max(gaps[1:])

    outcome, refused_s, worst_gap = asyncio.run(run())
    assert outcome.startswith("INVALID_ARGUMENT") and "max_chat" in outcome, outcome
    assert refused_s < 2, refused_s
    assert worst_gap < 1.5, worst_gap


def test_chat_limits_name_their_settings(mesh: Mesh) -> None:
    stub = _stub(mesh)
    many = inference_pb2.GenerateRequest(
        model="tiny-llama",
        messages=[inference_pb2.ChatMessage(role="user", content="hi")] * 300,
        max_new_tokens=2,
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(many, timeout=30, metadata=bearer(PLAIN))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_chat_messages" in caught.value.details()
    long = "x" * 33_000
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(
            inference_pb2.GenerateRequest(model=long, prompt="hi"),
            timeout=30,
            metadata=bearer(PLAIN),
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(caught.value.details()) < 120  # the name is quoted, not echoed whole


# -- workers prove who they are ----------------------------------------------------------------


def test_a_workers_credential_is_good_for_its_own_address_only(mesh: Mesh) -> None:
    """Derived from the mesh secret per address: one worker's credential cannot register
    another address, nor take over or remove a live worker's registration."""
    worker = next(p for p in mesh.workers if "tiny-llama" in p.args)
    with grpc.insecure_channel(worker.address) as channel:
        info = worker_pb2_grpc.WorkerStub(channel).Info(
            worker_pb2.InfoRequest(),
            timeout=5,
            metadata=bearer(derive_token(SECRET, "call", worker.address)),
        )
    registry = worker_pb2_grpc.RegistryStub(mesh.channel())
    own = derive_token(SECRET, REGISTER, worker.address)
    fake = worker_pb2.WorkerInfo()
    fake.CopyFrom(info)
    fake.address = "127.0.0.1:1"
    with pytest.raises(grpc.RpcError) as caught:
        registry.Register(worker_pb2.RegisterRequest(worker=fake), timeout=5, metadata=bearer(own))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    other = next(p for p in mesh.workers if "tiny-bert" in p.args)
    with pytest.raises(grpc.RpcError) as caught:
        registry.Deregister(
            worker_pb2.DeregisterRequest(address=other.address), timeout=5, metadata=bearer(own)
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The worker takes calls only with the token derived for its own address.
    with grpc.insecure_channel(worker.address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            worker_pb2_grpc.WorkerStub(channel).Info(
                worker_pb2.InfoRequest(),
                timeout=5,
                metadata=bearer(derive_token(SECRET, "call", other.address)),
            )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


# -- safe defaults -----------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_router_beyond_loopback_needs_user_tokens_or_allow_anonymous(tiny_repo: Path) -> None:
    env = service_env(tiny_repo)
    command = [sys.executable, "-m", "services.cli", "router", "--host", "0.0.0.0", "--port", "0"]
    refused = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "allow_anonymous" in refused.stdout + refused.stderr
    allowed = subprocess.Popen(
        [*command, "--allow-anonymous"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines: list[str] = []
        assert allowed.stdout is not None
        wait_until(
            lambda: bool(lines.append(allowed.stdout.readline()) or "ready" in lines[-1]),
            60,
            "the anonymous router to start",
        )
    finally:
        allowed.send_signal(signal.SIGTERM)
        allowed.wait(timeout=30)
