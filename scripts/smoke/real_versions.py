"""Smoke: the issue-18 acceptance flow on real MiniLM through `tessera up` (a copy of the repository)."""
import json, shutil, subprocess, sys, time, os
from pathlib import Path
from collections import Counter
import numpy as np, grpc, yaml
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from services.cache.launcher import free_port
from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc
from tests.integration.test_up import tessera_up

ROOT = Path("/tmp/realrepo")
if ROOT.exists(): shutil.rmtree(ROOT)
ROOT.mkdir()
for m in ("all-minilm-l6-v2", "smollm2-135m-instruct"):
    shutil.copytree(REPO / "model-repository" / m, ROOT / m)
v2 = Path("/tmp/minilm-v2")
if v2.exists(): shutil.rmtree(v2)
shutil.copytree(ROOT / "all-minilm-l6-v2", v2)
weights = load_file(v2 / "model.safetensors")
key = next(k for k in weights if "layer.3" in k and "query.weight" in k)
weights[key] = weights[key] * 1.5
save_file(weights, v2 / "model.safetensors", metadata={"format": "pt"})
texts = ["The capital of France is Paris.", "gRPC carries protobuf messages.", "A cat sat on the mat."]
refs = {}
for label, path in (("base", ROOT / "all-minilm-l6-v2"), ("v2", v2)):
    refs[label] = SentenceTransformer(str(path), device="cpu").encode(texts, normalize_embeddings=True)
print("refs differ by", float(np.abs(refs["base"] - refs["v2"]).max()), flush=True)
port = free_port()
cfg = Path("/tmp/tessera-smoke-mesh.yaml")
cfg.write_text(yaml.safe_dump({"router": {"port": port, "http_port": 0}, "cache": {"nodes": [f"127.0.0.1:{free_port()}"]},
    "workers": [{"model": "smollm2-135m-instruct", "layers": "0:15", "port": free_port()},
                {"model": "smollm2-135m-instruct", "layers": "15:30", "port": free_port()},
                {"model": "all-minilm-l6-v2", "port": free_port()}]}))
addr = f"127.0.0.1:{port}"
def cli(*a):
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "services.cli", "models", "--router", addr, *a], capture_output=True, text=True, cwd=REPO, timeout=600)
    print(f"$ tessera models {' '.join(a)}  ({time.monotonic()-t:.1f} s, rc {r.returncode})\n{r.stdout}{r.stderr}", flush=True)
    return r
def which(stub, i):
    reply = stub.Embed(inference_pb2.EmbedRequest(model="all-minilm-l6-v2", inputs=[texts[i % 3]]), timeout=60)
    got = np.array(reply.embeddings[0].values)
    for label, ref in refs.items():
        if np.abs(got - ref[i % 3]).max() < 1e-4:
            return reply.version, label
    return reply.version, "NEITHER"
env = dict(os.environ, TESSERA_MODEL_REPOSITORY=str(ROOT))
t0 = time.monotonic()
with tessera_up(cfg, ROOT) as up:
    up.wait_ready(600)
    print("mesh ready in", round(time.monotonic() - t0, 1), flush=True)
    with grpc.insecure_channel(addr) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        cli("list")
        cli("publish", "all-minilm-l6-v2", "--from", str(v2))
        cli("traffic", "all-minilm-l6-v2", "v2=20")
        c = Counter(which(stub, i) for i in range(150)); print("after traffic v2=20:", c, flush=True)
        t = time.monotonic(); cli("rollback", "all-minilm-l6-v2"); print("rollback took", round(time.monotonic()-t, 2))
        c = Counter(which(stub, i) for i in range(30)); print("after rollback:", c, flush=True)
        cli("promote", "all-minilm-l6-v2", "v2")
        c = Counter(which(stub, i) for i in range(30)); print("after promote:", c, flush=True)
        base = [l for l in json.loads(cli("list", "all-minilm-l6-v2", "--json").stdout)["models"][0]["versions"] if l.get("base")][0]["label"]
        cli("unload", "all-minilm-l6-v2", base)
        c = Counter(which(stub, i) for i in range(30)); print("after unload:", c, flush=True)
        cli("list")
