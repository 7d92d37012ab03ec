"""One decode step on this CPU, in process: where a chain's step time goes; what torch options do.

    python -m services.bench.step [--context 64] [--steps 30] [--out FILE]

Tessera's own batch engine (StageModel + StageBatch, the code the workers run), no gRPC, SmolLM2:
the median time of one decode step of a batch of rows holding `context` tokens each, for

- the replica [0,30) with 16 rows on all cores, and on one core;
- each stage of the default chain ([0,15), [15,30)) with 8 rows on one core: with two slots of 8
  rows pipelined over two stages, the chain's compute-bound ceiling is 16 tokens per
  2 x the slower stage's step, against the replica's 16 per step (each measured alone: two
  stages computing at once slow each other down, see `services.bench.generation`'s split); the
  last stage's and the replica's step include the LM head and sampling;
- torch options on the replica's step: eager attention instead of scaled-dot-product attention,
  bfloat16 and int8 weights (not exact: their greedy tokens may differ), and `torch.compile` of
  the step (inductor, dynamic shapes) where it compiles;
- one core's fp32 matrix products at 1, 8 and 16 rows over 212 MB of distinct MLP-shaped
  weights: how fast torch streams weights and computes at the shapes a decode step has.

Each option's first 8 greedy tokens are compared with the baseline's (16 rows): "same" or how
many rows differ.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from services.bench.generation import LLM
from services.common.repository import ModelSpec, model_spec
from services.common.types import Span
from services.worker.batch import Row, StageBatch
from services.worker.stage import StageModel

TOKENS_CHECKED = 8


def _batch(stage: StageModel, rows: int, context: int, steps: int) -> tuple[StageBatch, Any]:
    """A prefilled batch on `stage` and the input of its first decode step."""
    generator = torch.Generator().manual_seed(0)
    members = [Row(i, context, context + steps + TOKENS_CHECKED + 2) for i in range(rows)]
    if stage.is_first:
        ids = torch.randint(100, 10_000, (rows, context), generator=generator)
        batch, hidden = StageBatch.prefill(stage, "b", members, ids)
    else:
        x = torch.randn(rows, context, stage.spec.hidden_size, generator=generator)
        batch, hidden = StageBatch.prefill(stage, "b", members, x)
    return batch, hidden


def _timed(stage: StageModel, rows: int, context: int, steps: int, threads: int) -> dict[str, Any]:
    """Median seconds per decode step, and the first greedy tokens when the stage samples."""
    torch.set_num_threads(threads)
    batch, hidden = _batch(stage, rows, context, steps)
    tokens: list[list[int]] = []
    times = []
    with torch.inference_mode():
        if stage.is_last:
            picked, _ = batch.sample(stage, hidden)  # the first token, from the prefill
        for _ in range(steps):
            if stage.is_first and stage.is_last:
                tokens.append(picked)
                x: torch.Tensor = torch.tensor(picked)
            elif stage.is_first:
                x = torch.randint(100, 10_000, (rows,))
            else:
                x = torch.randn(rows, 1, stage.spec.hidden_size)
            started = time.perf_counter()
            hidden = batch.decode(stage, x)
            if stage.is_last:  # the head and sampling are part of the last stage's step
                picked, _ = batch.sample(stage, hidden)
            times.append(time.perf_counter() - started)
    warm = times[3:] or times
    return {
        "step_ms": statistics.median(warm) * 1e3,
        "p90_ms": sorted(warm)[int(0.9 * (len(warm) - 1))] * 1e3,
        "tokens": [list(col) for col in zip(*tokens[:TOKENS_CHECKED], strict=True)],
    }


def _gemm(spec: ModelSpec, rows: int, megabytes: int = 212) -> dict[str, float]:
    """One thread's fp32 matrix products at `rows` rows over distinct weights shaped like the
    model's MLP matrices (`megabytes` of them, far more than the caches hold, as a step's are):
    weight bytes streamed per second and arithmetic per second."""
    torch.set_num_threads(1)
    shape = (spec.hidden_size * 8 // 3, spec.hidden_size)  # SmolLM2's MLP: 1536 x 576
    count = max(1, megabytes * 2**20 // (4 * shape[0] * shape[1]))
    weights = [torch.randn(shape) for _ in range(count)]
    x = torch.randn(rows, spec.hidden_size)
    with torch.inference_mode():
        for w in weights:
            torch.nn.functional.linear(x, w)
        started = time.perf_counter()
        for _ in range(3):
            for w in weights:
                torch.nn.functional.linear(x, w)
        seconds = (time.perf_counter() - started) / 3
    elements = count * shape[0] * shape[1]
    return {"gb_s": 4 * elements / seconds / 1e9, "gflop_s": 2 * rows * elements / seconds / 1e9}


def _compiled(stage: StageModel) -> StageModel:
    """The stage with its base model's forward compiled (inductor, dynamic shapes)."""
    stage.main.forward = torch.compile(stage.main.forward, dynamic=True)
    return stage


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="also torch.compile (minutes)")
    parser.add_argument(
        "--repository", default=os.environ.get("TESSERA_MODEL_REPOSITORY", "model-repository")
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    spec = model_spec(Path(args.repository), LLM)
    cores = os.cpu_count() or 1
    whole = Span(0, spec.num_layers)
    half = spec.num_layers // 2
    cases: list[tuple[str, Callable[[], StageModel], int, int]] = [
        ("replica, 16 rows, all cores", lambda: StageModel(spec, whole), 16, cores),
        ("replica, 16 rows, 1 core", lambda: StageModel(spec, whole), 16, 1),
        ("stage [0,15), 8 rows, 1 core", lambda: StageModel(spec, Span(0, half)), 8, 1),
        (
            f"stage [15,{spec.num_layers}), 8 rows, 1 core",
            lambda: StageModel(spec, Span(half, spec.num_layers)),
            8,
            1,
        ),
        (
            "replica, eager attention",
            lambda: StageModel(spec, whole, attn_implementation="eager"),
            16,
            cores,
        ),
        (
            "replica, bfloat16 weights",
            lambda: StageModel(spec, whole, precision="bfloat16"),
            16,
            cores,
        ),
        ("replica, int8 weights", lambda: StageModel(spec, whole, precision="int8"), 16, cores),
    ]
    if args.compile:
        cases.append(
            ("replica, torch.compile", lambda: _compiled(StageModel(spec, whole)), 16, cores)
        )
    results: dict[str, Any] = {"cores": cores, "context": args.context}
    baseline: list[list[int]] | None = None
    for name, build, rows, threads in cases:
        try:
            found = _timed(build(), rows, args.context, args.steps, threads)
        except Exception as error:  # noqa: BLE001 - an option that fails is reported, not fatal
            print(f"{name:34s} failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
            results[name] = {"error": str(error)[:500]}
            continue
        same = ""
        if found["tokens"]:
            baseline = baseline or found["tokens"]
            differ = sum(a != b for a, b in zip(found["tokens"], baseline, strict=True))
            same = "same tokens" if not differ else f"{differ}/{rows} rows' tokens differ"
        results[name] = found
        print(
            f"{name:34s} {found['step_ms']:7.1f} ms/step (p90 {found['p90_ms']:.1f})  {same}",
            flush=True,
        )
    for rows in (1, 8, 16):
        gemm = _gemm(spec, rows)
        results[f"gemm, {rows} rows, 1 core"] = gemm
        print(
            f"fp32 matrix products, {rows:2d} rows, 1 core: weights streamed at "
            f"{gemm['gb_s']:.1f} GB/s, {gemm['gflop_s']:.1f} GFLOP/s",
            flush=True,
        )
    replica = results["replica, 16 rows, all cores"]["step_ms"]
    stages = [results[name]["step_ms"] for name, *_ in cases[2:4]]
    ceiling = replica / (2 * max(stages))
    print(
        f"chain ceiling (two 8-row slots pipelined, compute only, stages alone): 16 tokens per "
        f"{2 * max(stages):.1f} ms against the replica's 16 per {replica:.1f} ms = {ceiling:.2f}x",
        flush=True,
    )
    results["chain_ceiling_vs_replica"] = ceiling
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
