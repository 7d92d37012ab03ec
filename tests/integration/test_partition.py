"""A fault seen from another host: a stage worker in its own network namespace, behind a veth
pair, whose link is cut mid-stream (packets vanish; nothing is refused, nothing is reset).

The chain through it is failed over within the stuck-stage timeout (the overdue step gets its
worker's health checked, and two checks go unanswered), no accepted request is lost, and once
the link is back the worker is admitted again and takes work. Needs root (`ip netns`, veth),
as CI has; `make test` installs iproute2.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.pb.tessera.v1 import inference_pb2
from services.router.pool import MAX_RETRY_S
from tests.integration.test_faults import GREEDY_PROMPT, stream_tokens, worker_info
from tests.integration.test_isolation import _streams
from tests.mesh import Mesh, Proc

pytestmark = pytest.mark.slow

NS_PORT = 50061  # the namespace is empty: any port is free in it
OVERDUE_S = 1.0  # the router's stuck_step_min_s here
# Overdue, then two health checks of up to 2 s each, 1 s apart: the stuck-stage timeout.
STUCK_TIMEOUT_S = OVERDUE_S + 2 * 2.0 + 1.0


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextmanager
def namespace() -> Iterator[tuple[str, str]]:
    """A network namespace joined to this one by a veth pair: (its name, its address)."""
    tag = f"{os.getpid() % 10000}{random.randrange(100)}"
    name, host_end, ns_end = f"tsr{tag}", f"tsrh{tag}", f"tsrn{tag}"
    subnet = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
    try:
        ip("netns", "add", name)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        raise AssertionError(f"this test needs root and iproute2 (`ip netns`): {exc}") from None
    try:
        ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        ip("link", "set", ns_end, "netns", name)
        ip("addr", "add", f"{subnet}.1/30", "dev", host_end)
        ip("link", "set", host_end, "up")
        ip("netns", "exec", name, "ip", "addr", "add", f"{subnet}.2/30", "dev", ns_end)
        ip("netns", "exec", name, "ip", "link", "set", ns_end, "up")
        ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name, f"{subnet}.2"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def link(name: str, state: str) -> None:
    """Takes the namespace's end of the veth down or up: a partition, or its end."""
    ends = subprocess.run(
        ["ip", "netns", "exec", name, "ip", "-o", "link", "show", "type", "veth"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    device = re.search(r"^\d+: (\S+?)@", ends, re.M)
    assert device, ends
    ip("netns", "exec", name, "ip", "link", "set", device.group(1), state)


def _prefills(proc: Proc) -> int:
    return sum('"rpc": "/tessera.v1.Worker/Prefill"' in line for line in list(proc.lines))


def test_a_partitioned_stage_is_failed_over_and_taken_back(tiny_repo: Path) -> None:
    with (
        namespace() as (netns, address),
        Mesh(
            tiny_repo,
            env={
                "TESSERA_ROUTER_WORKERS": f"{address}:{NS_PORT}",
                "TESSERA_ROUTER_STUCK_STEP_MIN_S": str(OVERDUE_S),
            },
        ) as mesh,
    ):
        mesh.start_router()
        mesh.start_worker("tiny-llama", "0:2")
        mesh.start_worker("tiny-llama", "2:4")
        far = Proc(
            [
                "worker",
                "--model",
                "tiny-llama",
                "--layers",
                "2:4",
                "--host",
                address,
                "--port",
                str(NS_PORT),
                "--repository",
                str(tiny_repo),
            ],
            mesh.env,
            prefix=["ip", "netns", "exec", netns],
        )
        mesh.workers.append(far)
        far.start().wait_ready()
        mesh.wait_model("tiny-llama", chains=2)
        stub = mesh.stub()
        prompts = [GREEDY_PROMPT, "a b c d", "the cat sat", "b c d e"]
        requests = [
            inference_pb2.GenerateRequest(
                model="tiny-llama", prompt=prompts[i % 4], max_new_tokens=200
            )
            for i in range(8)
        ]
        want = {r.prompt: stream_tokens(stub, r) for r in requests[:4]}

        async def cut_mid_stream() -> tuple[list, int, float]:
            running = asyncio.create_task(_streams(mesh.address, requests, 0.0))
            held = 0
            for _ in range(500):  # until the far stage holds rows (bounded)
                held = await asyncio.to_thread(lambda: worker_info(far).live_sessions)
                if held:
                    break
                await asyncio.sleep(0.01)
            link(netns, "down")
            cut = time.monotonic()
            return await running, held, cut

        got, held, cut = asyncio.run(cut_mid_stream())
        assert held > 0, "the far stage held no rows when its link was cut"
        assert [g for g in got if isinstance(g, str)] == []  # nothing accepted was lost
        assert [want[r.prompt] for r in requests] == got
        assert mesh.router is not None
        moved = [line for line in mesh.router.lines if "lost a stage" in line]
        assert moved and f"{address}:{NS_PORT}" in moved[0], moved
        stuck_at = _logged_at(moved[0])
        assert stuck_at - cut <= STUCK_TIMEOUT_S + 1.0, (stuck_at - cut, moved[0])

        # The link comes back: the worker is admitted again and takes new work. A check of it
        # refused while it was cut off is made again after a backoff of up to MAX_RETRY_S, and
        # an admission's calls take up to admission_timeout_s (10 s) each on a loaded machine.
        link(netns, "up")
        try:
            mesh.wait_model("tiny-llama", chains=2, timeout=MAX_RETRY_S + 3 * 10.0 + 5.0)
        except TimeoutError:
            about = [line for line in mesh.router.lines if f"{address}:{NS_PORT}" in line]
            raise AssertionError("not taken back:\n" + "\n".join(about[-40:])) from None
        before = _prefills(far)
        deadline = time.monotonic() + 30
        while _prefills(far) == before and time.monotonic() < deadline:
            stream_tokens(stub, requests[0])
        assert _prefills(far) > before, "the far worker took no work after its link came back"


def _logged_at(line: str) -> float:
    """A JSON log line's timestamp as this machine's monotonic clock reads it."""
    stamp = re.search(r'"ts": "([^"]+)Z"', line)
    assert stamp, line
    wall = datetime.fromisoformat(stamp.group(1)).replace(tzinfo=UTC).timestamp()
    return time.monotonic() - (time.time() - wall)
