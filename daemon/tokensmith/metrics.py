"""Prometheus metrics for /metrics, on a registry of our own (never the process-global one), so
tests and config reloads can build a fresh Metrics without "Duplicated timeseries" errors.

Labels carry only client names, grant names, bounded reason codes, sink types and names, and
results: never a token, a secret or a fingerprint. Reasons come partly from the token endpoint's
`error` field, which a provider controls, so they are clamped to a fixed vocabulary (an unknown
code becomes the response's `http_<status>`, else "other") to keep cardinality bounded. Series are
created lazily, on first use, so an idle client costs only the series it has actually produced
(memory: 5,000 clients). The refresh-duration histogram has no client label: 13 series per client
would be about 65k series at 5,000 clients; per-client health is in the gauges and counters.

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

from tokensmith import __version__
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
    "proxy", "discovery", "invalid_client_material", "spent_refresh_token",
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
    """Clamp a failure reason (a code, or the error itself) to a bounded vocabulary: an OAuth code
    a provider made up becomes http_<status> when the status is known, anything else "other"."""
    global _error_classes
    if isinstance(reason, BaseException):
        error, status = getattr(reason, "error", None), getattr(reason, "status", None)
        label = reason_label(error or getattr(reason, "reason", None) or type(reason).__name__)
        if label == OTHER and isinstance(status, int) and 100 <= status <= 599:
            return sys.intern(f"http_{status}")
        return label
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


def _histogram() -> array:
    return array("d", bytes(8 * (len(DURATION_BUCKETS) + 2)))  # per-bucket counts, +Inf, sum


class _Series:
    """One client's counters: plain numbers, no per-series lock or object."""

    __slots__ = ("attempts", "successes", "failures", "sinks", "compromises", "sink_success")

    def __init__(self):
        self.attempts: dict[str, int] = {}
        self.successes = 0
        self.failures: dict[str, int] | None = None
        self.sinks: dict[str, int] | None = None
        self.compromises: dict[str, int] | None = None
        self.sink_success: dict[str, float] | None = None  # sink name -> time of its last good write


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
        self._durations = {"ok": _histogram(), "failed": _histogram()}  # by result, for every client
        self._reload: tuple[bool, float | None] = (True, None)  # last reload ok, time of the last good one
        self._ha = None  # leadership and state-store figures, only with a shared state backend

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
                registry.register(_LeadershipCollector(self))
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
        durations = self._durations["ok" if ok else "failed"]
        with self._lock:
            series = self._client(client)
            if ok:
                series.successes += 1
            else:
                series.failures = _bump(series.failures, label)
            durations[slot] += 1
            durations[-1] += seconds

    def sink_failure(self, client: str, sink_type: str) -> None:
        label = code_label(sink_type)
        with self._lock:
            series = self._client(client)
            series.sinks = _bump(series.sinks, label)

    def sink_success(self, client: str, sink: str, when: float) -> None:
        with self._lock:
            series = self._client(client)
            if series.sink_success is None:
                series.sink_success = {}
            series.sink_success[sys.intern(str(sink))] = float(when)

    def reloaded(self, ok: bool, when: float) -> None:
        """The outcome of loading the config (start-up counts as the first successful load)."""
        with self._lock:
            self._reload = (bool(ok), float(when) if ok else self._reload[1])

    def compromise_rotation(self, client: str, result: str) -> None:
        label = code_label(result)
        with self._lock:
            series = self._client(client)
            series.compromises = _bump(series.compromises, label)

    # ---- leadership and the shared state store (daemon and leadership.py)

    def _leadership(self) -> dict:
        if self._ha is None:
            self._ha = {"leader": 0.0, "transitions": 0, "renew_failures": 0, "ops": {}}
        return self._ha

    def leadership(self, leader: bool | None) -> None:
        """None: leadership is in use (a standby so far); True/False: this replica became leader/standby."""
        with self._lock:
            ha = self._leadership()
            if leader is not None:
                ha["leader"] = 1.0 if leader else 0.0
                ha["transitions"] += 1

    def lease_renew_failure(self) -> None:
        with self._lock:
            self._leadership()["renew_failures"] += 1

    def state_store(self, op: str, seconds: float, ok: bool) -> None:
        label = code_label(op)
        slot = bisect_left(DURATION_BUCKETS, max(float(seconds), 0.0))
        with self._lock:
            ops = self._leadership()["ops"]
            record = ops.get(label)
            if record is None:
                record = ops[label] = [array("d", bytes(8 * (len(DURATION_BUCKETS) + 2))), 0]
            record[0][slot] += 1
            record[0][-1] += max(float(seconds), 0.0)
            if not ok:
                record[1] += 1

    # ---- lifecycle and exposition

    def forget(self, *clients: str) -> None:
        """Drop every labelled series of removed clients (config reload)."""
        with self._lock:
            for client in clients:
                self._series.pop(str(client), None)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def exposition(self, accept: str | None = None, accept_encoding: str | None = None) -> tuple[bytes, dict]:
        """The scrape body and its headers, negotiated with prometheus-client's own encoders: OpenMetrics
        when the scraper asks for it, gzip when it accepts it."""
        import gzip

        from prometheus_client.exposition import choose_encoder, gzip_accepted

        encoder, content_type = choose_encoder(accept or "")
        body = encoder(self.registry)
        headers = {"Content-Type": content_type, "Vary": "Accept, Accept-Encoding"}
        if gzip_accepted(accept_encoding or ""):
            body = gzip.compress(body, compresslevel=6)
            headers["Content-Encoding"] = "gzip"
        return body, headers

    def sample(self, name: str, labels: dict | None = None) -> float | None:
        """One sample's value by its exposed name (e.g. tokensmith_refresh_success_total); for tests and status."""
        return self.registry.get_sample_value(name, labels or {})


class _SeriesCollector:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        attempts = CounterMetricFamily(f"{PREFIX}_refresh_attempts", "Token requests made, by grant",
                                       labels=["client", "grant"])
        successes = CounterMetricFamily(f"{PREFIX}_refresh_success",
                                        "Refreshes that obtained and stored a new token", labels=["client"])
        failures = CounterMetricFamily(f"{PREFIX}_refresh_failures", "Refreshes that failed, by reason code",
                                       labels=["client", "reason"])
        duration = HistogramMetricFamily(f"{PREFIX}_refresh_duration_seconds",
                                         "Time a refresh took, every client, by result", labels=["result"])
        sink_success = GaugeMetricFamily(f"{PREFIX}_sink_last_success_timestamp_seconds",
                                         "Unix time of the last successful write to the sink", labels=["client", "sink"])
        build = GaugeMetricFamily(f"{PREFIX}_build_info", "tokensmith's version and Python's (always 1)",
                                  labels=["version", "python"])
        build.add_metric([__version__, sys.version.split()[0]], 1.0)
        reload_ok = GaugeMetricFamily(f"{PREFIX}_config_last_reload_successful",
                                      "1 when the last config load (start-up or SIGHUP) succeeded")
        reload_at = GaugeMetricFamily(f"{PREFIX}_config_last_reload_success_timestamp_seconds",
                                      "Unix time of the last successful config load")
        sinks = CounterMetricFamily(f"{PREFIX}_sink_write_failures", "Failed writes of a token to a sink",
                                    labels=["client", "sink_type"])
        compromises = CounterMetricFamily(f"{PREFIX}_compromise_rotations",
                                          "Emergency rotations after a suspected compromise",
                                          labels=["client", "result"])
        bounds = [floatToGoString(b) for b in DURATION_BUCKETS] + ["+Inf"]
        metrics = self.metrics
        with metrics._lock:  # copy out quickly; the families are built without holding up the keepers
            snapshot = [(client, dict(s.attempts), s.successes, dict(s.failures or {}), dict(s.sinks or {}),
                         dict(s.compromises or {}), dict(s.sink_success or {}))
                        for client, s in metrics._series.items()]
            histograms = {result: counts.tolist() for result, counts in metrics._durations.items()}
            reload_state = metrics._reload
        reload_ok.add_metric([], 1.0 if reload_state[0] else 0.0)
        if reload_state[1] is not None:
            reload_at.add_metric([], reload_state[1])
        for client, attempted, succeeded, failed, sinks_failed, compromised, written in snapshot:
            for grant, value in attempted.items():
                attempts.add_metric([client, grant], value)
            successes.add_metric([client], succeeded)
            for table, family in ((failed, failures), (sinks_failed, sinks), (compromised, compromises)):
                for label, value in table.items():
                    family.add_metric([client, label], value)
            for sink, when in written.items():
                sink_success.add_metric([client, sink], when)
        for result, counts in histograms.items():
            cumulative, buckets = 0.0, []
            for bound, count in zip(bounds, counts):
                cumulative += count
                buckets.append((bound, cumulative))
            duration.add_metric([result], buckets, counts[-1])
        families = [attempts, successes, failures, duration, sinks, compromises, sink_success, build, reload_ok]
        return families + ([reload_at] if reload_state[1] is not None else [])


class _LeadershipCollector:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        metrics = self.metrics
        with metrics._lock:
            ha = metrics._ha
            if ha is None:
                return []
            leader, transitions, renew_failures = ha["leader"], ha["transitions"], ha["renew_failures"]
            ops = {op: (record[0].tolist(), record[1]) for op, record in ha["ops"].items()}
        is_leader = GaugeMetricFamily(f"{PREFIX}_is_leader", "1 while this replica holds the leader lease")
        is_leader.add_metric([], leader)
        changes = CounterMetricFamily(f"{PREFIX}_leader_transitions", "Times this replica became leader or standby")
        changes.add_metric([], transitions)
        renews = CounterMetricFamily(f"{PREFIX}_lease_renew_failures", "Failed reads or writes of the leader lease")
        renews.add_metric([], renew_failures)
        latency = HistogramMetricFamily(f"{PREFIX}_state_store_duration_seconds",
                                        "Time a shared state store operation took", labels=["op"])
        errors = CounterMetricFamily(f"{PREFIX}_state_store_errors", "Shared state store operations that failed",
                                     labels=["op"])
        bounds = [floatToGoString(b) for b in DURATION_BUCKETS] + ["+Inf"]
        for op, (counts, failed) in ops.items():
            cumulative, buckets = 0.0, []
            for bound, count in zip(bounds, counts):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric([op], buckets, counts[-1])
            errors.add_metric([op], failed)
        return [is_leader, changes, renews, latency, errors]
