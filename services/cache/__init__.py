"""The cache tier: keys, value codecs, the memcached-backed store and the local node launcher."""

from services.cache.codec import decode_vector, encode_vector
from services.cache.keys import embed_key, generate_key
from services.cache.store import CacheStats, CacheStore

__all__ = [
    "CacheStats",
    "CacheStore",
    "decode_vector",
    "embed_key",
    "encode_vector",
    "generate_key",
]
