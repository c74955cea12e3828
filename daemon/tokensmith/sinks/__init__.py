"""Sinks: where a new access token is published for consumers. One small module per destination,
registered in SINKS by the config's `type` and imported only when a config uses it.

A sink raises SinkError and never retries by itself: the keeper retries and fans out."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from tokensmith.backends import Backends
    from tokensmith.config import ClientConfig
    from tokensmith.tokens import Token


class Sink(Protocol):
    name: str  # e.g. "file:/run/tokensmith/api.token"; used in logs, status, metrics and audit
    type: str

    def check(self) -> None:
        """Fail at start-up (SinkError, not retryable) when the sink can never be written."""

    def write(self, token: "Token") -> None: ...

    # Optional: `holds(token) -> bool`, True when the destination already has exactly this token.
    # A sink that can answer cheaply (a local file) needs no persisted record of what it was sent.


SINKS = {
    "file": "tokensmith.sinks.file:FileSink",
    "vault": "tokensmith.sinks.vault:VaultSink",
    "aws": "tokensmith.sinks.aws:AwsSink",
}


def build_sinks(client: "ClientConfig", backends: "Backends") -> list[Sink]:
    sinks = []
    for config in client.sinks:
        module, _, name = SINKS[config.type].partition(":")
        sinks.append(getattr(importlib.import_module(module), name)(config, client.name, backends))
    return sinks
