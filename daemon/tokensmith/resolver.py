"""Name lookups inside the exchange's deadline. getaddrinfo cannot be interrupted and has no timeout
of its own (glibc waits `timeout x attempts` per nameserver from resolv.conf, 5 s x 2 each by
default, longer with search domains), so a lookup runs in a daemon thread and the caller waits only
for what is left of its deadline. At most MAX_LOOKUPS run at once, so a dead resolver cannot pile
up threads: a lookup that cannot get a slot in time times out as well. Addresses skip all this.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

MAX_LOOKUPS = 8

_slots = threading.BoundedSemaphore(MAX_LOOKUPS)


class _Lookup:
    __slots__ = ("host", "port", "done", "result", "error")

    def __init__(self, host: str, port: int):
        self.host = host
        self.port = port
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_STREAM)
        except BaseException as exc:  # handed to the waiting caller, who raises it
            self.error = exc
        finally:
            _slots.release()
            self.done.set()


def getaddrinfo(host: str, port: int, deadline: float) -> list:
    """socket.getaddrinfo(host, port, 0, SOCK_STREAM), or TimeoutError at `deadline` (time.monotonic)."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    else:
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    if not _slots.acquire(timeout=max(deadline - time.monotonic(), 0)):
        raise TimeoutError(f"name lookup of {host} timed out (every lookup slot is taken)")
    lookup = _Lookup(host, port)
    try:
        threading.Thread(target=lookup.run, name="tokensmith-lookup", daemon=True).start()
    except BaseException:
        _slots.release()
        raise
    if not lookup.done.wait(max(deadline - time.monotonic(), 0)):
        raise TimeoutError(f"name lookup of {host} timed out")
    if lookup.error is not None:
        raise lookup.error
    return lookup.result
