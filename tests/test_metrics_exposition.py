"""/metrics and /readyz of a real `tokensmith run`: promtool accepts the exposition, OpenMetrics and
gzip are negotiated, HEAD is answered, the new gauges are there, the duration histogram has no
client label, and readiness means "serving" (strict=1: every client has a token)."""

from __future__ import annotations

import gzip
import http.client
import shutil
import signal
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon_harness import Project, wait_for
from tokensmith.devserver import OAuthServer
from tokensmith.errors import TokenEndpointError
from tokensmith.metrics import Metrics, reason_label


@pytest.fixture
def server():
    with OAuthServer(access_lifetime=60) as server:
        yield server


def fetch(port, path, method="GET", headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


@pytest.fixture
def running(tmp_path, server):
    """A daemon with one good client and one whose secret the provider refuses."""
    project = Project(tmp_path, server)
    project.add_client("good", lifetime=60)
    project.add_client("refused", lifetime=60)
    server.set_client_secret("refused", "rotated-at-the-provider")
    daemon = project.start()
    try:
        wait_for(lambda: project.token("good"))
        port = daemon.health_port()
        wait_for(lambda: b"tokensmith_refresh_failures_total" in fetch(port, "/metrics")[2])
        yield project, daemon, port
    finally:
        assert daemon.stop() == 0


def samples(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def test_promtool_accepts_a_real_daemons_exposition(running):
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: scripts/test installs Debian's prometheus package"
    _, _, port = running
    status, headers, body = fetch(port, "/metrics", headers={"Accept": "text/plain"})
    assert status == 200
    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    # promtool exits 0 when it finds nothing (lint findings exit 3, parse errors 1)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    # promtool reads only the text format; the OpenMetrics answer goes through its strict parser
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

    status, headers, body = fetch(port, "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    names = {family.name for family in openmetrics_families(body.decode())}
    assert {"tokensmith_refresh_success", "tokensmith_build_info", "tokensmith_client_ready"} <= names


def test_openmetrics_and_gzip_are_negotiated(running):
    _, _, port = running
    status, headers, body = fetch(port, "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    status, headers, body = fetch(port, "/metrics", headers={"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip"
    assert b"tokensmith_build_info" in gzip.decompress(body)
    status, headers, body = fetch(port, "/metrics")
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "Content-Encoding" not in headers and b"tokensmith_build_info" in body


def test_head_is_answered_without_a_body(running):
    _, _, port = running
    for path in ("/healthz", "/readyz", "/metrics"):
        status, headers, body = fetch(port, path, method="HEAD")
        assert status == 200, path
        assert body == b"" and int(headers["Content-Length"]) > 0, path


def test_new_gauges_and_a_histogram_without_client_label(running):
    project, daemon, port = running
    s = samples(fetch(port, "/metrics")[2].decode())
    from tokensmith import __version__

    (build,) = [labels for name, labels in s if name == "tokensmith_build_info"]
    assert dict(build)["version"] == __version__
    assert s[("tokensmith_config_last_reload_successful", frozenset())] == 1
    loaded_at = s[("tokensmith_config_last_reload_success_timestamp_seconds", frozenset())]
    sink = f"file:{project.token_path('good')}"
    assert s[("tokensmith_sink_last_success_timestamp_seconds",
              frozenset({("client", "good"), ("sink", sink)}))] >= loaded_at
    assert not any(name == "tokensmith_sink_last_success_timestamp_seconds" and ("client", "refused") in labels
                   for name, labels in s)
    durations = [labels for name, labels in s if name.startswith("tokensmith_refresh_duration_seconds")]
    assert durations and not any("client" in dict(labels) for labels in durations)
    # a reload that fails flips the gauge and keeps the time of the last good one
    project.config.write_text("clients: [")
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in daemon.log)
    s = samples(fetch(port, "/metrics")[2].decode())
    assert s[("tokensmith_config_last_reload_successful", frozenset())] == 0
    assert s[("tokensmith_config_last_reload_success_timestamp_seconds", frozenset())] == loaded_at


def test_readyz_means_serving_and_strict_names_the_client_without_a_token(running):
    _, _, port = running
    assert fetch(port, "/readyz")[:1] == (200,)  # one refused secret does not make the pod NotReady
    status, _, body = fetch(port, "/readyz?strict=1")
    assert (status, body) == (503, b"not ready: refused\n")
    s = samples(fetch(port, "/metrics")[2].decode())
    assert s[("tokensmith_client_ready", frozenset({("client", "refused")}))] == 0  # per-client health is here


def test_an_unknown_provider_error_code_becomes_its_http_status():
    made_up = TokenEndpointError("HTTP 418 teapot_error", error="teapot_error", status=418)
    assert reason_label(made_up) == "http_418"
    assert reason_label(TokenEndpointError("x", error="invalid_grant", status=400)) == "invalid_grant"
    assert reason_label(TokenEndpointError("x", error="made_up")) == "other"  # no status known
    metrics = Metrics(process=False)
    metrics.refresh_result("api", False, made_up, 0.1, None)
    assert metrics.sample("tokensmith_refresh_failures_total", {"client": "api", "reason": "http_418"}) == 1
