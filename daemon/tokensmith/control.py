"""The local control channel: a Unix socket in the runtime directory (0600, or 0660 with a group;
never TCP). The CLI hands `status` and `rotate` to a running daemon over it, so the daemon stays
the one writer of every refresh-token chain. One JSON request line, one JSON reply line.

Who may do what: `ping` and `status` anyone the socket lets connect; `rotate` (plain or
--compromised) only root, the daemon's own user and the uids in control_operators, told apart by
the peer's SO_PEERCRED credentials, never by anything the request says.

This module is imported by the CLI's fast path: stdlib only at module level."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from typing import NamedTuple

from tokensmith.control_protocol import MAX_REQUEST, Request, RequestError, parse_request

log = logging.getLogger("tokensmith.control")

MAX_CONNECTIONS = 16  # connections served at once; more get a "busy" reply at once, never a thread
REQUEST_DEADLINE = 5.0  # the whole request line must arrive within this
REPLY_TIMEOUT = 10.0


def default_runtime_dir() -> str:
    """systemd's RuntimeDirectory= when set, else /run/tokensmith (shared with the config model)."""
    return os.environ.get("RUNTIME_DIRECTORY", "/run/tokensmith").split(":")[0]


def prepare_runtime_dir(directory, group: str | None) -> None:
    """Created 0700 (0750 with a socket group; missing parents 0755), whatever the umask. An
    existing one owned by another user is refused: they could swap the socket. Ours loses group and
    other write; read and search bits stay, since under systemd (0750) the group reaches token
    files there. A shared one (sticky, like /tmp or a Kubernetes memory emptyDir) or root's is not
    ours to narrow: the socket itself is still 0600."""
    from tokensmith.fsutil import make_dirs

    try:
        if make_dirs(directory, 0o750 if group else 0o700):
            return
        st = os.stat(directory)
    except OSError as exc:
        raise RuntimeError(f"runtime directory {directory} is not usable: {exc.strerror or exc}") from exc
    uid = os.geteuid()
    if st.st_uid not in (uid, 0):
        raise RuntimeError(f"runtime directory {directory} is owned by uid {st.st_uid}, not by this user "
                           f"(uid {uid}); refusing to put the control socket there")
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o022:
        return
    if st.st_uid != uid or mode & stat.S_ISVTX:
        log.warning("runtime directory %s is mode %04o and shared; it is left as it is", directory, mode,
                    extra={"event": "runtime_dir_shared"})
        return
    try:
        os.chmod(directory, mode & ~0o022)
    except OSError as exc:
        raise RuntimeError(f"runtime directory {directory} cannot be tightened: {exc.strerror}") from exc


class Unreachable(Exception):
    """A daemon's socket exists but the daemon does not answer."""


def request(path: str, message: dict, timeout: float = 120.0) -> dict | None:
    """Send one request; None when no daemon listens (no socket, or a stale one)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except PermissionError as exc:
            raise Unreachable(f"permission denied on control socket {path}: run as the daemon's user or a member "
                              f"of its control_socket_group") from exc
        try:
            sock.sendall(json.dumps(message).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # a busy daemon answers and closes without reading: its reply is still there to read
        data = b""
        while not data.endswith(b"\n"):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                if not data:
                    raise
                break
            if not chunk:
                break
            data += chunk
    except socket.timeout as exc:
        raise Unreachable(f"daemon did not answer on {path} within {timeout:g}s") from exc
    except OSError as exc:
        raise Unreachable(f"control socket {path}: {exc.strerror or exc}") from exc
    finally:
        sock.close()
    try:
        return json.loads(data)
    except ValueError as exc:
        raise Unreachable(f"daemon sent an unreadable reply on {path}") from exc


class Peer(NamedTuple):
    pid: int
    uid: int
    gid: int


def peer_credentials(conn: socket.socket) -> Peer | None:
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return Peer(*struct.unpack("3i", creds))
    except (OSError, AttributeError):
        return None


class RequestTimeout(Exception):
    pass


def read_request(conn: socket.socket, deadline: float) -> bytes | None:
    """The first line a peer sends, which must arrive by `deadline` (monotonic) as a whole: a peer
    that trickles bytes cannot hold a connection slot for longer than REQUEST_DEADLINE."""
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RequestTimeout
        conn.settimeout(remaining)
        try:
            chunk = conn.recv(65536)
        except socket.timeout:
            raise RequestTimeout from None
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST + 1:
            raise RequestError(f"request longer than {MAX_REQUEST} bytes")
    return data.split(b"\n", 1)[0] if data else None


def _send_now(conn: socket.socket, reply: dict) -> None:
    """A short reply without waiting: used where no thread may block on a slow peer."""
    try:
        conn.setblocking(False)
        conn.send(json.dumps(reply).encode() + b"\n")
        while conn.recv(65536):  # what the peer sent so far: unread, it would turn the close into a reset
            pass
    except OSError:
        pass
    finally:
        conn.close()


class ControlServer:
    def __init__(self, settings, daemon):
        self.path = settings.control_socket
        self.group = settings.control_socket_group
        self.settings = settings
        self.daemon = daemon
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def start(self) -> None:
        prepare_runtime_dir(self.path.parent, self.group)
        if self.path.exists() or self.path.is_symlink():
            if request(str(self.path), {"op": "ping"}, timeout=2) is not None:
                raise RuntimeError(f"another daemon answers on {self.path}")
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket exists with mode 0600 from its first instant
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        if self.group:
            import grp

            os.chown(self.path, -1, grp.getgrnam(self.group).gr_gid)
            os.chmod(self.path, 0o660)
        sock.listen(16)
        self.sock = sock
        self.thread = threading.Thread(target=self._serve, args=(sock,), name="control", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop(self) -> None:
        self._stopping.set()
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
            self.sock = None
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def _serve(self, sock: socket.socket) -> None:
        # Nothing a peer does may end this loop: a dead accept thread is a daemon nobody can
        # reach (and /healthz says so, see Daemon.healthy). Only a closed socket ends it.
        failures = 0
        while not self._stopping.is_set():
            try:
                conn, _ = sock.accept()
                self._start_handler(conn)
            except OSError as exc:
                if self._stopping.is_set() or exc.errno in (errno.EBADF, errno.EINVAL, errno.ENOTSOCK):
                    return
                failures = self._back_off(failures, f"accept failed: {exc.strerror or exc}")
            except Exception as exc:  # RuntimeError: can't start new thread, and anything unforeseen
                failures = self._back_off(failures, f"{type(exc).__name__}: {exc}")
            else:
                if failures:
                    log.info("control socket accepts connections again after %d failure(s)", failures,
                             extra={"event": "control_recovered"})
                    failures = 0

    def _back_off(self, failures: int, reason: str) -> int:
        if not failures:
            log.warning("control socket: %s; backing off", reason, extra={"event": "control_accept_failed"})
        self._stopping.wait(min(1.0, 0.05 * 2 ** min(failures, 5)))
        return failures + 1

    def _start_handler(self, conn: socket.socket) -> None:
        if not self._slots.acquire(blocking=False):
            _send_now(conn, {"ok": False, "error": "the daemon is busy with other control connections; try again",
                             "code": "busy"})
            return
        try:
            threading.Thread(target=self._handle, args=(conn,), name="control-conn", daemon=True).start()
        except BaseException:
            self._slots.release()
            _send_now(conn, {"ok": False, "error": "the daemon cannot start a thread; try again", "code": "busy"})
            raise

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                reply = self._answer(conn)
                if reply is None:
                    return
                try:
                    conn.settimeout(REPLY_TIMEOUT)
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    pass
        finally:
            self._slots.release()

    def _answer(self, conn: socket.socket) -> dict | None:
        peer = peer_credentials(conn)
        try:
            data = read_request(conn, time.monotonic() + REQUEST_DEADLINE)
            if data is None:  # connected and left without a word
                return None
            message = parse_request(data)
        except RequestTimeout:
            return {"ok": False, "error": f"request not complete within {REQUEST_DEADLINE:g}s", "code": "timeout"}
        except RequestError as exc:
            log.info("malformed control request from uid %s: %s", peer.uid if peer else "?", exc,
                     extra={"event": "control_bad_request"})
            return {"ok": False, "error": str(exc), "code": "bad_request"}
        except OSError:
            return None
        conn.settimeout(None)
        try:
            return self.dispatch(message, peer)
        except Exception as exc:  # a reply is owed even when the handler breaks
            log.exception("control request failed", extra={"event": "control_error"})
            return {"ok": False, "error": f"internal error ({type(exc).__name__})"}

    # ---- who may do what

    def operators(self) -> set[int]:
        settings = getattr(self.daemon, "settings", self.settings)  # a reload may change the list
        return {0, os.getuid(), *settings.control_operators}

    def may(self, message: Request, peer: Peer | None) -> bool:
        if message.op in ("ping", "status"):
            return True  # anyone the socket's mode lets connect: the owner and the socket group
        return peer is not None and peer.uid in self.operators()

    def refuse(self, message: Request, peer: Peer | None) -> dict:
        from tokensmith.compromise import operator_identity, write_audit_line

        who = operator_identity(peer.uid) if peer else {"uid": None, "user": "unknown"}
        client = message.client or "--all"
        log.warning("control request refused: %s of %s by uid %s (%s), who is not a control operator",
                    message.verb, client, who["uid"], who["user"], extra={"event": "control_refused"})
        settings = getattr(self.daemon, "settings", self.settings)
        try:
            write_audit_line(settings.audit_log_path, {
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "operator": who,
                "verb": message.verb, "client": client, "result": "refused"})
        except OSError as exc:
            log.error("cannot write the audit log: %s", exc.strerror or exc, extra={"event": "audit_failed"})
        return {"ok": False, "code": "forbidden",
                "error": f"{message.verb} is refused: uid {who['uid']} ({who['user']}) is not root, the daemon's "
                         f"user or listed in control_operators"}

    def dispatch(self, message: Request, peer: Peer | None) -> dict:
        if not self.may(message, peer):
            return self.refuse(message, peer)
        daemon = self.daemon
        if message.op == "ping":
            return {"ok": True}
        if message.op == "status":
            return {"ok": True, "clients": daemon.statuses(), "daemon": True, **daemon.leadership_status()}
        refusal = daemon.standby_refusal()
        if refusal:  # never performed by two replicas: the leader, on its own host, does rotations
            return {"ok": False, "error": refusal, "code": "standby"}
        names = list(daemon.keepers) if message.all else [message.client]
        unknown = [name for name in names if name not in daemon.keepers]
        if unknown:
            return {"ok": False, "error": f"unknown client {unknown[0]!r}", "code": "unknown_client"}
        from tokensmith.commands import missing_verify_url, rotate_clients

        missing = missing_verify_url(daemon, names) if message.verify else []
        if missing:
            return {"ok": False, "error": missing, "code": "no_verify_url"}
        results = rotate_clients(daemon, names, compromised=message.compromised,
                                 accept_unrevoked=message.accept_unrevoked,
                                 reload_credentials=message.reload_credentials, uid=peer.uid if peer else None)
        return {"ok": True, "results": results}
