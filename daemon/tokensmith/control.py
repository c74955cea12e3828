"""The local control channel: a Unix socket in the runtime directory (0600, or 0660 with a group;
never TCP). The CLI hands `status` and `rotate` to a running daemon over it, so the daemon stays
the one writer of every refresh-token chain. One JSON request line, one JSON reply line.

This module is imported by the CLI's fast path: stdlib only at module level."""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading

log = logging.getLogger("tokensmith.control")

MAX_REQUEST = 64 * 1024


def default_runtime_dir() -> str:
    """systemd's RuntimeDirectory= when set, else /run/tokensmith (shared with the config model)."""
    return os.environ.get("RUNTIME_DIRECTORY", "/run/tokensmith").split(":")[0]


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
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
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


def peer_uid(conn: socket.socket) -> int | None:
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[1]
    except (OSError, AttributeError):
        return None


class ControlServer:
    def __init__(self, settings, daemon):
        self.path = settings.control_socket
        self.group = settings.control_socket_group
        self.daemon = daemon
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        directory = self.path.parent
        directory.mkdir(mode=0o750 if self.group else 0o700, parents=True, exist_ok=True)
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
        self.thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self.thread.start()

    def stop(self) -> None:
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

    def _serve(self) -> None:
        while self.sock is not None:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), name="control-conn", daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                data = b""
                while not data.endswith(b"\n") and len(data) <= MAX_REQUEST:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                message = json.loads(data)
                if not isinstance(message, dict):
                    raise ValueError
            except (OSError, ValueError):
                return
            conn.settimeout(None)
            try:
                reply = self.dispatch(message, peer_uid(conn))
            except Exception as exc:  # a reply is owed even when the handler breaks
                log.exception("control request failed", extra={"event": "control_error"})
                reply = {"ok": False, "error": f"internal error ({type(exc).__name__})"}
            try:
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass

    def dispatch(self, message: dict, uid: int | None) -> dict:
        op = message.get("op")
        daemon = self.daemon
        if op == "ping":
            return {"ok": True}
        if op == "status":
            return {"ok": True, "clients": daemon.statuses(), "daemon": True, **daemon.leadership_status()}
        if op == "rotate" and daemon.standby_refusal():
            return {"ok": False, "error": daemon.standby_refusal()}
        if op == "rotate":
            names = list(daemon.keepers) if message.get("all") else [message.get("client")]
            unknown = [name for name in names if name not in daemon.keepers]
            if unknown:
                return {"ok": False, "error": f"unknown client {unknown[0]!r}"}
            from tokensmith.commands import rotate_clients

            results = rotate_clients(daemon, names, compromised=bool(message.get("compromised")),
                                     accept_unrevoked=bool(message.get("accept_unrevoked")),
                                     reload_credentials=bool(message.get("reload_credentials")),
                                     verify_url=message.get("verify_url"), uid=uid)
            return {"ok": True, "results": results}
        return {"ok": False, "error": f"unknown op {op!r}"}
