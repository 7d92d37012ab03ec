"""Priority and tenant fairness end to end, through a real router and worker.

The worker holds one generation row at a time, so requests queue in the router's scheduler
while a long stream runs; when that stream leaves, the order in which the queued requests get
their first token is the scheduler's order. The requests are sent through the public API, so
these tests fail if the servicer stops passing a request's priority or tenant to the scheduler.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc import aio

from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc
from tests.mesh import Mesh, metric, metrics_address, scrape, wait_until

pytestmark = pytest.mark.slow

LONG = inference_pb2.GenerateRequest(model="tiny-llama", prompt="a b c", max_new_tokens=240)


@pytest.fixture(scope="module")
def mesh(tiny_repo: Path) -> Iterator[Mesh]:
    env = {"TESSERA_ROUTER_METRICS_PORT": "0", "TESSERA_WORKER_MAX_ROWS": "1"}
    with Mesh(tiny_repo, env=env) as m:
        m.start_router()
        m.start_worker("tiny-llama")
        m.wait_model("tiny-llama")
        yield m


def _waiting(mesh: Mesh) -> float:
    assert mesh.router is not None
    samples = scrape(metrics_address(mesh.router))
    return metric(samples, "tessera_generation_queue_depth", model="tiny-llama")


async def _first_token_order(
    mesh: Mesh, queued: list[tuple[str, inference_pb2.GenerateRequest, str]]
) -> list[str]:
    """Holds the worker's one row with a long stream, queues `queued` (name, request, tenant)
    in that order behind it, then ends the long stream: the names in first-token order."""
    order: list[str] = []
    async with aio.insecure_channel(mesh.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        holder = stub.GenerateStream(LONG, timeout=60, metadata=[("x-tessera-tenant", "x")])
        await holder.read()  # the long stream holds the row

        async def one(name: str, request: inference_pb2.GenerateRequest, tenant: str) -> None:
            call = stub.GenerateStream(request, timeout=60, metadata=[("x-tessera-tenant", tenant)])
            await call.read()
            order.append(name)
            while await call.read() is not aio.EOF:
                pass

        tasks = []
        for index, (name, request, tenant) in enumerate(queued):
            tasks.append(asyncio.create_task(one(name, request, tenant)))
            await asyncio.to_thread(
                wait_until, lambda n=index + 1: _waiting(mesh) >= n, 10, f"{name} queued"
            )
        holder.cancel()
        await asyncio.gather(*tasks)
    return order


def _short(priority: int | None = None) -> inference_pb2.GenerateRequest:
    request = inference_pb2.GenerateRequest(model="tiny-llama", prompt="the cat", max_new_tokens=4)
    if priority is not None:
        request.priority = priority
    return request


def test_a_higher_priority_request_is_served_first(mesh: Mesh) -> None:
    order = asyncio.run(
        _first_token_order(mesh, [("low", _short(0), "x"), ("high", _short(50), "x")])
    )
    assert order == ["high", "low"]


def test_the_tenant_with_the_smaller_share_is_served_first(mesh: Mesh) -> None:
    """Tenant x already had the long stream; y's request, though queued later, goes first."""
    order = asyncio.run(
        _first_token_order(mesh, [("x-again", _short(), "x"), ("y-first", _short(), "y")])
    )
    assert order == ["y-first", "x-again"]
