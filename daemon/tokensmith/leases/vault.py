"""The lease as one KV v2 record, <mount>/data/<prefix>/leader, written only with `options.cas`
set to the version read (0: only if absent). Vault serialises writes to a key, so of two
candidates racing for one version exactly one succeeds."""

from __future__ import annotations

from tokensmith.leases import LeaseError, LeaseLost, LeaseRecord, record_from
from tokensmith.vault import CAS_MISMATCH

MAX_TIMEOUT = 5.0


class VaultLease:
    def __init__(self, vault, mount: str, prefix: str):
        self.vault = vault
        self.mount = mount
        self.path = f"{prefix.strip('/')}/leader"
        self.where = f"vault {mount}/{self.path}"

    @classmethod
    def from_settings(cls, settings, backends) -> "VaultLease":
        from tokensmith.vault import VaultClient

        # Its own session and a short timeout: a renew must not wait behind sink writes, nor hang past the ttl
        timeout = min(settings.vault.timeout, MAX_TIMEOUT, max(settings.leader.renew_every, 0.5))
        client = VaultClient(settings.vault.model_copy(update={"timeout": timeout}))
        return cls(client, settings.state.mount, settings.state.prefix)

    def read(self) -> LeaseRecord | None:
        data, version = self.vault.read_kv2_versioned(self.mount, self.path, error_cls=LeaseError)
        return record_from(data, version)

    def write(self, record: LeaseRecord, expected_version: int) -> LeaseRecord:
        try:
            response = self.vault._call(
                lambda kv: kv.secrets.kv.v2.create_or_update_secret(
                    self.path, secret=record.as_data(), cas=expected_version, mount_point=self.mount),
                f"leader lease {self.where}", None, LeaseError)
        except LeaseError as exc:
            if CAS_MISMATCH in exc.message:
                raise LeaseLost(f"leader lease {self.where} was written by another replica") from exc
            raise
        version = (response.get("data") or {}).get("version")
        if not isinstance(version, int):
            raise LeaseError(f"leader lease {self.where}: the write returned no version")
        return LeaseRecord(record.holder, record.epoch, record.ttl, version, record.renewed_at)
