"""The lease as one KV v2 record, <mount>/data/<prefix>/leader, written only with `options.cas`
set to the version read (0: only if absent). Vault serialises writes to a key, so of two
candidates racing for one version exactly one succeeds."""

from __future__ import annotations

from tokensmith.leases import LeaseError, LeaseLost, LeaseRecord, record_from

MAX_TIMEOUT = 5.0


class VaultLease:
    def __init__(self, vault, mount: str, prefix: str):
        self.vault = vault
        self.mount = mount
        self.path = f"{prefix.strip('/')}/leader"
        self.where = f"vault {mount}/{self.path}"
        self.index = None  # the storage index of our last write: a standby node then forwards our reads

    @classmethod
    def from_settings(cls, settings, backends) -> "VaultLease":
        from tokensmith.vault import VaultClient

        # Its own session and a short timeout: a renew must not wait behind sink writes, nor hang past the ttl
        timeout = min(settings.vault.timeout, MAX_TIMEOUT, max(settings.leader.renew_every, 0.5))
        client = VaultClient(type(settings.vault)(**{**dict(settings.vault), "timeout": timeout}))
        return cls(client, settings.state.mount, settings.state.prefix)

    def read(self) -> LeaseRecord | None:
        data, version, _ = self.vault.kv2_get(self.mount, self.path, index=self.index, error_cls=LeaseError)
        return record_from(data, version)

    def write(self, record: LeaseRecord, expected_version: int) -> LeaseRecord:
        version, index = self.vault.kv2_put(self.mount, self.path, record.as_data(), expected_version,
                                            error_cls=LeaseError)
        if version is None:
            raise LeaseLost(f"leader lease {self.where} was written by another replica")
        self.index = index or self.index
        return LeaseRecord(record.holder, record.epoch, record.ttl, version, record.renewed_at)
