"""`tessera trace`: reading span files and drawing one trace as a waterfall."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

from services.common.telemetry import setup_tracing
from services.tracing import waterfall
from services.tracing.fileexport import JsonLinesSpanExporter
from services.tracing.waterfall import ASCII, UNICODE, SpanRecord

MS = 1_000_000
ROUTER, WORKER_A, WORKER_B = "tessera-router", "tessera-worker-a", "tessera-worker-b"
TRACE_A = "a" * 31 + "1"
TRACE_B = "b" * 31 + "2"
TRACE_BG = "c" * 31 + "3"


def _line(
    trace: str,
    span: str,
    parent: str,
    name: str,
    service: str,
    start_ms: float,
    end_ms: float,
    base_s: int,
    **attributes: object,
) -> str:
    base = base_s * 1_000_000_000
    return json.dumps(
        {
            "trace_id": trace,
            "span_id": span,
            "parent_span_id": parent,
            "name": name,
            "kind": "INTERNAL",
            "service.name": service,
            "resource": {"service.name": service},
            "scope": "test",
            "start_time_unix_nano": base + int(start_ms * MS),
            "end_time_unix_nano": base + int(end_ms * MS),
            "attributes": attributes,
            "events": [],
            "status": {"code": "UNSET", "message": ""},
        }
    )


def _request(trace: str, base_s: int, prefix: str) -> list[str]:
    """A two-stage generation of one token: root 0-100 ms on a 1 ms = 1 cell scale."""
    ids = {
        k: prefix + format(i, "015x")
        for i, k in enumerate(["root", "get", "gen", "sa", "stepa", "sb", "stepb", "set"], start=1)
    }
    return [
        # Written out of order, as several processes appending to one file would.
        _line(
            trace,
            ids["stepb"],
            ids["sb"],
            "stage.step",
            WORKER_B,
            31,
            51,
            base_s,
            **{"tessera.span": "2:4", "tessera.queue_ms": 0.0, "tessera.compute_ms": 20.0},
        ),
        _line(trace, ids["sa"], ids["gen"], "tessera.v1.Worker/Session", WORKER_A, 6, 90, base_s),
        _line(trace, ids["root"], "", "tessera.v1.Inference/Generate", ROUTER, 0, 100, base_s),
        _line(trace, ids["set"], ids["root"], "cache.set", ROUTER, 96, 98, base_s),
        _line(
            trace,
            ids["get"],
            ids["root"],
            "cache.get",
            ROUTER,
            1,
            3,
            base_s,
            **{"cache.hit": False},
        ),
        _line(trace, ids["gen"], ids["root"], "generate", ROUTER, 5, 95, base_s),
        _line(
            trace,
            ids["stepa"],
            ids["sa"],
            "stage.step",
            WORKER_A,
            10,
            30,
            base_s,
            **{"tessera.span": "0:2", "tessera.queue_ms": 5.0, "tessera.compute_ms": 10.0},
        ),
        _line(trace, ids["sb"], ids["gen"], "tessera.v1.Worker/Session", WORKER_B, 7, 91, base_s),
    ]


@pytest.fixture
def span_file(tmp_path: Path) -> Path:
    lines = _request(TRACE_A, 1000, "a")
    lines += ["some log line that is not JSON", '{"torn": ']  # skipped, not fatal
    lines += _request(TRACE_B, 2000, "b")
    # A later background trace (a worker heartbeat) is not what the default picks.
    lines.append(_line(TRACE_BG, "d" * 16, "", "tessera.v1.Registry/Register", ROUTER, 0, 1, 3000))
    path = tmp_path / "spans.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _rows(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.endswith("|")]


def test_reads_and_groups_spans(span_file: Path) -> None:
    traces = waterfall.group_traces(waterfall.read_spans(span_file))
    assert sorted(traces) == sorted([TRACE_A, TRACE_B, TRACE_BG])
    assert len(traces[TRACE_A]) == 8
    assert [r.name for r in waterfall.roots(traces[TRACE_A])] == ["tessera.v1.Inference/Generate"]


def test_tree_order_and_depth(span_file: Path) -> None:
    spans = waterfall.group_traces(waterfall.read_spans(span_file))[TRACE_A]
    order = [(depth, s.name, s.service) for depth, s in waterfall.tree_order(spans)]
    assert order == [
        (0, "tessera.v1.Inference/Generate", ROUTER),
        (1, "cache.get", ROUTER),
        (1, "generate", ROUTER),
        (2, "tessera.v1.Worker/Session", WORKER_A),
        (3, "stage.step", WORKER_A),
        (2, "tessera.v1.Worker/Session", WORKER_B),
        (3, "stage.step", WORKER_B),
        (1, "cache.set", ROUTER),
    ]


def test_rendered_rows(span_file: Path) -> None:
    spans = waterfall.group_traces(waterfall.read_spans(span_file))[TRACE_A]
    out = waterfall.render(spans, width=200)
    rows = _rows(out)
    assert len(rows) == 8
    assert out.splitlines()[0].startswith(f"trace {TRACE_A}  tessera.v1.Inference/Generate")
    assert "100.00 ms" in out.splitlines()[0] and "3 services" in out.splitlines()[0]
    # Indentation by depth, service first, then start offset and duration in ms.
    cells = [row.split("|")[0].split() for row in rows]
    assert cells[0][:4] == [ROUTER, "tessera.v1.Inference/Generate", "0.00", "100.00"]
    assert cells[1] == [ROUTER, "cache.get", "miss", "1.00", "2.00"]
    assert cells[4] == [WORKER_A, "stage.step", "[0:2]", "10.00", "20.00", "5.00/10.00"]
    assert cells[6] == [WORKER_B, "stage.step", "[2:4]", "31.00", "20.00", "0.00/20.00"]
    assert cells[7] == [ROUTER, "cache.set", "96.00", "2.00"]
    assert "      stage.step [0:2]" in rows[4]  # depth 3: six spaces
    assert "    tessera.v1.Worker/Session" in rows[3]
    # Every bar has the same width and the root spans all of it.
    bars = [row[row.index("|") + 1 : -1] for row in rows]
    assert len({len(b) for b in bars}) == 1
    assert set(bars[0]) == {UNICODE.span}
    assert UNICODE.queue in bars[4] and UNICODE.other in bars[4]
    assert UNICODE.queue not in bars[6]


def test_bar_scale_and_queue_compute_split() -> None:
    t0 = 10**18

    def span(start: float, end: float, **attrs: object) -> SpanRecord:
        return SpanRecord(
            "t", "s", "", "x", "svc", t0 + int(start * MS), t0 + int(end * MS), dict(attrs)
        )

    # 100 ms over 100 cells: 1 ms per cell.
    assert waterfall.bar(span(0, 100), t0, 100 * MS, 100) == "█" * 100
    assert waterfall.bar(span(25, 50), t0, 100 * MS, 100) == " " * 25 + "█" * 25 + " " * 50
    # Over 50 cells: 2 ms per cell.
    assert waterfall.bar(span(25, 50), t0, 100 * MS, 50) == " " * 12 + "█" * 13 + " " * 25
    # A very short span still gets one cell.
    assert waterfall.bar(span(40, 40.1), t0, 100 * MS, 100) == " " * 40 + "█" + " " * 59
    assert waterfall.bar(span(100, 100), t0, 100 * MS, 10) == " " * 9 + "█"
    # Stage: 5 ms queued, then 10 ms compute, then 5 ms overhead.
    stage = span(10, 30, **{"tessera.queue_ms": 5.0, "tessera.compute_ms": 10.0})
    assert waterfall.bar(stage, t0, 100 * MS, 100) == (
        " " * 10 + "░" * 5 + "█" * 10 + "▒" * 5 + " " * 70
    )
    assert waterfall.bar(stage, t0, 100 * MS, 100, ASCII) == (
        " " * 10 + "." * 5 + "#" * 10 + "=" * 5 + " " * 70
    )
    # Attributes that overrun the span are clipped to it.
    over = span(0, 10, **{"tessera.queue_ms": 8.0, "tessera.compute_ms": 8.0})
    assert waterfall.bar(over, t0, 10 * MS, 10) == "░" * 8 + "█" * 2
    # A compute too short for a cell still shows.
    tiny = span(0, 10, **{"tessera.queue_ms": 9.99, "tessera.compute_ms": 0.001})
    assert waterfall.bar(tiny, t0, 10 * MS, 10) == "░" * 9 + "█"
    # One cell: the larger part wins.
    one = span(0, 1, **{"tessera.queue_ms": 0.8, "tessera.compute_ms": 0.2})
    assert waterfall.bar(one, t0, 100 * MS, 10) == "░" + " " * 9
    assert waterfall.split_ms(span(0, 1)) is None


def test_default_picks_the_most_recent_request(
    span_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert waterfall.main([str(span_file), "--width", "160"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"trace {TRACE_B} ")
    assert "queued for a batch" in out


def test_trace_selection_by_id(span_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert waterfall.main([str(span_file), "--trace-id", TRACE_A[:6], "--width", "160"]) == 0
    assert capsys.readouterr().out.startswith(f"trace {TRACE_A} ")
    assert waterfall.main([str(span_file), "--trace-id", "0x" + TRACE_BG]) == 0
    assert capsys.readouterr().out.startswith(f"trace {TRACE_BG} ")
    assert waterfall.main([str(span_file), "--trace-id", "ffff"]) == 1
    assert "no trace" in capsys.readouterr().err
    assert waterfall.main([str(span_file), "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == [TRACE_A, TRACE_B, TRACE_BG]
    assert waterfall.main([str(span_file.with_name("missing"))]) == 2
    empty = span_file.with_name("empty")
    empty.write_text("")
    assert waterfall.main([str(empty)]) == 1


def test_ascii_and_narrow_width(span_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert waterfall.main([str(span_file), "--ascii", "--width", "40"]) == 0
    out = capsys.readouterr().out
    assert out.isascii()
    rows = _rows(out)
    assert len(rows) == 8 and all(len(r.split("|")[1]) == 10 for r in rows)  # minimum bar


def _provider(service: str, exporter: object) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))  # type: ignore[arg-type]
    return provider


def test_file_exporter_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "trace.jsonl"
    provider = _provider("svc", JsonLinesSpanExporter(path))
    tracer = provider.get_tracer("tessera.worker")
    with tracer.start_as_current_span("outer") as outer:
        with tracer.start_as_current_span("stage.step") as inner:
            inner.set_attribute("tessera.queue_ms", 1.5)
            inner.set_attribute("tessera.compute_ms", 2)
            inner.set_attribute("tags", ["a", "b"])
    provider.shutdown()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["name"] == "stage.step" and first["service.name"] == "svc"
    assert first["trace_id"] == format(outer.get_span_context().trace_id, "032x")
    assert first["parent_span_id"] == format(outer.get_span_context().span_id, "016x")
    assert first["attributes"] == {
        "tessera.queue_ms": 1.5,
        "tessera.compute_ms": 2,
        "tags": ["a", "b"],
    }
    assert first["end_time_unix_nano"] >= first["start_time_unix_nano"] > 0
    assert json.loads(lines[1])["parent_span_id"] == ""
    spans = waterfall.read_spans(path)
    assert [(d, s.name) for d, s in waterfall.tree_order(spans)] == [
        (0, "outer"),
        (1, "stage.step"),
    ]


def test_file_exporter_appends_whole_lines_from_many_writers(tmp_path: Path) -> None:
    """Separate exporters (separate descriptors, as separate processes have) on one file."""
    path = tmp_path / "shared.jsonl"
    path.write_text("")  # appends to what is there

    def write(n: int) -> None:
        provider = _provider(f"svc-{n}", JsonLinesSpanExporter(path))
        tracer = provider.get_tracer("t")
        for i in range(200):
            with tracer.start_as_current_span(f"span-{i}") as span:
                span.set_attribute("padding", "x" * (50 * (i % 7)))
        provider.shutdown()

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 800
    assert len({json.loads(line)["span_id"] for line in lines}) == 800


def test_reads_console_exporter_output() -> None:
    out = io.StringIO()
    provider = _provider("console-svc", ConsoleSpanExporter(out=out))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("root"):
        with tracer.start_as_current_span("child") as child:
            child.set_attribute("tessera.queue_ms", 1.0)
    provider.shutdown()
    text = "2024-01-01 INFO starting {not json}\n" + out.getvalue() + "shutting down\n"
    spans = waterfall.parse_spans(text)
    assert sorted(s.name for s in spans) == ["child", "root"]
    assert {s.service for s in spans} == {"console-svc"}
    order = waterfall.tree_order(spans)
    assert [(d, s.name) for d, s in order] == [(0, "root"), (1, "child")]
    assert order[1][1].number("tessera.queue_ms") == 1.0


def test_reads_otlp_json_lines() -> None:
    line = json.dumps(
        {
            "resourceSpans": [
                {
                    "resource": {
                        "attributes": [
                            {"key": "service.name", "value": {"stringValue": "otlp-svc"}}
                        ]
                    },
                    "scopeSpans": [
                        {
                            "spans": [
                                {
                                    "traceId": "5b8efff798038103d269b633813fc60c",
                                    "spanId": "eee19b7ec3c1b174",
                                    "parentSpanId": "",
                                    "name": "root",
                                    "startTimeUnixNano": "1000000000",
                                    "endTimeUnixNano": "1005000000",
                                    "status": {"code": 2},
                                    "attributes": [
                                        {
                                            "key": "tessera.compute_ms",
                                            "value": {"doubleValue": 4.0},
                                        },
                                        {"key": "n", "value": {"intValue": "3"}},
                                    ],
                                }
                            ]
                        }
                    ],
                }
            ]
        }
    )
    [span] = waterfall.parse_spans(line + "\n")
    assert span.service == "otlp-svc" and span.status == "ERROR"
    assert span.duration_ns == 5 * MS and span.attributes == {"tessera.compute_ms": 4.0, "n": 3}
    assert "root !" in waterfall.render([span], width=80)


def test_file_exporter_needs_a_path() -> None:
    with pytest.raises(ValueError, match="TESSERA_TRACE_FILE"):
        setup_tracing("x", {"OTEL_TRACES_EXPORTER": "file"})
