"""The Open Inference Protocol (KServe v2 gRPC) on the router, driven by the unchanged
`tritonclient.grpc.InferenceServerClient` from PyPI: health, metadata and ModelInfer for a
causal model and an encoder, tiny and real, equal to the router's own Generate and Embed.

tritonclient runs in a child process: its generated `inference.*` messages and the router's
(services.pb.kserve, imported into this process by other test modules that run the router
in-process) cannot share one protobuf descriptor pool ("duplicate symbol").
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tessera import Client

from tests.mesh import ROOT, Mesh

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TEXTS = ["the cat sat on the mat", "hello", "paris is the capital of france"]

PRELUDE = """
import json, sys
import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

client = triton.InferenceServerClient(sys.argv[1])

def text_input(texts, shape=None):
    tensor = triton.InferInput("text", shape or [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object)
                               .reshape(shape or [len(texts)]))
    return tensor

def status(call):
    try:
        call()
    except InferenceServerException as exc:
        return exc.status()
    return "OK"
"""


def triton(address: str, body: str) -> Any:
    """Runs `body` (which sets `result`) with a tritonclient connected to `address`."""
    script = PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(result))\n"
    done = subprocess.run(
        [sys.executable, "-c", script, address],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


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


def test_health_and_metadata(mesh: Mesh) -> None:
    got = triton(
        mesh.address,
        """
        result = {
            "live": client.is_server_live(), "ready": client.is_server_ready(),
            "llama_ready": client.is_model_ready("tiny-llama"),
            "bert_ready": client.is_model_ready("tiny-bert"),
            "unknown_ready": client.is_model_ready("no-such-model"),
            "wrong_version_ready": client.is_model_ready("tiny-llama", "no-such-version"),
            "server": client.get_server_metadata(as_json=True),
            "llama": client.get_model_metadata("tiny-llama", as_json=True),
            "bert": client.get_model_metadata("tiny-bert", as_json=True),
            "unknown": status(lambda: client.get_model_metadata("no-such-model")),
        }
    """,
    )
    assert got["live"] and got["ready"] and got["llama_ready"] and got["bert_ready"]
    assert not got["unknown_ready"] and not got["wrong_version_ready"]
    assert got["server"]["name"] == "tessera" and got["server"]["version"]
    with Client(mesh.address) as client:
        listed = {m.name: m for m in client.list_models()}
    llama, bert = got["llama"], got["bert"]
    assert llama["versions"] == [listed["tiny-llama"].version]
    assert llama["platform"] == "tessera/causal-lm" and bert["platform"] == "tessera/encoder"
    assert llama["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": ["1"]}]
    assert llama["outputs"] == [{"name": "text", "datatype": "BYTES", "shape": ["1"]}]
    assert bert["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": ["-1"]}]
    assert bert["outputs"] == [{"name": "embeddings", "datatype": "FP32", "shape": ["-1", "32"]}]
    assert got["unknown"] == "StatusCode.NOT_FOUND"


def test_infer_causal_equals_generate(mesh: Mesh) -> None:
    got = triton(
        mesh.address,
        """
        def infer(prompt, shape=None, **parameters):
            reply = client.infer("tiny-llama", [text_input([prompt], shape)],
                                 parameters=parameters, request_id="req-1")
            text = reply.as_numpy("text")
            response = reply.get_response(as_json=True)
            return {"text": [t.decode() for t in text.reshape(-1)], "shape": list(text.shape),
                    "id": response["id"], "parameters": response["parameters"]}
        result = {
            "greedy": infer("the cat sat", max_new_tokens=8),
            "sampled": infer("hello world", [1, 1], max_new_tokens=6, temperature=0.9,
                             top_p=0.95, top_k=20, seed=5),
        }
    """,
    )
    with Client(mesh.address) as client:  # the references, retried if a probe blips
        greedy = client.generate("tiny-llama", "the cat sat", max_new_tokens=8)
        sampled = client.generate(
            "tiny-llama",
            "hello world",
            max_new_tokens=6,
            temperature=0.9,
            top_p=0.95,
            top_k=20,
            seed=5,
        )
    assert got["greedy"]["text"] == [greedy.text] and got["greedy"]["shape"] == [1]
    assert got["greedy"]["id"] == "req-1"
    params = got["greedy"]["parameters"]
    assert params["finish_reason"]["string_param"] == greedy.finish_reason
    assert int(params["generated_tokens"]["int64_param"]) == greedy.generated_tokens
    assert got["sampled"]["text"] == [sampled.text] and got["sampled"]["shape"] == [1, 1]


def test_infer_encoder_equals_embed(mesh: Mesh) -> None:
    got = triton(
        mesh.address,
        f"""
        reply = client.infer("tiny-bert", [text_input({TEXTS!r})],
                             outputs=[triton.InferRequestedOutput("embeddings")])
        matrix = reply.as_numpy("embeddings")
        result = {{"dtype": str(matrix.dtype), "values": matrix.tolist()}}
    """,
    )
    with Client(mesh.address) as client:
        want = client.embed("tiny-bert", TEXTS)
    assert got["dtype"] == "float32"
    np.testing.assert_array_equal(np.array(got["values"], dtype=np.float32), want.numpy())


def test_bad_requests_get_their_status(mesh: Mesh) -> None:
    got = triton(
        mesh.address,
        """
        def wrong_name():
            tensor = triton.InferInput("prompt", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([b"hi"], dtype=object))
            client.infer("tiny-llama", [tensor])
        def wrong_type():
            tensor = triton.InferInput("text", [1], "FP32")
            tensor.set_data_from_numpy(np.array([1.0], dtype=np.float32))
            client.infer("tiny-bert", [tensor])
        result = {
            "unknown model": status(lambda: client.infer("nope", [text_input(["hi"])])),
            "wrong input name": status(wrong_name),
            "wrong input type": status(wrong_type),
            "two prompts": status(lambda: client.infer("tiny-llama", [text_input(["a", "b"])])),
            "unknown parameter": status(lambda: client.infer(
                "tiny-llama", [text_input(["hi"])], parameters={"max_tokens": 3})),
            "sampling on an encoder": status(lambda: client.infer(
                "tiny-bert", [text_input(["hi"])], parameters={"temperature": 0.5})),
            "bad max_new_tokens": status(lambda: client.infer(
                "tiny-llama", [text_input(["hi"])], parameters={"max_new_tokens": 0})),
            "unknown output": status(lambda: client.infer(
                "tiny-bert", [text_input(["hi"])],
                outputs=[triton.InferRequestedOutput("logits")])),
            "empty text": status(lambda: client.infer("tiny-bert", [text_input([""])])),
            "still serving": status(lambda: client.infer("tiny-llama", [text_input(["hi"])],
                                                         parameters={"max_new_tokens": 1})),
        }
    """,
    )
    assert got.pop("unknown model") == "StatusCode.NOT_FOUND"
    assert got.pop("still serving") == "OK"
    assert got == {k: "StatusCode.INVALID_ARGUMENT" for k in got}, got


@pytest.mark.timeout(480)
def test_real_models(real_repo: Path) -> None:
    """SmolLM2 as two stages and MiniLM as a replica, through tritonclient."""
    llm, encoder = "smollm2-135m-instruct", "all-minilm-l6-v2"
    prompt, texts = "The capital of France is", ["hello", "The cat sat on the mat."]
    with Mesh(real_repo) as m:
        m.start_router()
        for model, layers in [(llm, "0:15"), (llm, "15:30"), (encoder, None)]:
            m.start_worker(model, layers, wait=False)
        for proc in m.workers:
            proc.wait_ready(timeout=300)
        m.wait_model(llm, timeout=120)
        m.wait_model(encoder, timeout=120)
        got = triton(
            m.address,
            f"""
            reply = client.infer({llm!r}, [text_input([{prompt!r}])],
                                 parameters={{"max_new_tokens": 4}}, client_timeout=120)
            embedded = client.infer({encoder!r}, [text_input({texts!r})], client_timeout=120)
            result = {{"ready": [client.is_model_ready({llm!r}),
                                 client.is_model_ready({encoder!r})],
                       "text": reply.as_numpy("text")[0].decode(),
                       "embeddings": embedded.as_numpy("embeddings").tolist()}}
        """,
        )
        with Client(m.address, timeout=120) as client:
            generated = client.generate(llm, prompt, max_new_tokens=4)
            embedded = client.embed(encoder, texts)
    assert got["ready"] == [True, True]
    assert got["text"] == generated.text and "Paris" in got["text"]
    matrix = np.array(got["embeddings"], dtype=np.float32)
    assert matrix.shape == (2, 384)
    np.testing.assert_array_equal(matrix, embedded.numpy())


def test_grpcurl_sees_the_service_with_no_protos(mesh: Mesh) -> None:
    grpcurl = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    listed = subprocess.run(
        [grpcurl, "-plaintext", mesh.address, "list"], capture_output=True, text=True, timeout=60
    )
    assert "inference.GRPCInferenceService" in listed.stdout.split(), listed.stderr
    described = subprocess.run(
        [grpcurl, "-plaintext", mesh.address, "describe", "inference.GRPCInferenceService"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "rpc ModelInfer (" in described.stdout, described.stderr
    health = subprocess.run(
        [
            grpcurl,
            "-plaintext",
            "-d",
            '{"service": "inference.GRPCInferenceService"}',
            mesh.address,
            "grpc.health.v1.Health/Check",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(health.stdout)["status"] == "SERVING", health.stderr
