"""`tessera trace FILE`: one request's trace as a waterfall in the terminal.

Reads spans exported by Tessera's file exporter (``OTEL_TRACES_EXPORTER=file``, JSON lines, see
services.tracing.fileexport), by the console exporter (``OTEL_TRACES_EXPORTER=console``, pretty
JSON objects, possibly mixed with log lines) or as OTLP/JSON lines (``{"resourceSpans": ...}``,
as a collector's file exporter writes them). Spans are grouped by trace; one trace is drawn: one
row per span in tree order (children indented under their parent, in start order) with its
service, name, start offset and duration, and a bar on a time axis scaled to the whole trace.
Worker stage spans carry tessera.queue_ms and tessera.compute_ms: their bar shows the time
queued for a batch (░) before the compute (█); what is left of the span after both (▒) is the
stage's own overhead (decoding, encoding, hand-over).
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

# Background RPCs are their own traces; the default pick skips them when a request trace exists.
REQUEST_PREFIXES = ("tessera.v1.Inference/", "inference.GRPCInferenceService/")
BACKGROUND_PREFIXES = ("tessera.v1.Registry/", "tessera.v1.Worker/Info")


@dataclass(frozen=True)
class Glyphs:
    span: str
    queue: str
    compute: str
    other: str


UNICODE = Glyphs(span="█", queue="░", compute="█", other="▒")
ASCII = Glyphs(span="#", queue=".", compute="#", other="=")


@dataclass
class SpanRecord:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    service: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    status: str = "UNSET"
    kind: str = ""

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)

    def number(self, key: str) -> float | None:
        value = self.attributes.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                return float(value) if isinstance(value, str) else None
            except ValueError:
                return None
        return float(value)


# -- reading ---------------------------------------------------------------------------------


def _hex_id(value: Any, width: int) -> str:
    if value is None:
        return ""
    if isinstance(value, int):
        return format(value, f"0{width}x") if value else ""
    text = str(value).strip().lower()
    if text.startswith("0x"):
        text = text[2:]
    if text and any(c not in "0123456789abcdef" for c in text):
        try:  # proto3 JSON mapping writes bytes as base64
            text = base64.b64decode(text, validate=True).hex()
        except ValueError:
            return text
    if text.strip("0") == "":
        return ""
    return text.rjust(width, "0")


def _nanos(value: Any) -> int:
    if value is None or value == "":
        return 0
    if isinstance(value, (int, float)):
        return int(value)
    text = str(value)
    if text.isdigit():
        return int(text)
    stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int(stamp.timestamp()) * 1_000_000_000 + stamp.microsecond * 1000


def _otlp_value(value: Mapping[str, Any]) -> Any:
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in value:
            return value[key]
    if "intValue" in value:
        return int(value["intValue"])
    if "arrayValue" in value:
        return [_otlp_value(v) for v in value["arrayValue"].get("values", [])]
    return None


def _otlp_attributes(items: Iterable[Mapping[str, Any]] | None) -> dict[str, Any]:
    return {
        item["key"]: _otlp_value(item.get("value", {})) for item in items or () if "key" in item
    }


def _status_name(value: Any) -> str:
    """UNSET, OK or ERROR from "ERROR", "StatusCode.ERROR", "STATUS_CODE_ERROR" or 2."""
    text = str(value if value is not None else "").upper()
    if "ERROR" in text or text == "2":
        return "ERROR"
    if text.endswith("OK") or text == "1":
        return "OK"
    return "UNSET"


def _from_object(obj: Mapping[str, Any]) -> Iterator[SpanRecord]:
    """Spans from one decoded JSON object in any of the three formats."""
    if "resourceSpans" in obj:  # OTLP/JSON
        for resource_spans in obj.get("resourceSpans") or ():
            resource = _otlp_attributes((resource_spans.get("resource") or {}).get("attributes"))
            service = str(resource.get("service.name", ""))
            for scope_spans in resource_spans.get("scopeSpans") or ():
                for span in scope_spans.get("spans") or ():
                    yield SpanRecord(
                        trace_id=_hex_id(span.get("traceId"), 32),
                        span_id=_hex_id(span.get("spanId"), 16),
                        parent_id=_hex_id(span.get("parentSpanId"), 16),
                        name=str(span.get("name", "")),
                        service=service,
                        start_ns=_nanos(span.get("startTimeUnixNano")),
                        end_ns=_nanos(span.get("endTimeUnixNano")),
                        attributes=_otlp_attributes(span.get("attributes")),
                        status=_status_name((span.get("status") or {}).get("code")),
                        kind=str(span.get("kind", "")),
                    )
        return
    if "trace_id" in obj and "span_id" in obj:  # Tessera's file exporter
        resource = obj.get("resource") or {}
        yield SpanRecord(
            trace_id=_hex_id(obj["trace_id"], 32),
            span_id=_hex_id(obj["span_id"], 16),
            parent_id=_hex_id(obj.get("parent_span_id"), 16),
            name=str(obj.get("name", "")),
            service=str(obj.get("service.name") or resource.get("service.name", "")),
            start_ns=_nanos(obj.get("start_time_unix_nano")),
            end_ns=_nanos(obj.get("end_time_unix_nano")),
            attributes=dict(obj.get("attributes") or {}),
            status=_status_name((obj.get("status") or {}).get("code")),
            kind=str(obj.get("kind", "")),
        )
        return
    context = obj.get("context")
    if isinstance(context, Mapping) and "trace_id" in context:  # the console exporter
        resource = (obj.get("resource") or {}).get("attributes") or {}
        yield SpanRecord(
            trace_id=_hex_id(context["trace_id"], 32),
            span_id=_hex_id(context.get("span_id"), 16),
            parent_id=_hex_id(obj.get("parent_id"), 16),
            name=str(obj.get("name", "")),
            service=str(resource.get("service.name", "")),
            start_ns=_nanos(obj.get("start_time")),
            end_ns=_nanos(obj.get("end_time")),
            attributes=dict(obj.get("attributes") or {}),
            status=_status_name((obj.get("status") or {}).get("status_code")),
            kind=str(obj.get("kind", "")).removeprefix("SpanKind."),
        )


def parse_spans(text: str) -> list[SpanRecord]:
    """Every span found in `text`; lines that are not span JSON (logs, torn lines) are skipped."""
    decoder = json.JSONDecoder()
    spans: list[SpanRecord] = []
    index, size = 0, len(text)
    while index < size:
        start = text.find("{", index)
        if start < 0:
            break
        line_start = text.rfind("\n", 0, start) + 1
        if text[line_start:start].strip():  # a brace inside some other line: skip that line
            end_of_line = text.find("\n", start)
            index = size if end_of_line < 0 else end_of_line + 1
            continue
        try:
            obj, end = decoder.raw_decode(text, start)
        except ValueError:
            index = start + 1
            continue
        if isinstance(obj, dict):
            spans.extend(s for s in _from_object(obj) if s.trace_id and s.span_id)
        index = end
    return spans


def read_spans(path: str | Path) -> list[SpanRecord]:
    return parse_spans(Path(path).read_text(encoding="utf-8", errors="replace"))


# -- traces ----------------------------------------------------------------------------------


def group_traces(spans: Iterable[SpanRecord]) -> dict[str, list[SpanRecord]]:
    traces: dict[str, dict[str, SpanRecord]] = {}
    for span in spans:  # a span exported twice (e.g. two readers of one file) counts once
        traces.setdefault(span.trace_id, {})[span.span_id] = span
    return {trace_id: list(by_id.values()) for trace_id, by_id in traces.items()}


def roots(spans: Sequence[SpanRecord]) -> list[SpanRecord]:
    """Spans whose parent is not in the trace, earliest first."""
    ids = {s.span_id for s in spans}
    return sorted(
        (s for s in spans if not s.parent_id or s.parent_id not in ids),
        key=lambda s: (s.start_ns, -s.end_ns),
    )


def root_name(spans: Sequence[SpanRecord]) -> str:
    found = roots(spans)
    return found[0].name if found else ""


def pick_trace(traces: Mapping[str, list[SpanRecord]], trace_id: str | None = None) -> str:
    """The trace to draw: the one named (a unique prefix will do) or the most recent request.

    "Most recent" is by the trace's start; traces rooted at a public request RPC are preferred
    over background ones (worker registration, probes) when there are any.
    """
    if not traces:
        raise LookupError("no spans in the file")
    if trace_id:
        wanted = trace_id.lower().removeprefix("0x")
        if wanted in traces:
            return wanted
        matches = [t for t in traces if t.startswith(wanted)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise LookupError(f"trace id prefix {trace_id!r} is ambiguous ({len(matches)} traces)")
        raise LookupError(f"no trace {trace_id!r} in the file")

    def start(t: str) -> int:
        return min(s.start_ns for s in traces[t])

    requests = [t for t in traces if root_name(traces[t]).startswith(REQUEST_PREFIXES)]
    foreground = [t for t in traces if not root_name(traces[t]).startswith(BACKGROUND_PREFIXES)]
    candidates = requests or foreground or list(traces)
    return max(candidates, key=start)


def tree_order(spans: Sequence[SpanRecord]) -> list[tuple[int, SpanRecord]]:
    """(depth, span) in depth-first order, siblings by start time."""
    children: dict[str, list[SpanRecord]] = {}
    for span in spans:
        children.setdefault(span.parent_id, []).append(span)
    for group in children.values():
        group.sort(key=lambda s: (s.start_ns, -s.end_ns, s.name))
    out: list[tuple[int, SpanRecord]] = []
    seen: set[str] = set()

    def visit(span: SpanRecord, depth: int) -> None:
        stack = [(span, depth)]
        while stack:
            node, level = stack.pop()
            if node.span_id in seen:
                continue
            seen.add(node.span_id)
            out.append((level, node))
            stack.extend((c, level + 1) for c in reversed(children.get(node.span_id, [])))

    for root in roots(spans):
        visit(root, 0)
    for span in sorted(spans, key=lambda s: s.start_ns):  # cycles: never lose a span
        if span.span_id not in seen:
            visit(span, 0)
    return out


# -- drawing ---------------------------------------------------------------------------------


def _label(span: SpanRecord) -> str:
    label = span.name
    layers = span.attributes.get("tessera.span")
    if layers is not None and span.name.startswith("stage."):
        label += f" [{layers}]"
    hit = span.attributes.get("cache.hit")
    if isinstance(hit, bool):
        label += " hit" if hit else " miss"
    if span.status == "ERROR":
        label += " !"
    return label


def split_ms(span: SpanRecord) -> tuple[float, float] | None:
    """(queue_ms, compute_ms) of a worker stage span, None for other spans."""
    queue, compute = span.number("tessera.queue_ms"), span.number("tessera.compute_ms")
    if queue is None and compute is None:
        return None
    return max(0.0, queue or 0.0), max(0.0, compute or 0.0)


def bar(span: SpanRecord, t0: int, total_ns: int, width: int, glyphs: Glyphs = UNICODE) -> str:
    """The span's bar on a `width`-cell axis from t0 to t0 + total_ns (padded to width)."""
    total = max(total_ns, 1)

    def cell(t_ns: float) -> int:
        return min(width, max(0, round((t_ns - t0) / total * width)))

    left, right = cell(span.start_ns), cell(span.end_ns)
    if right <= left:  # every span gets at least one cell
        left = min(left, width - 1)
        right = left + 1
    cells = glyphs.span * (right - left)
    split = split_ms(span)
    if split is not None:
        queue_ms, compute_ms = split
        queue_end = min(span.end_ns, span.start_ns + queue_ms * 1e6)
        compute_end = min(span.end_ns, queue_end + compute_ms * 1e6)
        if right - left == 1:  # one cell: show what most of the span was
            parts = {
                glyphs.queue: queue_end - span.start_ns,
                glyphs.compute: compute_end - queue_end,
                glyphs.other: span.end_ns - compute_end,
            }
            cells = max(parts, key=lambda g: parts[g])
        else:
            b1 = min(right, max(left, cell(queue_end)))
            b2 = min(right, max(b1, cell(compute_end)))
            queued, computed, other = b1 - left, b2 - b1, right - b2
            if computed == 0 and compute_ms > 0:  # never hide the compute entirely
                if queued >= other:
                    queued -= 1
                else:
                    other -= 1
                computed = 1
            cells = glyphs.queue * queued + glyphs.compute * computed + glyphs.other * other
    return " " * left + "".join(cells) + " " * (width - right)


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.2f}"


def render(spans: Sequence[SpanRecord], width: int = 120, glyphs: Glyphs = UNICODE) -> str:
    """The waterfall of one trace as text, `width` columns wide (the bar takes what is left)."""
    if not spans:
        return "(no spans)\n"
    rows = tree_order(spans)
    t0 = min(s.start_ns for s in spans)
    total = max(s.end_ns for s in spans) - t0
    service_w = min(32, max(len("service"), *(len(s.service) for _, s in rows)))
    name_w = min(60, max(len("span"), *(2 * d + len(_label(s)) for d, s in rows)))
    splits = {s.span_id: split_ms(s) for _, s in rows}
    split_text = {k: f"{v[0]:.2f}/{v[1]:.2f}" for k, v in splits.items() if v is not None}
    split_w = (
        max([len("queue/compute")] + [len(t) for t in split_text.values()]) if split_text else 0
    )
    fixed = service_w + 1 + name_w + 1 + 9 + 1 + 9 + 1 + (split_w + 1 if split_w else 0) + 2
    bar_w = max(10, width - fixed)

    top = roots(spans)[0]
    services = sorted({s.service for s in spans if s.service})
    lines = [
        f"trace {top.trace_id}  {top.name}  {_ms(total)} ms  {len(spans)} spans  "
        f"{len(services)} services ({', '.join(services)})"
    ]
    axis_left, axis_right = "0 ms", f"{_ms(total)} ms"
    axis = (
        axis_left + axis_right.rjust(bar_w - len(axis_left))
        if bar_w > len(axis_left) + len(axis_right)
        else ""
    )
    header = (
        f"{'service':<{service_w}} {'span':<{name_w}} {'start ms':>9} {'dur ms':>9} "
        + (f"{'queue/compute':>{split_w}} " if split_w else "")
        + " "
        + axis
    )
    lines.append(header.rstrip())
    for depth, span in rows:
        name = "  " * depth + _label(span)
        if len(name) > name_w:
            name = name[: name_w - 1] + "…"
        service = (
            span.service if len(span.service) <= service_w else span.service[: service_w - 1] + "…"
        )
        row = (
            f"{service:<{service_w}} {name:<{name_w}} {_ms(span.start_ns - t0):>9} "
            f"{_ms(span.duration_ns):>9} "
        )
        if split_w:
            row += f"{split_text.get(span.span_id, ''):>{split_w}} "
        row += "|" + bar(span, t0, total, bar_w, glyphs) + "|"
        lines.append(row)
    legend = (
        f"{glyphs.span} span   stage spans: {glyphs.queue} queued for a batch, "
        f"{glyphs.compute} compute, {glyphs.other} overhead (queue/compute in ms)"
        if split_w
        else f"{glyphs.span} span"
    )
    lines.append(legend)
    return "\n".join(lines) + "\n"


def list_traces(traces: Mapping[str, list[SpanRecord]]) -> str:
    lines = []
    for trace_id, spans in sorted(traces.items(), key=lambda kv: min(s.start_ns for s in kv[1])):
        t0 = min(s.start_ns for s in spans)
        total = max(s.end_ns for s in spans) - t0
        when = datetime.fromtimestamp(t0 / 1e9).isoformat(timespec="milliseconds")
        lines.append(
            f"{trace_id}  {when}  {_ms(total):>9} ms  {len(spans):>4} spans  {root_name(spans)}"
        )
    return "\n".join(lines) + "\n"


def _glyphs_for(stream: TextIO, ascii_only: bool) -> Glyphs:
    if ascii_only:
        return ASCII
    try:
        (UNICODE.queue + UNICODE.compute + UNICODE.other + "…").encode(
            getattr(stream, "encoding", None) or "utf-8"
        )
    except (UnicodeEncodeError, LookupError):
        return ASCII
    return UNICODE


DESCRIPTION = (
    "Draw one trace from a span file as a waterfall (router, cache, stages, "
    "queueing vs compute). Write the file with OTEL_TRACES_EXPORTER=file "
    "TESSERA_TRACE_FILE=PATH (console-exporter output and OTLP/JSON work too)."
)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `tessera trace`, for a parser of its own or a CLI subcommand."""
    parser.add_argument("file", help="the exported span file")
    parser.add_argument(
        "--trace-id",
        help="the trace to draw (a unique prefix will do); default: the most recent request",
    )
    parser.add_argument(
        "--width", type=int, default=0, help="output width in columns (default: the terminal's)"
    )
    parser.add_argument("--list", action="store_true", help="list the traces in the file")
    parser.add_argument("--ascii", action="store_true", help="draw with ASCII only")
    return parser


def run(args: argparse.Namespace) -> int:
    """`tessera trace` with parsed arguments (see add_arguments)."""
    try:
        spans = read_spans(args.file)
    except OSError as exc:
        print(f"tessera trace: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    traces = group_traces(spans)
    if args.list:
        sys.stdout.write(list_traces(traces))
        return 0
    try:
        chosen = pick_trace(traces, args.trace_id)
    except LookupError as exc:
        print(f"tessera trace: {exc.args[0]}", file=sys.stderr)
        return 1
    width = args.width or shutil.get_terminal_size((120, 24)).columns
    sys.stdout.write(render(traces[chosen], width, _glyphs_for(sys.stdout, args.ascii)))
    return 0


def main(argv: list[str]) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="tessera trace", description=DESCRIPTION))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
