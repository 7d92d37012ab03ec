"""The router speaks the Open Inference Protocol (KServe v2 gRPC) too: any KServe/Triton
client works unchanged. Here with tritonclient (pip install tritonclient; see the note below).

    python examples/python/kserve_infer.py [ADDRESS] [--model NAME] [--embed-model NAME]

Note: tritonclient's `[grpc]` extra pins protobuf<7 while Tessera needs protobuf>=7; install
`tritonclient` alone (grpcio and protobuf are already there). Do not import tritonclient in a
process that imports Tessera's router: both define the `inference.*` protobuf messages.
"""

from __future__ import annotations

import argparse

import numpy as np
import tritonclient.grpc as triton


def text_input(texts: list[str]) -> triton.InferInput:
    tensor = triton.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    return tensor


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default="localhost:50051")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--embed-model", default="all-minilm-l6-v2")
    args = parser.parse_args()

    client = triton.InferenceServerClient(args.address)
    print("live:", client.is_server_live(), "ready:", client.is_server_ready())
    print("metadata:", client.get_model_metadata(args.model, as_json=True))

    # Causal models: BYTES "text" [1] in, BYTES "text" out; sampling as request parameters.
    reply = client.infer(
        args.model,
        [text_input(["The capital of France is"])],
        parameters={"max_new_tokens": 16, "temperature": 0.0},
    )
    print("generated:", reply.as_numpy("text")[0].decode())

    # Encoder models: BYTES "text" [N] in, FP32 "embeddings" [N, dim] out.
    reply = client.infer(args.embed_model, [text_input(["hello world", "the cat sat"])])
    print("embeddings:", reply.as_numpy("embeddings").shape)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
