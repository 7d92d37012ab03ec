"""One typed settings object per service: flags > TESSERA_* environment > YAML file > defaults."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_REPOSITORY = "model-repository"


def default_repository() -> str:
    return os.environ.get("TESSERA_MODEL_REPOSITORY", DEFAULT_REPOSITORY)


@dataclass
class WorkerSettings:
    model: str = ""
    layers: str | None = None  # "START:END"; None = the whole model (a replica)
    precision: str = "float32"  # float32 (exact) | bfloat16 | int8; part of the fingerprint
    host: str = "127.0.0.1"  # interface to bind
    port: int = 50061
    advertise: str | None = None  # host:port the router dials; default host:port
    routers: list[str] = field(default_factory=list)  # routers to register with
    repository: str = field(default_factory=default_repository)
    heartbeat_s: float = 2.0  # seconds between registrations
    max_outstanding: int = 64  # requests in flight before RESOURCE_EXHAUSTED
    max_rows: int = 64  # generation rows held at once, over every batch
    max_kv_mb: int = 2048  # MiB of KV cache over every batch, padding included
    batch_idle_s: float = 60.0  # seconds before a batch no router steps is freed
    max_batch: int = 32  # rows (texts or sessions) per forward pass
    drain_s: float = 10.0  # seconds to finish work on SIGTERM
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    metrics_port: int = -1  # Prometheus /metrics port; -1 = off, 0 = any free port
    tls_cert: str = ""  # server certificate (PEM); empty = plaintext
    tls_key: str = ""
    tls_client_ca: str = ""  # CA of accepted client certs: mutual TLS with routers
    router_ca: str = ""  # CA to verify routers when registering (TLS routers)
    client_cert: str = ""  # this worker's client certificate for routers
    client_key: str = ""
    router_token: str = ""  # worker token sent to routers (their worker_tokens), when they need one
    # Callers of tessera.v1.Worker/* must send `authorization: Bearer <one of these>` (the
    # router's worker_call_token); health and reflection stay open. Empty = no token needed
    # (mutual TLS through tls_client_ca authenticates callers too).
    caller_tokens: list[str] = field(default_factory=list)
    caller_token_file: str = ""  # file of caller tokens, one per line, reloaded when it changes
    # Transport limits, enforced by gRPC before any handler runs (RESOURCE_EXHAUSTED):
    max_message_mb: int = 0  # MiB per message each way; 0 = the largest routed request (server.py)
    max_concurrent_rpcs: int = 512  # calls in flight, every method, probes included
    max_concurrent_streams: int = 256  # HTTP/2 streams open at once per connection


@dataclass
class RouterSettings:
    host: str = "127.0.0.1"
    port: int = 50051
    repository: str = field(default_factory=default_repository)
    workers: list[str] = field(default_factory=list)  # static worker addresses
    cache_nodes: list[str] = field(default_factory=list)
    cache_timeout_s: float = 0.1  # seconds per memcached call
    health_interval_s: float = 1.0  # seconds between worker probes
    worker_ttl_s: float = 6.0  # a registration not renewed this long expires
    max_prompt_tokens: int = 4096  # longer prompts get INVALID_ARGUMENT
    max_new_tokens: int = 1024  # the largest max_new_tokens accepted
    default_max_new_tokens: int = 64
    max_embed_inputs: int = 256  # texts per Embed request
    embed_segment_size: int = 32  # texts per segment scattered over the replicas
    coalesce_max_tokens: int = 16_384  # rows x padded width of one coalesced Embed/Forward call
    coalesce_in_flight: int = 2  # coalesced Embed/Forward calls in flight per worker
    max_input_chars: int = 32_768  # characters per text (past the models' lengths already)
    max_outstanding: int = 256  # requests in flight before RESOURCE_EXHAUSTED
    request_timeout_s: float = 120.0  # deadline when the client sets none
    drain_s: float = 10.0
    # Largest gRPC message accepted or sent, MiB; 0 = the largest legal request, computed from
    # max_embed_inputs x max_input_chars (server.py text_message_bytes: 32.1 MiB by default).
    max_message_mb: int = 0
    max_streams_per_connection: int = 64  # concurrent GenerateStream calls per client connection
    hidden_dtype: str = "float32"  # dtype of hidden states between stages
    micro_batches: int = 2  # generation batches in flight per chain (pipelining across stages)
    max_waiting: int = 256  # generations waiting per chain before RESOURCE_EXHAUSTED
    max_prefill_tokens: int = 8192  # rows x width of one prefill
    waiting_served_ratio: float = 1.2  # prefill early only for this many waiting per running row
    max_waiting_steps: int = 20  # ... or once this many decode steps have run since the last
    aging_s: float = 2.0  # seconds of waiting that raise a generation's priority by one
    retries: int = 2  # other chains a request may go on to after a worker fails its work
    # A worker call unanswered after stuck_factor x the slowest recent call of its kind (per unit
    # of work; at least stuck_step_min_s) gets its worker's health checked: a worker that answers
    # is busy and is waited for (up to stuck_step_max_s), one that misses two checks is stuck:
    # marked failed, and only the chains through it move. A client's deadline is never used.
    stuck_step_min_s: float = 2.0
    stuck_factor: float = 10.0
    stuck_step_max_s: float = 120.0
    metrics_port: int = -1  # Prometheus /metrics port; -1 = off, 0 = any free port
    tls_cert: str = ""  # public port certificate (PEM); empty = plaintext
    tls_key: str = ""
    tls_client_ca: str = ""  # CA of client certs required on the public port
    worker_ca: str = ""  # CA that signed the workers' certificates (mTLS)
    client_cert: str = ""  # the router's client certificate for workers
    client_key: str = ""
    auth_tokens: list[str] = field(default_factory=list)  # accepted bearer tokens
    auth_token_file: str = ""  # file of bearer tokens, one per line, reloaded
    # Registry/Register and Deregister accept only these (never a user token: PERMISSION_DENIED).
    # With no token of either kind the registry is open (local development; logged at start).
    worker_tokens: list[str] = field(default_factory=list)
    worker_token_file: str = ""  # file of worker tokens, one per line, reloaded
    # Fingerprints admitted besides the one the router's repository gives (e.g. the version being
    # rolled out or back); model, span, layers and hidden size are still checked against it.
    allowed_fingerprints: list[str] = field(default_factory=list)
    admission_timeout_s: float = 10.0  # seconds for each call that admits a worker
    recheck_s: float = 60.0  # seconds between probe requests re-run on admitted workers; 0 = off
    max_registrations: int = 1024  # registered workers in all (static ones not counted)
    max_registrations_per_model: int = 512
    max_registrations_per_version: int = 256
    worker_call_token: str = ""  # bearer token sent on every worker call (caller_tokens there)
    max_concurrent_rpcs: int = 1024  # calls in flight, every method; beyond: RESOURCE_EXHAUSTED
    max_concurrent_streams: int = 128  # HTTP/2 streams open at once per client connection


@dataclass
class MeshSettings:
    """The file `tessera up --config` reads."""

    router: RouterSettings = field(default_factory=RouterSettings)
    cache_nodes: list[str] = field(default_factory=lambda: ["127.0.0.1:11211"])
    workers: list[WorkerSettings] = field(default_factory=list)


DEFAULT_MESH_YAML = """\
router: {port: 50051}
cache: {nodes: ["127.0.0.1:11211"]}     # local nodes are launched by `tessera up`
workers:
  - {model: smollm2-135m-instruct, layers: "0:15", port: 50061}
  - {model: smollm2-135m-instruct, layers: "15:30", port: 50062}
  - {model: all-minilm-l6-v2, port: 50063}   # no layers: a replica
"""


def _coerce(value: Any, kind: Any) -> Any:
    text = str(kind)
    if text.startswith("str") and not isinstance(value, str):
        # YAML reads an unquoted 15:30 as the base-60 number 930.
        raise ValueError(f"expected a string, got {value!r}; quote it in YAML")
    if isinstance(value, str) and "list" in text:
        return [v.strip() for v in value.split(",") if v.strip()]
    if text in ("int", "<class 'int'>"):
        return int(value)
    if text in ("float", "<class 'float'>"):
        return float(value)
    if text in ("bool", "<class 'bool'>"):
        return str(value).lower() in ("1", "true", "yes", "on")
    return value


def apply(target: Any, values: Mapping[str, Any], source: str) -> Any:
    """Sets known fields from a mapping; unknown keys are an error naming the source."""
    known = {f.name: f for f in dataclasses.fields(target)}
    for key, value in values.items():
        if value is None:
            continue
        name = key.replace("-", "_")
        if name not in known:
            raise ValueError(f"{source}: unknown setting {key!r}")
        setattr(target, name, _coerce(value, known[name].type))
    return target


def apply_env(target: Any, prefix: str, environ: Mapping[str, str] | None = None) -> Any:
    env = os.environ if environ is None else environ
    values = {}
    for f in dataclasses.fields(target):
        key = f"{prefix}{f.name.upper()}"
        if key in env:
            values[f.name] = env[key]
    return apply(target, values, "environment")


def load_mesh(text: str, source: str = "mesh file") -> MeshSettings:
    data = yaml.safe_load(text) or {}
    mesh = MeshSettings()
    unknown = set(data) - {"router", "cache", "workers"}
    if unknown:
        raise ValueError(f"{source}: unknown sections {sorted(unknown)}")
    apply(mesh.router, data.get("router") or {}, f"{source} router")
    cache = data.get("cache") or {}
    if set(cache) - {"nodes"}:
        raise ValueError(f"{source} cache: unknown settings {sorted(set(cache) - {'nodes'})}")
    if "nodes" in cache:
        mesh.cache_nodes = [str(n) for n in cache["nodes"] or []]
    for index, entry in enumerate(data.get("workers") or []):
        mesh.workers.append(apply(WorkerSettings(), entry, f"{source} workers[{index}]"))
    return mesh


def load_mesh_file(path: str | Path | None) -> MeshSettings:
    if path is None:
        return load_mesh(DEFAULT_MESH_YAML, "built-in default mesh")
    return load_mesh(Path(path).read_text(), str(path))
