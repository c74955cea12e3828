"""State in Vault/OpenBao KV v2: one record per client at <mount>/data/<prefix>/clients/<name>.

Every write is check-and-set (options.cas) on the version this object last read or wrote, so a
stale writer fails instead of overwriting. Vault encrypts the records at rest (its barrier).
OpenBao standbys answer reads (and check a write's CAS version) from their own copy, which can lag:
every request carries the storage index of the shared VaultClient's latest write (X-Vault-Index
with X-Vault-Inconsistent: forward-active-node), so a node that has not applied it forwards the
request to the active node. A replica that has written its lease record through the same client
therefore reads every state write committed before its lease."""

from __future__ import annotations

from tokensmith.errors import StateError
from tokensmith.state.shared import SharedStateStore


class VaultStateStore(SharedStateStore):
    what = "vault state"

    def __init__(self, config, vault, directory):
        super().__init__(directory)
        self.mount = config.mount
        self.prefix = config.prefix
        self.vault = vault

    @classmethod
    def from_settings(cls, settings, backends) -> "VaultStateStore":
        store = cls(settings.state, backends.vault(), settings.state_dir)
        store.workers = settings.scheduler.max_workers
        store.vault.keep_connections(store.workers)
        return store

    def _path(self, client: str) -> str:
        return f"{self.prefix}/clients/{client}"

    def _read(self, client: str) -> tuple[dict | None, int]:
        data, version, _ = self.vault.kv2_get(self.mount, self._path(client), client=client, error_cls=StateError)
        return data, version

    def _write(self, client: str, record: dict, cas: int) -> int | None:
        version, _ = self.vault.kv2_put(self.mount, self._path(client), record, cas, client=client,
                                        error_cls=StateError)
        return version

    def _list(self) -> list[str]:
        return [key for key in self.vault.kv2_list(self.mount, f"{self.prefix}/clients",
                                                   error_cls=StateError) if not key.endswith("/")]

    def _put_audit(self, key: str, record: dict) -> None:
        self.vault.kv2_put(self.mount, f"{self.prefix}/audit/{key}", record, 0, error_cls=StateError)

    def audit_records(self) -> list[dict]:
        """Every stored audit record, oldest first (for operators and tests)."""
        records = []
        for key in sorted(self.vault.kv2_list(self.mount, f"{self.prefix}/audit",
                                              error_cls=StateError)):
            data, _, _ = self.vault.kv2_get(self.mount, f"{self.prefix}/audit/{key}",
                                            error_cls=StateError)
            if data is not None:
                records.append(data)
        return records

    def check(self) -> None:
        """The token works and the mount is a KV v2 store this identity can read."""
        self.vault.check(error_cls=StateError)
        try:
            self.vault.kv2_list(self.mount, f"{self.prefix}/clients", error_cls=StateError)
        except StateError as exc:
            raise StateError(f"state backend vault at {self.mount}/{self.prefix}: {exc.message}",
                             retryable=exc.retryable) from exc
