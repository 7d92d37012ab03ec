"""Values the cache tier cannot forge: each one carries a MAC over its key and its bytes.

Anything that reaches memcached (any local process, any pod the network lets through) can write
any key. A value is therefore stored as `magic, version, HMAC-SHA256(secret, key NUL value),
value`, with a secret only the routers hold: a value moved to another key, edited, truncated or
made up fails the MAC and is a miss (and is overwritten by the answer computed instead).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

_MAGIC = b"TS"
_VERSION = 1
_HEADER = len(_MAGIC) + 1
_MAC_BYTES = hashlib.sha256().digest_size


class Seal:
    """Seals values to their keys with one secret (routers that share a cache share it)."""

    def __init__(self, secret: str | bytes | None = None) -> None:
        """No secret: a random one, so only this process's own values are ever accepted."""
        if not secret:
            secret = secrets.token_bytes(32)
        self._secret = secret.encode() if isinstance(secret, str) else secret

    def _mac(self, key: str, value: bytes) -> bytes:
        mac = hmac.new(self._secret, key.encode(), hashlib.sha256)
        mac.update(b"\0")
        mac.update(value)
        return mac.digest()

    def wrap(self, key: str, value: bytes) -> bytes:
        return _MAGIC + bytes([_VERSION]) + self._mac(key, value) + value

    def unwrap(self, key: str, sealed: bytes) -> bytes | None:
        """The value sealed under `key`, or None when the seal does not hold."""
        if len(sealed) < _HEADER + _MAC_BYTES or not sealed.startswith(_MAGIC):
            return None
        if sealed[len(_MAGIC)] != _VERSION:
            return None
        value = sealed[_HEADER + _MAC_BYTES :]
        mac = sealed[_HEADER : _HEADER + _MAC_BYTES]
        return value if hmac.compare_digest(mac, self._mac(key, value)) else None
