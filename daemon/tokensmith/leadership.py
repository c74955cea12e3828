"""The leadership loop: with a shared state backend, one replica (the holder of the leader lease)
refreshes; the others are standbys that keep campaigning. The loop renews every renew_every and
campaigns at the same pace; when the lease is won the daemon loads every client's state from the
store and schedules from it, and when it is lost (or a write is fenced) the daemon stops all
refreshing at once."""

from __future__ import annotations

import logging
import threading
import time

from tokensmith.leases import Elector, FencedError, LeaseError

log = logging.getLogger("tokensmith.leadership")

# the lease must outlive a token request's deadline by this much before the request is sent
MARGIN_FRACTION = 0.1


class Leadership:
    def __init__(self, lease, settings, *, on_elected, on_deposed, metrics=None, clock=time.monotonic):
        config = settings.leader
        self.identity = config.name
        self.renew_every = config.renew_every
        self.margin = max(config.lease_ttl * MARGIN_FRACTION, 0.2)
        self.elector = Elector(lease, self.identity, ttl=config.lease_ttl, margin=self.margin, clock=clock)
        self.lease = lease
        self.on_elected = on_elected
        self.on_deposed = on_deposed
        self.metrics = metrics
        self.active = False  # True between on_elected and on_deposed
        self.store_reachable = False
        self._transition = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        if metrics is not None:
            metrics.leadership(None)

    # ---- asked by keepers and the state backend

    def before_request(self, deadline: float) -> None:
        """Before a token request: the lease must outlive the request's deadline plus the margin.
        A standby gets FencedError; a leader whose renewals are failing gets a retryable LeaseError."""
        if not self.active:
            raise FencedError("not the leader: a standby does not refresh")
        self.elector.check(0.0, "refresh")
        left = self.elector.remaining()
        if left < deadline + self.margin:
            self._wake.set()  # renew now
            raise LeaseError(f"leader lease has {left:.1f}s left, less than the request deadline "
                             f"{deadline:.1f}s plus {self.margin:.1f}s margin; waiting for its renewal")

    def fence(self) -> None:
        """The state backend's fence: a state or sink write is refused unless this replica leads."""
        if not self.active:
            raise FencedError("not the leader: a standby does not write")
        self.elector.check(0.0, "write")

    @property
    def epoch(self) -> int:
        return self.elector.epoch

    def fenced(self, reason: str) -> None:
        """A keeper's write or request was refused: stop refreshing now and campaign again."""
        if not self.active:
            return
        log.warning("stepping down: %s", reason, extra={"event": "step_down"})
        self.elector.step_down()
        self._deposed()
        self._wake.set()

    # ---- the loop

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="leadership", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            delay = self.renew_every
            started = time.monotonic()
            try:
                leading = self.elector.step()
                self.store_reachable = True
                if self.metrics is not None:
                    self.metrics.state_store("lease", time.monotonic() - started, True)
            except LeaseError as exc:
                if self.metrics is not None:
                    self.metrics.state_store("lease", time.monotonic() - started, False)
                leading = self.elector.held is not None
                self.store_reachable = False
                delay = max(self.renew_every / 4, 0.1)
                if self.metrics is not None and self.active:
                    self.metrics.lease_renew_failure()
                log.warning("leader lease store: %s", exc.message, extra={"event": "lease_store_failed"})
            except Exception:  # the loop must survive anything
                log.exception("leadership loop failed", extra={"event": "lease_store_failed"})
                leading = self.elector.held is not None
                delay = max(self.renew_every / 4, 0.1)
            if self._stop.is_set():
                break
            if leading and not self.active:
                self._elected()
            elif not leading and self.active:
                self._deposed()
            self._wake.wait(delay)
            self._wake.clear()

    def _elected(self) -> None:
        with self._transition:
            epoch = self.elector.epoch
            try:
                self.on_elected(epoch)
            except Exception:
                log.exception("taking over as leader failed; giving the lease up", extra={"event": "takeover_failed"})
                self.elector.release()
                return
            self.active = True
            if self.metrics is not None:
                self.metrics.leadership(True)
        log.info("this replica is the leader (epoch %d)", epoch, extra={"event": "leader_elected"})

    def _deposed(self) -> None:
        with self._transition:
            if not self.active:
                return
            self.active = False
            self.on_deposed()
            if self.metrics is not None:
                self.metrics.leadership(False)
        log.warning("this replica is now a standby", extra={"event": "leader_deposed"})

    def pause(self) -> None:
        """Stop the loop: no more campaigning or renewing (the daemon is stopping)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def stop(self, release: bool = True) -> None:
        self.pause()
        self._deposed()
        if release:
            self.elector.release()

    def status(self) -> dict:
        leader = self.elector.leader()
        return {"backend": self.lease.where, "identity": self.identity,
                "role": "active" if self.active else "standby", "leader": leader["holder"],
                "epoch": leader["epoch"], "lease_expires_in": leader["lease_expires_in"]}


class LocalOnly:
    """A CLI run without a daemon on a shared backend: the store belongs to the elected leader, so
    nothing here may refresh or write; rotate and once go to the leader's host instead."""

    active = False
    epoch = 0

    def before_request(self, deadline: float) -> None:
        raise FencedError("the state store is shared: only the elected leader refreshes; run rotate on the "
                          "leader's host (see `tokensmith status` there)")

    def fence(self) -> None:
        self.before_request(0.0)

    def fenced(self, reason: str) -> None:
        pass


def instrument(store, metrics) -> None:
    """Time the shared store's reads and writes for /metrics (a fenced write is no store error)."""
    for op in ("load", "load_if_changed", "load_all", "save"):
        method = getattr(store, op, None)
        if method is not None:
            setattr(store, op, _timed(method, op, metrics))


def _timed(method, op, metrics):
    from tokensmith.errors import TokensmithError

    def timed(*args, **kwargs):
        started = time.monotonic()
        ok = False
        try:
            result = method(*args, **kwargs)
            ok = True
            return result
        except FencedError:
            ok = True
            raise
        except TokensmithError:
            raise
        finally:
            metrics.state_store(op, time.monotonic() - started, ok)

    return timed
