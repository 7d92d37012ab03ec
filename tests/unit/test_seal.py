"""Cache values sealed to their keys: nothing written by anyone without the secret is accepted."""

from __future__ import annotations

from services.cache.seal import Seal


def test_a_sealed_value_opens_under_its_own_key_only() -> None:
    seal = Seal("secret")
    sealed = seal.wrap("key-a", b"vector of a")
    assert seal.unwrap("key-a", sealed) == b"vector of a"
    assert seal.unwrap("key-b", sealed) is None  # moved to another key (a swap)
    assert Seal("other secret").unwrap("key-a", sealed) is None
    assert Seal().unwrap("key-a", sealed) is None  # a random secret knows no one else's


def test_edited_truncated_or_made_up_values_do_not_open() -> None:
    seal = Seal("secret")
    sealed = seal.wrap("k", b"\x00" * 64)
    assert seal.unwrap("k", sealed[:-1]) is None
    assert seal.unwrap("k", sealed[:-1] + b"\x01") is None
    assert seal.unwrap("k", sealed + b"\x00") is None
    assert seal.unwrap("k", b"") is None
    assert seal.unwrap("k", b"TS\x01" + b"\x00" * 40) is None
    assert seal.unwrap("k", b"\x00" * 4) is None  # an unsealed vector of one float
