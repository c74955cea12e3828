"""An obtained token and how it is named in logs: never by value, only by fingerprint."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from dataclasses import dataclass, field


@lru_cache(maxsize=256)  # a refresh names its old and new token several times (log, sinks, status)
def _sha256_prefix(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


def fingerprint(secret: str | None) -> str:
    """The first 12 hex digits of the SHA-256 of a token: enough to tell tokens apart, useless to an attacker."""
    if not secret:
        return "-"
    return _sha256_prefix(secret)


@dataclass(frozen=True, slots=True)
class Token:
    access_token: str = field(repr=False)
    token_type: str
    obtained_at: float
    expires_at: float
    refresh_token: str | None = field(default=None, repr=False)
    scope: str | None = None

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.access_token)

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.obtained_at

    def document(self) -> dict:
        """What sinks publish: never the refresh token, which stays in the daemon's state."""
        return {"access_token": self.access_token, "token_type": self.token_type, "expires_at": int(self.expires_at)}
