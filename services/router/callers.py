"""Who a request's caller is: its tenant, the highest priority it may ask for, how many
requests it may have in flight, and whether it is an operator.

With user tokens on, a caller is who its token says (the token file's fields; a plain token is
its own tenant with priority at most 0) and the `x-tessera-tenant` header is ignored: a client
cannot make itself someone else, or new, to win the scheduler's share tie-break. With no tokens
at all (local development) the header still names the tenant, bounded in length, and every
caller may use every priority and is an operator, as the open registry is.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.common.security import AnyOf, Caller, TokenSet, bearer_token
from services.router.scheduler import MAX_PRIORITY

TENANT_KEY = "x-tessera-tenant"
MAX_TENANT_CHARS = 64
ADMIN_TENANT = "admin"


class Callers:
    """Resolves a call's metadata to its Caller (auth has already refused unknown tokens)."""

    def __init__(self, users: TokenSet, admins: TokenSet) -> None:
        self.users = users
        self.admins = admins
        self.tokens = AnyOf(admins, users)  # what the public services accept

    @property
    def open(self) -> bool:
        """No user or admin tokens: local development, everyone is trusted."""
        return not self.tokens.enabled

    def identify(self, metadata: Sequence[tuple[str, str | bytes]]) -> Caller:
        _, token = bearer_token(metadata)
        if token and self.admins.enabled and self.admins.accepts(token):
            return Caller(ADMIN_TENANT, MAX_PRIORITY, None, admin=True)
        if not self.open:
            caller = self.users.caller(token) if token else None
            # Only reachable with an accepted token: auth refused the rest before the handler.
            return caller or Caller("")
        tenant = ""
        for key, value in metadata:
            if key == TENANT_KEY and isinstance(value, str):
                tenant = value[:MAX_TENANT_CHARS]
        return Caller(tenant, MAX_PRIORITY, None, admin=True)
