"""Cache keys and the vector codec: pure functions, no sockets."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest

from services.cache.codec import decode_vector, encode_vector
from services.cache.keys import embed_key, generate_key

PARAMS: dict[str, object] = {
    "max_new_tokens": 32,
    "temperature": 0.7,
    "top_k": 50,
    "top_p": 0.9,
    "seed": 1234,
    "stop": ["\n\n", "</s>"],
}
IDS = [1, 2, 3, 40, 500]
MEMCACHED_SAFE = re.compile(r"^[\x21-\x7e]{1,250}$")


def gen(**overrides: object) -> str:
    args: dict[str, object] = {
        "model": "smollm2-135m-instruct",
        "fingerprint": "f" * 16,
        "prompt_ids": IDS,
        "params": PARAMS,
    }
    args.update(overrides)
    return generate_key(**args)  # type: ignore[arg-type]


def test_generate_key_is_deterministic_and_memcached_safe() -> None:
    key = gen()
    assert key == gen()
    assert key == gen(params=dict(reversed(list(PARAMS.items()))))  # order-independent
    assert key == gen(prompt_ids=tuple(np.array(IDS, dtype=np.int64)))
    assert MEMCACHED_SAFE.match(key)
    assert key.startswith("tsr1:")


@pytest.mark.parametrize(
    "overrides",
    [
        {"model": "all-minilm-l6-v2"},
        {"fingerprint": "e" * 16},
        {"prompt_ids": IDS[:-1]},
        {"prompt_ids": IDS + [0]},
        {"prompt_ids": list(reversed(IDS))},
        {"prompt_ids": []},
    ],
)
def test_generate_key_changes_with_inputs(overrides: dict[str, object]) -> None:
    assert gen(**overrides) != gen()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_new_tokens", 33),
        ("temperature", 0.0),
        ("top_k", 0),
        ("top_p", 1.0),
        ("seed", 1235),
        ("stop", ["\n\n"]),
        ("stop", []),
        ("stop", ["\n", "\n</s>"]),
    ],
)
def test_generate_key_changes_with_each_param(name: str, value: object) -> None:
    assert gen(params={**PARAMS, name: value}) != gen()


def test_generate_key_changes_when_a_param_is_added_or_removed() -> None:
    without_seed = {k: v for k, v in PARAMS.items() if k != "seed"}
    assert gen(params=without_seed) != gen()
    assert gen(params={**PARAMS, "repetition_penalty": 1.1}) != gen()


def test_keys_are_injective_across_field_boundaries() -> None:
    assert gen(model="ab", fingerprint="c") != gen(model="a", fingerprint="bc")
    assert gen(prompt_ids=[12, 3]) != gen(prompt_ids=[1, 23])
    assert gen(params={**PARAMS, "stop": ["a,b"]}) != gen(params={**PARAMS, "stop": ["a", "b"]})
    assert embed_key("ab", "c", "d") != embed_key("a", "bc", "d")
    assert embed_key("m", "ab", "c") != embed_key("m", "a", "bc")
    assert embed_key("m", "f", 'x","y') != embed_key("m", "f", "x")


def test_generation_and_embedding_keys_never_collide() -> None:
    assert embed_key("m", "f", "") != generate_key("m", "f", [], {})


def test_embed_key() -> None:
    key = embed_key("all-minilm-l6-v2", "abc", "hello world")
    assert key == embed_key("all-minilm-l6-v2", "abc", "hello world")
    assert MEMCACHED_SAFE.match(key)
    assert key != embed_key("all-minilm-l6-v2", "abd", "hello world")
    assert key != embed_key("all-minilm-l6-v2", "abc", "hello world ")
    assert key != embed_key("other", "abc", "hello world")


def test_keys_are_safe_for_any_text() -> None:
    for text in ["", " ", "\x00\r\n", "naïve 日本語 🙂", "x" * 100_000, "\ud800"]:
        assert MEMCACHED_SAFE.match(embed_key("m", "f", text))


def test_vector_round_trip() -> None:
    vector = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    decoded = decode_vector(encode_vector(vector))
    assert decoded is not None
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, vector)
    decoded[0] = 1.0  # writable


def test_vector_encoding_is_little_endian_float32() -> None:
    data = encode_vector(np.array([1.0, -2.5], dtype=np.float64))
    assert data.endswith(struct.pack("<2f", 1.0, -2.5))
    empty = decode_vector(encode_vector(np.zeros(0, dtype=np.float32)))
    assert empty is not None and empty.shape == (0,)


def test_encode_rejects_non_vectors() -> None:
    with pytest.raises(ValueError):
        encode_vector(np.zeros((2, 3), dtype=np.float32))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"TV",
        b"garbage that is long enough",
        b"\x00" * 64,
        "not bytes",
        None,
    ],
)
def test_decode_malformed_returns_none(data: object) -> None:
    assert decode_vector(data) is None  # type: ignore[arg-type]


def test_decode_truncated_or_padded_returns_none() -> None:
    data = encode_vector(np.arange(8, dtype=np.float32))
    assert decode_vector(data[:-1]) is None
    assert decode_vector(data[:-4]) is None
    assert decode_vector(data + b"\x00") is None
    assert decode_vector(b"XX" + data[2:]) is None
    assert decode_vector(data[:2] + b"\x09" + data[3:]) is None  # unknown format version
