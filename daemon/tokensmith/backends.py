"""Shared, lazily created clients for the secret stores, so boto3 (and tokensmith.vault) are imported
only when a config uses them and every client of one daemon shares one authenticated session."""

from __future__ import annotations

import importlib.util
import threading
from typing import TYPE_CHECKING, Any

from tokensmith.errors import ConfigError

if TYPE_CHECKING:
    from tokensmith.config import Settings
    from tokensmith.vault import VaultClient


EXTRAS = {"aws": ("boto3", "AWS Secrets Manager")}  # Vault/OpenBao needs no library: tokensmith.vault speaks HTTP


def check_extras(settings: "Settings") -> None:
    """A backend the config uses whose library is not installed: one line naming the extra to install."""
    from tokensmith.configview import backend_types

    used = set().union(*(backend_types(client) for client in settings.clients))
    for kind in sorted(used & EXTRAS.keys()):
        module, what = EXTRAS[kind]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"the config uses {what} but {module} is not installed: "
                              f"pip install 'tokensmith[{kind}]'")


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

                # a connection per worker: on a dynamodb state backend every refresh talks to the table
                self._aws[service] = make_client(service, self.settings.aws,
                                                 pool_size=self.settings.scheduler.max_workers)
            return self._aws[service]
