"""The leader lease: one record in the shared state store that names the replica allowed to
refresh. Backends only read the record and write it by check-and-set on the version they read;
all timing is in Elector, on this process's monotonic clock (never a comparison of two hosts'
clocks), after client-go's leaderelection:

  * a candidate takes over only when the record has not changed for the record's ttl, measured
    from the moment this process first saw that version (or at once when it is released);
  * the holder's lease is valid until the monotonic time its last successful renew was SENT plus
    ttl minus a margin, whatever the reply's delay; every write and every token request checks it.

A lease is not a fence by itself (a process paused after its check can still act); see docs/ha.md
for what the version check-and-set on every state write adds and what remains.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from tokensmith.errors import TokensmithError
from tokensmith.state import FencedError  # noqa: F401  (raised here; the state backends define it)

log = logging.getLogger("tokensmith.leases")

LEASES = {"vault": "tokensmith.leases.vault:VaultLease", "dynamodb": "tokensmith.leases.dynamodb:DynamoLease"}


class LeaseError(TokensmithError):
    """The lease store could not be read or written (an outage: try again)."""
    retryable = True


class LeaseLost(LeaseError):
    """A check-and-set on the lease record failed: someone else wrote it since we read it."""
    retryable = False


@dataclass(frozen=True)
class LeaseRecord:
    holder: str | None  # None: released, anyone may take it at once
    epoch: int
    ttl: float
    version: int  # the store's version of the record, for the next check-and-set
    renewed_at: float = 0.0  # wall clock of the holder, for humans only (status); never compared

    def as_data(self) -> dict:
        return {"holder": self.holder, "epoch": self.epoch, "ttl": self.ttl, "renewed_at": self.renewed_at}


def record_from(data: dict | None, version: int | None) -> LeaseRecord | None:
    if not data or not version:
        return None
    try:
        holder = data.get("holder")
        return LeaseRecord(holder=str(holder) if holder else None, epoch=int(data.get("epoch", 0)),
                           ttl=float(data.get("ttl", 0)), version=int(version),
                           renewed_at=float(data.get("renewed_at", 0)))
    except (TypeError, ValueError, AttributeError):
        # an unreadable record is treated as a released one of epoch 0: the CAS on its version still decides
        return LeaseRecord(holder=None, epoch=0, ttl=0.0, version=int(version))


class Lease(Protocol):
    where: str  # for status and logs: the store and the record's path

    def read(self) -> LeaseRecord | None: ...

    def write(self, record: LeaseRecord, expected_version: int) -> LeaseRecord:
        """Check-and-set: succeed only when the stored version is expected_version (0: absent).
        Returns the record with its new version; raises LeaseLost on a conflict, LeaseError otherwise."""


def build_lease(settings, backends) -> Lease:
    """The lease for the config's shared state backend (settings.state)."""
    state = settings.state
    module_name, _, class_name = LEASES[state.type].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls.from_settings(settings, backends)


class Elector:
    """Campaigns for and keeps the lease; thread-safe; the leadership loop calls step()."""

    def __init__(self, lease: Lease, identity: str, *, ttl: float, margin: float, clock=time.monotonic,
                 wall=time.time):
        self.lease = lease
        self.identity = identity
        self.ttl = ttl
        self.margin = margin
        self.clock = clock
        self.wall = wall
        self._lock = threading.Lock()
        self.held: LeaseRecord | None = None
        self.valid_until = 0.0
        self.observed: LeaseRecord | None = None  # the last record read, and when it was first seen
        self.observed_at = 0.0
        self.fresh = True  # has not held the lease in this process: its own name on the record is an earlier run
        self.term = 0  # bumped at every acquisition: one uninterrupted holding of the lease
        self.unacknowledged: list[float] = []  # renewals (renewed_at) that failed in flight: one may be stored

    # ---- asked by the keepers and the state backend (no I/O)

    @property
    def is_leader(self) -> bool:
        return self.held is not None and self.clock() < self.valid_until

    @property
    def epoch(self) -> int:
        held = self.held
        return held.epoch if held else 0

    def tenure(self) -> int | None:
        """Which uninterrupted holding of the lease this is (a new number at every acquisition), None
        when not leading. Renewals keep it: each is a check-and-set on the version this holder wrote,
        so nobody else held the lease in between, and nobody else wrote state."""
        if not self.is_leader:
            return None
        return self.term  # read after is_leader: _take bumps it before the new holding is visible

    def remaining(self) -> float:
        if self.held is None:
            return 0.0
        return max(0.0, self.valid_until - self.clock())

    def check(self, needed: float = 0.0, what: str = "write state") -> None:
        """Raise FencedError unless this replica holds the lease for at least `needed` more seconds."""
        if self.held is None:
            raise FencedError(f"not the leader: a standby does not {what}")
        left = self.valid_until - self.clock()
        if left <= needed:
            raise FencedError(f"leader lease (epoch {self.held.epoch}) has {max(left, 0):.1f}s left, "
                              f"{needed:.1f}s needed to {what}")

    # ---- one round of the loop

    def step(self) -> bool:
        """Renew (leader) or campaign (standby) once; True while this replica leads."""
        with self._lock:
            if self.held is not None:
                return self._renew()
            return self._campaign()

    def _renew(self) -> bool:
        held = self.held
        sent = self.clock()
        record = LeaseRecord(self.identity, held.epoch, self.ttl, held.version, self.wall())
        try:
            self.held = self.lease.write(record, held.version)
        except LeaseLost:
            if self._adopt_own_write(held):
                return self._renew()  # once: the adopted version is the check-and-set base now
            log.warning("leader lease lost: another replica wrote it (epoch %d)", held.epoch,
                        extra={"event": "lease_lost"})
            self._drop()
            return False
        except LeaseError:
            self.unacknowledged.append(record.renewed_at)
            if self.clock() >= self.valid_until:
                log.error("leader lease could not be renewed before it lapsed (epoch %d)", held.epoch,
                          extra={"event": "lease_lapsed"})
                self._drop()
            raise
        self.unacknowledged = []
        self.valid_until = sent + self.ttl - self.margin
        return True

    def _adopt_own_write(self, held: LeaseRecord) -> bool:
        """A renewal whose answer was lost (a timeout, a store failover in flight) but which was stored
        makes the next one conflict with itself: that is this holder's record, not a takeover."""
        if not self.unacknowledged:
            return False
        current = self.lease.read()  # a LeaseError here: the next round asks again
        tried, self.unacknowledged = self.unacknowledged, []
        if current is None or (current.holder, current.epoch, current.version) != \
                (self.identity, held.epoch, held.version + 1) or current.renewed_at not in tried:
            return False
        self.held = current
        return True

    def _campaign(self) -> bool:
        now = self.clock()
        current = self.lease.read()
        if current is None:
            return self._take(None, epoch=1, sent=now)
        if self.observed is None or current.version != self.observed.version:
            self.observed, self.observed_at = current, now
        if current.holder is None or (current.holder == self.identity and self.fresh):
            # released, or held by an earlier run of this very identity (a restarted process); a
            # holder that stepped down itself waits the ttl like anyone, its last write may be in flight
            return self._take(current, epoch=current.epoch + 1, sent=now)
        if now - self.observed_at >= current.ttl:
            log.info("leader lease of %s (epoch %d) unchanged for %.1fs: taking over", current.holder,
                     current.epoch, now - self.observed_at, extra={"event": "lease_expired"})
            return self._take(current, epoch=current.epoch + 1, sent=now)
        return False

    def _take(self, current: LeaseRecord | None, *, epoch: int, sent: float) -> bool:
        record = LeaseRecord(self.identity, epoch, self.ttl, 0, self.wall())
        self.term += 1  # before held is set: no reader may pair the new holding with the old term
        try:
            self.held = self.lease.write(record, current.version if current else 0)
        except LeaseLost:
            return False
        self.valid_until = sent + self.ttl - self.margin
        self.observed = None
        self.fresh = False
        log.info("leader lease acquired (epoch %d)", epoch, extra={"event": "lease_acquired"})
        return True

    def _drop(self) -> None:
        self.held = None
        self.unacknowledged = []
        self.valid_until = 0.0
        self.observed = None

    def step_down(self) -> None:
        """Stop leading now (a fenced write): the next step() campaigns again."""
        with self._lock:
            self._drop()

    def release(self) -> None:
        """On a clean stop: mark the record released so a standby takes over without waiting a ttl."""
        with self._lock:
            held = self.held
            self._drop()
            if held is None:
                return
            try:
                self.lease.write(LeaseRecord(None, held.epoch, 0.0, held.version, self.wall()), held.version)
            except LeaseError:
                pass  # lost or unreachable: the others wait for the ttl instead

    def leader(self) -> dict:
        """Who leads, as far as this replica knows (for status): holder, epoch, lease expiry."""
        held = self.held
        if held is not None:
            return {"holder": held.holder, "epoch": held.epoch, "self": True,
                    "lease_expires_in": round(self.remaining(), 1)}
        seen = self.observed
        if seen is None or seen.holder is None:
            return {"holder": None, "epoch": seen.epoch if seen else 0, "self": False, "lease_expires_in": None}
        left = seen.ttl - (self.clock() - self.observed_at)
        return {"holder": seen.holder, "epoch": seen.epoch, "self": False,
                "lease_expires_in": round(max(left, 0.0), 1)}
