"""Publish the token document to a Vault/OpenBao KV v2 secret with check-and-set.

Several daemons (or a restarted one) may publish to the same path: the CAS write and the
expires_at comparison make sure an older token never replaces a newer one."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tokensmith.errors import SinkError
from tokensmith.tokens import fingerprint

if TYPE_CHECKING:
    from tokensmith.backends import Backends
    from tokensmith.config import VaultSinkConfig
    from tokensmith.tokens import Token

log = logging.getLogger(__name__)


class VaultSink:
    type = "vault"

    def __init__(self, config: "VaultSinkConfig", client_name: str, backends: "Backends"):
        self.config = config
        self.client_name = client_name
        self.backends = backends
        self.name = f"vault:{config.mount}/{config.path}"

    def check(self) -> None:
        # a read proves login, that the mount exists, and the read access check-and-set needs
        self.backends.vault().read_kv2_versioned(self.config.mount, self.config.path, client=self.client_name,
                                                 error_cls=SinkError)

    def write(self, token: "Token") -> None:
        vault = self.backends.vault()
        mount, path = self.config.mount, self.config.path
        current, version = vault.read_kv2_versioned(mount, path, client=self.client_name, error_cls=SinkError)
        document = token.document()
        if current == document:
            return
        if current and current.get("access_token") != document["access_token"]:
            try:
                stored_expiry = float(current.get("expires_at") or 0)
            except (TypeError, ValueError):
                stored_expiry = 0
            if stored_expiry > document["expires_at"]:
                log.info("client %s: %s already holds a newer token (%s); not replacing it with %s",
                         self.client_name, self.name, fingerprint(str(current.get("access_token") or "")), token.fingerprint)
                return
        vault.write_kv2(mount, path, document, cas=version or 0, client=self.client_name, error_cls=SinkError)

    def purge(self, access_token: str) -> str:
        """After a compromise: destroy every KV v2 version of the secret that holds the leaked token, so its
        history cannot hand it out again. Answers what was done, for the audit line."""
        vault = self.backends.vault()
        mount, path = self.config.mount, self.config.path
        metadata = vault.kv2_metadata(mount, path, client=self.client_name, error_cls=SinkError)
        versions = metadata.get("versions") or {}
        holding = []
        for number, info in versions.items():
            if info.get("destroyed") or info.get("deletion_time"):
                continue
            data = vault.kv2_version(mount, path, int(number), client=self.client_name, error_cls=SinkError)
            if isinstance(data, dict) and data.get("access_token") == access_token:
                holding.append(int(number))
        if not holding:
            return "no version holds the old token"
        vault.kv2_destroy(mount, path, holding, client=self.client_name, error_cls=SinkError)
        return f"destroyed version(s) {', '.join(map(str, sorted(holding)))}"
