"""One absolute deadline per call for botocore, whose urllib3 connections only time out each recv: a peer
dripping one byte per timeout would otherwise hold the caller for ever. (The token endpoint and Vault
go through tokensmith.transport, which has the deadline natively.)

A call runs inside `limit(seconds)`; the connection classes below register the sockets it uses, and
one reaper thread shuts down (SHUT_RDWR) the sockets of a call still running at its deadline, which
ends the blocked connect, send or recv with an error the caller reports as a timeout (Call.expired).
Registering is a heap push under a lock; a finished call is only marked, and dropped from the heap
when its deadline comes round. The name lookup, which no socket timeout reaches, runs within the
deadline too (WatchedConnection._new_conn).
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
from contextlib import contextmanager

from tokensmith import resolver

SLACK = 0.05  # deadlines this close together are handled in one wake-up (late, never early)

_local = threading.local()


class Call:
    __slots__ = ("deadline", "socks", "done", "expired", "queued")

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.socks: list = []
        self.done = False
        self.expired = False
        self.queued = False

    def remaining(self) -> float:
        """Seconds left; TimeoutError (and the call marked expired) when none are."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.expired = True
            raise TimeoutError("deadline passed")
        return left


def _shutdown(sock) -> None:
    try:
        if isinstance(sock, socket.socket):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain one: SSLSocket's would drop its SSL object
        else:
            sock.shutdown(socket.SHUT_RDWR)
    except Exception:  # already closed, detached or never connected: nothing left to wake
        pass


class Reaper:
    def __init__(self):
        self._heap: list[tuple[float, int, Call]] = []
        self._order = itertools.count()
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._live = 0  # queued calls not yet ended; the rest of the heap is waiting to be dropped

    def watch(self, call: Call, sock) -> None:
        with self._cond:
            if call.expired:  # past its deadline already: nothing will read this socket in time
                _shutdown(sock)
                return
            if call.done or any(known is sock for known in call.socks):
                return
            call.socks.append(sock)
            if not call.queued:
                call.queued = True
                self._live += 1
                if len(self._heap) > 2 * self._live + 1024:  # mostly ended calls: drop them now, not at their deadlines
                    self._heap[:] = [entry for entry in self._heap if not entry[2].done]
                    heapq.heapify(self._heap)
                heapq.heappush(self._heap, (call.deadline, next(self._order), call))
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="deadline-reaper", daemon=True)
                    self._thread.start()
                elif self._heap[0][2] is call:
                    self._cond.notify()

    def end(self, call: Call) -> None:
        with self._cond:
            if call.queued and not call.done:
                self._live -= 1
            call.done = True
            call.socks = []

    def _run(self) -> None:
        heap = self._heap
        with self._cond:
            while True:
                now = time.monotonic()
                while heap and heap[0][0] <= now:
                    call = heapq.heappop(heap)[2]
                    if not call.done:
                        call.expired = True
                        call.done = True  # ended as far as the reaper goes: end() must not count it again
                        self._live -= 1
                        for sock in call.socks:
                            _shutdown(sock)
                self._cond.wait(max(heap[0][0] - now, SLACK) if heap else None)


REAPER = Reaper()


@contextmanager
def limit(seconds: float):
    """Everything this thread sends or reads through a watched connection ends by the deadline;
    a nested limit cannot outlast the one around it."""
    outer = getattr(_local, "call", None)
    deadline = time.monotonic() + seconds
    if outer is not None and outer.deadline < deadline:
        deadline = outer.deadline
    call = Call(deadline)
    _local.call = call
    try:
        yield call
    finally:
        _local.call = outer
        REAPER.end(call)


def current() -> Call | None:
    return getattr(_local, "call", None)


class WatchedConnection:
    """Mixin for a urllib3 HTTPConnection subclass: connect within what is left of the current call's
    deadline, and put every socket a call uses in the reaper's care."""

    def connect(self):
        call = current()
        if call is not None:
            left = call.remaining()
            if not isinstance(self.timeout, (int, float)) or self.timeout > left:
                self.timeout = left
        super().connect()
        if call is not None and self.sock is not None:
            REAPER.watch(call, self.sock)

    def _new_conn(self):
        """The name lookup within the call's deadline as well (getaddrinfo has no timeout: tokensmith.resolver);
        then urllib3 connects to each address in turn, as it would have. `_dns_host` is the name urllib3
        resolves; `host` (SNI, the certificate check) is read only once this returns."""
        from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

        call = current()
        if call is None:
            return super()._new_conn()
        name = self._dns_host
        try:
            addresses = resolver.getaddrinfo(name, self.port, call.deadline)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        except TimeoutError as exc:
            raise ConnectTimeoutError(self, f"name lookup of {self.host} timed out") from exc
        error = None
        for *_, address in addresses:
            self._dns_host = address[0]
            try:
                return super()._new_conn()
            except NewConnectionError as exc:  # refused or unreachable: the next address (a timeout ends it)
                error = exc
            finally:
                self._dns_host = name
        raise error or NewConnectionError(self, f"no address for {self.host}")

    def request(self, *args, **kwargs):
        call = current()
        if call is not None and self.sock is not None:
            REAPER.watch(call, self.sock)
        return super().request(*args, **kwargs)


def watched_pool_classes(http_pool: type, https_pool: type) -> dict[str, type]:
    """pool_classes_by_scheme for a urllib3 PoolManager whose connections are watched."""
    classes = {}
    for scheme, pool in (("http", http_pool), ("https", https_pool)):
        connection = type(f"Watched{pool.ConnectionCls.__name__}", (WatchedConnection, pool.ConnectionCls), {})
        classes[scheme] = type(f"Watched{pool.__name__}", (pool,), {"ConnectionCls": connection})
    return classes
