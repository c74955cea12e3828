"""tokensmith.health: the real HealthServer on a free loopback port, scraped with requests."""

from __future__ import annotations

import http.client

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tokensmith.errors import TokenEndpointError
from tokensmith.health import HealthServer, parse_listen
from tokensmith.metrics import Metrics
from test_metrics import ACCESS_TOKEN, CLIENT_SECRET, NOW, REFRESH_TOKEN, Clock, make_keeper


class FakeDaemon:
    """The duck type HealthServer needs: healthy(), not_ready(), metrics."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.__dict__.clear()  # also drops per-test overrides of not_ready or metrics
        self.keepers = {}
        self.alive = True
        self.metrics = Metrics(keepers=lambda: self.keepers)

    def healthy(self) -> bool:
        if isinstance(self.alive, Exception):
            raise self.alive
        return self.alive

    def not_ready(self) -> list[str]:
        return [name for name, keeper in self.keepers.items() if not keeper.ready()]

    def not_serving(self) -> str | None:
        return None if self.alive is True else "not serving"


@pytest.fixture(scope="module")
def shared():
    """One server for the module (stopping one waits up to the 0.5 s poll interval); a fresh daemon per test."""
    daemon = FakeDaemon()
    health = HealthServer("127.0.0.1:0", daemon)
    health.start()
    yield health, daemon
    health.stop()


@pytest.fixture
def daemon(shared):
    shared[1].reset()
    return shared[1]


@pytest.fixture
def server(shared, daemon):
    return shared[0]


def url(server, path):
    host, port = server.address
    return f"http://{host}:{port}{path}"


def get(server, path):
    return requests.get(url(server, path), timeout=5)


def parse(body: str) -> dict:
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def test_healthz_follows_daemon(server, daemon):
    response = get(server, "/healthz")
    assert (response.status_code, response.text) == (200, "ok\n")
    daemon.alive = False
    response = get(server, "/healthz")
    assert (response.status_code, response.text) == (503, "unhealthy\n")
    daemon.alive = RuntimeError("scheduler gone")
    assert get(server, "/healthz").status_code == 503
    daemon.alive = True
    assert get(server, "/healthz").status_code == 200


def test_readyz_names_failing_clients_then_flips_to_ready(server, daemon, tmp_path):
    clock = Clock()
    daemon.keepers["alpha"] = make_keeper(tmp_path, "alpha", daemon.metrics, clock)
    daemon.keepers["beta"] = make_keeper(tmp_path, "beta", daemon.metrics, clock, errors=[
        TokenEndpointError("HTTP 503", status=503)])

    response = get(server, "/readyz?strict=1")
    assert (response.status_code, response.text) == (503, "not ready: alpha, beta\n")

    assert daemon.keepers["alpha"].refresh().ok
    assert not daemon.keepers["beta"].refresh().ok
    response = get(server, "/readyz?strict=1")
    assert (response.status_code, response.text) == (503, "not ready: beta\n")

    assert daemon.keepers["beta"].refresh().ok
    response = get(server, "/readyz?strict=1")
    assert (response.status_code, response.text) == (200, "ready\n")

    clock.now = NOW + 7200  # both tokens expired
    assert get(server, "/readyz?strict=1").text == "not ready: alpha, beta\n"


def test_readyz_with_no_clients_is_ready(server):
    assert get(server, "/readyz?strict=1").status_code == 200


def test_readyz_caps_a_long_list(server, daemon):
    daemon.not_ready = lambda: [f"c{i}" for i in range(250)]
    text = get(server, "/readyz?strict=1").text
    assert text.startswith("not ready: c0, c1, ") and text.endswith(", c99, ... (150 more)\n")


def test_metrics_endpoint_values_and_no_secrets(server, daemon, tmp_path):
    clock = Clock()
    daemon.keepers["api"] = make_keeper(tmp_path, "api", daemon.metrics, clock)
    daemon.keepers["down"] = make_keeper(tmp_path, "down", daemon.metrics, clock, errors=[
        TokenEndpointError("HTTP 400 invalid_grant", error="invalid_grant", status=400, retryable=False)])
    assert daemon.keepers["api"].refresh().ok
    assert not daemon.keepers["down"].refresh().ok
    daemon.metrics.compromise_rotation("api", "ok")
    clock.now = NOW + 100

    response = get(server, "/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    s = parse(response.text)

    def v(name, **labels):
        return s.get((name, frozenset(labels.items())))

    assert v("tokensmith_token_expiry_timestamp_seconds", client="api") == NOW + 3600
    assert v("tokensmith_token_validity_seconds", client="api") == pytest.approx(3500)
    assert v("tokensmith_client_ready", client="api") == 1
    assert v("tokensmith_client_ready", client="down") == 0
    assert v("tokensmith_client_consecutive_failures", client="down") == 1
    assert v("tokensmith_refresh_attempts_total", client="api", grant="client_credentials") == 1
    assert v("tokensmith_refresh_success_total", client="api") == 1
    assert v("tokensmith_refresh_failures_total", client="down", reason="invalid_grant") == 1
    assert v("tokensmith_refresh_duration_seconds_count", result="ok") == 1
    assert v("tokensmith_refresh_duration_seconds_count", result="failed") == 1
    assert v("tokensmith_compromise_rotations_total", client="api", result="ok") == 1
    assert any(name == "process_resident_memory_bytes" for name, _ in s)

    # no page ever carries the token, the refresh token, the client secret or even the fingerprint
    fingerprint = daemon.keepers["api"].state.token.fingerprint
    for path in ("/metrics", "/readyz", "/healthz", "/nope"):
        text = get(server, path).text
        for secret in (ACCESS_TOKEN, REFRESH_TOKEN, CLIENT_SECRET, fingerprint):
            assert secret not in text, (path, secret)


def test_forgotten_client_leaves_the_scrape(server, daemon, tmp_path):
    clock = Clock()
    for name in ("stay", "gone"):
        daemon.keepers[name] = make_keeper(tmp_path, name, daemon.metrics, clock)
        daemon.keepers[name].refresh()
    assert 'client="gone"' in get(server, "/metrics").text
    del daemon.keepers["gone"]
    daemon.metrics.forget("gone")
    text = get(server, "/metrics").text
    assert 'client="gone"' not in text and 'client="stay"' in text


def test_query_string_ignored_unknown_path_404(server):
    assert get(server, "/healthz?verbose=1").status_code == 200
    assert get(server, "/metrics?name[]=x").status_code == 200
    response = get(server, "/")
    assert response.status_code == 404
    assert get(server, "/healthz/extra").status_code == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"])
def test_non_get_is_405(server, method):
    host, port = server.address
    connection = http.client.HTTPConnection(host, port, timeout=5)
    try:
        connection.request(method, "/metrics", body=b"x" if method in ("POST", "PUT") else None)
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    assert response.status == 405
    assert response.getheader("Allow") == "GET, HEAD"
    assert body == b"method not allowed\n"


def test_metrics_render_failure_is_500(server, daemon):
    def broken():
        raise RuntimeError("boom")
    daemon.metrics.exposition = broken
    assert get(server, "/metrics").status_code == 500
    assert get(server, "/healthz").status_code == 200  # the server lives on


def test_no_request_logging(server, capsys, caplog):
    get(server, "/healthz")
    get(server, "/nope")
    captured = capsys.readouterr()
    assert "GET /healthz" not in captured.err + captured.out
    assert "GET /healthz" not in caplog.text


def test_address_and_stop_releases_port(daemon):
    health = HealthServer("127.0.0.1:0", daemon)
    with pytest.raises(RuntimeError):
        _ = health.address
    health.start()
    host, port = health.address
    assert host == "127.0.0.1" and port > 0
    assert requests.get(f"http://{host}:{port}/healthz", timeout=5).status_code == 200
    health.stop()
    health.stop()  # idempotent
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://{host}:{port}/healthz", timeout=2)
    again = HealthServer(f"127.0.0.1:{port}", daemon)  # the port can be bound again right away
    again.start()
    try:
        assert again.address == (host, port)
    finally:
        again.stop()


def test_ipv6_listen(daemon):
    health = HealthServer("[::1]:0", daemon)
    health.start()
    try:
        host, port = health.address
        assert host == "::1" and port > 0
        response = requests.get(f"http://[::1]:{port}/healthz", timeout=5)
        assert (response.status_code, response.text) == (200, "ok\n")
    finally:
        health.stop()


@pytest.mark.parametrize("listen, expected", [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)),
    ("[::1]:9464", ("::1", 9464)),
    ("[::]:0", ("::", 0)),
    (":9464", ("", 9464)),
    ("localhost:8080", ("localhost", 8080)),
])
def test_parse_listen(listen, expected):
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["127.0.0.1", "::1:9464", "host:port", "127.0.0.1:70000", ""])
def test_parse_listen_rejects(listen):
    with pytest.raises(ValueError):
        parse_listen(listen)
