"""Model versions while serving, driven through `tessera models` on `tessera up`'s mesh.

Tiny models (a BERT replica, a two-stage Llama) stand in for MiniLM and SmolLM2; their second
versions are the same architecture and tokenizer with other weights (another seed), so every
answer can be told apart and checked against the version's own transformers reference.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from services.cache.launcher import free_port
from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc, models_pb2, models_pb2_grpc
from tests.integration.test_up import _write_mesh, tessera_up
from tests.mesh import ROOT, service_env, wait_until
from tests.tiny_models import build_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BERT, LLAMA = "tiny-bert", "tiny-llama"
TEXTS = ["the cat sat on the mat", "hello world", "paris is the capital of france", "dog"]


def _vectors(path: Path) -> dict[str, np.ndarray]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
    return dict(zip(TEXTS, pooled.numpy(), strict=True))


def _greedy(path: Path, prompt: str, max_new: int) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(
        ids, max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, ids.shape[1] :].tolist()


class Cli:
    def __init__(self, address: str, repository: Path) -> None:
        self.address = address
        self.env = service_env(repository)

    def __call__(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "services.cli", "models", "--router", self.address, *args],
            capture_output=True,
            text=True,
            timeout=240,
            env=self.env,
            cwd=ROOT,
            check=False,
        )
        assert (done.returncode == 0) == ok, (args, done.stdout, done.stderr)
        return done

    def versions(self, model: str) -> dict[str, Any]:
        listed = json.loads(self("list", model, "--json").stdout)["models"][0]
        return {v["label"]: v for v in listed["versions"]} | {"": listed}


class EmbedLoad:
    """Embed calls in the background, each answer checked against its version's reference."""

    def __init__(self, stub: inference_pb2_grpc.InferenceStub, refs: dict[str, Any]) -> None:
        self.stub, self.refs = stub, refs
        self.errors: list[str] = []
        self.seen: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for index in range(5000):  # bounded; stopped long before
            if self._stop.is_set():
                return
            try:
                self.seen[check_embed(self.stub, self.refs, TEXTS[index % len(TEXTS)])] += 1
            except (grpc.RpcError, AssertionError) as error:
                self.errors.append(repr(error)[:300])
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def check_embed(stub: inference_pb2_grpc.InferenceStub, refs: dict[str, Any], text: str) -> str:
    """One Embed; its vector must equal the reference of the version it says answered."""
    reply = stub.Embed(inference_pb2.EmbedRequest(model=BERT, inputs=[text]), timeout=30)
    assert reply.version in refs, reply.version
    got = np.array(reply.embeddings[0].values, dtype=np.float32)
    np.testing.assert_allclose(got, refs[reply.version][text], rtol=0, atol=1e-5)
    return reply.version


def test_publish_weigh_roll_back_promote_and_unload_through_the_cli(
    tiny_repo: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "repository"
    for model in (BERT, LLAMA):  # a private copy: publishing writes into the repository
        shutil.copytree(tiny_repo / model, repository / model)
    bert_v2 = build_tiny_model("bert", tmp_path / "bert-v2", seed=1)
    llama_v2 = build_tiny_model("llama", tmp_path / "llama-v2", seed=1)
    router_port = free_port()
    config = _write_mesh(
        tmp_path / "mesh.yaml",
        router_port,
        [f"127.0.0.1:{free_port()}"],
        [
            {"model": BERT, "port": free_port()},
            {"model": LLAMA, "layers": "0:2", "port": free_port()},
            {"model": LLAMA, "layers": "2:4", "port": free_port()},
        ],
    )
    address = f"127.0.0.1:{router_port}"
    cli = Cli(address, repository)
    with tessera_up(config, repository) as up, grpc.insecure_channel(address) as channel:
        up.wait_ready()
        stub = inference_pb2_grpc.InferenceStub(channel)
        v1 = next(label for label, v in cli.versions(BERT).items() if label and v.get("base"))

        # Publish: the version's label is the last word; the same files again are the same.
        published = cli("publish", BERT, "--from", str(bert_v2)).stdout.split()[-1]
        assert published == "v2"
        assert cli("publish", BERT, "--from", str(bert_v2)).stdout.split()[-1] == "v2"
        refs = {v1: _vectors(repository / BERT), "v2": _vectors(bert_v2)}
        assert check_embed(stub, refs, TEXTS[0]) == v1  # published is not loaded

        load = EmbedLoad(stub, refs)
        try:
            # 20 % to v2: it loads (its worker starts), then takes its share; no call fails.
            assert "v2=20" in cli("traffic", BERT, "v2=20").stdout
            shares = Counter(check_embed(stub, refs, TEXTS[i % 4]) for i in range(150))
            assert 15 <= shares["v2"] <= 45, shares  # 10-30 % of 150

            # Rollback: every answer after the command returns is v1's.
            assert f"{v1}=100" in cli("rollback", BERT).stdout
            assert {check_embed(stub, refs, t) for t in TEXTS * 5} == {v1}
            cli("traffic", BERT, "v2=20")
        finally:
            load.stop()
        assert not load.errors, load.errors[:5]
        assert load.seen[v1] and load.seen["v2"], load.seen

        # A router restarted (SIGKILL, then by `tessera up`) mid-rollout has the same weights.
        (router,) = [p for p in up.children() if "router" in p.cmdline()]
        router.send_signal(signal.SIGKILL)
        wait_until(lambda: _weights(address, BERT) is not None, 60, "the router restarted")
        assert _weights(address, BERT) == {v1: 80, "v2": 20}
        wait_until(lambda: cli.versions(BERT)["v2"]["state"] == "ready", 60, "v2 ready")

        load = EmbedLoad(stub, refs)
        try:
            # Promote: every answer is v2's.
            assert "v2=100" in cli("promote", BERT, "v2").stdout
            assert {check_embed(stub, refs, t) for t in TEXTS * 5} == {"v2"}

            # Unload v1: its worker (the mesh file's) stops once its requests are done.
            before = _workers(up, BERT)
            assert any("--version" not in cmd for cmd in before)
            assert "unloaded" in cli("unload", BERT, v1).stdout
            wait_until(
                lambda: all("--version" in cmd for cmd in _workers(up, BERT)), 30, "v1 stopped"
            )
            assert {check_embed(stub, refs, t) for t in TEXTS * 5} == {"v2"}
        finally:
            load.stop()
        assert not load.errors, load.errors[:5]
        assert load.seen["v2"], load.seen

        # A version whose files are not the expected ones is refused and never loads.
        refused = cli(
            "publish", LLAMA, "--from", str(llama_v2), "--expected-fingerprint", "0" * 64, ok=False
        )
        assert "expected" in refused.stderr
        assert len(_labels(cli, LLAMA)) == 1  # the model's own version only
        assert not [p for p in (repository / ".versions" / LLAMA).glob("*") if p.is_dir()]

        # Generation: admitted on v1, it finishes with v1's greedy tokens while v2 takes over.
        llama_v1 = next(iter(_labels(cli, LLAMA)))
        assert cli("publish", LLAMA, "--from", str(llama_v2)).stdout.split()[-1] == "v2"
        cli("load", LLAMA, "v2")
        prompt, max_new = "the cat sat on", 200
        stream = stub.GenerateStream(
            inference_pb2.GenerateRequest(model=LLAMA, prompt=prompt, max_new_tokens=max_new),
            timeout=120,
        )
        first = next(stream)
        assert first.version == llama_v1
        models = models_pb2_grpc.ModelsStub(channel)
        models.Promote(models_pb2.VersionRequest(model=LLAMA, version="v2"), timeout=30)
        rest = list(stream)  # promoted while the stream still runs: it had max_new tokens left
        assert rest, "the stream ended before the promotion; it proves nothing"
        fresh = stub.Generate(
            inference_pb2.GenerateRequest(model=LLAMA, prompt=prompt, max_new_tokens=12),
            timeout=60,
        )
        assert fresh.version == "v2"
        assert list(fresh.token_ids) == _greedy(llama_v2, prompt, 12)[: len(fresh.token_ids)]
        streamed = [t for chunk in [first, *rest] for t in chunk.token_ids]
        want = _greedy(repository / LLAMA, prompt, max_new)
        assert streamed == want[: len(streamed)] and len(streamed) >= 12


def _weights(address: str, model: str) -> dict[str, int] | None:
    try:
        with grpc.insecure_channel(address) as channel:
            listed = models_pb2_grpc.ModelsStub(channel).List(
                models_pb2.ListVersionsRequest(model=model), timeout=5
            )
    except grpc.RpcError:
        return None
    return {v.label: v.weight for v in listed.models[0].versions if v.weight}


def _labels(cli: Cli, model: str) -> list[str]:
    return [label for label in cli.versions(model) if label]


def _workers(up: Any, model: str) -> list[str]:
    found = []
    for process in up.children():
        try:
            cmd = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if " worker " in f" {cmd} " and f"--model {model}" in cmd:
            found.append(cmd)
    return found


# -- pins, admin tokens and autoscaling signals on a plain mesh ------------------------------


USER, ADMIN = "versions-user-token", "versions-admin-token"


def _stream_until(stub: Any, stop: threading.Event, errors: list[str]) -> None:
    """One client: tiny-llama streams back to back until `stop` (bounded by count)."""
    request = inference_pb2.GenerateRequest(model=LLAMA, prompt="the cat", max_new_tokens=120)
    for _ in range(200):
        if stop.is_set():
            return
        try:
            for _chunk in stub.GenerateStream(
                request, timeout=60, metadata=[("authorization", f"Bearer {USER}")]
            ):
                pass
        except grpc.RpcError as error:
            errors.append(repr(error)[:200])


def test_pins_admin_tokens_and_desired_chains(tiny_repo: Path) -> None:
    from tests.mesh import (
        Mesh,
        metric,
        metrics_address,
        scrape,
        wait_model_on,
        wait_version_gauges,
    )

    env = {
        "TESSERA_ROUTER_AUTH_TOKENS": USER,
        "TESSERA_ROUTER_ADMIN_TOKENS": ADMIN,
        "TESSERA_ROUTER_METRICS_PORT": "0",
        "TESSERA_ROUTER_MESH_SECRET": "versions-mesh",
        "TESSERA_WORKER_MESH_SECRET": "versions-mesh",
        "TESSERA_ROUTER_AUTOSCALE_TARGET_PER_CHAIN": "4",
        "TESSERA_ROUTER_AUTOSCALE_UPSCALE_DELAY_S": "1",
        "TESSERA_ROUTER_AUTOSCALE_DOWNSCALE_DELAY_S": "3",
        "TESSERA_ROUTER_VERSION_STATE": str(Path(tiny_repo).parent / "pins-state.json"),
    }
    user = [("authorization", f"Bearer {USER}")]
    admin = [("authorization", f"Bearer {ADMIN}")]
    with Mesh(tiny_repo, env=env) as mesh:
        router = mesh.start_router()
        mesh.start_worker(LLAMA)
        wait_model_on(mesh.channel(), LLAMA, metadata=user, procs=[router, *mesh.workers])
        stub = mesh.stub()
        models = models_pb2_grpc.ModelsStub(mesh.channel())
        where = metrics_address(router)

        # Model control is for admin tokens only; a user token is refused by name.
        with pytest.raises(grpc.RpcError) as refused:
            models.List(models_pb2.ListVersionsRequest(), timeout=10, metadata=user)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as anonymous:
            models.List(models_pb2.ListVersionsRequest(), timeout=10)
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        listed = models.List(
            models_pb2.ListVersionsRequest(model=LLAMA), timeout=10, metadata=admin
        )
        (version,) = listed.models[0].versions
        assert version.state == "ready" and version.base and listed.models[0].implicit

        # A pin by label or fingerprint answers on that version; an unknown one is NOT_FOUND.
        for pin in (version.label, version.fingerprint):
            reply = stub.Generate(
                inference_pb2.GenerateRequest(
                    model=LLAMA, prompt="a b", max_new_tokens=3, version=pin
                ),
                timeout=30,
                metadata=user,
            )
            assert reply.version == version.label

        wait_version_gauges(where)  # the series compared below are all there already
        before = {(s.name, tuple(sorted(s.labels.items()))) for s in scrape(where)}
        for index in range(300):  # unknown models and versions: refused, and no new series
            request = (
                inference_pb2.GenerateRequest(model=f"nope-{index}", prompt="a")
                if index % 2
                else inference_pb2.GenerateRequest(model=LLAMA, prompt="a", version=f"v{index}")
            )
            with pytest.raises(grpc.RpcError) as missing:
                stub.Generate(request, timeout=10, metadata=user)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        after = {(s.name, tuple(sorted(s.labels.items()))) for s in scrape(where)}
        # A NOT_FOUND code per RPC and model may be new; never a series per name sent.
        new = after - before
        named = [
            labels
            for _, labels in new
            for _, value in labels
            if value.startswith("nope-") or (value.startswith("v") and value[1:].isdigit())
        ]
        assert not named, named
        kinds = {tuple(kv for kv in labels if kv[0] != "le") for _, labels in new}
        assert len(kinds) <= 4, kinds

        def desired() -> float:
            return metric(
                scrape(where), "tessera_version_desired_chains", model=LLAMA, version=version.label
            )

        assert desired() == 1
        stop, errors = threading.Event(), []
        clients = [
            threading.Thread(target=_stream_until, args=(stub, stop, errors), daemon=True)
            for _ in range(16)
        ]
        try:
            for client in clients:
                client.start()
            # 16 in flight over a target of 4: 4 chains wanted, within two 1 s intervals of the
            # upscale delay (1 s).
            wait_until(lambda: desired() == 4, 30, "desired_chains rising to 4")
            in_flight = metric(
                scrape(where),
                "tessera_version_requests_in_flight",
                model=LLAMA,
                version=version.label,
            )
            assert in_flight > 4
        finally:
            stop.set()
            for client in clients:
                client.join(timeout=60)
        assert not errors, errors[:3]
        fell = time.monotonic()
        wait_until(lambda: desired() == 1, 30, "desired_chains falling back to 1")
        assert time.monotonic() - fell >= 2.5  # not before the downscale delay (3 s)
