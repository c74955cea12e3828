"""Secrets never leak: run every CLI command and daemon path, error paths included, with
distinctive secrets, and grep every log line, output, status, audit line and metrics page."""

import json
import re
import signal

import pytest
import requests

from daemon_harness import Project, wait_for
from tokensmith.devserver import OAuthServer

CLIENT_SECRET = "ClientSecret-7f3a9d-LEAKCHECK"
PASSWORD = "UserPassword-41c2e8-LEAKCHECK"
BAD_SECRET = "WrongSecret-99aa01-LEAKCHECK"


@pytest.fixture
def server():
    with OAuthServer(access_lifetime=2) as server:
        yield server


@pytest.mark.security(threat="local user", claim="No client secret, password, access token or refresh token appears "
                                                 "in any log line, CLI output, status, audit line or metrics page, "
                                                 "error paths included.")
def test_no_secret_or_token_appears_in_any_output(tmp_path, server, report):
    project = Project(tmp_path, server, audit_log=str(tmp_path / "audit.log"), log={"level": "DEBUG"})
    project.add_client("form", grant="password", secret=CLIENT_SECRET, users={"alice": PASSWORD},
                       introspection_url=server.introspection_url, revocation_url=server.revocation_url,
                       verify_url=server.resource_url)
    project.add_client("basic", dialect="basic", secret=CLIENT_SECRET + "-b", verify_url=server.resource_url)
    project.add_client("json", dialect="json", secret=CLIENT_SECRET + "-j", fmt="json", verify_url=server.resource_url)
    outputs = []

    def cli(*args):
        result = project.cli(*args)
        outputs.append(result.stdout + result.stderr)
        return result

    project.write()
    cli("check-config")
    cli("once")
    cli("status")
    cli("status", "--json")
    cli("rotate", "form", "--compromised")  # without a daemon
    daemon = project.start("--log-format", "json")
    try:
        daemon.wait_ready()
        server.fail_next(2, status=503)
        server.fail_next(1, status=200, body=b'{"token_type": "bearer"}')
        server.fail_next(1, status=429, headers={"Retry-After": "1"})
        server.fail_next(1, status=200, body=b"<html>not json</html>")
        server.fail_next(1, status=400, body=json.dumps(
            {"error": "invalid_grant", "error_description": f"echoing {CLIENT_SECRET} {PASSWORD}"}).encode())
        wait_for(lambda: server.stats["token_requests"] > 20, timeout=15)
        cli("status")
        cli("status", "--json")
        cli("rotate", "form")
        cli("rotate", "--all", "--compromised", "--accept-unrevoked", "--verify")
        cli("rotate", "form", "--compromised", "--reload-credentials", "--json")
        # a rejected client secret, an operator-visible alert
        server.set_client_secret("basic", BAD_SECRET)
        wait_for(lambda: "invalid_client" in daemon.log, timeout=10)
        cli("status")
        port = daemon.health_port()
        for path in ("/metrics", "/readyz", "/healthz"):
            outputs.append(requests.get(f"http://127.0.0.1:{port}{path}", timeout=5).text)
        assert "tokensmith_refresh_failures_total" in outputs[-3]
        project.config.write_text(project.config.read_text().replace("min_lead: 0", "min_lead: 0.1"))
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: re.search(r"config reloaded: .*, [1-9]\d* changed", daemon.log), timeout=5)
        cli("status", "--json")
    finally:
        daemon.stop()
    cli("status")
    # a broken config that carries a secret must not echo it
    broken = project.config.read_text().replace("grant: password", "grant: pasword")
    project.config.write_text(broken + f"\nvault: {{address: 'https://v.example', auth: {{method: token, token: {CLIENT_SECRET}}}, bogus: 1}}\n")
    cli("check-config")
    cli("run")

    issued = []
    for name in ("form", "basic", "json"):
        issued += server.issued_tokens(name) + server.issued_refresh_tokens(name)
    assert len(issued) > 15
    secrets = [CLIENT_SECRET, PASSWORD, BAD_SECRET] + issued
    haystacks = {"cli": "\n".join(outputs), "audit": (tmp_path / "audit.log").read_text()}
    for log in tmp_path.glob("daemon-*.log"):
        haystacks[log.name] = log.read_text()
    assert "compromise_rotation" in "".join(haystacks.values())
    for where, text in haystacks.items():
        for secret in secrets:
            assert secret not in text, f"a secret or token leaked into {where}"
    report.record('every CLI command and daemon path (errors included) with distinctive secrets', 'zero hits in logs, stdout/stderr, status, audit, metrics')

@pytest.mark.security(threat="local user", claim="The /metrics, /readyz and /healthz pages, reachable by any local "
                                                 "user, hold no secret or token.")
def test_metrics_and_health_pages_hold_no_secret(tmp_path, server):
    project = Project(tmp_path, server)
    project.settings["health"] = {"listen": "127.0.0.1:0"}
    project.add_client("form", grant="password", secret=CLIENT_SECRET, users={"alice": PASSWORD})
    daemon = project.start()
    try:
        daemon.wait_ready()
        port = daemon.health_port()
        pages = [requests.get(f"http://127.0.0.1:{port}{path}", timeout=5).text
                 for path in ("/metrics", "/readyz", "/healthz")]
        assert "tokensmith_token_validity_seconds" in pages[0]
        for secret in [CLIENT_SECRET, PASSWORD] + server.issued_tokens("form") + server.issued_refresh_tokens("form"):
            assert all(secret not in page for page in pages)
    finally:
        daemon.stop()
