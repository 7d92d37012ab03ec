"""`tessera models`: publish, load, weigh, promote, roll back and unload model versions.

    tessera models list [MODEL] [--json]
    tessera models publish MODEL --from DIR [--label L] [--expected-fingerprint HEX]
    tessera models load MODEL LABEL
    tessera models traffic MODEL LABEL=WEIGHT [LABEL=WEIGHT ...]   # the rest: the current one
    tessera models promote MODEL LABEL
    tessera models rollback MODEL
    tessera models unload MODEL LABEL

Every command talks to one router (`--router`, default 127.0.0.1:50051) with an admin token
(`--token` or TESSERA_TOKEN; none when the router has no tokens). `traffic` and `promote` load a
version that is not loaded yet and wait until it is ready before moving traffic to it; every
command that changes something returns once the change is in effect, or fails with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.json_format import MessageToDict

from services.pb.tessera.v1 import models_pb2, models_pb2_grpc

T = TypeVar("T")
POLL_S = 0.5


class Failed(Exception):
    """A command that could not do what it was asked; the message says why."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--router", default=os.environ.get("TESSERA_ROUTER", "127.0.0.1:50051"))
    parser.add_argument("--token", default=os.environ.get("TESSERA_TOKEN", ""))
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds to wait for a version to be ready"
    )
    sub = parser.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="versions, states and weights")
    listing.add_argument("model", nargs="?", default="")
    listing.add_argument("--json", action="store_true")
    publish = sub.add_parser("publish", help="copy a folder in as a new immutable version")
    publish.add_argument("model")
    publish.add_argument("--from", dest="source", required=True, help="folder on the router host")
    publish.add_argument("--label", default="")
    publish.add_argument("--expected-fingerprint", default="")
    for name, text in (
        ("load", "start serving capacity for a version and wait until it is ready"),
        ("promote", "all traffic to a version (loading it first if needed)"),
        ("unload", "drain a version with no traffic and stop its workers"),
    ):
        one = sub.add_parser(name, help=text)
        one.add_argument("model")
        one.add_argument("label")
    traffic = sub.add_parser("traffic", help="set weights; the rest goes to the current version")
    traffic.add_argument("model")
    traffic.add_argument("weights", nargs="+", metavar="LABEL=WEIGHT")
    rollback = sub.add_parser("rollback", help="back to the last version that held 100 %%")
    rollback.add_argument("model")


class Client:
    def __init__(self, address: str, token: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = models_pb2_grpc.ModelsStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []

    def call(self, method: Callable[..., T], request: Any, timeout: float = 600.0) -> T:
        try:
            return method(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as error:
            raise Failed(f"{error.code().name}: {error.details()}") from None

    def versions(self, model: str) -> models_pb2.ModelVersions:
        answer = self.call(self.stub.List, models_pb2.ListVersionsRequest(model=model), 30)
        return answer.models[0]

    def version(self, model: str, label: str) -> models_pb2.VersionStatus:
        for version in self.versions(model).versions:
            if version.label == label:
                return version
        raise Failed(f"model {model} has no version {label}")

    def wait(self, model: str, label: str, states: set[str], timeout: float) -> str:
        """Polls until the version is in one of `states`; 'failed' raises."""
        deadline = time.monotonic() + timeout
        while True:
            version = self.version(model, label)
            if version.state in states:
                return version.state
            if version.state == "failed":
                raise Failed(f"version {label} of {model} failed: {version.reason}")
            if time.monotonic() > deadline:
                raise Failed(
                    f"version {label} of {model} is still {version.state} after {timeout:.0f} s"
                )
            time.sleep(POLL_S)

    def ensure_ready(self, model: str, label: str, timeout: float) -> None:
        if self.version(model, label).state != "ready":
            self.call(self.stub.Load, models_pb2.VersionRequest(model=model, version=label))
            print(f"loading {model} version {label} ...", flush=True)
            self.wait(model, label, {"ready"}, timeout)


def _traffic_line(answer: models_pb2.ModelVersions) -> str:
    weighted = [f"{v.label}={v.weight}" for v in answer.versions if v.weight]
    shown = " ".join(weighted) if weighted else "every ready version (no weights set)"
    return f"{answer.model}: {shown} (generation {answer.generation})"


def _weights(model: str, pairs: list[str], current: models_pb2.ModelVersions) -> dict[str, int]:
    weights: dict[str, int] = {}
    for pair in pairs:
        label, _, value = pair.partition("=")
        try:
            weights[label] = int(value)
        except ValueError:
            raise Failed(f"{pair!r} is not LABEL=WEIGHT") from None
    rest = 100 - sum(weights.values())
    if rest < 0:
        raise Failed(f"the weights add up to {100 - rest}, over 100")
    if rest:
        holder = _current(current)
        if holder is None:
            raise Failed(
                f"{model} has no current version to give the other {rest} % to; name every "
                "version's weight"
            )
        weights[holder] = weights.get(holder, 0) + rest
    return weights


def _current(versions: models_pb2.ModelVersions) -> str | None:
    """The version that holds the traffic now: the one at 100 %, the last stable one, or the
    only ready one."""
    full = [v.label for v in versions.versions if v.weight == 100]
    if full:
        return full[0]
    if versions.stable:
        return versions.stable[-1]
    ready = [v.label for v in versions.versions if v.state == "ready"]
    return ready[0] if len(ready) == 1 else None


def run(args: argparse.Namespace) -> int:
    client = Client(args.router, args.token)
    try:
        return _run(client, args)
    except Failed as failed:
        print(f"tessera models {args.action}: {failed}", file=sys.stderr, flush=True)
        return 1
    finally:
        client.channel.close()


def _run(client: Client, args: argparse.Namespace) -> int:
    stub = client.stub
    if args.action == "list":
        answer = client.call(stub.List, models_pb2.ListVersionsRequest(model=args.model), 30)
        if args.json:
            print(json.dumps(MessageToDict(answer, preserving_proto_field_name=True), indent=2))
            return 0
        print(
            f"{'MODEL':28} {'VERSION':14} {'STATE':10} {'WEIGHT':>6} {'CHAINS':>6} "
            f"{'WORKERS':>7} {'ANSWERING':>9}  FINGERPRINT"
        )
        for model in answer.models:
            for v in model.versions:
                share = "-" if model.implicit else f"{v.weight}%"
                print(
                    f"{model.model:28} {v.label + (' *' if v.base else ''):14} {v.state:10} "
                    f"{share:>6} {v.chains_ready:>6} {v.workers:>7} {v.answering:>9}  "
                    f"{v.fingerprint[:16]}"
                )
        return 0
    if args.action == "publish":
        published = models_pb2.PublishRequest(
            model=args.model,
            source=os.path.abspath(args.source),
            label=args.label,
            expected_fingerprint=args.expected_fingerprint,
        )
        version = client.call(stub.Publish, published)
        print(f"fingerprint {version.fingerprint}")
        print(f"{args.model}: {version.state} version {version.label}")
        return 0
    if args.action == "load":
        client.ensure_ready(args.model, args.label, args.timeout)
        print(f"{args.model}: version {args.label} is ready")
        return 0
    if args.action == "traffic":
        current = client.versions(args.model)
        weights = _weights(args.model, args.weights, current)
        for label, weight in weights.items():
            if weight:
                client.ensure_ready(args.model, label, args.timeout)
        # Loading pinned the weights as they were (a new generation): compare with that.
        generation = client.versions(args.model).generation
        setting = models_pb2.SetTrafficRequest(
            model=args.model, weights=weights, expected_generation=generation
        )
        print(_traffic_line(client.call(stub.SetTraffic, setting)))
        return 0
    if args.action == "promote":
        client.ensure_ready(args.model, args.label, args.timeout)
        one = models_pb2.VersionRequest(model=args.model, version=args.label)
        print(_traffic_line(client.call(stub.Promote, one)))
        return 0
    if args.action == "rollback":
        answer = client.call(stub.Rollback, models_pb2.RollbackRequest(model=args.model))
        print(_traffic_line(answer))
        return 0
    if args.action == "unload":
        leaving = models_pb2.VersionRequest(model=args.model, version=args.label)
        client.call(stub.Unload, leaving)
        print(f"{args.model}: version {args.label} draining ...", flush=True)
        client.wait(args.model, args.label, {"unloaded"}, args.timeout)
        print(f"{args.model}: version {args.label} unloaded")
        return 0
    raise Failed(f"unknown action {args.action}")
