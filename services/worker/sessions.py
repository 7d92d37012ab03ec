"""Per-session KV caches on one stage, with caps on count and memory, and idle expiry."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from services.common.errors import ResourceExhausted
from services.common.types import SamplingParams


@dataclass
class Session:
    session_id: str
    cache: DynamicCache
    sampling: SamplingParams
    generator: torch.Generator | None
    last_used: float = field(default_factory=time.monotonic)

    def kv_bytes(self) -> int:
        total = 0
        for layer in getattr(self.cache, "layers", ()):
            for name in ("keys", "values"):
                tensor = getattr(layer, name, None)
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total

    def cached_tokens(self) -> int:
        return int(self.cache.get_seq_length())


class SessionTable:
    """The sessions live on this worker. All access happens on the model thread."""

    def __init__(self, max_sessions: int, max_kv_bytes: int) -> None:
        self.max_sessions = max_sessions
        self.max_kv_bytes = max_kv_bytes
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def open(self, session: Session) -> None:
        if len(self._sessions) >= self.max_sessions:
            raise ResourceExhausted(
                f"worker holds {len(self._sessions)} sessions, its limit (max_sessions)"
            )
        self._sessions[session.session_id] = session

    def close(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def kv_bytes(self) -> int:
        return sum(s.kv_bytes() for s in self._sessions.values())

    def check_memory(self) -> None:
        used = self.kv_bytes()
        if used > self.max_kv_bytes:
            raise ResourceExhausted(
                f"KV caches use {used} bytes, over this worker's max_kv_bytes {self.max_kv_bytes}"
            )
