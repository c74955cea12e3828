"""What the shared backends (vault, dynamodb) have in common: the record codec, the version each
client was last seen at (the compare-and-set base of every write), fencing, local locks.

A subclass provides _read(client) -> (record | None, version), _write(client, record, cas) ->
new version or None on a conflict, _list() -> client names (or its own _read_all(), as dynamodb's one
scan), _put_audit(key, record) and check().
Version 0 means "no record" (or one without a version): a write with cas 0 succeeds only if nobody
has created a versioned one."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from tokensmith.errors import StateError
from tokensmith.state import ClientState, StaleStateError, check_types
from tokensmith.state.file import _KNOWN, _NAMES, FORMAT_VERSION, StateStore

log = logging.getLogger("tokensmith.state")

MAX_CLIENTS = 100_000  # load_all stops here rather than paging without end


def encode(state: ClientState, epoch: int) -> dict:
    data = {name: getattr(state, name) for name in _NAMES}
    data["sinks_written"] = dict(state.sinks_written)
    return {"format": FORMAT_VERSION, "epoch": epoch, "state": data}


def decode(record: dict) -> ClientState:
    """ValueError/TypeError for a record that is not ours or is damaged."""
    data = record.get("state")
    if isinstance(data, str):
        data = json.loads(data)
    if not isinstance(data, dict):
        raise TypeError("state")
    state = ClientState(**{key: value for key, value in data.items() if key in _KNOWN})
    check_types(state)
    return state


def audit_key(record: dict) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return f"{stamp}-{record.get('client') or 'unknown'}-{secrets.token_hex(4)}"


class SharedStateStore:
    shared = True
    what = "shared state"

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.local = StateStore(self.directory)  # daemon.lock and the runtime files stay on this host
        self.epoch = 0
        self.fence = None
        self.versions: dict[str, int] = {}  # per client: the version this object last read or wrote
        # Set by leadership: which uninterrupted holding of the lease this is (None: not leading).
        self.tenure: Callable[[], int | None] | None = None
        self.written: dict[str, int] = {}  # per client: the tenure in which this object wrote versions[client]
        self.writer = secrets.token_hex(8)  # tells this object's own committed write from another's equal one
        self.workers = 8  # reads at once in load_all: the daemon's scheduler.max_workers
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    # ---- subclass hooks

    def _read(self, client: str) -> tuple[dict | None, int]:
        raise NotImplementedError

    def _write(self, client: str, record: dict, cas: int) -> int | None:
        raise NotImplementedError

    def _list(self) -> list[str]:
        raise NotImplementedError

    def _put_audit(self, key: str, record: dict) -> None:
        raise NotImplementedError

    def check(self) -> None:
        raise NotImplementedError

    # ---- the StateBackend interface

    def prepare(self) -> None:
        self.local.prepare()
        self.check()

    def remove_stale_temps(self) -> None:
        pass

    def load(self, client: str) -> ClientState | None:
        """The stored record; with none yet, what the file backend left in state_dir (a host moving to
        a shared backend keeps its refresh-token chains: the first save creates the record)."""
        record, version = self._read(client)
        state = self._decode(client, record, version)
        if state is None and version == 0:
            try:
                state = self.local.load(client)
            except StateError:
                state = None
            if state is not None:
                log.info("no %s record yet: using the state file left in %s; the next save stores it", self.what,
                         self.directory, extra={"client": client, "event": "state_imported"})
        return state

    def load_if_changed(self, client: str) -> ClientState | None:
        """None without a request when this object wrote the current version itself in the lease
        holding still in force: any other writer needs the lease, and a deposed leader's late write
        (checked against an older version) can no longer land on it. Otherwise one read."""
        written = self.written.get(client)
        if written is not None and self.tenure is not None and written == self.tenure():
            return None
        return self.reread(client)

    def reread(self, client: str) -> ClientState | None:
        record, version = self._read(client)
        if version == 0:
            self.versions[client] = 0  # removed by an operator: the next save creates it again
            self.written.pop(client, None)
            return None
        if version <= self.versions.get(client, -1):
            # unchanged, or a replica that has not caught up with a version this object has seen
            return None
        return self._decode(client, record, version)

    def load_all(self) -> dict[str, ClientState]:
        """Every client's record (a standby's takeover), each as one consistent read."""
        states = {}
        for client, record, version in self._read_all():
            try:
                state = self._decode(client, record, version)
            except StateError:  # damaged: this client starts afresh, its next save replaces the record
                continue
            if state is not None:
                states[client] = state
        return states

    def _read_all(self) -> list[tuple[str, dict | None, int]]:
        """(client, record, version) for every listed client, up to `workers` reads at once. A
        failing read (the store is failing) fails the whole: a partial takeover view is worse than none."""
        from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

        def read(client: str) -> tuple[dict | None, int] | None:
            try:
                return self._read(client)
            except StateError as exc:
                if exc.retryable:
                    raise
                return None  # this record only (say, denied): the client starts afresh

        clients = self._list()[:MAX_CLIENTS]
        if not clients:
            return []
        with ThreadPoolExecutor(min(self.workers, len(clients)), thread_name_prefix="state-load") as pool:
            futures = [pool.submit(read, client) for client in clients]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((future for future in done if future.exception() is not None), None)
            if failed is not None:
                for future in futures:
                    future.cancel()
                raise failed.exception()
        return [(client, *future.result()) for client, future in zip(clients, futures) if future.result()]

    def save(self, client: str, state: ClientState, *, sync_dir: bool = True) -> None:
        """sync_dir is the file backend's; a shared store acknowledges a write once it is durable."""
        if self.fence is not None:
            self.fence()
        tenure = self.tenure() if self.tenure is not None else None  # before the write: see load_if_changed
        cas = self.versions.get(client, 0)
        record = {**encode(state, self.epoch), "writer": self.writer}
        self.written.pop(client, None)  # until this write is known to be stored: it may commit unanswered
        version = self._write(client, record, cas)
        if version is None:
            current, now = self._read(client)
            if now == cas + 1 and self._is_own_write(current, state):
                # this write committed but its acknowledgement was lost (a failover or a timeout in
                # flight), and the retry met its own version: that is success, not another writer
                version = now
            elif now == 0 and cas:
                # removed by an operator since this object wrote it (nothing read in between): create it again
                self.versions[client] = 0
                version = self._write(client, record, 0)
            if version is None:
                raise StaleStateError(f"another writer moved client {client} on (version {now}, this replica "
                                      f"last saw version {cas}); nothing was written", client=client)
        self.versions[client] = version
        if tenure is not None:
            self.written[client] = tenure

    def _is_own_write(self, record: dict | None, state: ClientState) -> bool:
        if not isinstance(record, dict) or record.get("epoch") != self.epoch or record.get("writer") != self.writer:
            return False
        try:
            return decode(record) == state
        except (ValueError, TypeError, AttributeError):
            return False

    @contextmanager
    def client_lock(self, client: str):
        """One thread per client in this process; across replicas leadership and CAS decide."""
        with self._guard:
            lock = self._locks.setdefault(client, threading.Lock())
        with lock:
            yield

    def try_daemon_lock(self) -> int | None:
        return self.local.try_daemon_lock()

    def append_audit(self, record: dict) -> None:
        self._put_audit(audit_key(record), record)

    def _decode(self, client: str, record: dict | None, version: int) -> ClientState | None:
        self.versions[client] = version  # also for a damaged record: the next save replaces it
        self.written.pop(client, None)
        if record is None:
            return None
        try:
            return decode(record)
        except (ValueError, TypeError, AttributeError):
            raise StateError(f"{self.what} record for client {client} (version {version}) is unreadable; "
                             f"a new token will be obtained and the record replaced", client=client) from None
