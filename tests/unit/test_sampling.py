"""Sampling on the last stage, and the one rule set for sampling parameters.

Draw frequencies are compared with the distribution the parameters define (binomial bounds of
six standard deviations, so a correct sampler fails about once in 10^9 runs); the seeded rule
makes every draw depend only on (seed, position).
"""

from __future__ import annotations

import math

import pytest
import torch

from services.common.errors import InvalidArgument
from services.common.types import SamplingParams
from services.pb.tessera.v1 import inference_pb2
from services.worker.sampling import make_generator, sample

DRAWS = 4000


def frequency_of_one(logits: list[float], params: SamplingParams) -> float:
    generator = make_generator(params)
    hits = sum(
        sample(torch.tensor(logits), params, generator, position=position)
        for position in range(DRAWS)
    )
    return hits / DRAWS


def within(observed: float, p: float) -> bool:
    return abs(observed - p) <= 6 * math.sqrt(p * (1 - p) / DRAWS)


def test_temperature_sharpens_the_distribution_as_softmax_of_logits_over_t() -> None:
    logits = [0.0, 1.0]
    for temperature in (0.5, 1.0, 2.0):
        p = 1 / (1 + math.exp(-1.0 / temperature))  # softmax([0, 1 / T])[1]
        observed = frequency_of_one(logits, SamplingParams(temperature=temperature, seed=7))
        assert within(observed, p), (temperature, observed, p)
    # T = 0.5 on two logits one apart: 0.881, far from T = 1's 0.731 (the bound tells them apart)
    assert not within(frequency_of_one(logits, SamplingParams(temperature=0.5, seed=7)), 0.731)


def test_top_k_and_top_p_cut_the_tail() -> None:
    logits = [2.0, 1.0, 0.0, -1.0]
    generator = make_generator(SamplingParams(temperature=1.0, seed=3))
    for params in (
        SamplingParams(temperature=1.0, top_k=2, seed=3),
        SamplingParams(temperature=1.0, top_p=0.7, seed=3),  # 0.64 + 0.24 reaches 0.7
    ):
        drawn = {sample(torch.tensor(logits), params, generator, position=i) for i in range(500)}
        assert drawn == {0, 1}, (params, drawn)


def test_seeded_draws_depend_only_on_seed_and_position() -> None:
    logits = torch.tensor([0.3, 0.1, 0.5, 0.2, 0.4])
    params = SamplingParams(temperature=1.0, seed=11)
    one, two = make_generator(params), make_generator(params)
    forward = [sample(logits, params, one, position=p) for p in range(50)]
    backward = [sample(logits, params, two, position=p) for p in reversed(range(50))]
    assert forward == backward[::-1]


def test_router_and_worker_share_one_rule_set() -> None:
    """The same parameters are refused on both sides (the public request and the worker wire),
    and what the router sends the worker reads back unchanged."""
    bad = [{"temperature": -1.0}, {"temperature": 101.0}, {"top_p": 0.0}, {"top_p": 1.5}]
    bad += [{"top_k": -1}, {"temperature": float("nan")}]
    for fields in bad:
        with pytest.raises(InvalidArgument):
            SamplingParams.from_request(inference_pb2.GenerateRequest(model="m", **fields))
        wire = SamplingParams().to_pb()
        for name, value in fields.items():
            setattr(wire, name, value)
        with pytest.raises(InvalidArgument):
            SamplingParams.from_pb(wire)
    params = SamplingParams(temperature=0.5, top_k=5, top_p=0.75, seed=2**40)  # exact in fp32
    assert SamplingParams.from_pb(params.to_pb()) == params
    assert SamplingParams.from_request(inference_pb2.GenerateRequest(model="m")) == SamplingParams()
