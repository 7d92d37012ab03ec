"""The client distribution (clients/python, `tessera-client`) on its own: installed into a fresh
virtualenv it brings no torch and no `services`, and it talks to a live router.

The slow tests need PyPI (pip builds the package with setuptools and installs grpcio, protobuf
and numpy). The fast ones check the package's metadata and that its generated stubs are the
server's: both come from protos/, and two different copies of a file such as
tessera/v1/inference.proto cannot be imported into one process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.pb.tessera.v1 import inference_pb2
from tests.mesh import ROOT, Mesh

pytestmark = pytest.mark.timeout(900)

CLIENT = ROOT / "clients" / "python"
PIP_TIMEOUT_S = 300
LLM, ENCODER = "tiny-llama", "tiny-bert"


# -- fast: metadata and generated stubs --------------------------------------------------------


def test_distribution_metadata() -> None:
    config = tomllib.loads((CLIENT / "pyproject.toml").read_text())
    project = config["project"]
    assert (project["name"], project["version"]) == ("tessera-client", "0.1.0")
    assert project["dependencies"] == ["grpcio>=1.85.1", "protobuf>=7.35.1", "numpy"]
    assert config["tool"]["setuptools"]["packages"]["find"]["include"] == ["tessera*"]


def test_client_stubs_are_the_servers() -> None:
    """Run scripts/gen_protos.sh (make proto) when this fails: it regenerates both."""
    shared = ROOT / "services" / "pb" / "tessera" / "v1"
    own = CLIENT / "tessera" / "_pb" / "tessera" / "v1"
    for stem in ("common", "inference"):
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            name = stem + suffix
            assert (own / name).read_bytes() == (shared / name).read_bytes(), name
    assert not list(own.glob("worker*")), "worker.proto is internal to the server"
    assert (CLIENT / "tessera" / "_pb" / "grpc_health" / "v1" / "health_pb2_grpc.py").is_file()


# -- slow: a fresh virtualenv ------------------------------------------------------------------


def _run(python: Path, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(
        [str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def client_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a new virtualenv holding only `pip install clients/python` (not editable).

    The package is copied out first, so pip's build leaves nothing in the repository and the
    build proves the folder needs nothing from outside it.
    """
    work = tmp_path_factory.mktemp("client-package")
    source = work / "src"
    shutil.copytree(
        CLIENT, source, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__")
    )
    venv = work / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    done = _run(
        python,
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        str(source),
        cwd=work,
        timeout=PIP_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return python


@pytest.mark.slow
def test_installs_without_torch_or_the_server(client_python: Path, tmp_path: Path) -> None:
    for module in ("torch", "services", "transformers", "grpc_health"):
        done = _run(client_python, "-c", f"import {module}", cwd=tmp_path)
        assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr, (module, done)
    listed = _run(client_python, "-m", "pip", "list", "--format=json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    names = {d["name"].lower(): d["version"] for d in json.loads(listed.stdout)}
    assert names.get("tessera-client") == "0.1.0"
    assert {"grpcio", "protobuf", "numpy"} <= set(names)
    assert not {"torch", "tessera", "transformers", "grpcio-health-checking"} & set(names), names
    # What the distribution put on sys.path: the `tessera` package and nothing else.
    top = _run(
        client_python,
        "-c",
        "import importlib.metadata as m, json; "
        "print(json.dumps(sorted({f.parts[0] for f in m.files('tessera-client') "
        "if not f.parts[0].endswith('.dist-info')})))",
        cwd=tmp_path,
    )
    assert top.returncode == 0, top.stderr
    assert json.loads(top.stdout) == ["tessera"]


@pytest.fixture(scope="module")
def mesh(tiny_repo: Path) -> Iterator[Mesh]:
    """A router with tiny-llama and tiny-bert, one replica each."""
    with Mesh(tiny_repo) as m:
        m.start_router()
        for model in (LLM, ENCODER):
            m.start_worker(model, wait=False)
        for proc in m.workers:
            proc.wait_ready()
        m.wait_model(LLM)
        m.wait_model(ENCODER)
        yield m


CALLS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tessera
    from tessera import Client

    address, llm, encoder = sys.argv[1:4]
    with Client(address, timeout=60) as client:
        whole = client.generate(llm, "the cat sat", max_new_tokens=8)
        chunks = list(client.stream(llm, "the cat sat", max_new_tokens=8))
        embedded = client.embed(encoder, ["hello world", "the cat sat on the mat"])
        models = client.list_models()
        ready = client.ready() and client.ready(llm)
    print(json.dumps({
        "module": tessera.__file__,
        "server_loaded": any(m.split(".")[0] in ("services", "grpc_health") for m in sys.modules),
        "generate": {"text": whole.text, "token_ids": list(whole.token_ids),
                     "generated_tokens": whole.generated_tokens,
                     "prompt_tokens": whole.prompt_tokens, "finish": whole.finish_reason},
        "stream": {"text": "".join(c.text for c in chunks),
                   "token_ids": [t for c in chunks for t in c.token_ids],
                   "last": chunks[-1].last, "finish": chunks[-1].finish_reason},
        "embed": {"dim": embedded.dim, "shape": list(embedded.numpy().shape),
                  "norms": np.linalg.norm(embedded.numpy(), axis=1).tolist()},
        "models": {m.name: {"kind": m.kind, "num_layers": m.num_layers, "healthy": m.healthy}
                   for m in models},
        "ready": ready,
    }))
    """
)


@pytest.mark.slow
def test_calls_a_live_router(
    client_python: Path, mesh: Mesh, tiny_repo: Path, tmp_path: Path
) -> None:
    done = _run(client_python, "-c", CALLS, mesh.address, LLM, ENCODER, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["module"].startswith(str(client_python.parent.parent)), got["module"]
    assert not got["server_loaded"]

    generated = got["generate"]
    want = mesh.stub().Generate(
        inference_pb2.GenerateRequest(model=LLM, prompt="the cat sat", max_new_tokens=8),
        timeout=60,
    )
    assert generated["prompt_tokens"] > 0 and generated["generated_tokens"] > 0
    assert generated["generated_tokens"] == len(generated["token_ids"])
    assert (generated["text"], generated["token_ids"]) == (want.text, list(want.token_ids))
    streamed = got["stream"]
    assert (streamed["text"], streamed["token_ids"]) == (generated["text"], generated["token_ids"])
    assert streamed["last"] and streamed["finish"] == generated["finish"]

    hidden = json.loads((tiny_repo / ENCODER / "config.json").read_text())["hidden_size"]
    embedded = got["embed"]
    assert embedded["dim"] == hidden and embedded["shape"] == [2, hidden]
    assert all(abs(n - 1.0) < 1e-4 for n in embedded["norms"])

    models = got["models"]
    assert {LLM, ENCODER} <= set(models)
    assert models[LLM]["kind"] == "causal-lm" and models[ENCODER]["kind"] == "encoder"
    assert models[LLM]["num_layers"] == 4 and models[LLM]["healthy"]
    assert got["ready"]
