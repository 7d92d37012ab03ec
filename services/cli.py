"""The `tessera` command: up, router, worker, models, cache, prepare."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from services.common.settings import (
    RouterSettings,
    WorkerSettings,
    add_flags,
    default_repository,
    settings_from,
)


def _setup_logging(service: str, level: str) -> None:
    from services.common.logs import setup_logging

    setup_logging(f"tessera-{service}", level)
    # Several workers share the cores; spinning OpenMP threads would steal them from each other.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # transformers' load reports and progress bars are noise in a server log.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _cmd_router(args: argparse.Namespace) -> int:
    from services.common.telemetry import setup_tracing, shutdown_tracing
    from services.router.main import run_router

    settings = settings_from(RouterSettings, args)
    setup_tracing("tessera-router")
    try:
        return asyncio.run(run_router(settings))
    finally:
        shutdown_tracing()


def _cmd_worker(args: argparse.Namespace) -> int:
    from services.common.telemetry import setup_tracing, shutdown_tracing
    from services.worker.main import run_worker

    settings = settings_from(WorkerSettings, args)
    if not settings.model:
        raise SystemExit("tessera worker: --model is required")
    setup_tracing(f"tessera-worker-{settings.model}-{settings.layers or 'replica'}")
    try:
        return asyncio.run(run_worker(settings))
    finally:
        shutdown_tracing()


def _cmd_cache(args: argparse.Namespace) -> int:
    from services.cache.launcher import run_nodes

    return run_nodes(args.nodes or ["127.0.0.1:11211"])


def _cmd_prepare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from services.worker.prepare import prepare_repository

    for name, path in prepare_repository(Path(args.repository)).items():
        print(f"{name}: {path}")
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    from services.tracing.waterfall import run

    return run(args)


def _cmd_certs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from services.common.security import make_dev_certs

    paths = make_dev_certs(Path(args.out), [h for h in args.hosts.split(",") if h])
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from services.bench.run import main as run_bench

    return run_bench(args)


def _cmd_models(args: argparse.Namespace) -> int:
    from services.models_cli import run

    return run(args)


def _cmd_up(args: argparse.Namespace) -> int:
    from services.mesh import run_mesh

    return run_mesh(args.config, repository=args.repository)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tessera", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("TESSERA_LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a whole local mesh: memcached, router, workers")
    up.add_argument("--config", help="mesh YAML file; default: the built-in mesh")
    up.add_argument("--repository", default=default_repository())
    up.set_defaults(func=_cmd_up)

    router = sub.add_parser(
        "router", help="start the router", description="Every router setting, as a flag."
    )
    add_flags(router, RouterSettings)
    router.set_defaults(func=_cmd_router)

    worker = sub.add_parser(
        "worker",
        help="start one worker (a stage or a replica)",
        description="Every worker setting, as a flag.",
    )
    add_flags(worker, WorkerSettings)
    worker.set_defaults(func=_cmd_worker)

    models = sub.add_parser(
        "models",
        help="publish, load, weigh, promote, roll back and unload model versions",
        description="Model versions on a running router (tessera.v1.Models, admin token).",
    )
    from services.models_cli import add_arguments as add_models_arguments

    add_models_arguments(models)
    models.set_defaults(func=_cmd_models)

    trace_view = sub.add_parser("trace", help="draw one request's trace as a waterfall")
    from services.tracing.waterfall import add_arguments as add_trace_arguments

    add_trace_arguments(trace_view)
    trace_view.set_defaults(func=_cmd_trace)

    certs = sub.add_parser("certs", help="make a local CA and server/client certs for dev")
    certs.add_argument("--out", default="certs")
    certs.add_argument(
        "--hosts",
        default="localhost,127.0.0.1",
        help="names and IPs the server certificate is valid for",
    )
    certs.set_defaults(func=_cmd_certs)

    cache = sub.add_parser("cache", help="start local memcached nodes")
    cache.add_argument("nodes", nargs="*", help="host:port per node (default 127.0.0.1:11211)")
    cache.set_defaults(func=_cmd_cache)

    prepare = sub.add_parser("prepare", help="prepare the model repository")
    prepare.add_argument("--repository", default=default_repository())
    prepare.set_defaults(func=_cmd_prepare)

    bench = sub.add_parser(
        "bench",
        help="start a local mesh and measure it against the in-process limit (table + JSON)",
    )
    bench.add_argument("--seconds", type=float, help="seconds per line (default 8; quick 1.5)")
    bench.add_argument("--quick", action="store_true", help="a short smoke run (~2 minutes)")
    bench.add_argument(
        "--threads",
        type=int,
        help="torch threads for workers and the in-process limit (default: torch's default)",
    )
    bench.add_argument("--max-new-tokens", type=int, help="tokens per generation (default 32)")
    bench.add_argument("--out", help="JSON path (default bench-results/bench-<timestamp>.json)")
    bench.add_argument(
        "--only",
        action="append",
        choices=["floor", "embed", "generate"],
        help="run only these phases (repeatable)",
    )
    bench.add_argument(
        "--omp-wait-policy",
        choices=["inherit", "active", "passive"],
        help="OMP_WAIT_POLICY for workers and the in-process limit (default: passive)",
    )
    bench.add_argument("--repository", default=default_repository())
    bench.set_defaults(func=_cmd_bench)

    args = parser.parse_args(argv)
    _setup_logging(args.command, args.log_level)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
