"""Smoke: issue 18's SmolLM2 flow through `tessera up` (two stages) on a copy of the repository."""
import json, shutil, subprocess, sys, time, os, threading
from pathlib import Path
from collections import Counter
import grpc, torch, yaml
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from services.cache.launcher import free_port
from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc
from tests.integration.test_up import tessera_up

LLM = "smollm2-135m-instruct"
ROOT = Path("/tmp/realrepo2")
if ROOT.exists(): shutil.rmtree(ROOT)
ROOT.mkdir()
shutil.copytree(REPO / "model-repository" / LLM, ROOT / LLM)
v2 = Path("/tmp/smollm-v2")
if v2.exists(): shutil.rmtree(v2)
shutil.copytree(ROOT / LLM, v2)
weights = load_file(v2 / "model.safetensors")
key = next(k for k in weights if "layers.20." in k and "down_proj.weight" in k)
weights[key] = weights[key] * 1.5
save_file(weights, v2 / "model.safetensors", metadata={"format": "pt"})
prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time,"]
tok = AutoTokenizer.from_pretrained(ROOT / LLM)
refs = {}
for label, path in (("base", ROOT / LLM), ("v2", v2)):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    refs[label] = {}
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=48, do_sample=False)
        refs[label][p] = out[0, ids.shape[1]:].tolist()
for p in prompts:
    same = sum(a == b for a, b in zip(refs["base"][p], refs["v2"][p]))
    print(f"refs for {p!r}: first difference at {next((i for i,(a,b) in enumerate(zip(refs['base'][p], refs['v2'][p])) if a!=b), None)}", flush=True)
port = free_port()
cfg = Path("/tmp/tessera-smoke-mesh2.yaml")
cfg.write_text(yaml.safe_dump({"router": {"port": port, "http_port": 0}, "cache": {"nodes": []},
    "workers": [{"model": LLM, "layers": "0:15", "port": free_port()},
                {"model": LLM, "layers": "15:30", "port": free_port()}]}))
addr = f"127.0.0.1:{port}"
def cli(*a, show=True):
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "services.cli", "models", "--router", addr, *a], capture_output=True, text=True, cwd=REPO, timeout=900)
    if show: print(f"$ tessera models {' '.join(a)}  ({time.monotonic()-t:.1f} s, rc {r.returncode})\n{r.stdout}{r.stderr}", flush=True)
    return r
def which(tokens, p, n):
    hits = [l for l, r in refs.items() if r[p][:n] == tokens]
    return hits[0] if len(hits) == 1 else ("BOTH" if hits else "NEITHER")
def gen(stub, i, n=6):
    p = prompts[i % 3]
    reply = stub.Generate(inference_pb2.GenerateRequest(model=LLM, prompt=p, max_new_tokens=n), timeout=120)
    return reply.version, which(list(reply.token_ids), p, n)
def versions():
    return json.loads(cli("list", LLM, "--json", show=False).stdout)["models"][0]["versions"]
t0 = time.monotonic()
with tessera_up(cfg, ROOT) as up:
    up.wait_ready(600)
    print("mesh ready in", round(time.monotonic() - t0, 1), flush=True)
    with grpc.insecure_channel(addr) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        bad = cli("publish", LLM, "--from", str(v2), "--label", "bad", "--expected-fingerprint", "0123456789ab")
        print("wrong expected_fingerprint refused:", bad.returncode != 0, "versions:", [v["label"] for v in versions()], flush=True)
        cli("publish", LLM, "--from", str(v2), "--label", "v2")
        cli("traffic", LLM, "v2=20")
        give_up = time.monotonic() + 600
        while not any(v["label"] == "v2" and v["state"] == "ready" for v in versions()) and time.monotonic() < give_up:
            time.sleep(1)
        print("v2 ready after", round(time.monotonic() - t0, 1), flush=True)
        c = Counter(gen(stub, i) for i in range(150)); print("after traffic v2=20 (150 requests):", c, flush=True)
        cli("rollback", LLM)
        c = Counter(gen(stub, i) for i in range(15)); print("after rollback:", c, flush=True)
        # A long generation admitted on base keeps base's tokens across a promote.
        held = {}
        def long():
            tokens, version = [], ""
            for chunk in stub.GenerateStream(inference_pb2.GenerateRequest(model=LLM, prompt=prompts[0], max_new_tokens=48), timeout=300):
                tokens.extend(chunk.token_ids); version = chunk.version or version
                held["started"] = True
            held["tokens"], held["version"] = tokens, version
        t = threading.Thread(target=long); t.start()
        while "started" not in held: time.sleep(0.05)
        cli("promote", LLM, "v2")
        c = Counter(gen(stub, i) for i in range(15)); print("after promote:", c, flush=True)
        t.join()
        print("stream admitted before promote:", held["version"], "equals base reference:", held["tokens"] == refs["base"][prompts[0]], flush=True)
        base = [v for v in versions() if v.get("base")][0]["label"]
        cli("unload", LLM, base)
        c = Counter(gen(stub, i) for i in range(15)); print("after unload:", c, flush=True)
        cli("list")
print("total", round(time.monotonic() - t0, 1), "s")
