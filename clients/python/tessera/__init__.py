"""The Tessera Python client: sync (`Client`) and asyncio (`AsyncClient`) over the generated
tessera.v1 stubs, with typed results, streaming iterators, per-call deadlines, retries on
UNAVAILABLE through the gRPC service config, TLS and bearer tokens.

    from tessera import Client

    with Client("localhost:50051") as client:
        print(client.generate("smollm2-135m-instruct", "The capital of France is",
                              max_new_tokens=8).text)
        vectors = client.embed("all-minilm-l6-v2", ["hello", "world"]).numpy()
"""

from tessera._wire import service_config
from tessera.aio import AsyncClient
from tessera.sync import Client
from tessera.types import (
    ChainInfo,
    ChatMessage,
    ChunkResult,
    EmbedResult,
    ForwardResult,
    GenerateResult,
    ModelInfo,
    StageInfo,
    TesseraError,
)

__all__ = [
    "AsyncClient",
    "ChainInfo",
    "ChatMessage",
    "ChunkResult",
    "Client",
    "EmbedResult",
    "ForwardResult",
    "GenerateResult",
    "ModelInfo",
    "StageInfo",
    "TesseraError",
    "service_config",
]
