"""Durable per-client state: the current token, its refresh token and which sinks hold it.

One JSON file per client in the state directory (0700; files 0600, replaced atomically), so a
crash at any instant leaves either the previous state or the next one, never a mix.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

from tokensmith.errors import StateError
from tokensmith.fsutil import atomic_write, make_dirs, remove_stale_temps
from tokensmith.tokens import Token

FORMAT_VERSION = 1


@dataclass(slots=True)
class ClientState:
    access_token: str | None = field(default=None, repr=False)
    token_type: str = "Bearer"
    obtained_at: float = 0.0
    expires_at: float = 0.0
    refresh_token: str | None = field(default=None, repr=False)
    refresh_token_obtained_at: float = 0.0
    client_id: str | None = None
    sinks_written: dict[str, str] = field(default_factory=dict)
    last_refresh: float = 0.0
    last_grant: str | None = None
    last_error: str | None = None
    last_error_at: float = 0.0
    alert: str | None = None
    spent_seed: str | None = None  # fingerprint of the source's refresh token once presented (grant refresh_token)

    @property
    def token(self) -> Token | None:
        if not self.access_token:
            return None
        return Token(access_token=self.access_token, token_type=self.token_type, obtained_at=self.obtained_at,
                     expires_at=self.expires_at, refresh_token=self.refresh_token)


_NAMES = tuple(f.name for f in fields(ClientState))
_KNOWN = frozenset(_NAMES)


_TYPES = {"access_token": (str, type(None)), "token_type": (str,), "obtained_at": (int, float),
          "expires_at": (int, float), "refresh_token": (str, type(None)), "refresh_token_obtained_at": (int, float),
          "client_id": (str, type(None)), "sinks_written": (dict,), "last_refresh": (int, float),
          "last_grant": (str, type(None)), "last_error": (str, type(None)), "last_error_at": (int, float),
          "alert": (str, type(None)), "spent_seed": (str, type(None))}


def check_types(state: ClientState) -> None:
    """A hand-edited or foreign state file must be set aside, not crash the keeper at every start."""
    for name, types in _TYPES.items():
        value = getattr(state, name)
        if not isinstance(value, types) or isinstance(value, bool):
            raise TypeError(name)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in state.sinks_written.items()):
        raise TypeError("sinks_written")


def _signature(st: os.stat_result) -> tuple[int, int, int]:
    # every write is a new file renamed into place, so a new inode/size/mtime means new content
    return st.st_ino, st.st_size, st.st_mtime_ns


class StateStore:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._dir = str(self.directory)  # per-refresh paths are plain strings: pathlib costs more than the syscalls
        self._seen: dict[str, tuple[int, int, int]] = {}  # per client: the file as this store last wrote or read it

    def prepare(self) -> None:
        """Create the directory 0700 (missing parents 0755) and prove it is writable, so a bad
        state_dir fails at start-up. A directory another user owns is refused: they could plant a
        state file whose token we would publish."""
        try:
            make_dirs(self.directory, 0o700)
            st = self.directory.stat()
            if st.st_uid not in (os.geteuid(), 0):
                raise StateError(f"state directory {self.directory} is owned by uid {st.st_uid}, not by this user "
                                 f"(uid {os.geteuid()}); refusing to use it")
            if st.st_mode & stat.S_ISVTX:  # /tmp and the like: narrowing it to 0700 would break the host
                raise StateError(f"state directory {self.directory} is a shared directory (sticky bit); "
                                 f"give the daemon a directory of its own")
            if stat.S_IMODE(st.st_mode) & 0o077:
                os.chmod(self.directory, 0o700)
            probe = self.directory / ".write-probe"
            atomic_write(probe, b"", mode=0o600)
            probe.unlink()
        except OSError as exc:
            raise StateError(f"state directory {self.directory} is not usable: {exc.strerror or exc}") from exc

    def remove_stale_temps(self) -> None:
        """Only when no other process can be writing state: at daemon start-up, under daemon.lock."""
        remove_stale_temps(self.directory)

    def path(self, client: str) -> Path:
        return self.directory / f"{client}.json"

    def _file(self, client: str, suffix: str = ".json") -> str:
        return f"{self._dir}/{client}{suffix}"

    def load(self, client: str) -> ClientState | None:
        path = self._file(client)
        try:
            # O_NOFOLLOW: a planted symlink must not choose what we read; O_NONBLOCK: nor a FIFO hang us
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._set_aside(path, client, "is a symlink") from None
            raise StateError(f"cannot read state file {path}: {exc.strerror}", client=client) from exc
        try:
            handle = open(fd, "rb")
        except OSError as exc:  # a directory: open() refuses it and leaves fd to us
            os.close(fd)
            raise StateError(f"cannot read state file {path}: {exc.strerror}", client=client) from exc
        with handle:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise self._set_aside(path, client, "is not a regular file")
            if st.st_uid not in (os.geteuid(), 0):
                raise self._set_aside(path, client, f"is owned by uid {st.st_uid}, not by this user")
            seen = _signature(st)
            try:
                raw = handle.read()
            except OSError as exc:
                raise StateError(f"cannot read state file {path}: {exc.strerror}", client=client) from exc
        try:
            data = json.loads(raw)
            state = ClientState(**{key: value for key, value in data.items() if key in _KNOWN})
            check_types(state)
        except (ValueError, TypeError, AttributeError):  # AttributeError: valid JSON but not an object
            aside = f"{path}.corrupt-{int(time.time())}"
            os.replace(path, aside)
            raise StateError(f"state file {path} was unreadable and was moved to {os.path.basename(aside)}; "
                             f"a new token will be obtained", client=client) from None
        self._seen[client] = seen
        return state

    @staticmethod
    def _set_aside(path: str, client: str, why: str) -> StateError:
        """A state file we did not write is never used (its token would be published): move it aside."""
        aside = f"{path}.refused-{int(time.time())}"
        try:
            os.replace(path, aside)
        except OSError as exc:
            return StateError(f"state file {path} {why} and could not be moved aside ({exc.strerror}); "
                              f"it is not used", client=client)
        return StateError(f"state file {path} {why}; it was moved to {os.path.basename(aside)} and is not used; "
                         f"a new token will be obtained", client=client)

    @staticmethod
    def _open_lock(path: str, client: str | None) -> int:
        # O_NOFOLLOW: a planted symlink would make us create (as root: anywhere) the file it names
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StateError(f"lock file {path} is a symlink; remove it", client=client) from None
            raise StateError(f"cannot open lock file {path}: {exc.strerror}", client=client) from exc

    def load_if_changed(self, client: str) -> ClientState | None:
        """load(), or None when the file is the one this store last wrote or read (one stat instead
        of a read and a parse on every refresh) or does not exist."""
        try:
            st = os.stat(self._file(client))
        except FileNotFoundError:
            return None
        except OSError:
            return self.load(client)
        if self._seen.get(client) == _signature(st):
            return None
        return self.load(client)

    def save(self, client: str, state: ClientState, *, sync_dir: bool = True) -> None:
        """sync_dir=False only where losing this write in a crash is harmless (the previous,
        durable version is then read back), e.g. the record of which sinks hold the token."""
        data = {name: getattr(state, name) for name in _NAMES}
        data["sinks_written"] = dict(state.sinks_written)
        data["version"] = FORMAT_VERSION
        path = self._file(client)
        try:
            written = atomic_write(path, json.dumps(data, separators=(",", ":")).encode(), mode=0o600,
                                   sync_dir=sync_dir)
        except OSError as exc:
            raise StateError(f"cannot write state file {path}: {exc.strerror or exc}", client=client) from exc
        self._seen[client] = _signature(written)

    @contextmanager
    def client_lock(self, client: str):
        """The cross-process lock that makes the daemon and a CLI without a daemon one writer per client."""
        fd = self._open_lock(self._file(client, ".lock"), client)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def try_daemon_lock(self) -> int | None:
        """Hold state_dir/daemon.lock for the process lifetime; None when another daemon has it."""
        fd = self._open_lock(self._file("daemon", ".lock"), None)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    # ---- the StateBackend interface beyond what the keeper has always used

    shared = False
    epoch = 0  # only a shared backend stores it
    fence = None

    @classmethod
    def from_settings(cls, settings, backends=None) -> "StateStore":
        return cls(settings.state_dir)

    def load_all(self) -> dict[str, ClientState]:
        """Every readable client record in the directory (unreadable ones are set aside by load)."""
        states = {}
        for path in sorted(self.directory.glob("*.json")):
            try:
                state = self.load(path.stem)
            except StateError:
                continue
            if state is not None:
                states[path.stem] = state
        return states

    def append_audit(self, record: dict) -> None:
        """The audit log file (settings.audit_log_path) is this backend's audit store."""
