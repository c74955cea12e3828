"""Shared, lazily created clients for the secret stores, so boto3 and hvac are imported only
when a config uses them and every client of one daemon shares one authenticated session."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from tokensmith.errors import ConfigError

if TYPE_CHECKING:
    from tokensmith.config import Settings
    from tokensmith.vault import VaultClient


class Backends:
    def __init__(self, settings: "Settings"):
        self.settings = settings
        self._lock = threading.Lock()
        self._vault: VaultClient | None = None
        self._aws: dict[str, Any] = {}

    def vault(self) -> "VaultClient":
        with self._lock:
            if self._vault is None:
                if self.settings.vault is None:
                    raise ConfigError("vault section missing from config")
                from tokensmith.vault import VaultClient

                self._vault = VaultClient(self.settings.vault)
            return self._vault

    def aws(self, service: str = "secretsmanager") -> Any:
        with self._lock:
            if service not in self._aws:
                from tokensmith.aws import make_client

                self._aws[service] = make_client(service, self.settings.aws)
            return self._aws[service]
