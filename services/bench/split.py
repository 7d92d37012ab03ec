"""Where a served generation's time goes, per stage: compute, queue, transport and waiting.

Read from the Prometheus metrics of the router and the workers (`tessera_worker_step_seconds`,
`tessera_router_stage_call_seconds`) before and after a run, and from each process's CPU time:

- compute: the model thread ran this stage's steps (worker-side);
- queue: a step waited for the model thread (another step of this stage was running);
- transport: the router's call to the stage took longer than queue + compute: gRPC, protobuf and
  tensor (de)serialisation at both ends, and the event loops that carry them;
- waiting: the stage computed nothing (wall - compute): its share of the run spent idle, waiting
  for the router, for the other stage or for transport.
"""

from __future__ import annotations

import urllib.request
from collections import defaultdict
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from services.bench.procs import Child, Fleet

KINDS = ("prefill", "decode")  # the router's kinds of generation step (a chunk is a prefill)
Sums = dict[tuple[str, ...], tuple[float, float]]  # labels -> (sum of seconds, count)


def scrape(address: str, metric: str, labels: tuple[str, ...]) -> Sums:
    """The `_sum` and `_count` of histogram `metric` at http://address/metrics, by labels."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found: dict[tuple[str, ...], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for family in text_string_to_metric_families(text):
        if family.name != metric:
            continue
        for sample in family.samples:
            key = tuple(sample.labels.get(label, "") for label in labels)
            if sample.name == f"{metric}_sum":
                found[key][0] = sample.value
            elif sample.name == f"{metric}_count":
                found[key][1] = sample.value
    return {key: (value[0], value[1]) for key, value in found.items()}


@dataclass(frozen=True)
class Snapshot:
    router: Sums  # (worker address, kind)
    workers: dict[str, Sums]  # worker address -> (kind, phase)
    cpu: dict[str, float]  # child name -> CPU seconds


def snapshot(fleet: Fleet) -> Snapshot:
    router = next(c for c in fleet.children if c.name.startswith("router"))
    workers = [c for c in fleet.children if c.name.startswith("w")]
    return Snapshot(
        router=scrape(_metrics(router), "tessera_router_stage_call_seconds", ("worker", "kind")),
        workers={
            w.address: scrape(_metrics(w), "tessera_worker_step_seconds", ("kind", "phase"))
            for w in workers
        },
        cpu=fleet.cpu_snapshot(),
    )


def _metrics(child: Child) -> str:
    if not child.metrics_address:
        raise RuntimeError(f"{child.name} serves no metrics (set its metrics_port to 0)")
    return child.metrics_address


def _delta(after: Sums, before: Sums, key: tuple[str, ...]) -> tuple[float, float]:
    a, b = after.get(key, (0.0, 0.0)), before.get(key, (0.0, 0.0))
    return a[0] - b[0], a[1] - b[1]


def split(before: Snapshot, after: Snapshot, wall_s: float) -> dict[str, object]:
    """Per stage, in chain order: fractions of the run's wall time and mean ms per decode step;
    and each process's share of one core over the run."""
    stages = []
    for address in after.workers:
        w_after, w_before = after.workers[address], before.workers.get(address, {})
        compute = queue = 0.0
        for kind in ("prefill", "chunk", "decode"):
            compute += _delta(w_after, w_before, (kind, "compute"))[0]
            queue += _delta(w_after, w_before, (kind, "queue"))[0]
        call = sum(_delta(after.router, before.router, (address, k))[0] for k in KINDS)
        d_compute, steps = _delta(w_after, w_before, ("decode", "compute"))
        d_queue = _delta(w_after, w_before, ("decode", "queue"))[0]
        d_call = _delta(after.router, before.router, (address, "decode"))[0]
        per = 1e3 / steps if steps else 0.0
        stages.append(
            {
                "worker": address,
                "compute": compute / wall_s,
                "queue": queue / wall_s,
                "transport": max(0.0, call - compute - queue) / wall_s,
                "waiting": max(0.0, wall_s - compute) / wall_s,
                "decode_steps": int(steps),
                "decode_compute_ms": d_compute * per,
                "decode_queue_ms": d_queue * per,
                "decode_transport_ms": max(0.0, d_call - d_compute - d_queue) * per,
            }
        )
    cpu = {
        name: (seconds - before.cpu.get(name, 0.0)) / wall_s for name, seconds in after.cpu.items()
    }
    return {"wall_s": wall_s, "stages": stages, "cpu_cores": cpu}


def describe(result: dict[str, object]) -> str:
    """One line per stage and one for CPU: how the run's wall time was spent."""
    lines = []
    stages = result["stages"]
    assert isinstance(stages, list)
    for index, s in enumerate(stages):
        lines.append(
            f"  stage {index}: compute {s['compute']:.0%}, waiting {s['waiting']:.0%} of the wall "
            f"(queue {s['queue']:.0%}, transport {s['transport']:.0%}); per decode step "
            f"compute {s['decode_compute_ms']:.1f} ms, queue {s['decode_queue_ms']:.1f} ms, "
            f"transport {s['decode_transport_ms']:.1f} ms ({s['decode_steps']} steps)"
        )
    cpu = result["cpu_cores"]
    assert isinstance(cpu, dict)
    lines.append("  CPU (cores busy): " + ", ".join(f"{n} {v:.2f}" for n, v in cpu.items()))
    return "\n".join(lines)
