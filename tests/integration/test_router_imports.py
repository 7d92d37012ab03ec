"""A real `tessera router` process serves Generate, a chat, a stream and Embed through real
workers without ever importing torch or transformers (issue 11: a router without torch).

Observed from outside: the router runs with PYTHONPROFILEIMPORTTIME=1, so CPython itself reports
every module the process imports, at start-up and later (frontends load when workers register,
requests import lazily); and /proc/<pid>/maps shows whether libtorch is mapped.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from services.pb.tessera.v1 import inference_pb2
from tests.mesh import Mesh, Proc

FORBIDDEN = ("torch", "transformers")
RPC_TIMEOUT_S = 60
# `import time:  self [us] | cumulative | <indent>module`, one line per module imported.
_IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$")


def _imported(lines: list[str]) -> set[str]:
    return {m.group(1) for line in lines if (m := _IMPORT_LINE.match(line))}


@pytest.mark.slow
def test_router_serves_without_importing_torch_or_transformers(tiny_repo: Path) -> None:
    with Mesh(tiny_repo) as mesh:
        router = Proc(
            ["router", "--port", "0", "--repository", str(tiny_repo), "--metrics-port", "-1"],
            {**mesh.env, "PYTHONPROFILEIMPORTTIME": "1"},
        )
        mesh.router = router.start().wait_ready()
        mesh.start_worker("tiny-llama", wait=False)
        mesh.start_worker("tiny-bert", wait=False)
        for worker in mesh.workers:
            worker.wait_ready()
        mesh.wait_model("tiny-llama")
        mesh.wait_model("tiny-bert")

        stub = mesh.stub()
        llama = AutoTokenizer.from_pretrained(tiny_repo / "tiny-llama")
        prompt = "the cat sat on the mat"
        got = stub.Generate(
            inference_pb2.GenerateRequest(model="tiny-llama", prompt=prompt, max_new_tokens=4),
            timeout=RPC_TIMEOUT_S,
        )
        assert got.prompt_tokens == len(llama(prompt)["input_ids"]) and got.token_ids
        chat = [inference_pb2.ChatMessage(role="user", content="hello world")]
        got = stub.Generate(
            inference_pb2.GenerateRequest(model="tiny-llama", messages=chat, max_new_tokens=4),
            timeout=RPC_TIMEOUT_S,
        )
        rendered = llama.apply_chat_template(
            [{"role": "user", "content": "hello world"}], add_generation_prompt=True, tokenize=False
        )
        assert got.prompt_tokens == len(llama(rendered, add_special_tokens=False)["input_ids"])
        stream = inference_pb2.GenerateRequest(model="tiny-llama", prompt="a b c", max_new_tokens=3)
        assert [c for c in stub.GenerateStream(stream, timeout=RPC_TIMEOUT_S)]
        embedded = stub.Embed(
            inference_pb2.EmbedRequest(model="tiny-bert", inputs=["the cat", "hello world"]),
            timeout=RPC_TIMEOUT_S,
        )
        values = np.array([e.values for e in embedded.embeddings], dtype=np.float32)
        assert values.shape == (2, 32)
        np.testing.assert_allclose(np.linalg.norm(values, axis=1), 1.0, atol=1e-5)

        maps = Path(f"/proc/{router.popen.pid}/maps").read_text().splitlines()
        imported = _imported(list(router.lines))
        # The observation works: it saw the router's own modules and its frontend's libraries.
        assert {"grpc", "tokenizers", "jinja2", "services.router.frontends"} <= imported
        torch_libraries = {line.split()[-1] for line in maps if "libtorch" in line}
        assert not torch_libraries, f"the router mapped {sorted(torch_libraries)}"
        found = sorted(m for m in imported if m.split(".")[0] in FORBIDDEN)
        assert not found, f"the router imported {found[:10]}"
        assert router.stop() == 0
