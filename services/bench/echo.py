"""A bare grpc.aio server for the round-trip floor: grpc.health.v1 only, no interceptors.

`python -m services.bench.echo [--port N]` prints "tessera bench echo ready on HOST:PORT" and
serves until SIGTERM/SIGINT. It is the cheapest unary call this machine can make over gRPC in
Python, so it is what router overhead is compared with.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


async def serve(host: str, port: int) -> int:
    server = aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"tessera bench echo ready on {host}:{bound}", flush=True)
    await stop.wait()
    await server.stop(grace=0.5)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m services.bench.echo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    return asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    raise SystemExit(main())
