"""Generation side by side in one run: served streams vs transformers' own batched generate.

    python -m services.bench.generation [--quick] [--prefill] [--peer DIR] [--chain SPANS]
                                        [--out FILE]

Two meshes, one after the other (never both loaded at once): a router with one SmolLM2 replica
(torch threads = cores) and a router with a two-stage chain [0,15) [15,30) (threads = cores / 2
each, so the chain uses the same cores; `--chain 0:19,19:30` runs other spans). The in-process
limit is `model.generate` of the same prompts, greedy, with the replica's thread count, run in this
process between the served measurements while the mesh is idle, so each ratio pairs runs made
minutes apart at most. Tokens are counted up to and including each row's first end-of-sequence
token on both sides.

The last 16-stream run on each mesh is split per stage into compute, queue, transport and waiting
(services/bench/split.py, from the workers' and the router's step-time metrics).

With --peer DIR (what `../shared/tools/build_llamacpp.sh DIR` built: llama.cpp's llama-server and
SmolLM2 as an F32 GGUF), llama-server serves the same prompts on the same cores after the two
meshes (services/bench/peer.py), and the replica and chain are reported against it.

With --prefill it then runs, each on its own fresh mesh, the prefix-reuse chat
(services.bench.prefix: turn 3's time to first token over its cold twin) and the chunked-prefill
scenario (services.bench.chunked: running streams' worst gap while a 3,000-token prompt is
prefilled, one pass vs 128-token chunks), and reports them with the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import torch
from grpc import aio

from services.bench.limits import GenerateLimit, left_pad
from services.bench.procs import Fleet
from services.bench.split import describe, snapshot, split
from services.common.repository import model_spec
from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc
from services.router.frontends import ModelFrontend

LLM = "smollm2-135m-instruct"
TOPICS = (
    "the history of the printing press",
    "how bridges carry their load",
    "the life of bees",
    "why the sky is blue",
    "the rules of chess",
    "how a steam engine works",
    "the moon landing",
    "the water cycle",
    "ancient Rome's roads",
    "how vaccines work",
    "volcanoes",
    "the Silk Road",
    "how airplanes fly",
    "the invention of paper",
    "coral reefs",
    "the first computers",
)


def prompts(count: int) -> list[str]:
    return [
        f"Write a long essay about {TOPICS[i % len(TOPICS)]}, part {i // len(TOPICS) + 1}:"
        for i in range(count)
    ]


@dataclass
class StreamRun:
    tokens: int
    seconds: float
    ttft: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


async def streams(address: str, texts: Sequence[str], max_new: int) -> StreamRun:
    """All of `texts` as simultaneous GenerateStream calls; tokens counted from the chunks."""
    async with aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        ttft: list[float] = []
        errors = 0

        async def one(text: str) -> int:
            nonlocal errors
            sent = time.perf_counter()
            count = 0
            try:
                call = stub.GenerateStream(
                    inference_pb2.GenerateRequest(model=LLM, prompt=text, max_new_tokens=max_new),
                    timeout=600,
                )
                async for chunk in call:
                    if chunk.token_ids and count == 0:
                        ttft.append(time.perf_counter() - sent)
                    count += len(chunk.token_ids)
            except grpc.RpcError:
                errors += 1
            return count

        started = time.perf_counter()
        counts = await asyncio.gather(*(one(t) for t in texts))
        return StreamRun(sum(counts), time.perf_counter() - started, ttft, errors)


def p50(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Limit:
    """The in-process reference: transformers' batched generate of the same prompts, loaded
    once, run between served measurements while the mesh is idle (paired, on a machine whose
    speed drifts)."""

    def __init__(
        self, path: Path, frontend: ModelFrontend, texts: list[str], max_new: int, threads: int
    ) -> None:
        torch.set_num_threads(threads)
        self.generate = GenerateLimit(path, frontend.eos_token_ids, frontend.pad_id)
        self.rows = [frontend.encode_prompt(t) for t in texts]
        self.pad_id = frontend.pad_id
        self.max_new = max_new
        self.generate.generate(self.rows[:2], 4)  # warm-up

    def batch_tok_s(self) -> float:
        tokens, seconds, _ = self.generate.generate(self.rows, self.max_new)
        return tokens / seconds

    def solo_tok_s(self) -> float:
        tokens, seconds, _ = self.generate.generate(self.rows[:1], self.max_new)
        return tokens / seconds

    def prefill_s(self) -> float:
        ids, mask = left_pad(self.rows, self.pad_id)
        with torch.inference_mode():
            started = time.perf_counter()
            self.generate.model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
            return time.perf_counter() - started


async def measure_mesh(
    fleet: Fleet, address: str, texts: list[str], max_new: int, repeats: int, limit: Limit
) -> dict[str, object]:
    """Each repeat: one stream, then the in-process batch-1 generate; the 16 streams, then the
    in-process batch generate and batched prefill. Ratios are of the paired medians. The last
    16-stream run's time is split per stage (services/bench/split.py)."""
    await streams(address, texts[:4], 4)  # warm-up
    solo, many, limits = [], [], []
    where: dict[str, object] = {}
    for _ in range(repeats):
        solo.append(await streams(address, texts[:1], max_new))
        limit_solo = limit.solo_tok_s()
        before = snapshot(fleet)
        many.append(await streams(address, texts, max_new))
        where = split(before, snapshot(fleet), many[-1].seconds)
        limits.append((limit_solo, limit.batch_tok_s(), limit.prefill_s()))
    wide = await streams(address, [f"{t} ({i})" for i in range(4) for t in texts], max_new)
    return {
        "solo_tok_s": p50([r.rate for r in solo]),
        "many_tok_s": p50([r.rate for r in many]),
        "ttft_p50_s": p50([x for r in many for x in r.ttft]),
        "ttft_p99_s": max(x for r in many for x in r.ttft),
        "wide_tok_s": wide.rate,
        "wide_errors": wide.errors,
        "many_errors": sum(r.errors for r in many),
        "limit_solo_tok_s": p50([x[0] for x in limits]),
        "limit_batch_tok_s": p50([x[1] for x in limits]),
        "limit_prefill_s": p50([x[2] for x in limits]),
        "split": where,
    }


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure_memory(
    repository: str, frontend: ModelFrontend, threads: int, max_new: int
) -> dict[str, float]:
    """One 4,096-token prompt and 31 short ones at once on a replica whose KV budget fits them
    as two batches (never padded together): the budget holds and peak RSS is reported."""
    long_ids = frontend.encode_prompt(" ".join(["history"] * 4096))[:4096]
    long_text = frontend.decode(long_ids)
    shorts = prompts(31)
    per_token = 2 * 30 * 3 * 64 * 4  # SmolLM2: layers x (K, V) x kv heads x head dim x fp32
    short_len = max(len(frontend.encode_prompt(t)) for t in shorts) + max_new
    budget = (len(long_ids) + 8 + max_new) * per_token + 31 * short_len * per_token
    kv_mb = budget // 2**20 + 8
    env = {
        "OMP_WAIT_POLICY": "PASSIVE",
        "TESSERA_WORKER_MAX_KV_MB": str(kv_mb),
        "TESSERA_ROUTER_MAX_PROMPT_TOKENS": "8192",
    }
    fleet = Fleet(repository, env=env)
    try:
        address = start(fleet, [None], threads)
        worker = next(c for c in fleet.children if c.name.startswith("w"))
        assert worker.popen is not None
        pid = worker.popen.pid
        steady = _status_kib(pid, "VmRSS")
        peak_kv = 0

        async def run() -> StreamRun:
            nonlocal peak_kv
            from services.pb.tessera.v1 import worker_pb2, worker_pb2_grpc

            done = asyncio.Event()

            async def poll() -> None:
                nonlocal peak_kv
                async with aio.insecure_channel(worker.address) as channel:
                    stub = worker_pb2_grpc.WorkerStub(channel)
                    while not done.is_set():
                        info = await stub.Info(worker_pb2.InfoRequest(), timeout=5)
                        peak_kv = max(peak_kv, info.kv_tokens)
                        await asyncio.sleep(0.05)

            poller = asyncio.create_task(poll())
            try:
                return await streams(address, [long_text, *shorts], max_new)
            finally:
                done.set()
                await poller

        result = asyncio.run(run())
        return {
            "kv_budget_mb": kv_mb,
            "peak_kv_mb": peak_kv * per_token / 2**20,
            "rss_before_mb": steady / 1024,
            "peak_rss_mb": _status_kib(pid, "VmHWM") / 1024,
            "errors": result.errors,
            "tokens": result.tokens,
            "seconds": result.seconds,
        }
    finally:
        fleet.stop_all()


def start(
    fleet: Fleet,
    layers: Sequence[str | None],
    threads: int,
    *,
    model: str = LLM,
    precision: str | None = None,
) -> str:
    """A router and workers for `layers` of `model`; returns the router's address once the
    model is healthy on it."""
    tag = f"{len(layers)}-{precision or 'float32'}"
    router = fleet.router(f"router-{tag}")
    router.wait_ready(time.monotonic() + 120)
    workers = [
        fleet.worker(
            f"w{tag}-{i}",
            model,
            [router.address],
            layers=span,
            threads=threads,
            precision=precision,
        )
        for i, span in enumerate(layers)
    ]
    for worker in workers:
        worker.wait_ready(time.monotonic() + 300)
    deadline = time.monotonic() + 60
    with grpc.insecure_channel(router.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        while time.monotonic() < deadline:
            listed = stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
            if any(m.name == model and m.healthy for m in listed.models):
                return router.address
            time.sleep(0.2)
    raise RuntimeError("the mesh did not become healthy")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--repository", default=os.environ.get("TESSERA_MODEL_REPOSITORY", "model-repository")
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--memory", action="store_true", help="only the KV-budget scenario")
    parser.add_argument(
        "--prefill", action="store_true", help="also the prefix-reuse and chunked scenarios"
    )
    parser.add_argument(
        "--chain",
        default="0:15,15:30",
        help="the chain's spans, comma-separated (default: the default mesh's two stages)",
    )
    parser.add_argument("--peer", type=Path, default=None, help="llama.cpp build directory")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    repeats = 1 if args.quick else 3
    spec = model_spec(Path(args.repository), LLM)
    frontend = ModelFrontend(spec)
    texts = prompts(args.streams)
    results: dict[str, object] = {
        "cores": cores,
        "streams": args.streams,
        "max_new_tokens": args.max_new_tokens,
    }
    if args.memory:
        memory = measure_memory(args.repository, frontend, cores, args.max_new_tokens)
        print(
            f"memory: 1 x 4096-token prompt + 31 short, max_kv_mb {memory['kv_budget_mb']}: "
            f"peak KV {memory['peak_kv_mb']:.0f} MiB, worker RSS {memory['rss_before_mb']:.0f} "
            f"-> peak {memory['peak_rss_mb']:.0f} MiB, {memory['errors']} errors, "
            f"{memory['tokens']} tokens in {memory['seconds']:.1f} s"
        )
        return 0 if memory["errors"] == 0 and memory["peak_kv_mb"] <= memory["kv_budget_mb"] else 1
    env = {
        "OMP_WAIT_POLICY": "PASSIVE",
        "TESSERA_ROUTER_METRICS_PORT": "0",
        "TESSERA_WORKER_METRICS_PORT": "0",
    }
    limit = Limit(spec.path, frontend, texts, args.max_new_tokens, cores)
    fleet = Fleet(args.repository, env=env)
    try:
        replica = start(fleet, [None], cores)
        results["replica"] = asyncio.run(
            measure_mesh(fleet, replica, texts, args.max_new_tokens, repeats, limit)
        )
        fleet.stop_all()
        fleet = Fleet(args.repository, env=env)
        spans = args.chain.split(",")
        chain = start(fleet, spans, max(1, cores // len(spans)))
        results["chain"] = asyncio.run(
            measure_mesh(fleet, chain, texts, args.max_new_tokens, repeats, limit)
        )
    finally:
        fleet.stop_all()
    for name in ("replica", "chain"):
        r = results[name]
        assert isinstance(r, dict)
        print(
            f"{name:8s} {args.streams} streams {r['many_tok_s']:.1f} tok/s = "
            f"{r['many_tok_s'] / r['limit_batch_tok_s']:.2f}x in-process batch "
            f"{args.streams} ({r['limit_batch_tok_s']:.1f}), "
            f"{r['many_tok_s'] / r['solo_tok_s']:.1f}x one stream; one stream "
            f"{r['solo_tok_s']:.1f} tok/s = {r['solo_tok_s'] / r['limit_solo_tok_s']:.2f}x "
            f"in-process batch 1 ({r['limit_solo_tok_s']:.1f}); TTFT p50 {r['ttft_p50_s']:.3f} s "
            f"= {r['ttft_p50_s'] / r['limit_prefill_s']:.2f}x batched prefill "
            f"({r['limit_prefill_s']:.3f} s); {4 * args.streams} streams "
            f"{r['wide_tok_s']:.1f} tok/s, {r['wide_errors']} errors"
        )
        split_r = r["split"]
        assert isinstance(split_r, dict)
        print(describe(split_r))
    chain_r, replica_r = results["chain"], results["replica"]
    assert isinstance(chain_r, dict) and isinstance(replica_r, dict)
    print(
        f"chain vs replica at {args.streams} streams: "
        f"{chain_r['many_tok_s'] / replica_r['many_tok_s']:.2f}x"
    )
    if args.peer is not None:
        from services.bench.peer import measure_peer

        peer = measure_peer(
            args.peer / "llama.cpp" / "build" / "bin" / "llama-server",
            args.peer / "smollm2-f32.gguf",
            texts,
            args.max_new_tokens,
            cores,
            repeats,
        )
        results["llama_cpp"] = peer
        print(
            f"llama.cpp's llama-server: {args.streams} streams {peer['many_tok_s']:.1f} tok/s, one "
            f"stream {peer['solo_tok_s']:.1f} tok/s; chain / llama.cpp "
            f"{chain_r['many_tok_s'] / peer['many_tok_s']:.2f}x at {args.streams} streams, "
            f"{chain_r['solo_tok_s'] / peer['solo_tok_s']:.2f}x one stream; replica / llama.cpp "
            f"{replica_r['many_tok_s'] / peer['many_tok_s']:.2f}x, "
            f"{replica_r['solo_tok_s'] / peer['solo_tok_s']:.2f}x"
        )
    code = 0
    if args.prefill:
        code = _prefill_scenarios(args.repository, results, args.quick)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=lambda o: asdict(o)))
    return code


def _prefill_scenarios(repository: str, results: dict[str, object], quick: bool) -> int:
    """The prefix-reuse chat and the chunked-prefill scenario, their summaries into `results`."""
    import tempfile

    from services.bench import chunked, prefix

    with tempfile.TemporaryDirectory() as tmp:
        prefix_out, chunked_out = Path(tmp) / "prefix.json", Path(tmp) / "chunked.json"
        conversations = "1" if quick else "3"
        code = prefix.main(
            ["--conversations", conversations, "--repository", repository, "--out", str(prefix_out)]
        )
        code |= chunked.main(
            ["--chunks", "0,128", "--repository", repository, "--out", str(chunked_out)]
        )
        results["prefix"] = json.loads(prefix_out.read_text())
        results["chunked"] = json.loads(chunked_out.read_text())
    return code


if __name__ == "__main__":
    raise SystemExit(main())
