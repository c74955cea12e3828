"""Client credentials from a Vault/OpenBao KV secret (v2 by default, v1 per `kv_version`).

Read fresh on every call so an operator's rotation is picked up; the keeper caches last-good."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokensmith.sources import Credentials, credentials_from_mapping

if TYPE_CHECKING:
    from tokensmith.backends import Backends
    from tokensmith.config import ClientConfig


class VaultSource:
    def __init__(self, client: "ClientConfig", backends: "Backends"):
        self.client = client
        self.config = client.source
        self.backends = backends

    def read(self) -> Credentials:
        mount, path = self.config.mount, self.config.path
        data = self.backends.vault().read_kv(mount, path, self.config.kv_version, client=self.client.name)
        return credentials_from_mapping(data, self.client, where=f"vault secret {mount}/{path}")
