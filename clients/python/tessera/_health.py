"""The grpc.health.v1 stubs behind `ready()`.

The package carries its own (tessera._pb.grpc_health, compiled under the file name
grpcio-health-checking uses). Where grpcio-health-checking is installed its stubs are used
instead: protobuf's default pool then never holds two different copies of health.proto, whatever
version that package has.
"""

from __future__ import annotations

try:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
except ImportError:
    from tessera._pb.grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[no-redef]

__all__ = ["health_pb2", "health_pb2_grpc"]
