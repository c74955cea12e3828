"""tokensmith.metrics: counters from real Keepers, scrape-time gauges, bounded labels, forget(),
and that no token or secret ever reaches the exposition text."""

from __future__ import annotations

import tracemalloc

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tokensmith.config import ClientConfig
from tokensmith.errors import SinkError, SourceError, TokenEndpointError
from tokensmith.keeper import Keeper
from tokensmith.metrics import DURATION_BUCKETS, Metrics, code_label, reason_label
from tokensmith.sources import Credentials
from tokensmith.state import StateStore
from tokensmith.tokens import Token

NOW = 1_800_000_000.0
CLIENT_SECRET = "cs-SECRET-b1e7c0ffee"
ACCESS_TOKEN = "at-TOKEN-9f8e7d6c5b4a"
REFRESH_TOKEN = "rt-REFRESH-0a1b2c3d4e"


# ---- local fakes (kept here so this file does not depend on shared fixtures)

class Clock:
    def __init__(self, now: float = NOW):
        self.now = now

    def __call__(self) -> float:
        return self.now


class StaticSource:
    def read(self) -> Credentials:
        return Credentials(client_id="svc", client_secret=CLIENT_SECRET)


class MemorySink:
    type = "memory"

    def __init__(self, name="memory:a", fail=0):
        self.name = name
        self.fail = fail
        self.tokens = []

    def check(self):
        pass

    def write(self, token):
        if self.fail:
            self.fail -= 1
            raise SinkError(f"{self.name}: injected failure")
        self.tokens.append(token)


class StubTokenClient:
    """Hands out tokens (or raises queued errors) without any HTTP."""

    def __init__(self, clock, lifetime=3600.0, errors=()):
        self.clock = clock
        self.lifetime = lifetime
        self.errors = list(errors)
        self.issued = 0

    def obtain(self, grant, creds, refresh_token=None):
        if self.errors:
            raise self.errors.pop(0)
        self.issued += 1
        now = self.clock()
        return Token(access_token=f"{ACCESS_TOKEN}-{self.issued}", token_type="Bearer", obtained_at=now,
                     expires_at=now + self.lifetime, refresh_token=f"{REFRESH_TOKEN}-{self.issued}")


def client_config(name, grant="client_credentials"):
    return ClientConfig(name=name, token_url="https://idp.example/token", grant=grant, source={"type": "env"},
                        sinks=[{"type": "file", "path": f"/run/tokensmith/{name}.token"}])


def make_keeper(tmp_path, name, metrics, clock, *, errors=(), sinks=None, lifetime=3600.0):
    keeper = Keeper(client_config(name), StaticSource(), sinks if sinks is not None else [MemorySink()],
                    StubTokenClient(clock, lifetime, errors), StateStore(tmp_path / "state"), clock=clock,
                    metrics=metrics)
    keeper.store.prepare()
    keeper.load()
    return keeper


def scrape(metrics: Metrics) -> dict:
    """Parse render() output: {(sample name, frozenset(labels)): value}."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())))


def names_for(samples, client):
    return {name for name, labels in samples if ("client", client) in labels}


# ---- tests

def test_direct_calls_counters_histogram_and_labels():
    metrics = Metrics()
    metrics.refresh_attempt("api", "client_credentials")
    metrics.refresh_attempt("api", "client_credentials")
    metrics.refresh_attempt("api", "refresh_token")
    metrics.refresh_result("api", True, "ok", 0.004, None)
    metrics.refresh_result("api", False, "invalid_grant", 0.3, None)
    metrics.refresh_result("api", False, "http_503", 45.0, None)
    metrics.sink_failure("api", "vault")
    metrics.compromise_rotation("api", "ok")
    metrics.compromise_rotation("api", "ok")

    s = scrape(metrics)
    assert value(s, "tokensmith_refresh_attempts_total", client="api", grant="client_credentials") == 2
    assert value(s, "tokensmith_refresh_attempts_total", client="api", grant="refresh_token") == 1
    assert value(s, "tokensmith_refresh_success_total", client="api") == 1
    assert value(s, "tokensmith_refresh_failures_total", client="api", reason="invalid_grant") == 1
    assert value(s, "tokensmith_refresh_failures_total", client="api", reason="http_503") == 1
    assert value(s, "tokensmith_sink_write_failures_total", client="api", sink_type="vault") == 1
    assert value(s, "tokensmith_compromise_rotations_total", client="api", result="ok") == 2

    # the histogram is by result, not by client (bounded series at thousands of clients)
    assert value(s, "tokensmith_refresh_duration_seconds_count", result="ok") == 1
    assert value(s, "tokensmith_refresh_duration_seconds_count", result="failed") == 2
    assert value(s, "tokensmith_refresh_duration_seconds_sum", result="failed") == pytest.approx(45.3)
    assert value(s, "tokensmith_refresh_duration_seconds_bucket", result="ok", le="0.001") == 0
    assert value(s, "tokensmith_refresh_duration_seconds_bucket", result="ok", le="0.005") == 1
    assert value(s, "tokensmith_refresh_duration_seconds_bucket", result="failed", le="0.5") == 1
    assert value(s, "tokensmith_refresh_duration_seconds_bucket", result="failed", le="30.0") == 1
    assert value(s, "tokensmith_refresh_duration_seconds_bucket", result="failed", le="+Inf") == 2
    assert not any(name.startswith("tokensmith_refresh_duration") and "client" in dict(labels) for name, labels in s)
    assert DURATION_BUCKETS[0] == 0.001 and DURATION_BUCKETS[-1] == 30.0

    # process metrics live on the same private registry
    assert any(name.startswith("process_") for name, _ in s)
    # and nothing was put on the global registry
    from prometheus_client import REGISTRY
    assert REGISTRY.get_sample_value("tokensmith_refresh_success_total", {"client": "api"}) is None


def test_histogram_bucket_bound_is_inclusive():
    metrics = Metrics(process=False)
    metrics.refresh_result("api", True, "ok", 1.0, None)
    s = scrape(metrics)
    assert value(s, "tokensmith_refresh_duration_seconds_bucket", result="ok", le="0.5") == 0
    assert value(s, "tokensmith_refresh_duration_seconds_bucket", result="ok", le="1.0") == 1


def test_two_instances_do_not_collide():
    first, second = Metrics(), Metrics()
    first.refresh_attempt("api", "password")
    assert first.sample("tokensmith_refresh_attempts_total", {"client": "api", "grant": "password"}) == 1
    assert second.sample("tokensmith_refresh_attempts_total", {"client": "api", "grant": "password"}) is None


@pytest.mark.parametrize("reason, label", [
    ("invalid_grant", "invalid_grant"), ("invalid_client", "invalid_client"), ("http_503", "http_503"),
    ("timeout", "timeout"), ("unreachable", "unreachable"), ("malformed_response", "malformed_response"),
    ("transport", "transport"), ("SourceError", "SourceError"), ("SinkError", "SinkError"),
    ("StateError", "StateError"), ("INVALID_GRANT", "invalid_grant"),
    ("provider_specific_thing", "other"), ("http_9999", "other"), ("ValueError", "other"),
    (f"Bearer {ACCESS_TOKEN}", "other"), ("x" * 500, "other"), ("", "other"), (None, "other"),
])
def test_reason_clamped_to_a_fixed_vocabulary(reason, label):
    assert reason_label(reason) == label


def test_code_labels_sanitized_and_short():
    assert code_label("client_credentials") == "client_credentials"
    assert code_label("Vault KV/2") == "vault_kv_2"
    assert code_label("") == "other"
    long = code_label("a" * 100)
    assert len(long) == 40 and set(long) == {"a"}


def test_unknown_reasons_share_one_series():
    metrics = Metrics(process=False)
    for i in range(200):
        metrics.refresh_result("api", False, f"weird_error_{i}", 0.01, None)
    s = scrape(metrics)
    reasons = {dict(labels)["reason"] for name, labels in s if name == "tokensmith_refresh_failures_total"}
    assert reasons == {"other"}
    assert value(s, "tokensmith_refresh_failures_total", client="api", reason="other") == 200


def test_keeper_driven_counters_and_gauges(tmp_path):
    clock = Clock()
    keepers = {}
    metrics = Metrics(keepers=lambda: keepers)
    good = keepers["good"] = make_keeper(tmp_path, "good", metrics, clock)
    bad = keepers["bad"] = make_keeper(tmp_path, "bad", metrics, clock, errors=[
        TokenEndpointError("HTTP 503", error=None, status=503),
        TokenEndpointError("HTTP 400 invalid_grant", error="invalid_grant", status=400, retryable=False),
    ])
    idle = keepers["idle"] = make_keeper(tmp_path, "idle", metrics, clock)

    # before any refresh: no token anywhere
    s = scrape(metrics)
    for name in ("good", "bad", "idle"):
        assert value(s, "tokensmith_token_expiry_timestamp_seconds", client=name) == 0
        assert value(s, "tokensmith_token_validity_seconds", client=name) == 0
        assert value(s, "tokensmith_client_ready", client=name) == 0
        assert value(s, "tokensmith_client_consecutive_failures", client=name) == 0

    assert good.refresh().ok
    assert not bad.refresh().ok
    assert not bad.refresh().ok
    clock.now += 600

    s = scrape(metrics)
    token = good.state.token
    assert value(s, "tokensmith_token_expiry_timestamp_seconds", client="good") == token.expires_at == NOW + 3600
    assert value(s, "tokensmith_token_validity_seconds", client="good") == pytest.approx(3000)
    assert value(s, "tokensmith_client_ready", client="good") == 1
    assert value(s, "tokensmith_client_consecutive_failures", client="good") == 0
    assert value(s, "tokensmith_refresh_attempts_total", client="good", grant="client_credentials") == 1
    assert value(s, "tokensmith_refresh_success_total", client="good") == 1

    assert value(s, "tokensmith_client_ready", client="bad") == 0
    assert value(s, "tokensmith_client_consecutive_failures", client="bad") == 2
    assert value(s, "tokensmith_token_validity_seconds", client="bad") == 0
    assert value(s, "tokensmith_refresh_failures_total", client="bad", reason="http_503") == 1
    assert value(s, "tokensmith_refresh_failures_total", client="bad", reason="invalid_grant") == 1
    assert value(s, "tokensmith_refresh_duration_seconds_count", result="failed") == 2
    assert value(s, "tokensmith_refresh_success_total", client="bad") == 0  # present from the first attempt
    assert names_for(s, "idle") == {"tokensmith_token_expiry_timestamp_seconds", "tokensmith_token_validity_seconds",
                                    "tokensmith_client_ready", "tokensmith_client_consecutive_failures"}

    # an expired token: validity 0, expiry timestamp kept, not ready
    clock.now = NOW + 4000
    s = scrape(metrics)
    assert value(s, "tokensmith_token_validity_seconds", client="good") == 0
    assert value(s, "tokensmith_token_expiry_timestamp_seconds", client="good") == NOW + 3600
    assert value(s, "tokensmith_client_ready", client="good") == 0
    assert idle.state.access_token is None


def test_sink_and_source_failures_from_keeper(tmp_path):
    clock = Clock()
    keepers = {}
    metrics = Metrics(keepers=lambda: keepers)

    class BrokenSource:
        def read(self):
            raise SourceError("vault sealed")

    sink = MemorySink("memory:flaky", fail=1)
    keeper = keepers["flaky"] = make_keeper(tmp_path, "flaky", metrics, clock, sinks=[sink])
    outcome = keeper.refresh()
    assert outcome.ok and not outcome.sinks_ok
    s = scrape(metrics)
    assert value(s, "tokensmith_sink_write_failures_total", client="flaky", sink_type="memory") == 1
    assert value(s, "tokensmith_client_ready", client="flaky") == 0  # token held but not in every sink

    clock.now = keeper.sink_retry_at + 1
    keeper.run_due()
    assert value(scrape(metrics), "tokensmith_client_ready", client="flaky") == 1

    nosrc = keepers["nosrc"] = make_keeper(tmp_path, "nosrc", metrics, clock)
    nosrc.source = BrokenSource()
    assert not nosrc.refresh().ok
    assert value(scrape(metrics), "tokensmith_refresh_failures_total", client="nosrc", reason="SourceError") == 1


def test_forget_removes_every_series_of_a_client(tmp_path):
    clock = Clock()
    keepers = {}
    metrics = Metrics(keepers=lambda: keepers)
    for name in ("keep", "drop"):
        keepers[name] = make_keeper(tmp_path, name, metrics, clock, sinks=[MemorySink(fail=1)])
        keepers[name].refresh()
        metrics.refresh_result(name, False, "timeout", 0.2, None)
        metrics.compromise_rotation(name, "ok")
    before = scrape(metrics)
    assert len(names_for(before, "drop")) >= 9  # the duration histogram has no client label

    del keepers["drop"]  # the daemon drops the keeper on reload, then forgets its series
    metrics.forget("drop")
    after = scrape(metrics)
    assert names_for(after, "drop") == set()
    assert names_for(after, "keep") == names_for(before, "keep")
    assert value(after, "tokensmith_refresh_success_total", client="keep") == 1

    metrics.forget("never-existed")  # harmless
    metrics.forget()  # no clients: a no-op
    # a forgotten client that comes back starts from zero
    metrics.refresh_attempt("drop", "client_credentials")
    again = scrape(metrics)
    assert value(again, "tokensmith_refresh_attempts_total", client="drop", grant="client_credentials") == 1
    assert value(again, "tokensmith_refresh_failures_total", client="drop", reason="timeout") is None


def test_no_token_or_secret_in_exposition(tmp_path):
    clock = Clock()
    keepers = {}
    metrics = Metrics(keepers=lambda: keepers)
    keeper = keepers["api"] = make_keeper(tmp_path, "api", metrics, clock)
    assert keeper.refresh().ok
    assert keeper.refresh(exchange=True).ok  # a refresh-token exchange too
    metrics.refresh_result("api", False, f"leaked {ACCESS_TOKEN}", 0.1, keeper.state.token)
    metrics.compromise_rotation("api", "ok")
    body, _ = metrics.render()
    text = body.decode()
    for secret in (ACCESS_TOKEN, REFRESH_TOKEN, CLIENT_SECRET, keeper.state.token.fingerprint):
        assert secret not in text
    assert "tokensmith_refresh_attempts_total" in text


def test_a_broken_keeper_does_not_break_the_scrape(tmp_path):
    clock = Clock()

    class Broken:
        @property
        def state(self):
            raise RuntimeError("boom")

    keepers = {"broken": Broken()}
    metrics = Metrics(keepers=lambda: keepers)
    keepers["ok"] = make_keeper(tmp_path, "ok", metrics, clock)
    s = scrape(metrics)
    assert value(s, "tokensmith_client_ready", client="ok") == 0
    assert names_for(s, "broken") == set()


def test_memory_per_client_is_small():
    metrics = Metrics(process=False)
    clients = [f"client-{i:05d}" for i in range(5000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for name in clients:
            metrics.refresh_attempt(name, "client_credentials")
            metrics.refresh_result(name, True, "ok", 0.12, None)
            metrics.refresh_attempt(name, "refresh_token")
            metrics.refresh_result(name, False, "http_503", 0.5, None)
            metrics.sink_failure(name, "file")
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    per_client = (after - before) / len(clients)
    assert per_client < 2048, f"{per_client:.0f} bytes of metrics per client"
