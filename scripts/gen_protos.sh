#!/usr/bin/env bash
# Regenerates services/pb from protos/ with the pinned grpcio-tools and mypy-protobuf stubs:
# tessera.v1 (protos/tessera/v1) and the KServe v2 / Open Inference Protocol API (protos/kserve).
# Imports are rewritten to relative ones so services.pb imports with no sys.path tricks.
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
