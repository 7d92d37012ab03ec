"""One typed settings object per service: flags > TESSERA_* environment > YAML file > defaults.

Each setting is declared once, here: its type, its default and a one-line doc (`setting`).
Everything else is derived from that declaration: the environment variables
(`TESSERA_ROUTER_<NAME>`, `TESSERA_WORKER_<NAME>`), the mesh file's keys, every CLI flag of
`tessera router` and `tessera worker` (`add_flags`), the README's settings tables
(`python -m services.common.settings`, checked by a test) and the sub-configs of the scheduler,
the coalescer and the worker (their `from_settings`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_REPOSITORY = "model-repository"


def default_repository() -> str:
    return os.environ.get("TESSERA_MODEL_REPOSITORY", DEFAULT_REPOSITORY)


def setting(
    default: Any = None,
    doc: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    choices: Sequence[str] = (),
    secret: bool = False,
) -> Any:
    """Declares one setting: its default (or a factory), a one-line doc, and the values it
    may take (`choices`); a `secret` is never shown with its value."""
    metadata = {"doc": doc, "choices": tuple(choices), "secret": secret}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ServerSettings:
    """What every Tessera server (router, worker) is configured with."""

    host: str = setting("127.0.0.1", "interface to bind (a router on another needs user tokens)")
    metrics_port: int = setting(-1, "Prometheus /metrics port; -1 = off, 0 = any free port")
    tls_cert: str = setting("", "server certificate (PEM); empty = plaintext")
    tls_key: str = setting("", "the certificate's private key (PEM)")
    tls_client_ca: str = setting("", "CA of client certificates to require (mutual TLS)")
    max_message_mb: int = setting(
        0, "MiB per message each way; 0 = the largest legal request (docs/deploy.md)"
    )
    open_max_calls: int = setting(
        64, "calls in flight from callers without an accepted token (health, reflection)"
    )
    open_max_watches: int = setting(
        128, "health Watch streams held by callers without an accepted token, in all"
    )
    open_max_watches_per_peer: int = setting(8, "... and per peer address")
    open_max_body_bytes: int = setting(
        4096, "largest request body read from a caller without an accepted token"
    )


@dataclass
class WorkerSettings(ServerSettings):
    model: str = setting("", "model name in the repository (required)")
    version: str = setting(
        "", "a published version's label to serve (tessera models); empty = the model's folder"
    )
    layers: str | None = setting(None, "START:END of the model's layers; none = a replica")
    precision: str = setting(
        "float32",
        "float32 (exact), bfloat16 or int8 (int8 weights per channel, inputs per row); "
        "part of the version's fingerprint",
        choices=("float32", "bfloat16", "int8"),
    )
    attention: str = setting(
        "sdpa",
        "attention kernel: transformers' sdpa or eager (both exact float32 attention; which is "
        "faster depends on the CPU: python -m services.bench.step)",
        choices=("sdpa", "eager"),
    )
    port: int = setting(50061, "port to listen on (0 = any free port)")
    advertise: str | None = setting(None, "host:port the router dials; default host:port")
    routers: list[str] = setting([], "routers to register with (host:port, comma-separated)")
    repository: str = setting(
        None, "the model repository (also TESSERA_MODEL_REPOSITORY)", factory=default_repository
    )
    heartbeat_s: float = setting(2.0, "seconds between registrations")
    max_outstanding: int = setting(64, "requests in flight before RESOURCE_EXHAUSTED")
    max_rows: int = setting(64, "generation rows held at once, over every batch")
    max_kv_mb: int = setting(2048, "MiB of KV cache over every batch, padding included")
    batch_idle_s: float = setting(60.0, "seconds before a batch no router steps is freed")
    prefix_nodes: list[str] = setting(
        [],
        "memcached nodes of the shared prefix tier: prompts' KV blocks are written there and a "
        "stage that lacks them reads them back (a restarted stage starts warm); empty: off",
    )
    prefix_secret: str = setting(
        "",
        "key of the MAC sealing each prefix block to its key (every worker of the mesh shares "
        "it; `tessera up` makes one per run); empty with prefix_nodes: a random one (blocks are "
        "this process's own)",
        secret=True,
    )
    prefix_timeout_s: float = setting(1.0, "seconds per memcached call of the prefix tier")
    max_batch: int = setting(32, "rows (texts) per Forward pass")
    drain_s: float = setting(10.0, "seconds to finish held work on SIGTERM")
    threads: int = setting(0, "torch intra-op threads; 0 = torch's default")
    max_concurrent_rpcs: int = setting(
        512, "calls in flight from accepted callers (RESOURCE_EXHAUSTED beyond)"
    )
    max_concurrent_streams: int = setting(256, "HTTP/2 streams open at once per connection")
    router_ca: str = setting("", "CA to verify routers by when registering (TLS routers)")
    client_cert: str = setting("", "this worker's client certificate for routers")
    client_key: str = setting("", "... and its key")
    router_token: str = setting(
        "", "credential sent to routers when registering (their worker_tokens)", secret=True
    )
    caller_tokens: list[str] = setting(
        [],
        "tokens callers of tessera.v1.Worker/* must send (the router's worker_call_token); "
        "health and reflection stay open",
        secret=True,
    )
    caller_token_file: str = setting("", "file of caller tokens, one per line, re-read")
    mesh_secret: str = setting(
        "",
        "the mesh's secret: this worker derives its own registration credential and caller "
        "token from it and its advertised address (instead of router_token, caller_tokens)",
        secret=True,
    )


@dataclass
class RouterSettings(ServerSettings):
    port: int = setting(50051, "public gRPC port (0 = any free port)")
    http_port: int | None = setting(
        None,
        "OpenAI-compatible HTTP port (0 = any free port, -1 = off); unset: off, but 8000 under "
        "`tessera up`",
    )
    repository: str = setting(
        None,
        "tokenizers, chat templates, configs; what admission checks workers against "
        "(also TESSERA_MODEL_REPOSITORY)",
        factory=default_repository,
    )
    workers: list[str] = setting([], "static worker addresses (workers also register themselves)")
    cache_nodes: list[str] = setting([], "memcached host:port nodes; empty disables the cache")
    cache_timeout_s: float = setting(0.1, "seconds per memcached call")
    cache_secret: str = setting(
        "",
        "key of the MAC that binds each cached value to its key (routers sharing a cache share "
        "it); empty = a random key per router process",
        secret=True,
    )
    cache_ttl_s: int = setting(86_400, "seconds a cached answer lives")
    cache_max_value_kb: int = setting(1024, "largest cached value, KiB (larger: not cached)")
    health_interval_s: float = setting(1.0, "seconds between worker probes")
    worker_ttl_s: float = setting(6.0, "a registration not renewed this long expires")
    max_prompt_tokens: int = setting(4096, "longer prompts get INVALID_ARGUMENT")
    max_new_tokens: int = setting(1024, "the largest max_new_tokens accepted")
    default_max_new_tokens: int = setting(64, "max_new_tokens when a request sets none")
    max_chat_messages: int = setting(256, "chat messages per request")
    max_chat_chars: int = setting(131_072, "characters in all of a request's chat messages")
    max_embed_inputs: int = setting(256, "texts per Embed request")
    max_input_chars: int = setting(32_768, "characters per text, prompt or message")
    max_forward_tokens: int = setting(16_384, "rows x positions of one Forward request")
    embed_segment_size: int = setting(32, "texts per segment scattered over the replicas")
    coalesce_max_tokens: int = setting(
        16_384, "rows x padded width of one coalesced Embed/Forward call"
    )
    coalesce_in_flight: int = setting(2, "coalesced Embed/Forward calls in flight per worker")
    max_outstanding: int = setting(256, "requests in flight before RESOURCE_EXHAUSTED")
    max_tenant_in_flight: int = setting(
        64, "requests in flight per tenant before RESOURCE_EXHAUSTED (a token file may set it)"
    )
    max_tenants: int = setting(4096, "tenants whose recent share the scheduler remembers")
    request_timeout_s: float = setting(
        120.0, "deadline when the client sets none, and the longest one accepted"
    )
    drain_s: float = setting(10.0, "seconds to finish requests in flight on SIGTERM")
    max_streams_per_connection: int = setting(
        64, "concurrent GenerateStream calls per client connection"
    )
    hidden_dtype: str = setting(
        "float32",
        "dtype of hidden states between stages (part of cache keys)",
        choices=("float32", "float16", "bfloat16"),
    )
    micro_batches: int = setting(2, "generation batches in flight per chain (pipelining)")
    max_waiting: int = setting(256, "generations waiting per chain before RESOURCE_EXHAUSTED")
    max_prefill_tokens: int = setting(8192, "rows x width of one prefill")
    prefill_chunk_tokens: int = setting(
        128,
        "while other generations run, a wider prefill goes in chunks of this many columns with "
        "their decode steps between them (0: always in one pass)",
    )
    prefill_chunk_steps: float = setting(
        2.0,
        "a chunk is sized to cost about this many decode steps of the running batch, from the "
        "step times observed on the chain (at least 16 columns, at most prefill_chunk_tokens); "
        "0: always prefill_chunk_tokens",
    )
    prefix_reuse: bool = setting(
        True,
        "a prompt that starts like one a chain prefilled before runs only its new part (every "
        "stage keeps prompts' KV blocks; requests go to the chain that holds theirs when loads "
        "are close)",
    )
    waiting_served_ratio: float = setting(
        1.2, "prefill into a running batch early only for this many waiting per running row"
    )
    max_waiting_steps: int = setting(
        20, "... or once this many decode steps have run since its last prefill"
    )
    aging_share: float = setting(
        0.5,
        "share of its deadline after which a waiting request's priority is the highest "
        "(it rises in proportion to its wait), so none starves before its deadline",
    )
    retries: int = setting(
        2, "other chains a request may go on to (or prefills it may run again) after a fault"
    )
    stuck_step_min_s: float = setting(
        2.0, "never check a worker's health for an overdue call before this (seconds)"
    )
    stuck_factor: float = setting(
        10.0, "a call is overdue after this x the slowest recent call of its kind and size"
    )
    stuck_step_max_s: float = setting(
        120.0, "a call of a worker that answers health checks fails after this (seconds)"
    )
    max_concurrent_rpcs: int = setting(
        1024, "calls in flight from accepted callers (RESOURCE_EXHAUSTED beyond)"
    )
    max_concurrent_streams: int = setting(128, "HTTP/2 streams open at once per connection")
    worker_ca: str = setting("", "CA that signed the workers' certificates (mutual TLS)")
    client_cert: str = setting("", "the router's client certificate for workers")
    client_key: str = setting("", "... and its key")
    allow_anonymous: bool = setting(
        False, "serve without user tokens on a non-loopback host (refused to start otherwise)"
    )
    auth_tokens: list[str] = setting([], "user bearer tokens accepted", secret=True)
    auth_token_file: str = setting(
        "",
        "file of user tokens, one per line, re-read when it changes; a line may add "
        "tenant=NAME max_priority=N max_in_flight=N",
    )
    admin_tokens: list[str] = setting(
        [], "tokens of operators: worker addresses in ListModels, the Models API", secret=True
    )
    admin_token_file: str = setting("", "file of admin tokens, one per line, re-read")
    worker_tokens: list[str] = setting(
        [], "tokens Registry/Register and Deregister accept (never a user token)", secret=True
    )
    worker_token_file: str = setting("", "file of worker tokens, one per line, re-read")
    mesh_secret: str = setting(
        "",
        "the mesh's secret: each worker's registration credential and call token are derived "
        "from it and the worker's address",
        secret=True,
    )
    allowed_fingerprints: list[str] = setting(
        [], "versions admitted besides the repository's (a rollout, a rollback)"
    )
    admission_timeout_s: float = setting(10.0, "seconds for each call that admits a worker")
    recheck_s: float = setting(
        60.0, "seconds between the probe requests re-run on admitted workers; 0 = off"
    )
    max_registrations: int = setting(1024, "registered workers in all (static ones not counted)")
    max_registrations_per_model: int = setting(512, "registered workers per model")
    max_registrations_per_version: int = setting(256, "registered workers per version")
    worker_call_token: str = setting(
        "", "bearer token sent on every worker call (their caller_tokens)", secret=True
    )
    version_state: str = setting(
        "",
        "file keeping every model's traffic weights and loaded versions (tessera models); "
        "empty = <repository>/.versions/state.json",
    )
    load_timeout_s: float = setting(
        600.0, "seconds a loading version has to become ready before it is marked failed"
    )
    unload_drain_s: float = setting(
        300.0, "seconds an unloading version's requests have to finish before its workers stop"
    )
    autoscale_target_per_chain: float = setting(
        8.0, "requests in flight one chain should carry (desired_chains = in flight / this)"
    )
    autoscale_upscale_delay_s: float = setting(
        10.0, "seconds a wish for more chains must last before desired_chains rises"
    )
    autoscale_downscale_delay_s: float = setting(
        300.0, "seconds a wish for fewer chains must last before desired_chains falls"
    )
    autoscale_min_chains: int = setting(1, "desired_chains is never below this")
    autoscale_max_chains: int = setting(16, "... nor above this")


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

ENV_PREFIXES = {RouterSettings: "TESSERA_ROUTER_", WorkerSettings: "TESSERA_WORKER_"}
# Flags kept from before every setting had one (the design brief's `--router`, `--cache`).
FLAG_ALIASES = {"routers": ["--router"], "cache_nodes": ["--cache"]}


def _kind(owner: type, f: dataclasses.Field[Any]) -> str:
    hints = typing.get_type_hints(owner)
    hint = hints[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if type(None) in typing.get_args(hint) and len(args) == 1:
        hint = args[0]  # an optional setting: its value's type
    text = str(hint)
    if hint is bool:
        return "bool"
    if hint is int:
        return "int"
    if hint is float:
        return "float"
    if "list" in text:
        return "list"
    return "str"


def _coerce(value: Any, kind: str) -> Any:
    if kind == "str" and not isinstance(value, str):
        # YAML reads an unquoted 15:30 as the base-60 number 930.
        raise ValueError(f"expected a string, got {value!r}; quote it in YAML")
    if kind == "list":
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return [str(v) for v in value]
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "bool" and not isinstance(value, bool):
        return str(value).lower() in ("1", "true", "yes", "on")
    return value


def apply(target: Any, values: Mapping[str, Any], source: str) -> Any:
    """Sets known fields from a mapping; unknown keys and values outside a setting's choices
    are errors naming the source."""
    owner = type(target)
    known = {f.name: f for f in dataclasses.fields(target)}
    for key, value in values.items():
        if value is None:
            continue
        name = key.replace("-", "_")
        if name not in known:
            raise ValueError(f"{source}: unknown setting {key!r}")
        f = known[name]
        coerced = _coerce(value, _kind(owner, f))
        choices = f.metadata.get("choices") or ()
        if choices and coerced not in choices:
            raise ValueError(f"{source}: {name} must be one of {', '.join(choices)}")
        setattr(target, name, coerced)
    return target


def apply_env(target: Any, prefix: str, environ: Mapping[str, str] | None = None) -> Any:
    env = os.environ if environ is None else environ
    values = {}
    for f in dataclasses.fields(target):
        key = f"{prefix}{f.name.upper()}"
        if key in env:
            values[f.name] = env[key]
    return apply(target, values, "environment")


def add_flags(parser: argparse.ArgumentParser, owner: type) -> None:
    """A flag per setting of `owner` (`--max-kv-mb`), its help the setting's doc."""
    for f in dataclasses.fields(owner):
        kind = _kind(owner, f)
        names = [f"--{f.name.replace('_', '-')}", *FLAG_ALIASES.get(f.name, [])]
        help_text = f.metadata.get("doc", "") or None
        if help_text and not f.metadata.get("secret"):
            help_text += f" (default: {_shown(f)})"
        if kind == "bool":
            parser.add_argument(
                *names, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text
            )
        else:
            choices = f.metadata.get("choices") or None
            parser.add_argument(*names, dest=f.name, choices=choices, help=help_text)


def flag_values(args: argparse.Namespace, owner: type) -> dict[str, Any]:
    """The settings of `owner` given as flags (those not given are absent)."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(owner)
        if getattr(args, f.name, None) is not None
    }


def settings_from(owner: type, args: argparse.Namespace | None = None) -> Any:
    """Defaults < TESSERA_* environment < flags."""
    settings = apply_env(owner(), ENV_PREFIXES[owner])
    if args is not None:
        apply(settings, flag_values(args, owner), "flags")
    return settings


def _shown(f: dataclasses.Field[Any]) -> str:
    if f.metadata.get("secret"):
        return "–"
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if f.name == "repository":
            return f"`{DEFAULT_REPOSITORY}`"
    else:
        value = f.default
    if value in (None, "", []):
        return "–"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def markdown_table(owner: type) -> str:
    """The README's table of `owner`'s settings, derived from their declarations."""
    prefix = ENV_PREFIXES[owner]
    service = "router" if owner is RouterSettings else "worker"
    lines = [
        f"| {service} setting (`{prefix}…`, `--flag`) | default | meaning |",
        "| --- | --- | --- |",
    ]
    for f in dataclasses.fields(owner):
        doc = f.metadata.get("doc", "").replace("|", "\\|")
        choices = f.metadata.get("choices")
        if choices:
            doc += f" ({' / '.join(choices)})"
        lines.append(f"| `{f.name}` | {_shown(f)} | {doc} |")
    return "\n".join(lines)


README_MARKERS = {
    RouterSettings: ("<!-- settings: router -->", "<!-- /settings: router -->"),
    WorkerSettings: ("<!-- settings: worker -->", "<!-- /settings: worker -->"),
}


def readme_with_tables(text: str) -> str:
    """The README with its settings tables regenerated between their markers."""
    for owner, (start, end) in README_MARKERS.items():
        before, found, rest = text.partition(start)
        if not found:
            raise ValueError(f"the README has no {start!r} marker")
        _, found, after = rest.partition(end)
        if not found:
            raise ValueError(f"the README has no {end!r} marker")
        text = f"{before}{start}\n{markdown_table(owner)}\n{end}{after}"
    return text


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


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m services.common.settings [--check] [README]`: regenerates (or checks) the
    README's settings tables."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("readme", nargs="?", default="README.md")
    parser.add_argument("--check", action="store_true", help="fail if the tables are stale")
    args = parser.parse_args(argv)
    path = Path(args.readme)
    text = path.read_text()
    fresh = readme_with_tables(text)
    if args.check:
        if fresh != text:
            print(f"{path}: the settings tables are stale; run python -m services.common.settings")
            return 1
        return 0
    path.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
