"""How a call to a worker can end without a usable answer, and who pays for it.

Classifying is pure: nothing here touches a worker's standing. Each fault names its `blame`,
the one consequence for the worker (`WorkerPool.apply_blame` applies it), and the code that
knows which rows were in the call decides what happens to them:

- StageDown (UNAVAILABLE, CANCELLED: the transport): the worker is marked failed; the rows
  its batches held move to another chain.
- StageStuck (no answer within the stuck-stage timeout): the same.
- StageDraining (UNAVAILABLE marked `tessera-draining`): the worker gets no new work; rows
  it was refused go to another chain, rows it holds finish there.
- StageFull (RESOURCE_EXHAUSTED: KV budget or rows): nothing; the new rows wait in the queue.
- BatchLost (ABORTED: the batch is not held; INTERNAL): nothing; the rows are prefilled
  again (a retry).
- StageMisbehaved (UNIMPLEMENTED, an answer of the wrong shape): the worker is dropped until it
  passes admission again; the rows move to another chain.
- PrefixNotHeld (FAILED_PRECONDITION marked `tessera-prefix-missing`): nothing; the prefill's
  rows wait again and are prefilled from their first token (the stage evicted or never had the
  cached prompt blocks the router thought it held).
- InputRefused (INVALID_ARGUMENT): nothing; the call's requests fail (a Forward client's own
  input, or else the router's bug).
- DeadlinePassed (DEADLINE_EXCEEDED under the caller's own deadline): nothing; the call's
  requests fail with DEADLINE_EXCEEDED.
- Abandoned (every row of a prefill left before its next hop): nothing; the rows leave as any
  cancelled or late row does.

A client's deadline never becomes a step's timeout: generation steps run under the stuck-stage
timeout (learnt from observed step times), so one short deadline cannot fail a healthy stage.
"""

from __future__ import annotations

from enum import StrEnum

import grpc
from grpc import aio

from services.common.errors import DRAINING_KEY, PREFIX_MISSING_KEY


class Blame(StrEnum):
    """What happens to the worker a fault came from."""

    NONE = "none"  # the worker is fine
    DOWN = "down"  # out of routing until a probe finds it serving
    DRAINING = "draining"  # out of routing for new work; what it holds finishes there
    REJECT = "reject"  # out of every chain until it passes admission again


class Fault(Exception):
    """A worker call that gave no usable answer."""

    blame = Blame.NONE
    reconnect = False  # the connection itself may be dead: the next call makes a fresh one

    def __init__(self, address: str, detail: str) -> None:
        super().__init__(f"worker {address}: {detail}")
        self.address = address
        self.detail = detail


class StageDown(Fault):
    blame = Blame.DOWN


class StageStuck(Fault):
    blame = Blame.DOWN
    reconnect = True  # a partitioned link keeps a dead TCP connection for minutes


class StageDraining(Fault):
    blame = Blame.DRAINING


class StageFull(Fault):
    """The worker's KV budget or row limit is reached (another router or chain holds it)."""


class BatchLost(Fault):
    """The worker no longer holds a batch it was sent (it restarted, or the batch expired), or
    failed inside the step: the rows are prefilled again."""


class StageMisbehaved(Fault):
    blame = Blame.REJECT


class PrefixNotHeld(Fault):
    """A stage does not hold the cached prompt blocks a prefill meant to start from."""


class InputRefused(Fault):
    """The worker refused the call's input (INVALID_ARGUMENT)."""


class DeadlinePassed(Fault):
    """The caller's own deadline passed while the worker worked."""


class Abandoned(Fault):
    """Every row of a prefill left (cancelled, or past its deadline) before its next hop: the
    later stages are spared the work. Nobody is at fault."""


def _marked(error: aio.AioRpcError, marker: str) -> bool:
    return any(key == marker for key, _ in error.trailing_metadata() or ())


def classify(error: aio.AioRpcError, address: str, *, timeout_is_stuck: bool) -> Fault:
    """The fault a worker's status stands for. `timeout_is_stuck`: the call ran under the
    stuck-stage timeout (DEADLINE_EXCEEDED means the stage is stuck), not a caller's deadline."""
    code = error.code()
    detail = f"{code.name}: {(error.details() or '')[:200]}"
    if code == grpc.StatusCode.UNAVAILABLE and _marked(error, DRAINING_KEY):
        return StageDraining(address, detail)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return StageDown(address, detail)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        if timeout_is_stuck:
            return StageStuck(address, "no answer within the stuck-stage timeout")
        return DeadlinePassed(address, detail)
    if code == grpc.StatusCode.FAILED_PRECONDITION and _marked(error, PREFIX_MISSING_KEY):
        return PrefixNotHeld(address, detail)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return StageFull(address, detail)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return StageMisbehaved(address, f"a call was answered {code.name}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InputRefused(address, error.details() or "invalid input")
    return BatchLost(address, detail)
