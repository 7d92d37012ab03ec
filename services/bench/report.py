"""The pure part of `tessera bench`: percentiles, rows, ratios, the table, JSON and target checks.

Nothing here opens a socket or loads a model, so it is unit-tested directly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Scenarios (the first column) and ratio groups.
EMBED_1 = "embed x1"  # one text per request
EMBED_16 = "embed x16"  # sixteen texts per request
EMBED_MIXED = "embed 60+4"  # 64 texts of which 60 are cached, against the 4 alone
GENERATE = "generate"  # GenerateStream, greedy, fixed max_new_tokens
FLOOR = "floor"  # bare round trips and the router's own overhead

# Paths (the second column).
LIMIT = "in-process limit"
LIMIT_1 = "in-process batch 1"  # one text per call: the latency a c=1 request is held to
DIRECT = "direct to worker"
ROUTER = "router -> replica"
ROUTER_BF16 = "router -> bf16 replica"
KSERVE = "KServe ModelInfer (tritonclient)"
MIXED = "60 cached + 4 new"
FOUR_NEW = "4 new (uncached)"
CHAIN = "router -> 2-stage chain"
CACHE = "router cache hits"
BARE = "bare grpc.aio round trip"
ROUTER_HEALTH = "router health Check"
OVERHEAD = "router overhead"

SCHEMA = "tessera-bench/1"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default).

    NaN for no values.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference; None when either is missing, NaN or the reference is not positive."""
    if value is None or reference is None or math.isnan(value) or math.isnan(reference):
        return None
    if reference <= 0:
        return None
    return value / reference


@dataclass
class Row:
    """One measured line of the table."""

    scenario: str
    path: str
    concurrency: int | None  # None: not a concurrency (a batched in-process call)
    requests: int  # completed requests (or batched calls for a limit)
    wall_s: float
    req_s: float  # requests per second (a limit: equivalent requests)
    items_s: float  # texts/s (Embed) or tokens/s (Generate)
    unit: str  # "texts", "tokens" or "calls"
    p50_ms: float
    p99_ms: float
    ttft_p50_ms: float | None = None
    errors: int = 0
    cpu_share: float | None = None  # the load generator's CPU share over the line
    group: str | None = None  # rows in a group are compared with its limit row
    is_limit: bool = False
    ratio: float | None = None  # items_s / the group's limit items_s
    note: str = ""
    error_kinds: dict[str, int] = field(default_factory=dict)
    service_cpu_ms: dict[str, float] = field(default_factory=dict)  # per request, by process

    @property
    def key(self) -> tuple[str, str, int | None]:
        return (self.scenario, self.path, self.concurrency)


def make_row(
    scenario: str,
    path: str,
    concurrency: int | None,
    *,
    latencies_s: Sequence[float],
    items: int,
    wall_s: float,
    unit: str,
    items_per_request: float = 1.0,
    ttfts_s: Sequence[float] = (),
    errors: int = 0,
    cpu_share: float | None = None,
    group: str | None = None,
    is_limit: bool = False,
    note: str = "",
    error_kinds: dict[str, int] | None = None,
) -> Row:
    """Summarises raw samples: latencies (one per request or call) in seconds, items done.

    req_s is items/s divided by items_per_request, so a batched in-process call reads as the
    requests it stands for.
    """
    items_s = items / wall_s if wall_s > 0 else math.nan
    req_s = items_s / items_per_request if items_per_request > 0 else math.nan
    return Row(
        scenario=scenario,
        path=path,
        concurrency=concurrency,
        requests=len(latencies_s),
        wall_s=wall_s,
        req_s=req_s,
        items_s=items_s,
        unit=unit,
        p50_ms=percentile(latencies_s, 50) * 1e3,
        p99_ms=percentile(latencies_s, 99) * 1e3,
        ttft_p50_ms=percentile(ttfts_s, 50) * 1e3 if ttfts_s else None,
        errors=errors,
        cpu_share=cpu_share,
        group=group,
        is_limit=is_limit,
        note=note,
        error_kinds=dict(error_kinds or {}),
    )


def cpu_per_request_ms(
    before: dict[str, float], after: dict[str, float], requests: int, min_ms: float = 0.05
) -> dict[str, float]:
    """CPU milliseconds per request of each process between two snapshots, busiest first;
    processes under min_ms per request (idle ones) are left out."""
    if requests <= 0:
        return {}
    spent = {
        name: (after[name] - before[name]) * 1e3 / requests for name in after if name in before
    }
    return {
        name: round(ms, 3)
        for name, ms in sorted(spent.items(), key=lambda kv: -kv[1])
        if ms >= min_ms
    }


def apply_ratios(rows: Iterable[Row]) -> None:
    """Sets each grouped row's ratio to its group's in-process limit (the limit itself: 1.0)."""
    rows = list(rows)
    limits = {r.group: r for r in rows if r.is_limit and r.group is not None}
    for row in rows:
        limit = limits.get(row.group) if row.group is not None else None
        row.ratio = ratio(row.items_s, limit.items_s) if limit is not None else None


def find(
    rows: Iterable[Row], scenario: str, path: str, concurrency: int | None = None
) -> Row | None:
    """The first row with this scenario and path (and concurrency, when given)."""
    for row in rows:
        if (
            row.scenario == scenario
            and row.path == path
            and (concurrency is None or row.concurrency == concurrency)
        ):
            return row
    return None


# -- the table ------------------------------------------------------------------------------

_UNITS = {"texts": "texts/s", "tokens": "tok/s", "calls": "calls/s"}


def _num(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _cells(row: Row) -> list[str]:
    items = "-" if row.unit == "calls" else f"{_num(row.items_s)} {_UNITS.get(row.unit, row.unit)}"
    note = row.note
    if row.errors:
        note = f"{row.errors} errors {row.error_kinds}" + (f"; {note}" if note else "")
    return [
        row.scenario,
        row.path,
        "-" if row.concurrency is None else str(row.concurrency),
        str(row.requests),
        _num(row.req_s),
        items,
        _num(row.p50_ms, 2),
        _num(row.p99_ms, 2),
        _num(row.ttft_p50_ms, 1),
        "-" if row.ratio is None else f"{row.ratio:.2f}",
        "-" if row.cpu_share is None else f"{row.cpu_share * 100:.0f}%",
        note,
    ]


HEADER = [
    "scenario",
    "path",
    "conc",
    "reqs",
    "req/s",
    "items/s",
    "p50 ms",
    "p99 ms",
    "ttft p50",
    "vs limit",
    "gen cpu",
    "note",
]
_RIGHT = {2, 3, 4, 5, 6, 7, 8, 9, 10}


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table, one line per row, a blank line between scenarios."""
    body = [_cells(r) for r in rows]
    widths = [
        max(len(HEADER[i]), *(len(c[i]) for c in body)) if body else len(HEADER[i])
        for i in range(len(HEADER))
    ]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in _RIGHT else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ]
        return "  ".join(parts).rstrip()

    out = [line(HEADER), line(["-" * w for w in widths])]
    previous = None
    for row, cells in zip(rows, body):
        if previous is not None and row.scenario != previous:
            out.append("")
        out.append(line(cells))
        previous = row.scenario
    return "\n".join(out)


# -- targets --------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    measured: float | None
    wanted: str  # e.g. ">= 0.85"
    ok: bool | None  # None: not measured in this run
    detail: str = ""


def _at_least(name: str, measured: float | None, bound: float, unit: str = "") -> Target:
    if measured is None or math.isnan(measured):
        return Target(name, None, f">= {bound:g}{unit}", None, "not measured")
    ok = measured >= bound
    detail = "" if ok else f"short by {(1 - measured / bound) * 100:.0f}%" if bound else ""
    return Target(name, measured, f">= {bound:g}{unit}", ok, detail)


def _at_most(name: str, measured: float | None, bound: float | None, unit: str = "") -> Target:
    known_bound = bound is not None and not math.isnan(bound)
    if measured is None or math.isnan(measured) or not known_bound:
        wanted = f"<= {bound:.3f}{unit}" if known_bound else "<= ?"
        return Target(
            name,
            None if measured is None or math.isnan(measured) else measured,
            wanted,
            None,
            "not measured",
        )
    assert bound is not None
    ok = measured <= bound
    detail = ""
    if not ok:
        detail = (
            f"over by {(measured / bound - 1) * 100:.0f}%"
            if bound > 0
            else f"over by {measured - bound:.3f}{unit}"
        )
    return Target(name, measured, f"<= {bound:.3f}{unit}", ok, detail)


def router_overhead_ms(rows: Sequence[Row]) -> float | None:
    """Router Embed p50 minus direct-to-worker p50, one text per request at concurrency 1.

    The measured overhead row (interleaved calls) when there is one, else the c=1 lines.
    """
    measured = find(rows, FLOOR, OVERHEAD, 1)
    if measured is not None:
        return measured.p50_ms
    router = find(rows, EMBED_1, ROUTER, 1)
    direct = find(rows, EMBED_1, DIRECT, 1)
    if router is None or direct is None:
        return None
    return router.p50_ms - direct.p50_ms


def overhead_row(rows: Sequence[Row]) -> Row | None:
    """The router's own cost at concurrency 1, as a row next to the bare round trip."""
    overhead = router_overhead_ms(rows)
    if overhead is None:
        return None
    bare = find(rows, FLOOR, BARE, 1)
    versus = ratio(overhead, bare.p50_ms) if bare is not None else None
    note = "router Embed p50 - direct Forward p50, 1 text, c=1"
    if versus is not None:
        note += f"; {versus:.2f} x bare round trip"
    return Row(
        scenario=FLOOR,
        path=OVERHEAD,
        concurrency=1,
        requests=0,
        wall_s=0.0,
        req_s=math.nan,
        items_s=math.nan,
        unit="calls",
        p50_ms=overhead,
        p99_ms=math.nan,
        note=note,
    )


def _plus(value: float | None, extra: float) -> float | None:
    return None if value is None or math.isnan(value) else value + extra


def _p50(row: Row | None) -> float | None:
    return row.p50_ms if row is not None else None


def embed_targets(rows: Sequence[Row]) -> list[Target]:
    """The embedding targets (issue 11): throughput ratios, c=1 latency, overhead, cache."""

    def ratio_of(path: str, concurrency: int) -> float | None:
        row = find(rows, EMBED_1, path, concurrency)
        return row.ratio if row is not None else None

    bare = find(rows, FLOOR, BARE, 1)
    floor = bare.p50_ms if bare is not None else None
    alone = find(rows, EMBED_1, LIMIT_1)
    mixed, four = find(rows, EMBED_MIXED, MIXED, 1), find(rows, EMBED_MIXED, FOUR_NEW, 1)
    hit = find(rows, EMBED_1, CACHE, 1)
    return [
        _at_least("embed x1 via router c=64 vs limit", ratio_of(ROUTER, 64), 0.85),
        _at_least("embed x1 via router c=16 vs limit", ratio_of(ROUTER, 16), 0.75),
        _at_least("embed x1 via KServe c=64 vs limit", ratio_of(KSERVE, 64), 0.85),
        _at_least("embed x1 via KServe c=16 vs limit", ratio_of(KSERVE, 16), 0.75),
        _at_most(
            "embed x1 via router c=1 p50 (ms) vs in-process batch 1 + 1.5 ms",
            _p50(find(rows, EMBED_1, ROUTER, 1)),
            _plus(_p50(alone), 1.5),
            " ms",
        ),
        _at_most(
            "embed x1 via KServe c=1 p50 (ms) vs in-process batch 1 + 1.5 ms",
            _p50(find(rows, EMBED_1, KSERVE, 1)),
            _plus(_p50(alone), 1.5),
            " ms",
        ),
        _at_most("router overhead c=1 (ms), interleaved", router_overhead_ms(rows), 1.0, " ms"),
        _at_most(
            "embed cache hit c=1 p50 (ms) vs 1.5 x bare",
            _p50(hit),
            1.5 * floor if floor is not None else None,
            " ms",
        ),
        _at_most(
            "embed 60 cached + 4 new p50 vs 4 new p50",
            ratio(_p50(mixed), _p50(four)),
            1.2,
            "x",
        ),
    ]


def _items_ratio(row: Row | None, reference: Row | None) -> float | None:
    return ratio(row.items_s, reference.items_s) if row and reference else None


def generate_targets(rows: Sequence[Row]) -> list[Target]:
    """The generation targets (issue 10), over the replica and the two-stage chain."""
    targets = []
    limit_16 = find(rows, GENERATE, LIMIT, 16)
    for path, name, solo_bound in ((ROUTER, "replica", 0.95), (CHAIN, "chain", 0.9)):
        one, sixteen = find(rows, GENERATE, path, 1), find(rows, GENERATE, path, 16)
        wide = find(rows, GENERATE, path, 64)
        targets += [
            _at_least(
                f"generate via {name} c=16 vs limit", sixteen.ratio if sixteen else None, 0.9
            ),
            _at_least(f"generate via {name} c=1 vs limit", one.ratio if one else None, solo_bound),
            _at_least(
                f"generate via {name} c=16 vs c=1 tok/s", _items_ratio(sixteen, one), 6.0, "x"
            ),
            _at_least(
                f"generate via {name} c=64 vs c=16 tok/s", _items_ratio(wide, sixteen), 1.0, "x"
            ),
            _at_most(
                f"generate via {name} c=64 errors",
                float(wide.errors) if wide is not None else None,
                0.0,
            ),
            _at_most(
                f"generate via {name} c=16 ttft p50 vs in-process prefill of 16 (closed loop)",
                ratio(sixteen.ttft_p50_ms, limit_16.ttft_p50_ms)
                if sixteen and limit_16 and sixteen.ttft_p50_ms and limit_16.ttft_p50_ms
                else None,
                1.5,
                "x",
            ),
        ]
    targets.append(
        _at_least(
            "generate chain vs replica c=16 tok/s (stretch)",
            _items_ratio(find(rows, GENERATE, CHAIN, 16), find(rows, GENERATE, ROUTER, 16)),
            1.1,
            "x",
        )
    )
    return targets


def evaluate_targets(rows: Sequence[Row]) -> list[Target]:
    """The issues' targets, checked against one run's rows."""

    def ratio_of(scenario: str, path: str, concurrency: int) -> float | None:
        row = find(rows, scenario, path, concurrency)
        return row.ratio if row is not None else None

    bare = find(rows, FLOOR, BARE, 1)
    floor = bare.p50_ms if bare is not None else None
    targets = embed_targets(rows)
    targets += [
        _at_least("embed x16 via router c=8 vs limit", ratio_of(EMBED_16, ROUTER, 8), 0.9),
        _at_least(
            "embed x1 bf16 replica c=64 vs float32 replica c=64",
            _items_ratio(find(rows, EMBED_1, ROUTER_BF16, 64), find(rows, EMBED_1, ROUTER, 64)),
            1.3,
            "x",
        ),
    ]
    targets += generate_targets(rows)
    targets.append(
        _at_most(
            "router overhead c=1 (ms) vs bare round trip", router_overhead_ms(rows), floor, " ms"
        )
    )
    hit = find(rows, GENERATE, CACHE)
    targets.append(
        _at_most(
            "generate cache hit p50 (ms) vs 1.5 x bare",
            hit.p50_ms if hit else None,
            1.5 * floor if floor is not None else None,
            " ms",
        )
    )
    miss = find(rows, GENERATE, ROUTER, 1)
    speedup = ratio(miss.p50_ms, hit.p50_ms) if miss and hit else None
    targets.append(_at_least("generate cache hit speed-up vs miss p50", speedup, 20.0, "x"))
    return targets


def format_targets(targets: Sequence[Target]) -> str:
    lines = ["targets:"]
    for t in targets:
        verdict = {True: "PASS", False: "MISS", None: "----"}[t.ok]
        measured = "-" if t.measured is None else f"{t.measured:.3f}"
        lines.append(
            f"  [{verdict}] {t.name}: {measured} (want {t.wanted})"
            + (f" {t.detail}" if t.detail else "")
        )
    return "\n".join(lines)


# -- JSON -----------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """NaN and infinities are not JSON: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def to_document(
    rows: Sequence[Row], meta: dict[str, Any], targets: Sequence[Target] = ()
) -> dict[str, Any]:
    """The JSON document: schema, run metadata, one object per row, the target checks."""
    return _clean(
        {
            "schema": SCHEMA,
            "meta": dict(meta),
            "rows": [asdict(r) for r in rows],
            "router_overhead_ms": router_overhead_ms(rows),
            "targets": [asdict(t) for t in targets],
        }
    )


def write_json(path: Path, document: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    return path
