"""A span exporter that appends one JSON object per span to a file (JSON lines).

Selected with ``OTEL_TRACES_EXPORTER=file`` and ``TESSERA_TRACE_FILE=/path``. Each line is
OTLP-JSON-like, with hex ids and unix-nanosecond times::

    {"trace_id": "<32 hex>", "span_id": "<16 hex>", "parent_span_id": "<16 hex>" | "",
     "name": "...", "kind": "SERVER", "service.name": "tessera-router",
     "resource": {...}, "scope": "tessera.router",
     "start_time_unix_nano": 1700000000000000000, "end_time_unix_nano": ...,
     "attributes": {...}, "events": [{"name": ..., "time_unix_nano": ..., "attributes": {...}}],
     "status": {"code": "UNSET" | "OK" | "ERROR", "message": "..."}}

Several processes (a router and its workers) may append to the same file: it is opened with
O_APPEND and every line goes out in one ``write()``, so lines never interleave.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

__all__ = ["JsonLinesSpanExporter", "span_to_dict"]


def _value(value: Any) -> Any:
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_value(v) for v in value]
    return str(value)


def _attributes(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    return {str(k): _value(v) for k, v in (attributes or {}).items()}


def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
    """One finished span as a JSON-able dict (the line format of this module)."""
    context = span.get_span_context()
    resource = _attributes(span.resource.attributes if span.resource else None)
    status = span.status
    return {
        "trace_id": format(context.trace_id, "032x") if context else "",
        "span_id": format(context.span_id, "016x") if context else "",
        "parent_span_id": format(span.parent.span_id, "016x") if span.parent else "",
        "name": span.name,
        "kind": span.kind.name if span.kind is not None else "INTERNAL",
        "service.name": resource.get("service.name", ""),
        "resource": resource,
        "scope": span.instrumentation_scope.name if span.instrumentation_scope else "",
        "start_time_unix_nano": span.start_time or 0,
        "end_time_unix_nano": span.end_time or span.start_time or 0,
        "attributes": _attributes(span.attributes),
        "events": [
            {"name": e.name, "time_unix_nano": e.timestamp, "attributes": _attributes(e.attributes)}
            for e in span.events
        ],
        "status": {
            "code": status.status_code.name if status else "UNSET",
            "message": (status.description or "") if status else "",
        },
    }


class JsonLinesSpanExporter(SpanExporter):
    """Appends finished spans to `path`, one JSON object per line, one write() per line."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            try:
                lines.append(
                    (
                        json.dumps(span_to_dict(span), separators=(",", ":"), ensure_ascii=False)
                        + "\n"
                    ).encode("utf-8")
                )
            except (TypeError, ValueError):
                continue
        with self._lock:
            if self._fd is None:
                return SpanExportResult.FAILURE
            try:
                for line in lines:
                    self._write(line)
            except OSError:
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        written = os.write(self._fd, data)
        while written < len(data):  # only on a full disk or the like; the line may then split
            data = data[written:]
            written = os.write(self._fd, data)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # every export is written straight through, there is nothing buffered

    def shutdown(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
