"""Tessera's Python client in a few lines: list models, generate, stream, embed.

    python examples/python/generate.py [ADDRESS] [--model NAME] [--embed-model NAME]

Needs only the client package (pip install clients/python); run it against `tessera up`.
"""

from __future__ import annotations

import argparse

from tessera import Client, TesseraError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default="localhost:50051")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--embed-model", default="all-minilm-l6-v2")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--token", help="bearer token, when the router asks for one")
    args = parser.parse_args()

    # Deadline 60 s per call; UNAVAILABLE is retried by gRPC (service config retryPolicy).
    with Client(args.address, timeout=60, token=args.token) as client:
        for model in client.list_models():
            print(
                f"{model.name} ({model.kind}, {model.num_layers} layers, version "
                f"{model.version}): {'healthy' if model.healthy else 'unhealthy'}"
            )

        result = client.generate(args.model, args.prompt, max_new_tokens=16)
        print(
            f"generate: {result.text!r} ({result.generated_tokens} tokens, {result.finish_reason})"
        )

        print("stream:   ", end="")
        for chunk in client.stream(
            args.model, args.prompt, max_new_tokens=16, temperature=0.7, seed=1
        ):
            print(chunk.text, end="", flush=True)
        print()

        embedded = client.embed(args.embed_model, ["hello world", "the cat sat on the mat"])
        vectors = embedded.numpy()
        print(
            f"embed:    {vectors.shape[0]} vectors of {embedded.dim}, "
            f"cosine {float(vectors[0] @ vectors[1]):.4f}"
        )

        try:
            client.generate("no-such-model", "hi")
        except TesseraError as exc:
            print(f"errors:   {exc.code().name}: {exc.details()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
