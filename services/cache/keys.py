"""Cache keys: pure functions from a request's output-affecting inputs to a memcached key.

A key is ``tsr1:<kind>:<sha256 hex>`` over a canonical JSON document, so it is short (71 chars),
memcached-safe (ASCII, no whitespace or control characters) and unambiguous: JSON quotes and
delimits every field, so ("ab", "c") and ("a", "bc") can never collide.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

KEY_PREFIX = "tsr1"
# Bump when the canonical document or the cached value format changes, so old entries are ignored.
SCHEMA_VERSION = 2  # 2: values are sealed to their keys (seal.py); keys carry hidden_dtype


def generate_key(
    model: str,
    fingerprint: str,
    prompt_ids: Sequence[int],
    params: Mapping[str, object],
) -> str:
    """Key of one generation result.

    ``params`` must hold every parameter that can change the output (max_new_tokens,
    temperature, top_k, top_p, seed, stop, ...); values must be JSON-encodable.
    """
    document: dict[str, object] = {
        "model": model,
        "fingerprint": fingerprint,
        # int() accepts numpy and torch scalars, whose JSON encoding would otherwise fail.
        "ids": [int(token) for token in prompt_ids],
        "params": dict(params),
    }
    return _hashed_key("g", document)


def embed_key(
    model: str, fingerprint: str, text: str, *, hidden_dtype: str = "float32", ids: bool = False
) -> str:
    """Key of one input text's embedding; `hidden_dtype` is what travelled between stages.
    With `ids`, `text` identifies a token array a client sent: its key never equals a text's."""
    document: dict[str, object] = {
        "model": model,
        "fingerprint": fingerprint,
        "ids" if ids else "text": text,
        "hidden": hidden_dtype,
    }
    return _hashed_key("e", document)


def _hashed_key(kind: str, document: dict[str, object]) -> str:
    canonical = json.dumps(
        {"v": SCHEMA_VERSION, "kind": kind, **document},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    # surrogatepass: a lone surrogate in user text must still hash, not raise.
    digest = hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{KEY_PREFIX}:{kind}:{digest}"
