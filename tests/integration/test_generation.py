"""Generation through real routers and workers, compared with the unsplit transformers model.

One router serves three copies of tiny-llama: `llama-1` as a replica, `llama-2` as two stages,
`llama-3` as three. Streams run alone and together (joining and leaving a running batch at
different steps); greedy tokens must equal the unsplit model's, seeded draws must equal the
draws a reference loop makes from the unsplit model's logits with the same (seed, position)
rule, and a cancelled stream must free its rows on every stage.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from grpc import aio
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.common.types import SamplingParams
from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.worker.sampling import make_generator, sample
from tests.mesh import Mesh, Proc, metric, metrics_address, scrape, wait_until

pytestmark = pytest.mark.slow

CHAINS = {
    "llama-1": [None],
    "llama-2": ["0:2", "2:4"],
    "llama-3": ["0:1", "1:3", "3:4"],
}
PROMPTS = [
    "the cat sat on the mat",
    "hello",
    "what is the capital of france ?",
    "it",
    "the dog",
    "paris is",
    "hello world and the cat",
    "a b c d e f g",
    "it is",
]
MAX_NEW = [12, 30, 7, 24, 16, 40, 5, 20, 33]  # rows leave the running batch at different steps


@pytest.fixture(scope="module")
def repo(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("generation-repo")
    for name in CHAINS:
        shutil.copytree(tiny_repo / "tiny-llama", root / name)
    return root


@pytest.fixture(scope="module")
def mesh(repo: Path) -> Iterator[Mesh]:
    env = {"TESSERA_WORKER_METRICS_PORT": "0"}
    with Mesh(repo, env=env) as m:  # no cache: every request reaches the workers
        m.start_router()
        for model, spans in CHAINS.items():
            for span in spans:
                m.start_worker(model, span, wait=False)
        for proc in m.workers:
            proc.wait_ready()
        for model in CHAINS:
            m.wait_model(model)
        yield m


@pytest.fixture(scope="module")
def reference(repo: Path) -> tuple[AutoTokenizer, AutoModelForCausalLM]:
    path = repo / "llama-1"
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()


def greedy_reference(reference: tuple, prompt: str, max_new: int) -> list[int]:
    tokenizer, model = reference
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(
        ids, max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, ids.shape[1] :].tolist()


@torch.inference_mode()
def seeded_reference(reference: tuple, prompt: str, max_new: int, params: SamplingParams) -> list:
    """Draws from the unsplit model's logits with the workers' (seed, position) rule."""
    tokenizer, model = reference
    sequence = list(tokenizer(prompt)["input_ids"])
    generator = make_generator(params)
    out = []
    for _ in range(max_new):
        logits = model(torch.tensor([sequence])).logits[0, -1]
        token = sample(logits, params, generator, position=len(sequence))
        out.append(token)
        sequence.append(token)
    return out


def request(
    model: str, prompt: str, max_new: int, **sampling: float
) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=model, prompt=prompt, max_new_tokens=max_new, **sampling
    )


async def stream(
    stub: inference_pb2_grpc.InferenceStub, req: inference_pb2.GenerateRequest, delay: float = 0
) -> tuple[list[int], int, str, bool]:
    """(tokens, chunks, finish_reason, any chunk cached) of one GenerateStream."""
    await asyncio.sleep(delay)
    tokens: list[int] = []
    chunks, finish, cached = 0, "", False
    async for chunk in stub.GenerateStream(req, timeout=60):
        chunks += 1
        tokens.extend(chunk.token_ids)
        finish = chunk.finish_reason or finish
        cached = cached or chunk.cached
    return tokens, chunks, finish, cached


def run_streams(
    mesh: Mesh, requests: list[inference_pb2.GenerateRequest], delays: list[float]
) -> list[tuple[list[int], int, str, bool]]:
    async def go() -> list[tuple[list[int], int, str, bool]]:
        async with aio.insecure_channel(mesh.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            return await asyncio.gather(
                *(stream(stub, r, d) for r, d in zip(requests, delays, strict=True))
            )

    return asyncio.run(go())


def check_against(want: list[int], got: list[int], finish: str, max_new: int) -> None:
    # tiny-llama's EOS is a real token: a stream that samples it stops there (and includes it).
    assert got == want[: len(got)], (got, want)
    if finish == "length":
        assert len(got) == max_new
    else:
        assert finish == "eos" and got[-1] == 6, (finish, got)


def workers_of(mesh: Mesh, model: str) -> list[Proc]:
    return [p for p in mesh.workers if model in p.args]


def info(proc: Proc) -> worker_pb2.WorkerInfo:
    import grpc

    with grpc.insecure_channel(proc.address) as channel:
        return worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=5)


@pytest.mark.parametrize("model", list(CHAINS))
def test_each_stream_alone_equals_the_unsplit_model(
    mesh: Mesh, reference: tuple, model: str
) -> None:
    for prompt, max_new in zip(PROMPTS, MAX_NEW, strict=True):
        [(got, chunks, finish, cached)] = run_streams(mesh, [request(model, prompt, max_new)], [0])
        assert not cached
        assert chunks >= min(len(got), 2), "the stream came as one piece"
        check_against(greedy_reference(reference, prompt, max_new), got, finish, max_new)


@pytest.mark.parametrize("model", list(CHAINS))
def test_streams_joining_and_leaving_equal_their_solo_runs(
    mesh: Mesh, reference: tuple, model: str
) -> None:
    workers = workers_of(mesh, model)
    before = [scrape(metrics_address(p)) for p in workers]
    requests = [request(model, p, n) for p, n in zip(PROMPTS, MAX_NEW, strict=True)]
    delays = [0.0, 0.0, 0.005, 0.01, 0.01, 0.015, 0.02, 0.03, 0.035]  # some join mid-batch
    results = run_streams(mesh, requests, delays)
    for (got, _, finish, cached), prompt, max_new in zip(results, PROMPTS, MAX_NEW, strict=True):
        assert not cached
        check_against(greedy_reference(reference, prompt, max_new), got, finish, max_new)
    # The streams really shared decode steps: on every stage, steps carried several rows; and
    # late ones joined a running batch: more than one prefill fed the same decode steps.
    for proc, earlier in zip(workers, before, strict=True):
        samples = scrape(metrics_address(proc))

        def shared(samples: list) -> float:
            steps = metric(samples, "tessera_worker_batch_rows_count", kind="decode")
            single = metric(samples, "tessera_worker_batch_rows_bucket", kind="decode", le="1.0")
            return steps - single

        assert shared(samples) - shared(earlier) >= 5, proc.args
        assert _prefills(samples) - _prefills(earlier) >= 2, proc.args


def _prefills(samples: list) -> float:
    return metric(samples, "tessera_worker_batch_rows_count", kind="prefill")


def test_simultaneous_arrivals_share_a_prefill(mesh: Mesh, reference: tuple) -> None:
    """Eight streams sent at once on a replica: far fewer prefills than streams."""
    [worker] = workers_of(mesh, "llama-1")
    before = scrape(metrics_address(worker))
    requests = [request("llama-1", p, 6) for p in PROMPTS[:8]]
    results = run_streams(mesh, requests, [0.0] * 8)
    for (got, _, finish, _), req in zip(results, requests, strict=True):
        check_against(greedy_reference(reference, req.prompt, 6), got, finish, 6)
    after = scrape(metrics_address(worker))
    rows = metric(after, "tessera_worker_batch_rows_sum", kind="prefill") - metric(
        before, "tessera_worker_batch_rows_sum", kind="prefill"
    )
    assert rows == 8
    assert _prefills(after) - _prefills(before) <= 2


def test_seeded_streams_equal_the_reference_draws(mesh: Mesh, reference: tuple) -> None:
    seeds = [3, 11, 42, 7, 1234]
    requests = [
        request("llama-2", p, 20, temperature=0.9, seed=s, top_k=20) for p, s in zip(PROMPTS, seeds)
    ]
    requests += [request("llama-2", p, 20) for p in PROMPTS[5:]]  # greedy rows in the batch
    results = run_streams(mesh, requests, [0.01 * i for i in range(len(requests))])
    for (got, _, finish, _), req in zip(results, requests, strict=True):
        if req.HasField("seed"):
            params = SamplingParams(temperature=req.temperature, top_k=req.top_k, seed=req.seed)
            want = seeded_reference(reference, req.prompt, 20, params)
        else:
            want = greedy_reference(reference, req.prompt, 20)
        check_against(want, got, finish, 20)


def test_a_cancelled_stream_frees_its_rows_on_every_stage(mesh: Mesh) -> None:
    stages = workers_of(mesh, "llama-3")
    wait_until(lambda: all(info(p).live_sessions == 0 for p in stages), 10, "idle stages")
    stub = mesh.stub()
    steps_before = _decode_steps(stages[0])
    call = stub.GenerateStream(request("llama-3", "a b c", 250), timeout=60)
    for _ in range(3):
        next(call)
    held = [info(p) for p in stages]
    assert all(i.live_sessions == 1 and i.kv_tokens > 0 for i in held), held
    call.cancel()
    # The row left at the next step, far from its 250th token (an undisturbed run takes 250
    # steps; the batch idle timeout, 60 s, is far longer still).
    wait_until(
        lambda: all(info(p).live_sessions == 0 and info(p).kv_tokens == 0 for p in stages),
        30,
        "rows freed on every stage after the cancel",
    )
    assert _decode_steps(stages[0]) - steps_before < 125


def _decode_steps(proc: Proc) -> float:
    return metric(scrape(metrics_address(proc)), "tessera_worker_batch_rows_count", kind="decode")


def test_a_wide_prompt_is_prefilled_in_chunks_beside_a_running_stream(
    repo: Path, reference: tuple
) -> None:
    """Chunks of 8 columns: a ~70-token prompt sent once a long stream is running joins it in
    chunks (the first stage logs them), and both equal the unsplit model's greedy tokens."""
    env = {"TESSERA_ROUTER_PREFILL_CHUNK_TOKENS": "8", "TESSERA_ROUTER_MAX_WAITING_STEPS": "1"}
    long = request("llama-2", "it is", 240)
    wide = request("llama-2", " ".join(["the cat sat on the mat"] * 12), 10)  # 9 chunks of 8
    want_long = greedy_reference(reference, long.prompt, 240)
    assert 6 not in want_long[:200]  # no EOS for long: it is still running when wide arrives
    with Mesh(repo, env=env) as m:
        m.start_router()
        for span in CHAINS["llama-2"]:
            m.start_worker("llama-2", span, wait=False)
        for proc in m.workers:
            proc.wait_ready()
        m.wait_model("llama-2")
        first = m.workers[0]

        def prefill_calls() -> int:
            return sum('"rpc": "/tessera.v1.Worker/Prefill"' in line for line in list(first.lines))

        async def go() -> tuple[list[int], list[int]]:
            async with aio.insecure_channel(m.address) as channel:
                stub = inference_pb2_grpc.InferenceStub(channel)
                running = stub.GenerateStream(long, timeout=60)
                got_long: list[int] = []
                async for chunk in running:  # wait for its first tokens: it is running
                    got_long.extend(chunk.token_ids)
                    break
                joined = asyncio.create_task(stream(stub, wide))
                async for chunk in running:
                    got_long.extend(chunk.token_ids)
                return got_long, (await joined)[0]

        before = prefill_calls()
        got_long, got_wide = asyncio.run(go())
        assert got_long == want_long
        assert got_wide == greedy_reference(reference, wide.prompt, 10)[: len(got_wide)]
        assert len(got_wide) == 10 or got_wide[-1] == 6
        assert prefill_calls() - before >= 1 + 9  # the long prompt's, and the wide one's chunks
