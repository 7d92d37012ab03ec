"""What each worker holds: RSS after warm-up and peak RSS while loading, against a torch baseline.

``python -m services.bench.memory [--repository DIR] [--precision P] [--json FILE]``

Starts a router and then, one at a time, real `tessera worker` processes for: a SmolLM2 replica,
SmolLM2 stages 0:15 and 15:30, and the MiniLM replica. For each, once it prints its ready line
(the model is loaded and warmed up) it reads VmRSS (steady) and VmHWM (the peak since the process
started, i.e. while loading) from /proc/PID/status, then stops it. The baseline is a fresh
``python -c "import torch, transformers, grpc"`` process's RSS.

Ratios printed:
- share = (stage RSS - baseline) / (replica RSS - baseline): what a stage holds above the
  baseline, as a fraction of the whole model's; a stage of half the layers plus the tied
  embedding matrix should stay at or under 0.65 (issue 11).
- share+code: the same against a second baseline that has also imported the model's
  transformers code (``transformers.models.llama.modeling_llama``). That import alone costs more
  than 100 MiB (it pulls in torch.distributed.tensor, torch._dynamo and scipy); every worker pays
  it whatever it holds, so it dilutes the first share towards 1.
- peak / steady = VmHWM / VmRSS per worker: loading should not need more than 1.1x what is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from services.bench.procs import Child, ChildFailed, Fleet

LLM = "smollm2-135m-instruct"
ENCODER = "all-minilm-l6-v2"
START_TIMEOUT_S = 180.0
SETTLE_S = 1.0  # after the ready line: let the registration and first heartbeat happen
SHARE_BOUND = 0.65
PEAK_BOUND = 1.1


@dataclass(frozen=True)
class Memory:
    name: str
    rss_mb: float  # VmRSS after warm-up
    peak_mb: float  # VmHWM: the most it held, loading included
    anon_mb: float  # RssAnon: memory the process owns (weights, activations, heap)


def _status(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon of a process, in MiB."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon"):
            values[key] = int(rest.split()[0]) / 1024
    return values


def baseline(env: dict[str, str], extra_import: str = "") -> Memory:
    """A fresh process that imports torch, transformers and grpc (and `extra_import`)."""
    code = (
        "import torch, transformers, grpc, pathlib\n"
        + (f"import {extra_import}\n" if extra_import else "")
        + "print(pathlib.Path('/proc/self/status').read_text())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    values = {}
    for line in out.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon"):
            values[key] = int(rest.split()[0]) / 1024
    name = f"baseline + {extra_import}" if extra_import else "baseline"
    return Memory(name, values["VmRSS"], values["VmHWM"], values["RssAnon"])


def _worker_argv(
    fleet: Fleet, model: str, router: str, layers: str | None, precision: str
) -> list[str]:
    argv = [
        "-m",
        "services.cli",
        "--log-level",
        fleet.log_level,
        "worker",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--router",
        router,
        "--repository",
        fleet.repository,
        "--precision",
        precision,
    ]
    return argv + (["--layers", layers] if layers else [])


def measure_worker(
    fleet: Fleet, name: str, model: str, router: str, layers: str | None, precision: str
) -> Memory:
    child = Child(name, _worker_argv(fleet, model, router, layers, precision), fleet.env)
    fleet.children.append(child.start())
    try:
        child.wait_ready(time.monotonic() + START_TIMEOUT_S)
        time.sleep(SETTLE_S)
        assert child.popen is not None
        values = _status(child.popen.pid)
        return Memory(name, values["VmRSS"], values["VmHWM"], values["RssAnon"])
    finally:
        child.terminate()
        child.wait_or_kill(15.0)
        fleet.children.remove(child)


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repository", default=os.environ.get("TESSERA_MODEL_REPOSITORY", "model-repository")
    )
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    fleet = Fleet(args.repository, env={"OMP_WAIT_POLICY": "PASSIVE"})
    try:
        base = baseline(fleet.env)
        code_base = baseline(fleet.env, "transformers.models.llama.modeling_llama")
        router = fleet.router("router").wait_ready(time.monotonic() + START_TIMEOUT_S)
        rows = [
            measure_worker(fleet, "smollm2 replica", LLM, router.address, None, args.precision),
            measure_worker(fleet, "smollm2 0:15", LLM, router.address, "0:15", args.precision),
            measure_worker(fleet, "smollm2 15:30", LLM, router.address, "15:30", args.precision),
            measure_worker(fleet, "minilm replica", ENCODER, router.address, None, args.precision),
        ]
    except ChildFailed as exc:
        print(f"memory bench: {exc}", file=sys.stderr)
        return 1
    finally:
        fleet.stop_all()
    replica = rows[0]
    print(
        f"precision {args.precision}; baseline (import torch, transformers, grpc): "
        f"{base.rss_mb:.0f} MiB; with the Llama model code imported too: "
        f"{code_base.rss_mb:.0f} MiB"
    )
    print(
        f"{'worker':16s} {'RSS':>8s} {'peak':>8s} {'anon':>8s} {'above base':>11s} "
        f"{'share':>6s} {'share+code':>10s} {'peak/RSS':>9s}"
    )
    ok = True
    result: dict[str, object] = {
        "precision": args.precision,
        "baseline": asdict(base),
        "code_baseline": asdict(code_base),
    }
    entries = []
    for row in rows:
        above = row.rss_mb - base.rss_mb
        llm = row.name.startswith("smollm2")
        share = above / (replica.rss_mb - base.rss_mb) if llm else None
        code_share = (
            (row.rss_mb - code_base.rss_mb) / (replica.rss_mb - code_base.rss_mb) if llm else None
        )
        peak_ratio = row.peak_mb / row.rss_mb
        print(
            f"{row.name:16s} {row.rss_mb:7.0f}M {row.peak_mb:7.0f}M {row.anon_mb:7.0f}M "
            f"{above:10.0f}M {_ratio(share):>6s} {_ratio(code_share):>10s} {peak_ratio:9.2f}"
        )
        if share is not None and row is not replica and share > SHARE_BOUND:
            ok = False
        if peak_ratio > PEAK_BOUND:
            ok = False
        entries.append(
            asdict(row)
            | {"share": share, "share_over_code_baseline": code_share, "peak_over_rss": peak_ratio}
        )
    result["rows"] = entries
    print(
        f"bounds: each SmolLM2 stage share <= {SHARE_BOUND}, peak/RSS <= {PEAK_BOUND}: "
        + ("met" if ok else "NOT met")
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 2


if __name__ == "__main__":
    raise SystemExit(main())
