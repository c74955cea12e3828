"""Per-client state backends, chosen by the config's `state.type`.

    file      one JSON file per client in state_dir (the default; a single host)
    vault     one Vault/OpenBao KV v2 record per client, every write check-and-set on its version
    dynamodb  one DynamoDB item per client, every write conditional on its version attribute

Every backend has the interface of `StateBackend`. A shared backend (vault, dynamodb) never lets a
stale writer overwrite: save() is a compare-and-set on the version this object last read or
wrote for that client, and a conflict raises StaleStateError.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Protocol

from tokensmith.errors import StateError
from tokensmith.state.file import ClientState, StateStore, check_types  # noqa: F401

if TYPE_CHECKING:
    from tokensmith.backends import Backends
    from tokensmith.config import Settings

FileStateStore = StateStore


class StaleStateError(StateError):
    """Another writer changed the record since this backend object read it: nothing was written."""
    retryable = False


class FencedError(StateError):
    """This replica may not write (it is not the leader, or its lease is about to run out)."""
    retryable = False


class StateBackend(Protocol):
    shared: bool
    epoch: int
    fence: Callable[[], None] | None

    def prepare(self) -> None: ...
    def remove_stale_temps(self) -> None: ...
    def load(self, client: str) -> ClientState | None: ...
    def load_if_changed(self, client: str) -> ClientState | None: ...
    def load_all(self) -> dict[str, ClientState]: ...
    def save(self, client: str, state: ClientState, *, sync_dir: bool = True) -> None: ...
    def client_lock(self, client: str) -> ContextManager[Any]: ...
    def try_daemon_lock(self) -> int | None: ...
    def append_audit(self, record: dict) -> None: ...


STATE_BACKENDS = {
    "file": "tokensmith.state.file:StateStore",
    "vault": "tokensmith.state.vault:VaultStateStore",
    "dynamodb": "tokensmith.state.dynamodb:DynamoStateStore",
}


def build_state_backend(settings: "Settings", backends: "Backends | None" = None) -> StateBackend:
    """The configured backend; its module (dynamodb: boto3) is imported only here, when chosen."""
    module, name = STATE_BACKENDS[settings.state.type].split(":")
    cls = getattr(import_module(module), name)
    if backends is None and settings.state.type != "file":
        from tokensmith.backends import Backends

        backends = Backends(settings)
    return cls.from_settings(settings, backends)
