"""`tessera bench`: starts a local mesh, measures it against the in-process limit, reports.

Modules:
- run.py: orchestration (child processes, phases, the CLI entry point)
- procs.py: child processes (memcached, routers, workers, the echo server) and their ready lines
- load.py: the grpc.aio closed-loop load generator (one process, one event loop)
- limits.py: the in-process limits (same models through plain `transformers`, no gRPC)
- workload.py: deterministic, distinct texts and prompts
- report.py: percentiles, ratios, the table, the JSON document and the target checks (pure)
- echo.py: a bare grpc.aio server (health only) for the round-trip floor
"""
