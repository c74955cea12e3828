"""Minimal systemd notify protocol client (sd_notify(3)), stdlib only.

systemd passes the address of a datagram socket in ``$NOTIFY_SOCKET``; the
service reports state changes by sending newline-separated ``KEY=VALUE``
assignments to it. A leading ``@`` denotes a Linux abstract-namespace socket
(the ``@`` stands for a leading NUL byte).

Everything here is best-effort: when tokensmith runs outside systemd (a
container, a terminal, tests) there is no socket and every call is a cheap
no-op, and a failure to notify must never take the daemon down, so
:meth:`Notifier.send` never raises.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Mapping, Optional

__all__ = ["Notifier"]


def _socket_address(raw: Optional[str]) -> Optional[str]:
    """Turn a ``$NOTIFY_SOCKET`` value into an AF_UNIX address, or None.

    Only absolute paths and abstract names are AF_UNIX addresses; anything
    else (unset, empty, relative, or the ``vsock:`` form newer systemd uses
    for VMs) is not something we can talk to, so notification is disabled.
    """
    if not raw:
        return None
    if raw.startswith("@"):
        if len(raw) < 2:
            return None
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    return None


class Notifier:
    """Sends sd_notify messages to the socket named by ``$NOTIFY_SOCKET``.

    ``environ`` is read once, at construction: systemd sets these variables
    before exec and they do not change afterwards.
    """

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self._address = _socket_address(environ.get("NOTIFY_SOCKET"))
        self.enabled: bool = self._address is not None
        self._watchdog_usec = environ.get("WATCHDOG_USEC")
        self._watchdog_pid = environ.get("WATCHDOG_PID")

    def send(self, *lines: str) -> bool:
        """Send one datagram made of ``lines`` joined by newlines.

        Returns True when the datagram was handed to the kernel, False when
        notification is disabled or sending failed. Never raises.
        """
        if self._address is None or not lines:
            return False
        try:
            payload = "\n".join(lines).encode("utf-8", "replace")
            # A fresh socket per message: notifications are rare (state
            # changes, a watchdog ping every few seconds), and it avoids
            # holding an fd that could leak into hook subprocesses or go
            # stale if systemd re-creates its notify socket.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, self._address)
            return True
        except Exception:  # noqa: BLE001 - notification must never break the daemon
            return False

    def ready(self, status: Optional[str] = None) -> bool:
        """READY=1: startup (or a reload) finished; with an optional STATUS=."""
        if status is None:
            return self.send("READY=1")
        return self.send("READY=1", _status_line(status))

    def reloading(self) -> bool:
        """RELOADING=1 with the CLOCK_MONOTONIC timestamp of the reload start.

        ``Type=notify-reload`` (systemd >= 253) requires MONOTONIC_USEC to tell
        this reload from a stale one; plain ``Type=notify`` ignores it.
        Follow up with :meth:`ready` once the reload is done.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """STOPPING=1: shutdown has begun."""
        return self.send("STOPPING=1")

    def status(self, text: str) -> bool:
        """STATUS=<text>: free-form one-line status shown by ``systemctl status``."""
        return self.send(_status_line(text))

    def watchdog(self) -> bool:
        """WATCHDOG=1: keep-alive ping for ``WatchdogSec=``."""
        return self.send("WATCHDOG=1")

    def watchdog_interval(self) -> Optional[float]:
        """Seconds between watchdog pings, or None when no watchdog applies.

        Half of ``$WATCHDOG_USEC`` (as sd_watchdog_enabled(3) recommends), and
        only if ``$WATCHDOG_PID`` is unset or names this process: a child
        that inherited the environment must not ping on the parent's behalf.
        """
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        if not self._watchdog_usec:
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2_000_000


def _status_line(text: str) -> str:
    # One assignment per line: an embedded newline would start a new
    # (bogus) assignment, so fold the text onto a single line.
    return "STATUS=" + " ".join(str(text).splitlines())
