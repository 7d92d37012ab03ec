"""`tessera bench`: start a local mesh, measure every path against the in-process limit, report.

The mesh (all child processes, every server on port 0):

    memcached ─┐
    router-plain (no cache)  ◀── all-minilm-l6-v2 replica, smollm2-135m-instruct replica
    router-cache (--cache)   ◀── the same two workers (they register with both routers)
    router-chain (no cache)  ◀── smollm2-135m-instruct stages [0,15) and [15,30)
    echo (bare grpc.aio health server: the round-trip floor)

Misses go through routers without a cache, so every request does the work; cache hits go through
router-cache after its keys were warmed. The chain has its own router so "router -> replica" and
"router -> 2-stage chain" each measure one kind of chain. Lines run one after another (never two
at once), so an idle worker costs only its heartbeats. The in-process limits load the same models
in this process with the workers' torch thread count and run while the mesh is idle.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.bench import load, report, workload
from services.bench.load import Outcome, closed_loop
from services.bench.procs import Child, ChildFailed, Fleet
from services.bench.report import (
    BARE,
    CACHE,
    CHAIN,
    DIRECT,
    EMBED_1,
    EMBED_16,
    EMBED_MIXED,
    FLOOR,
    FOUR_NEW,
    GENERATE,
    KSERVE,
    LIMIT,
    LIMIT_1,
    MIXED,
    ROUTER,
    ROUTER_BF16,
    ROUTER_HEALTH,
    Row,
)
from services.common.repository import model_spec
from services.common.server import CHANNEL_OPTIONS
from services.common.tensors import from_numpy
from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc, worker_pb2

ENCODER = "all-minilm-l6-v2"
LLM = "smollm2-135m-instruct"
PHASES = ("floor", "embed", "generate")
START_TIMEOUT_S = 300.0


@dataclass
class Options:
    seconds: float
    threads: int
    max_new_tokens: int
    repository: str
    out: Path
    quick: bool
    phases: tuple[str, ...]
    omp_wait_policy: str = "passive"
    embed_concurrency: tuple[int, ...] = (1, 16, 64)
    embed16_concurrency: int = 8
    streams: tuple[int, ...] = (1, 16, 64)
    text_pool: int = 8192
    hit_pool: int = 512
    prompt_pool: int = 2048

    @property
    def cores(self) -> int:
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:
            return os.cpu_count() or 1


# The direct-to-worker line at c=64 keeps exactly the default max_outstanding (64) calls on the
# worker; a router's periodic admission probe then finds it full and drops the worker for the
# lines that follow. The bench measures the data path, so its workers take more in flight.
BENCH_ENV = {"TESSERA_WORKER_MAX_OUTSTANDING": "256"}


def omp_env(options: Options) -> dict[str, str]:
    """OMP_WAIT_POLICY for the workers; this process sets the same before torch loads."""
    if options.omp_wait_policy == "inherit":
        return {}
    return {"OMP_WAIT_POLICY": options.omp_wait_policy.upper()}


def options_from_args(args: argparse.Namespace) -> Options:
    # PASSIVE by default: the bench puts its load generator, routers, workers and the in-process
    # limit on one small machine, where spinning OpenMP threads starve each other (a 32-token
    # generate took 72 s instead of 4 s with 2 threads on a busy 2-core box).
    policy = getattr(args, "omp_wait_policy", None) or "passive"
    if policy != "inherit":
        # libgomp reads this when torch loads: the in-process limit must spin (or not) as the
        # workers do.
        if "torch" in sys.modules:
            raise SystemExit("tessera bench: --omp-wait-policy must be set before torch loads")
        os.environ["OMP_WAIT_POLICY"] = policy.upper()
    import torch

    quick = bool(args.quick)
    seconds = args.seconds if args.seconds is not None else (1.5 if quick else 8.0)
    out = (
        Path(args.out)
        if args.out
        else Path("bench-results", f"bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    )
    phases = tuple(args.only) if args.only else PHASES
    options = Options(
        seconds=seconds,
        threads=args.threads or torch.get_num_threads(),
        max_new_tokens=args.max_new_tokens or (16 if quick else 32),
        repository=str(Path(args.repository).resolve()),
        out=out,
        quick=quick,
        phases=phases,
        omp_wait_policy=policy,
    )
    if quick:
        options.text_pool, options.hit_pool, options.prompt_pool = 2048, 256, 256
        options.streams = (1, 4)
    return options


def _say(message: str) -> None:
    print(message, flush=True)


# -- the mesh -------------------------------------------------------------------------------


@dataclass
class Mesh:
    echo: Child
    plain: Child
    cache: Child
    chain: Child | None
    encoder: Child | None
    bf16: Child | None  # a router with one bfloat16 MiniLM replica of its own
    encoder_bf16: Child | None
    replica: Child | None
    stages: list[Child]


def start_mesh(fleet: Fleet, options: Options, cache_address: str) -> Mesh:
    deadline = time.monotonic() + START_TIMEOUT_S
    want_embed = "embed" in options.phases or "floor" in options.phases
    want_generate = "generate" in options.phases
    echo = fleet.echo()
    plain = fleet.router("router-plain")
    cache = fleet.router("router-cache", cache=[cache_address])
    chain = fleet.router("router-chain") if want_generate else None
    bf16 = fleet.router("router-bf16") if want_embed else None
    for child in (echo, plain, cache, chain, bf16):
        if child is not None:
            child.wait_ready(deadline)
    both = [plain.address, cache.address]
    encoder = (
        fleet.worker("worker-minilm", ENCODER, both, threads=options.threads)
        if want_embed
        else None
    )
    encoder_bf16 = (
        fleet.worker(
            "worker-minilm-bf16",
            ENCODER,
            [bf16.address],
            threads=options.threads,
            precision="bfloat16",
        )
        if bf16 is not None
        else None
    )
    replica = stages = None
    if want_generate:
        assert chain is not None
        layers = model_spec(Path(options.repository), LLM).num_layers
        half = layers // 2
        replica = fleet.worker("worker-smollm-replica", LLM, both, threads=options.threads)
        stages = [
            fleet.worker(
                f"worker-smollm-{span}", LLM, [chain.address], layers=span, threads=options.threads
            )
            for span in (f"0:{half}", f"{half}:{layers}")
        ]
    return Mesh(echo, plain, cache, chain, encoder, bf16, encoder_bf16, replica, stages or [])


def wait_workers(mesh: Mesh) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    for child in (mesh.encoder, mesh.encoder_bf16, mesh.replica, *mesh.stages):
        if child is not None:
            child.wait_ready(deadline)


async def wait_model(
    channel: aio.Channel, model: str, fleet: Fleet, timeout: float = START_TIMEOUT_S
) -> None:
    """Until the router reports SERVING for the model with a healthy chain."""
    health = health_pb2_grpc.HealthStub(channel)
    stub = inference_pb2_grpc.InferenceStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fleet.check_alive()
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=model), timeout=1.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                listed = await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=2.0)
                if any(m.name == model and any(c.healthy for c in m.chains) for m in listed.models):
                    return
        except aio.AioRpcError:
            pass
        await asyncio.sleep(0.2)
    raise ChildFailed(f"a router did not serve {model} within {timeout:.0f} s")


# -- measuring ------------------------------------------------------------------------------


class Bench:
    def __init__(self, options: Options, fleet: Fleet) -> None:
        self.options = options
        self.fleet = fleet
        self.rows: list[Row] = []
        self.grpc_cpu_s = 0.0
        self.grpc_wall_s = 0.0
        self._next_index = 0
        self.mesh: Mesh | None = None
        self.crashed: dict[str, int | None] = {}

    def _dead(self, needs: Sequence[Child]) -> str:
        """Which needed services have exited (noted once in self.crashed), '' if none."""
        dead = []
        for child in needs:
            if not child.alive:
                code = child.popen.returncode if child.popen is not None else None
                if child.name not in self.crashed:
                    self.crashed[child.name] = code
                    _say(
                        f"  !! {child.name} exited with {code}; its log: "
                        f"{child.log_path or '(none)'}"
                    )
                dead.append(f"{child.name} exited ({code})")
        return ", ".join(dead)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        conc = "-" if row.concurrency is None else row.concurrency
        ttft = f" ttft p50 {row.ttft_p50_ms:.1f} ms" if row.ttft_p50_ms is not None else ""
        cpu = f" gen cpu {row.cpu_share * 100:.0f}%" if row.cpu_share is not None else ""
        errors = f" ERRORS {row.errors} {row.error_kinds}" if row.errors else ""
        _say(
            f"  {row.scenario:10s} {row.path:26s} c={conc!s:3s} {row.requests:6d} reqs "
            f"{row.items_s:9.1f} {row.unit}/s  p50 {row.p50_ms:8.2f} ms  "
            f"p99 {row.p99_ms:8.2f} ms{ttft}{cpu}{errors}" + (f"  [{row.note}]" if row.note else "")
        )
        return row

    async def grpc_line(
        self,
        scenario: str,
        path: str,
        call: load.Call,
        *,
        concurrency: int,
        unit: str,
        items_per_request: float,
        group: str | None,
        warmup: int | None = None,
        seconds: float | None = None,
        min_requests: int = 0,
        note: str = "",
        needs: Sequence[Child] = (),
    ) -> Row:
        dead = self._dead(needs)
        if dead:  # a line whose services died is reported as skipped, the run goes on
            return self.add(
                self._row(
                    scenario,
                    path,
                    concurrency,
                    Outcome(),
                    unit=unit,
                    items_per_request=items_per_request,
                    group=group,
                    note=f"skipped: {dead}",
                )
            )
        warm = concurrency if warmup is None else warmup
        if warm:
            await closed_loop(
                call,
                concurrency=min(concurrency, warm),
                seconds=0,
                min_requests=warm,
                start_index=self._take(warm),
            )
        before = self.fleet.cpu_snapshot()
        outcome = await closed_loop(
            call,
            concurrency=concurrency,
            seconds=self.options.seconds if seconds is None else seconds,
            min_requests=max(min_requests, concurrency),
            start_index=self._take(0),
        )
        cpu = report.cpu_per_request_ms(before, self.fleet.cpu_snapshot(), len(outcome.latencies_s))
        self._next_index += len(outcome.latencies_s) + outcome.errors
        self.grpc_cpu_s += outcome.cpu_s
        self.grpc_wall_s += outcome.wall_s
        if cpu:
            shown = ", ".join(f"{name} {ms:.2f}" for name, ms in list(cpu.items())[:3])
            note = f"cpu ms/req: {shown}" + (f"; {note}" if note else "")
        dead = self._dead(needs)
        if dead:
            note = f"DIED during the line: {dead}; {note}"
        row = self._row(
            scenario,
            path,
            concurrency,
            outcome,
            unit=unit,
            items_per_request=items_per_request,
            group=group,
            cpu_share=outcome.cpu_share(self.options.cores),
            note=note,
        )
        row.service_cpu_ms = cpu
        return self.add(row)

    def _take(self, count: int) -> int:
        start = self._next_index
        self._next_index += count
        return start

    @staticmethod
    def _row(
        scenario: str,
        path: str,
        concurrency: int | None,
        outcome: Outcome,
        *,
        unit: str,
        items_per_request: float,
        group: str | None,
        cpu_share: float | None = None,
        is_limit: bool = False,
        note: str = "",
    ) -> Row:
        return report.make_row(
            scenario,
            path,
            concurrency,
            latencies_s=outcome.latencies_s,
            items=outcome.items,
            wall_s=outcome.wall_s,
            unit=unit,
            items_per_request=items_per_request,
            ttfts_s=outcome.ttfts_s,
            errors=outcome.errors,
            cpu_share=cpu_share,
            group=group,
            is_limit=is_limit,
            note=note,
            error_kinds=dict(outcome.error_kinds),
        )

    # -- floor ------------------------------------------------------------------------------

    async def floor(self, echo: aio.Channel, router: aio.Channel) -> None:
        _say("floor: bare grpc.aio unary round trips at concurrency 1")
        assert self.mesh is not None
        for path, channel, note, needs in (
            (BARE, echo, "health Check on a bare grpc.aio server", [self.mesh.echo]),
            (ROUTER_HEALTH, router, "health Check on the router", [self.mesh.plain]),
        ):
            await self.grpc_line(
                FLOOR,
                path,
                load.health_call(channel),
                concurrency=1,
                unit="calls",
                items_per_request=1,
                group=None,
                warmup=50,
                min_requests=200,
                note=note,
                needs=needs,
            )

    # -- embed ------------------------------------------------------------------------------

    async def overhead(self, direct: load.Call, router: load.Call, bare: load.Call) -> None:
        """Router overhead at concurrency 1, measured interleaved so machine noise hits both.

        One round = one direct Forward, one router Embed (different texts), one bare round trip.
        """
        assert self.mesh is not None and self.mesh.encoder is not None
        if self._dead([self.mesh.echo, self.mesh.plain, self.mesh.encoder]):
            return
        latencies: dict[str, list[float]] = {"direct": [], "router": [], "bare": []}
        calls = (("direct", direct), ("router", router), ("bare", bare))
        errors = 0
        started = time.perf_counter()
        rounds = 0
        while rounds < 100 or time.perf_counter() - started < self.options.seconds:
            for name, call in calls:
                sent = time.perf_counter()
                try:
                    await call(self._take(1))
                except (aio.AioRpcError, load.BadResponse):
                    errors += 1
                    continue
                latencies[name].append(time.perf_counter() - sent)
            rounds += 1
        p50 = {k: report.percentile(v, 50) * 1e3 for k, v in latencies.items()}
        overhead = p50["router"] - p50["direct"]
        self.add(
            Row(
                scenario=FLOOR,
                path=report.OVERHEAD,
                concurrency=1,
                requests=rounds,
                wall_s=time.perf_counter() - started,
                req_s=float("nan"),
                items_s=float("nan"),
                unit="calls",
                p50_ms=overhead,
                p99_ms=float("nan"),
                errors=errors,
                note=f"{rounds} interleaved rounds: router Embed p50 {p50['router']:.2f} - "
                f"direct Forward p50 {p50['direct']:.2f} ms (bare p50 "
                f"{p50['bare']:.2f} ms in the same rounds)",
            )
        )

    async def embed(
        self,
        plain: aio.Channel,
        cached: aio.Channel,
        worker: aio.Channel,
        echo: aio.Channel,
        plain_address: str,
        bf16: aio.Channel | None,
    ) -> None:
        from services.bench.limits import (
            EmbedLimit,
            grouped_batches,
            length_sorted_batches,
            single_rows,
        )
        from services.router.frontends import ModelFrontend

        o = self.options
        spec = model_spec(Path(o.repository), ENCODER)
        frontend = ModelFrontend(spec)
        pool = workload.texts(o.text_pool, seed=1)
        ids = frontend.encode_texts(pool)
        hit_texts = workload.texts(o.hit_pool, seed=2, start=10**6)
        fresh = workload.texts(o.text_pool, seed=7, start=2 * 10**6)
        limit = EmbedLimit(spec.path)

        def embed_request(texts: list[str]) -> inference_pb2.EmbedRequest:
            # Packed, as the tessera SDK asks (a router without packed answers embeddings).
            return inference_pb2.EmbedRequest(model=ENCODER, inputs=texts, packed=True)

        # Requests, built before any clock starts.
        router_x1 = [embed_request([t]) for t in pool]
        direct_x1 = [
            (
                worker_pb2.StageForwardRequest(
                    input_ids=from_numpy(np.asarray([row], dtype=np.int64)), pool=True
                ),
                1,
            )
            for row in ids
        ]
        hits_x1 = [embed_request([t]) for t in hit_texts]
        groups = [list(range(i, i + 16)) for i in range(0, len(pool) - 15, 16)]
        router_x16 = [embed_request([pool[i] for i in g]) for g in groups]
        direct_x16 = []
        for g in groups:
            width = max(len(ids[i]) for i in g)
            batch = np.full((16, width), frontend.pad_id, dtype=np.int64)
            mask = np.zeros((16, width), dtype=np.int64)
            for row, i in enumerate(g):
                batch[row, : len(ids[i])] = ids[i]
                mask[row, : len(ids[i])] = 1
            direct_x16.append(
                (
                    worker_pb2.StageForwardRequest(
                        input_ids=from_numpy(batch), attention_mask=from_numpy(mask), pool=True
                    ),
                    16,
                )
            )
        hits_x16 = [embed_request(hit_texts[i : i + 16]) for i in range(0, len(hit_texts) - 15, 16)]

        # Warm the cache router's keys (every hit text, 32 per request).
        warm_stub = inference_pb2_grpc.InferenceStub(cached)
        await asyncio.gather(
            *(
                warm_stub.Embed(embed_request(hit_texts[i : i + 32]), timeout=120)
                for i in range(0, len(hit_texts), 32)
            )
        )

        tokens = [len(r) for r in ids]
        _say(
            f"embed {ENCODER}: {len(pool)} distinct texts, {min(tokens)}-{max(tokens)} tokens "
            f"(mean {sum(tokens) / len(tokens):.1f}); torch threads {o.threads}"
        )
        self.add(
            self._row(
                EMBED_1,
                f"{LIMIT} (batch 32)",
                None,
                limit.measure(length_sorted_batches(ids, 32, frontend.pad_id), seconds=o.seconds),
                unit="texts",
                items_per_request=1,
                group=EMBED_1,
                is_limit=True,
                note="reqs = batched calls of 32 length-sorted texts",
            )
        )
        self.add(
            self._row(
                EMBED_1,
                LIMIT_1,
                1,
                limit.measure(single_rows(ids, 512, frontend.pad_id), seconds=o.seconds),
                unit="texts",
                items_per_request=1,
                group=None,
                note="one pre-tokenized text per call: the c=1 latency reference",
            )
        )
        assert self.mesh is not None and self.mesh.encoder is not None
        m, encoder = self.mesh, self.mesh.encoder
        needs = {
            DIRECT: [encoder],
            ROUTER: [m.plain, encoder],
            KSERVE: [m.plain, encoder],
            CACHE: [m.cache, encoder],
            ROUTER_BF16: [c for c in (m.bf16, m.encoder_bf16) if c is not None],
        }
        kserve = await self._kserve(plain_address, pool)
        lines: list[tuple[str, load.Call | None]] = [
            (DIRECT, load.forward_call(worker, direct_x1)),
            (ROUTER, load.embed_call(plain, router_x1)),
            (KSERVE, kserve[0] if kserve else None),
            (CACHE, load.embed_call(cached, hits_x1, expect_cached=True)),
        ]
        if bf16 is not None:
            # The same texts through a router whose one replica runs in bfloat16; its ratio is
            # to the float32 limit, and it sits next to the float32 router line.
            lines.insert(2, (ROUTER_BF16, load.embed_call(bf16, router_x1)))
        try:
            for path, call in lines:
                for c in o.embed_concurrency:
                    if call is None:
                        self.add(
                            self._row(
                                EMBED_1,
                                path,
                                c,
                                Outcome(),
                                unit="texts",
                                items_per_request=1,
                                group=EMBED_1,
                                note="skipped: tritonclient is not importable here",
                            )
                        )
                        continue
                    await self.grpc_line(
                        EMBED_1,
                        path,
                        call,
                        concurrency=c,
                        unit="texts",
                        items_per_request=1,
                        group=EMBED_1,
                        min_requests=100 if c == 1 else 0,
                        needs=needs[path],
                    )
        finally:
            if kserve:
                await kserve[1]()

        await self.overhead(
            load.forward_call(worker, direct_x1),
            load.embed_call(plain, router_x1),
            load.health_call(echo),
        )
        await self.mixed(cached, hit_texts, fresh)

        c = o.embed16_concurrency
        self.add(
            self._row(
                EMBED_16,
                f"{LIMIT} (batch 16)",
                None,
                limit.measure(grouped_batches(ids, groups, frontend.pad_id), seconds=o.seconds),
                unit="texts",
                items_per_request=16,
                group=EMBED_16,
                is_limit=True,
                note="reqs = batched calls, one per request's 16 texts",
            )
        )
        for path, call16 in (
            (DIRECT, load.forward_call(worker, direct_x16)),
            (ROUTER, load.embed_call(plain, router_x16)),
            (CACHE, load.embed_call(cached, hits_x16, expect_cached=True)),
        ):
            await self.grpc_line(
                EMBED_16,
                path,
                call16,
                concurrency=c,
                unit="texts",
                items_per_request=16,
                group=EMBED_16,
                needs=needs[path],
            )
        del limit

    async def _kserve(
        self, address: str, texts: list[str]
    ) -> tuple[load.Call, Callable[[], Awaitable[None]]] | None:
        """tritonclient's ModelInfer on the plain router, one text per request; None when
        tritonclient cannot be used in this process."""
        if "services.pb.kserve.grpc_predict_v2_pb2" in sys.modules:
            return None  # its generated messages would clash with tritonclient's
        try:
            return load.kserve_call(address, ENCODER, texts)
        except ImportError:
            return None

    async def mixed(self, cached: aio.Channel, hit_texts: list[str], fresh: list[str]) -> None:
        """A 64-text Embed of which 60 texts are cached against a 4-text Embed of new texts,
        on the cache router at concurrency 1, interleaved so machine noise hits both."""
        assert self.mesh is not None and self.mesh.encoder is not None
        needs = [self.mesh.cache, self.mesh.encoder]
        rounds = max(20, min(len(fresh) // 8, 400))
        mixed = [
            inference_pb2.EmbedRequest(
                model=ENCODER,
                inputs=[hit_texts[(r * 60 + i) % len(hit_texts)] for i in range(60)]
                + fresh[8 * r : 8 * r + 4],
                packed=True,
            )
            for r in range(rounds)
        ]
        four = [
            inference_pb2.EmbedRequest(
                model=ENCODER, inputs=fresh[8 * r + 4 : 8 * r + 8], packed=True
            )
            for r in range(rounds)
        ]
        if self._dead(needs):
            return
        stub = inference_pb2_grpc.InferenceStub(cached)
        latencies: dict[str, list[float]] = {MIXED: [], FOUR_NEW: []}
        errors: dict[str, int] = {MIXED: 0, FOUR_NEW: 0}
        started = time.perf_counter()
        done = 0
        for r in range(rounds):
            if done >= 50 and time.perf_counter() - started > self.options.seconds:
                break
            for name, request, want_cached in ((MIXED, mixed[r], 60), (FOUR_NEW, four[r], 0)):
                sent = time.perf_counter()
                try:
                    reply = await stub.Embed(request, timeout=load.RPC_TIMEOUT_S)
                except aio.AioRpcError:
                    errors[name] += 1
                    continue
                took = time.perf_counter() - sent
                if reply.cached_inputs != want_cached:
                    errors[name] += 1
                    continue
                latencies[name].append(took)
            done += 1
        wall = time.perf_counter() - started
        p50 = {k: report.percentile(v, 50) * 1e3 for k, v in latencies.items()}
        for name in (MIXED, FOUR_NEW):
            texts = 64 if name == MIXED else 4
            row = report.make_row(
                EMBED_MIXED,
                name,
                1,
                latencies_s=latencies[name],
                items=texts * len(latencies[name]),
                wall_s=wall,
                unit="texts",
                items_per_request=texts,
                errors=errors[name],
                note=(
                    f"{done} interleaved rounds on the cache router; p50 ratio "
                    f"{p50[MIXED] / p50[FOUR_NEW]:.2f}"
                    if name == MIXED and latencies[FOUR_NEW]
                    else f"{done} interleaved rounds; new texts every round"
                ),
            )
            self.add(row)

    # -- generate ---------------------------------------------------------------------------

    async def generate(self, replica: aio.Channel, chain: aio.Channel, cached: aio.Channel) -> None:
        from services.bench.limits import GenerateLimit
        from services.router.frontends import ModelFrontend

        o = self.options
        spec = model_spec(Path(o.repository), LLM)
        frontend = ModelFrontend(spec)
        texts = workload.prompts(o.prompt_pool, seed=3)
        prompt_ids = [frontend.encode_chat([("user", t)]) for t in texts]
        limit = GenerateLimit(spec.path, frontend.eos_token_ids, frontend.pad_id)

        def request(text: str, max_new: int) -> inference_pb2.GenerateRequest:
            return inference_pb2.GenerateRequest(
                model=LLM,
                messages=[inference_pb2.ChatMessage(role="user", content=text)],
                max_new_tokens=max_new,
                temperature=0.0,
            )

        requests = [request(t, o.max_new_tokens) for t in texts]
        warm = [request(t, 2) for t in workload.prompts(32, seed=4, start=10**6)]
        hit = request("Write a long, detailed story about the bench itself.", o.max_new_tokens)
        lengths = [len(p) for p in prompt_ids]
        _say(
            f"generate {LLM}: greedy, max_new_tokens {o.max_new_tokens}, prompts "
            f"{min(lengths)}-{max(lengths)} tokens; torch threads {o.threads}"
        )
        for channel in (replica, chain):  # one short generation per chain, outside the clock
            await closed_loop(
                load.generate_stream_call(channel, warm), concurrency=2, seconds=0, min_requests=4
            )
        gen_seconds = o.seconds
        min_calls = 1 if o.quick else 2
        for n in o.streams:
            self.add(
                self._row(
                    GENERATE,
                    LIMIT,
                    n,
                    limit.measure(
                        prompt_ids,
                        batch=n,
                        max_new_tokens=o.max_new_tokens,
                        seconds=gen_seconds,
                        min_calls=min_calls,
                    ),
                    unit="tokens",
                    items_per_request=o.max_new_tokens,
                    group=f"{GENERATE} c{n}",
                    is_limit=True,
                    note=f"one generate() on {n} prompts",
                )
            )
        assert (
            self.mesh is not None and self.mesh.replica is not None and self.mesh.chain is not None
        )
        m, replica_child, chain_child = self.mesh, self.mesh.replica, self.mesh.chain
        needs = {
            ROUTER: [m.plain, replica_child],
            CHAIN: [chain_child, *m.stages],
            CACHE: [m.cache, replica_child],
        }
        for path, channel in ((ROUTER, replica), (CHAIN, chain)):
            call = load.generate_stream_call(channel, requests)
            for n in o.streams:
                await self.grpc_line(
                    GENERATE,
                    path,
                    call,
                    concurrency=n,
                    unit="tokens",
                    items_per_request=o.max_new_tokens,
                    group=f"{GENERATE} c{n}",
                    warmup=0,
                    seconds=gen_seconds,
                    min_requests=n * min_calls,
                    needs=needs[path],
                )
        # The cache hit: one miss fills the key, then the same request again and again.
        fill = await closed_loop(
            load.generate_stream_call(cached, [hit]), concurrency=1, seconds=0, min_requests=1
        )
        miss_ms = fill.latencies_s[0] * 1e3 if fill.latencies_s else float("nan")
        await self.grpc_line(
            GENERATE,
            CACHE,
            load.generate_stream_call(cached, [hit], expect_cached=True),
            concurrency=1,
            unit="tokens",
            items_per_request=o.max_new_tokens,
            group=f"{GENERATE} c1",
            warmup=20,
            min_requests=100,
            note=f"same request repeated; its miss took {miss_ms:.0f} ms",
            needs=needs[CACHE],
        )
        del limit


async def measure(bench: Bench, mesh: Mesh) -> None:
    import torch

    options, fleet = bench.options, bench.fleet
    bench.mesh = mesh
    torch.set_num_threads(options.threads)  # the in-process limits run as the workers do
    channels: list[aio.Channel] = []

    def channel(child: Child, keepalive: bool = True) -> aio.Channel:
        # The bare echo server keeps gRPC's default ping policy: no keepalive towards it.
        ch = aio.insecure_channel(child.address, options=CHANNEL_OPTIONS if keepalive else ())
        channels.append(ch)
        return ch

    try:
        plain, cached = channel(mesh.plain), channel(mesh.cache)
        bf16 = channel(mesh.bf16) if mesh.bf16 is not None else None
        if mesh.encoder is not None:
            await wait_model(plain, ENCODER, fleet)
            await wait_model(cached, ENCODER, fleet)
        if bf16 is not None:
            await wait_model(bf16, ENCODER, fleet)
        if mesh.replica is not None and mesh.chain is not None:
            chain = channel(mesh.chain)
            await wait_model(plain, LLM, fleet)
            await wait_model(cached, LLM, fleet)
            await wait_model(chain, LLM, fleet)
        _say(
            f"mesh ready: routers plain {mesh.plain.address}, cache {mesh.cache.address}"
            + (f", chain {mesh.chain.address}" if mesh.chain else "")
        )
        echo = channel(mesh.echo, keepalive=False)
        if "floor" in options.phases:
            await bench.floor(echo, plain)
        if "embed" in options.phases and mesh.encoder is not None:
            await bench.embed(plain, cached, channel(mesh.encoder), echo, mesh.plain.address, bf16)
        if "generate" in options.phases and mesh.replica is not None:
            await bench.generate(plain, chain, cached)
    finally:
        for ch in channels:
            await ch.close()


def _order(rows: Sequence[Row]) -> list[Row]:
    """Table order: embed x1, embed x16, generate, floor (stable within a scenario)."""
    rank = {EMBED_1: 0, EMBED_MIXED: 1, EMBED_16: 2, GENERATE: 3, FLOOR: 4}
    return sorted(rows, key=lambda r: rank.get(r.scenario, 9))


# The CPU features that decide bfloat16 and int8 speed (AMX tiles, AVX-512 BF16 and VNNI).
SPEED_FLAGS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f")


def cpu_flags(cpuinfo: str | None = None) -> dict[str, bool]:
    """Which of SPEED_FLAGS the CPU has (/proc/cpuinfo's first `flags` line)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            break
    return {flag: flag in flags for flag in SPEED_FLAGS}


def load_average() -> tuple[float, float, float] | None:
    """The machine's 1, 5 and 15 minute load averages (the bench shares the machine)."""
    try:
        return os.getloadavg()
    except OSError:
        return None


def _meta(options: Options, started: datetime, elapsed: float) -> dict[str, Any]:
    import grpc
    import torch
    import transformers

    return {
        "started": started.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "host": platform.node(),
        "cores": options.cores,
        "torch_threads": options.threads,
        "seconds_per_line": options.seconds,
        "quick": options.quick,
        "max_new_tokens": options.max_new_tokens,
        "phases": list(options.phases),
        "cpu_flags": cpu_flags(),
        "load_average_end": load_average(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset: libgomp default)"),
        "models": {"embed": ENCODER, "generate": LLM},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "grpc": grpc.__version__,
        },
        "layout": "routers: plain (no cache: replicas), cache (--cache: same replicas), "
        "chain (no cache: 2 stages); lines run one at a time",
    }


def run(options: Options) -> int:
    from services.cache.launcher import MemcachedNode, free_port

    started, t0 = datetime.now(), time.monotonic()
    load_at_start = load_average()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    fleet = Fleet(
        options.repository,
        log_dir=options.out.with_name(options.out.stem + "-logs"),
        env={**omp_env(options), **BENCH_ENV},
    )
    bench = Bench(options, fleet)
    node: MemcachedNode | None = None
    aborted = ""
    try:
        _say(
            f"tessera bench: {options.cores} cores, torch threads {options.threads}, "
            f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
            f"{options.seconds:g} s per line{' (quick)' if options.quick else ''}; "
            f"service logs in {fleet.log_dir}"
        )
        flags = cpu_flags()
        _say(
            "cpu flags: "
            + " ".join(f"{name}={'yes' if have else 'no'}" for name, have in flags.items())
            + (f"; load average {load_at_start[0]:.2f}" if load_at_start else "")
        )
        node = MemcachedNode().start(port=free_port())
        mesh = start_mesh(fleet, options, node.address)
        _say("starting workers (model loads take a while on a small machine)...")
        wait_workers(mesh)
        asyncio.run(measure(bench, mesh))
    except ChildFailed as exc:
        aborted = str(exc)
        print(f"tessera bench: {exc}", file=sys.stderr, flush=True)
        if not bench.rows:
            return 1
    except KeyboardInterrupt:
        print("tessera bench: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            fleet.stop_all()
            if node is not None:
                node.stop()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)

    rows = _order(bench.rows)
    if report.find(rows, FLOOR, report.OVERHEAD) is None:
        overhead = report.overhead_row(rows)
        if overhead is not None:
            rows.append(overhead)
    report.apply_ratios(rows)
    targets = report.evaluate_targets(rows)
    print()
    print(report.format_table(rows))
    print()
    share = (
        bench.grpc_cpu_s / (bench.grpc_wall_s * options.cores)
        if bench.grpc_wall_s > 0
        else float("nan")
    )
    print(
        f"load generator (this process, grpc.aio, one event loop): {share * 100:.0f}% of "
        f"{options.cores} cores over all gRPC lines ({bench.grpc_cpu_s:.1f} CPU-s in "
        f"{bench.grpc_wall_s:.1f} s)"
    )
    print(report.format_targets(targets))
    meta = _meta(options, started, time.monotonic() - t0)
    meta["load_generator_cpu_share"] = share
    meta["load_average_start"] = load_at_start
    end_load = meta.get("load_average_end")
    if end_load:
        print(
            f"machine load average: {load_at_start[0] if load_at_start else float('nan'):.2f} "
            f"at the start, {end_load[0]:.2f} at the end (1 minute)"
        )
    if bench.crashed:
        meta["crashed"] = bench.crashed
        print(
            f"\nINCOMPLETE: services exited during the run: {bench.crashed} "
            f"(logs in {fleet.log_dir})"
        )
    if aborted:
        meta["aborted"] = aborted.splitlines()[0]
        print(f"\nINCOMPLETE: the run stopped early: {meta['aborted']} (logs in {fleet.log_dir})")
    path = report.write_json(options.out, report.to_document(rows, meta, targets))
    print(f"\nwrote {path}")
    errors = sum(r.errors for r in rows)
    return 1 if errors or aborted or bench.crashed else 0


def main(args: argparse.Namespace) -> int:
    return run(options_from_args(args))
