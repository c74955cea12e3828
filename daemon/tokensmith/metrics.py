"""Prometheus metrics for /metrics, on a registry of our own (never the process-global one), so
tests and config reloads can build a fresh Metrics without "Duplicated timeseries" errors.

Labels carry only client names, grant names, bounded reason codes, sink types and results:
never a token, a secret or a fingerprint. Reasons come partly from the token endpoint's
`error` field, which a provider controls, so they are clamped to a fixed vocabulary ("other"
for anything else) to keep cardinality bounded. Series are created lazily, on first use, so an
idle client costs only the series it has actually produced (memory: 5,000 clients).

Per-client gauges (expiry, validity, readiness, consecutive failures) are not stored at all:
a custom collector computes them at scrape time from the live keepers.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from array import array
from bisect import bisect_left
from typing import Callable, Mapping

# prometheus_client (~0.1 s of imports, ~2 MB) is loaded on the first scrape, not at start-up:
# recording a refresh needs none of it.

from tokensmith.errors import TokensmithError

log = logging.getLogger("tokensmith.metrics")

PREFIX = "tokensmith"
# 1 ms to 30 s (the token client's timeout ceiling is 120 s: slower ones land in +Inf); kept short
# because every bucket is one exposed line per client
DURATION_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MAX_LABEL = 40
OTHER = "other"

# Reason codes allowed as label values: OAuth error codes (RFC 6749, 6750, 8628, 8693, 8707, 9449),
# the token client's own transport codes, http_NNN, and the names of TokensmithError classes.
KNOWN_REASONS = frozenset({
    "invalid_request", "invalid_client", "invalid_grant", "unauthorized_client", "unsupported_grant_type",
    "invalid_scope", "access_denied", "server_error", "temporarily_unavailable", "unsupported_response_type",
    "invalid_token", "insufficient_scope", "authorization_pending", "slow_down", "expired_token",
    "invalid_target", "invalid_dpop_proof", "use_dpop_nonce", "interaction_required", "login_required",
    "consent_required",
    "timeout", "unreachable", "transport", "malformed_response", "oversized_response", "tls",
    "proxy", "discovery", "invalid_client_material",
})
_HTTP_REASON = re.compile(r"http_[1-5][0-9][0-9]")
_UNSAFE = re.compile(r"[^a-z0-9_]+")


def _error_class_names() -> frozenset[str]:
    names, pending = set(), [TokensmithError]
    while pending:
        cls = pending.pop()
        names.add(cls.__name__)
        pending.extend(cls.__subclasses__())
    return frozenset(names)


_error_classes = _error_class_names()


def reason_label(reason) -> str:
    """Clamp a failure reason to a bounded vocabulary; unknown values become "other"."""
    global _error_classes
    text = str(reason or "")
    if text in KNOWN_REASONS or _HTTP_REASON.fullmatch(text) or text in _error_classes:
        return sys.intern(text)  # one shared string per code, not one per client
    lowered = text.lower()
    if lowered in KNOWN_REASONS:
        return sys.intern(lowered)
    if text.endswith("Error") and len(text) <= MAX_LABEL and text.isidentifier():
        _error_classes = _error_class_names()  # an error class defined since the last look
        if text in _error_classes:
            return sys.intern(text)
    return OTHER


def code_label(value) -> str:
    """A short code-defined label (grant, sink type, result): [a-z0-9_], at most 40 characters."""
    text = _UNSAFE.sub("_", str(value or "").lower()).strip("_")[:MAX_LABEL]
    return sys.intern(text) if text else OTHER


class KeeperCollector:
    """Per-client gauges computed at scrape time from the live keepers (nothing stored per client)."""

    def __init__(self, keepers: Callable[[], Mapping[str, object]]):
        self.keepers = keepers

    def describe(self):
        return []  # names are fixed and ours; skip the registry's collect-at-register probe

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        expiry = GaugeMetricFamily(f"{PREFIX}_token_expiry_timestamp_seconds",
                                   "Unix time the current access token expires (0 when there is none)",
                                   labels=["client"])
        validity = GaugeMetricFamily(f"{PREFIX}_token_validity_seconds",
                                     "Seconds the current access token stays valid (0 when none or expired)",
                                     labels=["client"])
        ready = GaugeMetricFamily(f"{PREFIX}_client_ready",
                                  "1 when the client has a valid token written to all its sinks", labels=["client"])
        failures = GaugeMetricFamily(f"{PREFIX}_client_consecutive_failures",
                                     "Refresh failures since the last success", labels=["client"])
        try:
            keepers = dict(self.keepers() or {})
        except Exception:  # a scrape must not take the endpoint down
            log.exception("listing keepers for metrics failed")
            keepers = {}
        for name, keeper in keepers.items():
            try:
                state = keeper.state  # replaced whole on commit: read it once
                has_token = bool(state.access_token)
                expires_at = float(state.expires_at) if has_token else 0.0
                left = max(expires_at - keeper.clock(), 0.0) if has_token else 0.0
                is_ready = 1.0 if keeper.ready() else 0.0
                failed = float(getattr(keeper, "failures", 0) or 0)
            except Exception:
                log.exception("reading keeper %s for metrics failed", name, extra={"client": name})
                continue
            labels = [str(name)]
            expiry.add_metric(labels, expires_at)
            validity.add_metric(labels, left)
            ready.add_metric(labels, is_ready)
            failures.add_metric(labels, failed)
        return [expiry, validity, ready, failures]


class _Series:
    """One client's counters and duration histogram: plain numbers, no per-series lock or object."""

    __slots__ = ("attempts", "successes", "failures", "sinks", "compromises", "durations")

    def __init__(self):
        self.attempts: dict[str, int] = {}
        self.successes = 0
        self.failures: dict[str, int] | None = None
        self.sinks: dict[str, int] | None = None
        self.compromises: dict[str, int] | None = None
        self.durations = array("d", bytes(8 * (len(DURATION_BUCKETS) + 2)))  # per-bucket counts, +Inf, sum


def _bump(table: dict | None, key: str) -> dict:
    if table is None:
        table = {}
    table[key] = table.get(key, 0) + 1
    return table


class Metrics:
    """What the keepers report, kept compactly and exposed through prometheus-client collectors.

    Counters and the histogram are stored per client in one small record (about 0.6 KB) rather than
    as prometheus_client Counter/Histogram children, which cost ~6.5 KB per client with a lock per
    value and a 2 s scrape at 5,000 clients.
    """

    def __init__(self, keepers: Callable[[], Mapping[str, object]] = lambda: {}, *, process: bool = True):
        self._keepers = keepers
        self._process = process
        self._registry = None
        self._registry_lock = threading.Lock()
        self._lock = threading.Lock()
        self._series: dict[str, _Series] = {}

    @property
    def registry(self):
        """The private registry, built on first use (a scrape, or a test reading a sample)."""
        with self._registry_lock:
            if self._registry is None:
                from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

                registry = CollectorRegistry()
                if self._process:
                    ProcessCollector(registry=registry)
                    PlatformCollector(registry=registry)
                    GCCollector(registry=registry)
                registry.register(_SeriesCollector(self))
                registry.register(KeeperCollector(self._keepers))
                self._registry = registry
            return self._registry

    def _client(self, client) -> _Series:
        name = str(client)
        series = self._series.get(name)
        if series is None:
            series = self._series[sys.intern(name)] = _Series()
        return series

    # ---- the keeper's calls (keeper.NullMetrics has the same shape)

    def refresh_attempt(self, client: str, grant: str) -> None:
        label = code_label(grant)
        with self._lock:
            _bump(self._client(client).attempts, label)

    def refresh_result(self, client: str, ok: bool, reason, seconds: float, token=None) -> None:
        # `token` is accepted for the keeper's signature and deliberately never looked at
        label = None if ok else reason_label(reason)
        seconds = max(float(seconds), 0.0)
        slot = bisect_left(DURATION_BUCKETS, seconds)  # le semantics: a value equal to a bound is in it
        with self._lock:
            series = self._client(client)
            if ok:
                series.successes += 1
            else:
                series.failures = _bump(series.failures, label)
            series.durations[slot] += 1
            series.durations[-1] += seconds

    def sink_failure(self, client: str, sink_type: str) -> None:
        label = code_label(sink_type)
        with self._lock:
            series = self._client(client)
            series.sinks = _bump(series.sinks, label)

    def compromise_rotation(self, client: str, result: str) -> None:
        label = code_label(result)
        with self._lock:
            series = self._client(client)
            series.compromises = _bump(series.compromises, label)

    # ---- lifecycle and exposition

    def forget(self, *clients: str) -> None:
        """Drop every labelled series of removed clients (config reload)."""
        with self._lock:
            for client in clients:
                self._series.pop(str(client), None)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def sample(self, name: str, labels: dict | None = None) -> float | None:
        """One sample's value by its exposed name (e.g. tokensmith_refresh_success_total); for tests and status."""
        return self.registry.get_sample_value(name, labels or {})


class _SeriesCollector:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        attempts = CounterMetricFamily(f"{PREFIX}_refresh_attempts", "Token requests made, by grant",
                                       labels=["client", "grant"])
        successes = CounterMetricFamily(f"{PREFIX}_refresh_success",
                                        "Refreshes that obtained and stored a new token", labels=["client"])
        failures = CounterMetricFamily(f"{PREFIX}_refresh_failures", "Refreshes that failed, by reason code",
                                       labels=["client", "reason"])
        duration = HistogramMetricFamily(f"{PREFIX}_refresh_duration_seconds", "Time a refresh took, success or not",
                                         labels=["client"])
        sinks = CounterMetricFamily(f"{PREFIX}_sink_write_failures", "Failed writes of a token to a sink",
                                    labels=["client", "sink_type"])
        compromises = CounterMetricFamily(f"{PREFIX}_compromise_rotations",
                                          "Emergency rotations after a suspected compromise",
                                          labels=["client", "result"])
        bounds = [floatToGoString(b) for b in DURATION_BUCKETS] + ["+Inf"]
        metrics = self.metrics
        with metrics._lock:  # copy out quickly; the families are built without holding up the keepers
            snapshot = [(client, dict(s.attempts), s.successes, dict(s.failures or {}), dict(s.sinks or {}),
                         dict(s.compromises or {}), s.durations.tolist()) for client, s in metrics._series.items()]
        for client, attempted, succeeded, failed, sinks_failed, compromised, counts in snapshot:
            for grant, value in attempted.items():
                attempts.add_metric([client, grant], value)
            successes.add_metric([client], succeeded)
            for table, family in ((failed, failures), (sinks_failed, sinks), (compromised, compromises)):
                for label, value in table.items():
                    family.add_metric([client, label], value)
            if any(counts[:-1]):
                cumulative, buckets = 0.0, []
                for bound, count in zip(bounds, counts):
                    cumulative += count
                    buckets.append((bound, cumulative))
                duration.add_metric([client], buckets, counts[-1])
        return [attempts, successes, failures, duration, sinks, compromises]
