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


def lease_margin(lease_ttl: float) -> float:
    return max(lease_ttl * MARGIN_FRACTION, 0.2)


class Leadership:
    def __init__(self, lease, settings, *, on_elected, on_deposed, metrics=None, clock=time.monotonic,
                 max_deadline: float = 0.0):
        config = settings.leader
        self.identity = config.name
        self.margin = lease_margin(config.lease_ttl)
        # renew often enough that the longest token request always fits in what is left of the lease
        self.renew_every = max(min(config.renew_every, config.lease_ttl - 2 * self.margin - max_deadline), 0.2)
        self.elector = Elector(lease, self.identity, ttl=config.lease_ttl, margin=self.margin, clock=clock)
        self.lease = lease
        self.on_elected = on_elected
        self.on_deposed = on_deposed
        self.metrics = metrics
        self.active = False  # True between on_elected and on_deposed
        self.store_reachable = False
        self.renew_failing = False  # the latest lease round failed: the store may not take a state write now
        self._transition = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewed = threading.Condition()
        self._taking_over = False
        self._rounds = 0
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
        if left < deadline + self.margin or self.renew_failing:
            with self._renewed:  # ask the loop to renew now, and wait for that round
                seen = self._rounds
                self._wake.set()
                self._renewed.wait_for(lambda: self._rounds != seen, timeout=self.renew_every)
            self.elector.check(0.0, "refresh")
            left = self.elector.remaining()
        if self.renew_failing:
            # an answer that cannot be stored is lost if the lease lapses first: the next leader
            # would present the spent refresh token (a Raft election, a store outage)
            raise LeaseError("the state store did not answer the last lease renewal; no refresh token is "
                             "spent until it does")
        if left < deadline + self.margin:
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
        """A keeper's write or request was refused: stop leading now (every later check fails at
        once); the loop removes the jobs. Not here: the keeper's thread may hold a lock a takeover
        in progress waits for."""
        if not self.active or self.elector.held is None:
            return
        log.warning("stepping down: %s", reason, extra={"event": "step_down"})
        self.elector.step_down()
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
                self.renew_failing = False
                if self.metrics is not None:
                    self.metrics.state_store("lease", time.monotonic() - started, True)
            except LeaseError as exc:
                if self.metrics is not None:
                    self.metrics.state_store("lease", time.monotonic() - started, False)
                leading = self.elector.held is not None
                self.store_reachable = False
                self.renew_failing = True
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
            if leading and not self.active and not self._taking_over:
                # in a thread of its own: reading every client's state can take longer than the
                # lease, which this loop must go on renewing meanwhile
                self._taking_over = True
                threading.Thread(target=self._elected, name="takeover", daemon=True).start()
            elif not leading and self.active:
                self._deposed()
            with self._renewed:
                self._rounds += 1
                self._renewed.notify_all()
            self._wake.wait(delay)
            self._wake.clear()

    def _elected(self) -> None:
        try:
            self._take_over()
        finally:
            self._taking_over = False

    def _take_over(self) -> None:
        with self._transition:
            epoch = self.elector.epoch
            if self.elector.held is None or self._stop.is_set():
                return  # lost again (or stopping) before this thread ran
            self.active = True  # before the jobs exist: their first run must find this replica leading
            try:
                self.on_elected(epoch)
            except Exception:
                log.exception("taking over as leader failed; giving the lease up", extra={"event": "takeover_failed"})
                self.active = False
                self.on_deposed()
                self.elector.release()
                return
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

    def refusal(self) -> str:
        leader = self.status()
        holder = f"the leader {leader['leader']} (epoch {leader['epoch']})" if leader["leader"] else "the leader"
        return f"this replica ({self.identity}) is a standby: rotate on {holder}; its control socket is on that host"

    def status(self) -> dict:
        leader = self.elector.leader()
        return {"backend": self.lease.where, "identity": self.identity,
                "role": "active" if self.active else "standby", "leader": leader["holder"],
                "epoch": leader["epoch"], "lease_expires_in": leader["lease_expires_in"]}


class LocalLeadership:
    """A CLI run without a daemon here (`once`, `rotate`) on a shared backend: it may refresh only
    while no daemon anywhere leads. It campaigns like a standby: a free lease (never held, or
    released) is taken at once, one whose holder stopped renewing after its ttl; a lease that is
    being renewed is refused, naming its holder. It renews as it goes and releases at exit."""

    POLL = 0.25

    def __init__(self, lease, settings, *, clock=time.monotonic, sleep=time.sleep):
        import atexit
        import os

        config = settings.leader
        self.margin = lease_margin(config.lease_ttl)
        # never the daemon's identity: a matching holder would be taken for this process's own earlier run
        self.elector = Elector(lease, f"{config.name}:cli:{os.getpid()}", ttl=config.lease_ttl, margin=self.margin,
                               clock=clock)
        self.refusal_reason = None
        try:
            self._campaign(lease, clock, sleep)
        except LeaseError as exc:
            self.refusal_reason = f"the leader lease cannot be read: {exc.message}"
        if self.active:
            atexit.register(self.elector.release)

    def _campaign(self, lease, clock, sleep) -> None:
        if self.elector.step():
            return
        first = self.elector.observed
        if first is not None and first.holder:
            log.warning("the leader lease in %s names %s (epoch %d); waiting up to %.0fs for it to lapse",
                        lease.where, first.holder, first.epoch, first.ttl, extra={"event": "lease_wait"})
        deadline = clock() + (first.ttl if first else 0) + self.POLL * 4
        while clock() < deadline:
            sleep(self.POLL)
            if self.elector.step():
                return
            seen = self.elector.observed
            if first is not None and seen is not None and seen.version != first.version:
                break  # renewed (or taken): a live leader
        seen = self.elector.observed or first
        holder = f"the leader {seen.holder} (epoch {seen.epoch})" if seen and seen.holder else "another replica"
        self.refusal_reason = (f"{holder} holds the lease in {lease.where}: only the elected leader refreshes; "
                               f"run this on its host")

    @property
    def active(self) -> bool:
        return self.elector.held is not None

    @property
    def epoch(self) -> int:
        return self.elector.epoch

    def before_request(self, deadline: float) -> None:
        if not self.active:
            raise FencedError(self.refusal_reason or "not the leader")
        if self.elector.remaining() < deadline + 2 * self.margin:
            try:
                self.elector.step()  # renew
            except LeaseError:
                pass
        self.elector.check(deadline + self.margin, "refresh")

    def fence(self) -> None:
        if not self.active:
            raise FencedError(self.refusal_reason or "not the leader")
        self.elector.check(0.0, "write")

    def fenced(self, reason: str) -> None:
        pass

    def refusal(self) -> str:
        return self.refusal_reason or "not the leader"


def for_daemon(daemon):
    """The leadership of a daemon on a shared state backend (a CLI's LocalLeadership when it does not serve)."""
    from tokensmith.errors import ConfigError
    from tokensmith.leases import build_lease

    settings, store = daemon.settings, daemon.store
    lease = build_lease(settings, daemon.backends)
    if not daemon.serve:  # a CLI without a daemon here must not write a store that a leader elsewhere owns
        leadership = LocalLeadership(lease, settings)
        store.fence = leadership.fence
        store.tenure = leadership.elector.tenure
        store.epoch = leadership.epoch
        return leadership
    config = settings.leader
    margin = lease_margin(config.lease_ttl)
    for client in settings.clients:
        if client.timeout + 2 * margin >= config.lease_ttl:
            raise ConfigError(f"client {client.name}: timeout {client.timeout:g}s does not fit in the leader lease: "
                              f"leader.lease_ttl ({config.lease_ttl:g}s) must exceed it plus twice the "
                              f"{margin:g}s margin")
    leadership = Leadership(lease, settings, on_elected=daemon._take_over, on_deposed=daemon._step_down,
                            metrics=daemon.metrics, max_deadline=max(client.timeout for client in settings.clients))
    store.fence = leadership.fence
    store.tenure = leadership.elector.tenure
    if daemon.metrics is not None:
        instrument(store, daemon.metrics)
    return leadership


def instrument(store, metrics) -> None:
    """Time the shared store's reads and writes for /metrics (a fenced write is no store error).
    load_if_changed is timed where it reads (reread): a call answered without a request is no operation."""
    for op, name in (("load", "load"), ("load_if_changed", "reread"), ("load_all", "load_all"), ("save", "save")):
        method = getattr(store, name, None)
        if method is not None:
            setattr(store, name, _timed(method, op, metrics))


def _timed(method, op, metrics):
    def timed(*args, **kwargs):
        started = time.monotonic()
        ok = False
        try:
            result = method(*args, **kwargs)
            ok = True
            return result
        except FencedError:  # refused before any request: no store error
            ok = True
            raise
        finally:
            metrics.state_store(op, time.monotonic() - started, ok)

    return timed
