"""The OpenAI-compatible HTTP front through the real `openai` package (sync, async, streaming),
against a real router serving SmolLM2 as two stages and MiniLM as a replica.

Answers are checked against independent references: transformers' own greedy generation and
log-probabilities, sentence-transformers' embeddings; and against the gRPC API of the same router.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import openai
import pytest
import torch

from services.common.security import CALL, derive_token
from services.pb.tessera.v1 import inference_pb2, worker_pb2, worker_pb2_grpc
from tests.mesh import Mesh, wait_model_on, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

LLM = "smollm2-135m-instruct"
ENCODER = "all-minilm-l6-v2"
KEY = "openai-test-key"
SECRET = "openai-test-mesh"
_HTTP = re.compile(r"tessera router http on (\S+)")


@pytest.fixture(scope="module")
def mesh(real_repo: Path) -> Iterator[tuple[Mesh, str]]:
    env = {
        "TESSERA_ROUTER_AUTH_TOKENS": KEY,
        "TESSERA_ROUTER_HTTP_PORT": "0",
        "TESSERA_ROUTER_METRICS_PORT": "0",
        "TESSERA_ROUTER_MESH_SECRET": SECRET,
        "TESSERA_WORKER_MESH_SECRET": SECRET,
    }
    with Mesh(real_repo, env=env) as m:
        router = m.start_router()
        m.start_worker(LLM, "0:15", wait=False)
        m.start_worker(LLM, "15:30", wait=False)
        m.start_worker(ENCODER, wait=False)
        for proc in m.workers:
            proc.wait_ready()
        metadata = [("authorization", f"Bearer {KEY}")]
        for model in (LLM, ENCODER):
            wait_model_on(m.channel(), model, metadata=metadata, procs=[router, *m.workers])
        address = next(g.group(1) for line in router.lines if (g := _HTTP.search(line)))
        yield m, f"http://{address}/v1"


@pytest.fixture(scope="module")
def client(mesh: tuple[Mesh, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh[1], api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def reference(real_repo: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = real_repo / LLM
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()


def _greedy(reference: tuple[Any, Any], ids: list[int], max_new: int) -> list[int]:
    tokenizer, model = reference
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    tokens = out[0, len(ids) :].tolist()
    eos = tokenizer.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def _chat_ids(reference: tuple[Any, Any], content: str) -> list[int]:
    tokenizer, _ = reference
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _grpc(mesh: Mesh, request: inference_pb2.GenerateRequest) -> inference_pb2.GenerateResponse:
    return mesh.stub().Generate(request, timeout=120, metadata=[("authorization", f"Bearer {KEY}")])


# -- generation ------------------------------------------------------------------------------


def test_chat_at_temperature_zero_equals_grpc_and_transformers(
    mesh: tuple[Mesh, str], client: openai.OpenAI, reference: tuple[Any, Any]
) -> None:
    question = "What is the capital of France?"
    answer = client.chat.completions.create(
        model=LLM, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24
    )
    choice = answer.choices[0]
    grpc_answer = _grpc(
        mesh[0],
        inference_pb2.GenerateRequest(
            model=LLM,
            messages=[inference_pb2.ChatMessage(role="user", content=question)],
            max_new_tokens=24,
        ),
    )
    assert choice.message.content == grpc_answer.text
    want = _greedy(reference, _chat_ids(reference, question), 24)
    assert list(grpc_answer.token_ids) == want
    assert choice.finish_reason == ("stop" if len(want) < 24 else "length")
    assert answer.usage.prompt_tokens == len(_chat_ids(reference, question))
    assert answer.usage.completion_tokens == len(want)


def test_completions_equal_grpc_and_transformers(
    mesh: tuple[Mesh, str], client: openai.OpenAI, reference: tuple[Any, Any]
) -> None:
    prompt = "The three primary colors are"
    answer = client.completions.create(model=LLM, prompt=prompt, temperature=0, max_tokens=16)
    grpc_answer = _grpc(
        mesh[0], inference_pb2.GenerateRequest(model=LLM, prompt=prompt, max_new_tokens=16)
    )
    assert answer.choices[0].text == grpc_answer.text
    tokenizer, _ = reference
    assert list(grpc_answer.token_ids) == _greedy(reference, tokenizer(prompt)["input_ids"], 16)


def test_streamed_deltas_reassemble_and_end_with_usage(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name three fruits."}]
    whole = client.chat.completions.create(
        model=LLM, messages=messages, temperature=0, max_tokens=20
    )
    parts, usage, finish = [], None, None
    for chunk in client.chat.completions.create(
        model=LLM,
        messages=messages,
        temperature=0,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        else:
            usage = chunk.usage
    assert "".join(parts) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_async_client_and_n_choices(mesh: tuple[Mesh, str]) -> None:
    async def run() -> Any:
        async with openai.AsyncOpenAI(base_url=mesh[1], api_key=KEY, max_retries=0) as aclient:
            return await aclient.chat.completions.create(
                model=LLM,
                messages=[{"role": "user", "content": "Say hello."}],
                n=2,
                temperature=0.8,
                seed=7,
                max_tokens=8,
            )

    answer = asyncio.run(run())
    assert [c.index for c in answer.choices] == [0, 1]
    assert all(c.message.content for c in answer.choices)


def test_top_logprobs_equal_transformers(client: openai.OpenAI, reference: tuple[Any, Any]) -> None:
    question = "Count to three."
    answer = client.chat.completions.create(
        model=LLM,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=6,
        logprobs=True,
        top_logprobs=2,
    )
    content = answer.choices[0].logprobs.content
    tokenizer, model = reference
    ids = _chat_ids(reference, question)
    generated = _greedy(reference, ids, 6)
    assert len(content) == len(generated)
    with torch.inference_mode():
        logits = model(torch.tensor([ids + generated])).logits[0]
    scores = torch.log_softmax(logits.float(), dim=-1)
    for step, entry in enumerate(content):
        row = scores[len(ids) - 1 + step]
        assert entry.logprob == pytest.approx(float(row[generated[step]]), abs=1e-4)
        assert len(entry.top_logprobs) == 2
        best = torch.topk(row, 2)
        for alternative, want in zip(entry.top_logprobs, best.values.tolist(), strict=True):
            assert alternative.logprob == pytest.approx(want, abs=1e-4)


def test_json_schema_answers_parse_with_exactly_the_schemas_keys(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    answer = client.chat.completions.create(
        model=LLM,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        temperature=0,
        max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
    )
    content = answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop", content
    parsed = json.loads(content)
    assert set(parsed) == {"city", "country"}
    assert isinstance(parsed["city"], str) and isinstance(parsed["country"], str)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=LLM,
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"schema": {"type": "objekt"}}},
        )


# -- embeddings ------------------------------------------------------------------------------


def test_embeddings_equal_grpc_and_sentence_transformers(
    mesh: tuple[Mesh, str], client: openai.OpenAI, real_repo: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    texts = ["The cat sat on the mat.", "Paris is the capital of France."]
    answer = client.embeddings.create(model=ENCODER, input=texts)
    got = np.array([d.embedding for d in answer.data])
    grpc_answer = (
        mesh[0]
        .stub()
        .Embed(
            inference_pb2.EmbedRequest(model=ENCODER, inputs=texts),
            timeout=60,
            metadata=[("authorization", f"Bearer {KEY}")],
        )
    )
    np.testing.assert_allclose(got, np.array([e.values for e in grpc_answer.embeddings]), atol=1e-6)
    want = SentenceTransformer(str(real_repo / ENCODER), device="cpu").encode(texts)
    cosines = (got * want).sum(axis=1) / np.linalg.norm(want, axis=1)
    assert cosines.min() >= 0.99999
    assert answer.usage.prompt_tokens > 0
    packed = client.embeddings.create(model=ENCODER, input=texts[0], encoding_format="base64")
    raw = base64.b64decode(packed.data[0].embedding)
    np.testing.assert_allclose(np.frombuffer(raw, dtype="<f4"), got[0], atol=1e-6)


# -- errors ------------------------------------------------------------------------------------


def test_errors_are_openais(mesh: tuple[Mesh, str], client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
    wrong = openai.OpenAI(base_url=mesh[1], api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=LLM, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=LLM, messages=[{"role": "user", "content": "x"}], presence_penalty=1.0
        )
    assert "presence_penalty" in str(caught.value)
    # Made-up paths: OpenAI's error object, and no metric label per path.
    for index in range(3):
        request = urllib.request.Request(
            f"{mesh[1]}/made-up-{index}", headers={"Authorization": f"Bearer {KEY}"}
        )
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(request, timeout=10)
        assert missing.value.code == 404
        assert json.loads(missing.value.read())["error"]["type"] == "not_found_error"
    with urllib.request.urlopen(mesh[1].removesuffix("/v1") + "/metrics", timeout=10) as answer:
        assert "made-up" not in answer.read().decode()
    models = client.models.list()
    assert {m.id for m in models.data} == {LLM, ENCODER}


def test_a_closed_stream_frees_its_rows_on_every_stage(
    mesh: tuple[Mesh, str], client: openai.OpenAI
) -> None:
    stages = [p for p in mesh[0].workers if "0:15" in p.args or "15:30" in p.args]

    def live(proc: Any) -> int:
        token = derive_token(SECRET, CALL, proc.address)
        with grpc.insecure_channel(proc.address) as channel:
            info = worker_pb2_grpc.WorkerStub(channel).Info(
                worker_pb2.InfoRequest(), timeout=5, metadata=[("authorization", f"Bearer {token}")]
            )
            return info.live_sessions

    wait_until(lambda: all(live(p) == 0 for p in stages), 30, "idle stages")
    stream = client.chat.completions.create(
        model=LLM,
        messages=[{"role": "user", "content": "Write a long story about the sea."}],
        max_tokens=400,
        stream=True,
    )
    for count, _ in enumerate(stream, 1):
        if count == 3:
            break
    assert all(live(p) == 1 for p in stages)
    # What an inference gateway's endpoint picker reads: one generation running, KV held.
    gauges = _gauges(mesh[1])
    assert gauges[("vllm:num_requests_running", LLM)] == 1
    assert gauges[("vllm:num_requests_waiting", LLM)] == 0
    assert 0 < gauges[("vllm:kv_cache_usage_perc", LLM)] < 1
    stream.close()
    started = time.monotonic()
    wait_until(lambda: all(live(p) == 0 for p in stages), 60, "rows freed after the close")
    assert time.monotonic() - started < 30  # far from the 400 tokens the stream asked for
    wait_until(
        lambda: _gauges(mesh[1])[("vllm:num_requests_running", LLM)] == 0, 30, "gauge follows"
    )
    assert _gauges(mesh[1])[("vllm:kv_cache_usage_perc", LLM)] == 0


def _gauges(base: str) -> dict[tuple[str, str], float]:
    """The router's per-model gauges from GET /metrics on its HTTP port (no token needed)."""
    from prometheus_client.parser import text_string_to_metric_families

    root = base.removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "model_name" in sample.labels:
                found[(sample.name, sample.labels["model_name"])] = sample.value
    return found


def test_ready_names_the_models_with_a_healthy_chain(mesh: tuple[Mesh, str]) -> None:
    root = mesh[1].removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/ready", timeout=10) as answer:
        assert answer.status == 200
        assert json.loads(answer.read()) == {"ready": True, "models": {LLM: True, ENCODER: True}}
