#!/usr/bin/env bash
# Regenerates the Python stubs from protos/ with the pinned grpcio-tools and mypy-protobuf stubs:
#   services/pb                 the server's: tessera.v1 (protos/tessera/v1) and the KServe v2 /
#                               Open Inference Protocol API (protos/kserve).
#   clients/python/tessera/_pb  the client package's own: the public tessera.v1 files (not the
#                               internal worker.proto) and grpc.health.v1 (protos/grpc/health/v1),
#                               so `tessera-client` needs neither the server nor
#                               grpcio-health-checking.
# Imports are rewritten to relative ones so both import with no sys.path tricks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PATH="$(dirname "$PY"):$PATH"

rm -rf services/pb/tessera services/pb/kserve
mkdir -p services/pb
"$PY" -m grpc_tools.protoc -I protos \
  --python_out=services/pb --grpc_python_out=services/pb --mypy_out=services/pb \
  protos/tessera/v1/*.proto protos/kserve/*.proto
touch services/pb/__init__.py services/pb/tessera/__init__.py services/pb/tessera/v1/__init__.py \
  services/pb/kserve/__init__.py
sed -i -E 's/^from tessera\.v1 import/from . import/' services/pb/tessera/v1/*.py services/pb/tessera/v1/*.pyi
sed -i -E 's/^from kserve import/from . import/' services/pb/kserve/*.py services/pb/kserve/*.pyi

# The health proto is compiled under grpcio-health-checking's own file name,
# grpc_health/v1/health.proto (a protoc virtual path): a process that imports both packages then
# adds one identical file to protobuf's default pool instead of two files defining the same
# grpc.health.v1 symbols.
CLIENT_PB=clients/python/tessera/_pb
rm -rf "$CLIENT_PB"
mkdir -p "$CLIENT_PB"
"$PY" -m grpc_tools.protoc -I protos -Igrpc_health/v1=protos/grpc/health/v1 \
  --python_out="$CLIENT_PB" --grpc_python_out="$CLIENT_PB" --mypy_out="$CLIENT_PB" \
  tessera/v1/common.proto tessera/v1/inference.proto tessera/v1/models.proto \
  grpc_health/v1/health.proto
touch "$CLIENT_PB/__init__.py" "$CLIENT_PB/tessera/__init__.py" "$CLIENT_PB/tessera/v1/__init__.py" \
  "$CLIENT_PB/grpc_health/__init__.py" "$CLIENT_PB/grpc_health/v1/__init__.py"
sed -i -E 's/^from tessera\.v1 import/from . import/' "$CLIENT_PB"/tessera/v1/*.py "$CLIENT_PB"/tessera/v1/*.pyi
sed -i -E 's/^from grpc_health\.v1 import/from . import/' \
  "$CLIENT_PB"/grpc_health/v1/*.py "$CLIENT_PB"/grpc_health/v1/*.pyi
