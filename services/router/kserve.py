"""The Open Inference Protocol (KServe v2 gRPC) beside tessera.v1.Inference on the router.

`inference.GRPCInferenceService` maps the protocol's tensors onto the same request path as the
native API: ModelInfer calls InferenceService.Generate / Embed, so admission, validation,
caching, routing, deadlines and error codes are exactly those of tessera.v1.Inference.

Tensors:
- causal-lm models: input "text" BYTES with one element (the prompt); output "text" BYTES in
  the input's shape (the completion). Request parameters: max_new_tokens, temperature, top_p,
  top_k, seed, stop (one string), priority (GenerateRequest.priority). Response parameters:
  finish_reason, prompt_tokens,
  generated_tokens, cached.
- encoder models: input "text" BYTES [N]; output "embeddings" FP32 [N, dim] (mean pooling +
  L2 normalisation, equal to Embed). Response parameters: cached_inputs, cached.
`model_version` pins the version: every chain the request runs on is of that version
(passed down as an argument), or it fails UNAVAILABLE; an unknown version is NOT_FOUND.
BYTES elements use the protocol's raw layout (4-byte little-endian length, then the bytes) in
raw_input_contents / raw_output_contents; typed `contents.bytes_contents` input works too.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from importlib import metadata

from grpc import aio

from services.common.errors import InvalidArgument, NotFound, quoted
from services.common.types import ModelKind
from services.pb.kserve import grpc_predict_v2_pb2 as pb
from services.pb.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from services.pb.tessera.v1 import inference_pb2
from services.router.frontends import ModelFrontend
from services.router.service import InferenceService

KSERVE_NAME = "inference.GRPCInferenceService"
INPUT = "text"
TEXT_OUTPUT = "text"
EMBEDDINGS_OUTPUT = "embeddings"
# Request parameters that standard clients may send and that do not change Tessera's answer.
PROTOCOL_PARAMETERS = frozenset(
    {
        "priority",
        "timeout",
        "sequence_id",
        "sequence_start",
        "sequence_end",
        "binary_data_output",
        "headers",
    }
)
INT_PARAMETERS = ("max_new_tokens", "top_k", "seed", "priority")
FLOAT_PARAMETERS = ("temperature", "top_p")
GENERATION_PARAMETERS = frozenset({*INT_PARAMETERS, *FLOAT_PARAMETERS, "stop"})


def _server_version() -> str:
    try:
        return metadata.version("tessera")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def serialize_bytes(items: Iterable[bytes]) -> bytes:
    """BYTES tensor elements in the raw layout: each a uint32 LE length then the bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def deserialize_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidArgument(f"input {name!r}: truncated BYTES element length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidArgument(f"input {name!r}: BYTES element runs past the end of the data")
        items.append(raw[offset : offset + size])
        offset += size
    if len(items) != count:
        raise InvalidArgument(
            f"input {name!r}: shape holds {count} elements, the data holds {len(items)}"
        )
    return items


def _number(value: pb.InferParameter, name: str) -> float | int:
    which = value.WhichOneof("parameter_choice")
    if which in ("int64_param", "uint64_param", "double_param"):
        number: float | int = getattr(value, which)
        return number
    raise InvalidArgument(f"parameter {quoted(name)} must be a number, got {which or 'nothing'}")


def _int_param(value: pb.InferParameter, name: str) -> int:
    number = _number(value, name)
    if isinstance(number, float) and (not math.isfinite(number) or number != int(number)):
        raise InvalidArgument(f"parameter {quoted(name)} must be an integer, got {number}")
    return int(number)


def _str_param(value: pb.InferParameter, name: str) -> str:
    if value.WhichOneof("parameter_choice") != "string_param":
        raise InvalidArgument(f"parameter {quoted(name)} must be a string")
    return value.string_param


class KServeService(pb_grpc.GRPCInferenceServiceServicer):
    """KServe v2 health, metadata and inference over the router's own request path."""

    def __init__(self, inference: InferenceService) -> None:
        self.inference = inference

    def add_to_server(self, server: aio.Server) -> None:
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self, server)

    # -- health and metadata ----------------------------------------------------------------

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=not self.inference.draining)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="tessera", version=_server_version(), extensions=[])

    def _versions(self, model: str, healthy_only: bool) -> list[str]:
        table = self.inference.pool.table
        versions = table.versions(model, healthy_only=healthy_only)
        return list(dict.fromkeys(version for _, version in versions))

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        if not request.name:
            raise InvalidArgument("name is required")
        versions = self._versions(request.name, healthy_only=True)
        ready = (
            not self.inference.draining
            and bool(versions)
            and (not request.version or request.version in versions)
        )
        return pb.ModelReadyResponse(ready=ready)

    def _model(self, name: str, version: str) -> ModelFrontend:
        frontend = self.inference.inputs.frontend(name)
        if version and version not in self._versions(name, healthy_only=False):
            raise NotFound(
                f"model {quoted(name)} has no version {quoted(version)}; ModelMetadata lists its "
                "versions"
            )
        return frontend

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        frontend = self._model(request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        if frontend.kind is ModelKind.CAUSAL_LM:
            inputs = [tensor(name=INPUT, datatype="BYTES", shape=[1])]
            outputs = [tensor(name=TEXT_OUTPUT, datatype="BYTES", shape=[1])]
        else:
            inputs = [tensor(name=INPUT, datatype="BYTES", shape=[-1])]
            outputs = [
                tensor(
                    name=EMBEDDINGS_OUTPUT, datatype="FP32", shape=[-1, frontend.spec.hidden_size]
                )
            ]
        # The protocol's metadata has no free-form field: a reduced precision extends the
        # platform ("tessera/encoder/bfloat16"); float32, the exact default, keeps the plain one.
        precision = self._precision(request.name, request.version)
        platform = f"tessera/{frontend.kind.value}"
        return pb.ModelMetadataResponse(
            name=request.name,
            versions=self._versions(request.name, healthy_only=False),
            platform=platform if precision == "float32" else f"{platform}/{precision}",
            inputs=inputs,
            outputs=outputs,
        )

    def _precision(self, model: str, version: str) -> str:
        """The precision of `version`'s chains, else of the newest healthy (or any) chain."""
        table = self.inference.pool.table
        chains = [c for c in table.all_chains(model) if not version or c.version == version]
        healthy = [c for c in table.chains(model) if not version or c.version == version]
        chosen = (healthy or chains)[:1]
        return chosen[0].workers[0].precision if chosen else "float32"

    # -- inference --------------------------------------------------------------------------

    def _texts(self, request: pb.ModelInferRequest) -> tuple[list[str], list[int]]:
        if len(request.inputs) != 1 or request.inputs[0].name != INPUT:
            raise InvalidArgument(
                f"send exactly one input tensor named {INPUT!r} (BYTES); got "
                f"{[t.name for t in request.inputs]}"
            )
        tensor = request.inputs[0]
        if tensor.datatype != "BYTES":
            raise InvalidArgument(f"input {INPUT!r} must be BYTES, got {quoted(tensor.datatype)}")
        shape = [int(d) for d in tensor.shape]
        if any(d < 0 for d in shape):
            raise InvalidArgument(f"input {INPUT!r}: negative dimension in shape {shape}")
        count = math.prod(shape)
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise InvalidArgument("raw_input_contents must hold one entry per input")
            if tensor.HasField("contents"):
                raise InvalidArgument("send raw_input_contents or contents, not both")
            items = deserialize_bytes(request.raw_input_contents[0], count, INPUT)
        else:
            items = list(tensor.contents.bytes_contents)
            if len(items) != count:
                raise InvalidArgument(
                    f"input {INPUT!r}: shape holds {count} elements, contents hold {len(items)}"
                )
        try:
            return [item.decode("utf-8") for item in items], shape
        except UnicodeDecodeError:
            raise InvalidArgument(f"input {INPUT!r} is not UTF-8 text") from None

    def _check_outputs(self, request: pb.ModelInferRequest, name: str) -> None:
        for output in request.outputs:
            if output.name != name:
                raise InvalidArgument(
                    f"model {quoted(request.model_name)} has one output, {name!r}; "
                    f"unknown output {quoted(output.name)}"
                )

    def _check_parameters(self, request: pb.ModelInferRequest, kind: ModelKind) -> None:
        allowed = PROTOCOL_PARAMETERS | (
            GENERATION_PARAMETERS if kind is ModelKind.CAUSAL_LM else frozenset()
        )
        for key in request.parameters:
            if key not in allowed:
                ours = sorted(allowed - PROTOCOL_PARAMETERS)
                raise InvalidArgument(
                    f"unknown parameter {quoted(key)} for a {kind.value} model"
                    + (f"; accepted: {', '.join(ours)}" if ours else "")
                )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: aio.ServicerContext
    ) -> pb.ModelInferResponse:
        frontend = self._model(request.model_name, request.model_version)
        self._check_parameters(request, frontend.kind)
        texts, shape = self._texts(request)
        return await self._infer(request, frontend, texts, shape, context)

    async def _infer(
        self,
        request: pb.ModelInferRequest,
        frontend: ModelFrontend,
        texts: list[str],
        shape: list[int],
        context: aio.ServicerContext,
    ) -> pb.ModelInferResponse:
        """ModelInfer on its pinned version (model_version), if any."""
        response = pb.ModelInferResponse(
            model_name=request.model_name,
            id=request.id,
            model_version=request.model_version
            or next(iter(self._versions(request.model_name, healthy_only=True)), ""),
        )
        if frontend.kind is ModelKind.CAUSAL_LM:
            self._check_outputs(request, TEXT_OUTPUT)
            if len(texts) != 1:
                raise InvalidArgument(
                    f"a causal-lm model takes one prompt per request; input "
                    f"{INPUT!r} has shape {shape}"
                )
            generated = await self.inference.generate(
                self._generate_request(request, texts[0]), context, request.model_version or None
            )
            response.outputs.add(name=TEXT_OUTPUT, datatype="BYTES", shape=shape or [1])
            response.raw_output_contents.append(serialize_bytes([generated.text.encode()]))
            response.parameters["finish_reason"].string_param = generated.finish_reason
            response.parameters["prompt_tokens"].int64_param = generated.prompt_tokens
            response.parameters["generated_tokens"].int64_param = generated.generated_tokens
            response.parameters["cached"].bool_param = generated.cached
            response.model_version = generated.version or response.model_version
        else:
            self._check_outputs(request, EMBEDDINGS_OUTPUT)
            # Embed's own path without its message: the vectors go out as one raw FP32 block.
            matrix, cached, label = await self.inference.embed_matrix(
                request.model_name, texts, context, request.model_version or None
            )
            response.model_version = label or response.model_version
            response.outputs.add(
                name=EMBEDDINGS_OUTPUT, datatype="FP32", shape=[len(texts), int(matrix.shape[1])]
            )
            response.raw_output_contents.append(matrix.astype("<f4", copy=False).tobytes())
            response.parameters["cached_inputs"].int64_param = cached
            response.parameters["cached"].bool_param = cached == len(texts)
        return response

    @staticmethod
    def _generate_request(
        request: pb.ModelInferRequest, prompt: str
    ) -> inference_pb2.GenerateRequest:
        generate = inference_pb2.GenerateRequest(model=request.model_name, prompt=prompt)
        params = request.parameters
        for name in INT_PARAMETERS:
            if name in params:
                value = _int_param(params[name], name)
                bound = 2**63 if name == "seed" else 2**31
                if not -bound <= value < bound:
                    raise InvalidArgument(f"parameter {name!r} is out of range: {value}")
                setattr(generate, name, value)
        for name in FLOAT_PARAMETERS:
            if name in params:
                setattr(generate, name, float(_number(params[name], name)))
        if "stop" in params:
            generate.stop.append(_str_param(params["stop"], "stop"))
        return generate
