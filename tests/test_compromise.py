"""`tokensmith rotate --compromised`: invalidate, prove, write every sink, audit; with and
without a running daemon, against the seed semantics plus RFC 7009/7662 endpoints."""

import json
import os
import stat
import threading

import pytest
import requests

from daemon_harness import Project, wait_for
from tokensmith.devserver import OAuthServer
from tokensmith.tokens import fingerprint


@pytest.fixture
def server():
    with OAuthServer(access_lifetime=300) as server:
        yield server


@pytest.fixture
def project(tmp_path, server):
    return Project(tmp_path, server, audit_log=str(tmp_path / "audit" / "audit.log"))


def resource_status(server, token):
    return requests.get(server.resource_url, headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code


def audit_lines(project):
    path = project.root / "audit" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_exchange_invalidates_the_old_token_and_every_sink_gets_the_new_one(project, server):
    client = project.add_client("inv", grant="password", users={"alice": "pw-alice"},
                                introspection_url=server.introspection_url)
    client["sinks"].append({"type": "file", "path": str(project.root / "tokens" / "inv.json"), "format": "json"})
    daemon = project.start()
    try:
        daemon.wait_ready()
        old = project.token("inv")
        assert resource_status(server, old) == 200
        control = os.stat(project.root / "run" / "control.sock")
        assert stat.S_ISSOCK(control.st_mode) and stat.S_IMODE(control.st_mode) == 0o600
        result = project.cli("rotate", "inv", "--compromised", "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        reply = json.loads(result.stdout)
        assert reply["via"] == "daemon"
        outcome = reply["results"][0]
        assert outcome["invalidation"] == "refresh_exchange" and outcome["verification"] == "verified"
        new = project.token("inv")
        assert json.loads((project.root / "tokens" / "inv.json").read_text())["access_token"] == new
        assert resource_status(server, old) == 401 and resource_status(server, new) == 200
        [line] = audit_lines(project)
        assert line["old_token"] == fingerprint(old) and line["new_token"] == fingerprint(new)
        assert line["operator"]["uid"] == os.getuid()
        assert {"step": "refresh_exchange", "result": "ok"} in line["steps"]
        assert set(line["sinks"].values()) == {"ok"}
        text = (project.root / "audit" / "audit.log").read_text()
        assert old not in text and new not in text and "pw-alice" not in text
        assert stat.S_IMODE(os.stat(project.root / "audit" / "audit.log").st_mode) == 0o600
    finally:
        daemon.stop()


def test_no_refresh_token_and_no_revocation_says_so_and_exits_3(project, server):
    project.add_client("cc", dialect="basic")
    daemon = project.start()
    try:
        daemon.wait_ready()
        old = project.token("cc")
        result = project.cli("rotate", "cc", "--compromised")
        assert result.returncode == 3, result.stdout + result.stderr
        assert "stays valid until" in result.stdout
        assert resource_status(server, old) == 200, "the provider cannot revoke it: it really is still valid"
        assert project.token("cc") != old
        assert audit_lines(project)[-1]["result"] == "unrevoked"
        accepted = project.cli("rotate", "cc", "--compromised", "--accept-unrevoked")
        assert accepted.returncode == 0
    finally:
        daemon.stop()


def test_revocation_endpoint_is_used_when_no_refresh_token_is_held(project, server):
    project.add_client("cc", dialect="basic", revocation_url=server.revocation_url,
                       introspection_url=server.introspection_url)
    daemon = project.start()
    try:
        daemon.wait_ready()
        old = project.token("cc")
        result = project.cli("rotate", "cc", "--compromised", "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        outcome = json.loads(result.stdout)["results"][0]
        assert outcome["invalidation"] == "revocation" and outcome["verification"] == "verified"
        assert resource_status(server, old) == 401
    finally:
        daemon.stop()


def test_failed_verification_is_reported_with_its_own_exit_code(project, server):
    project.add_client("cc", dialect="post", introspection_url=server.introspection_url)
    project.write()
    assert project.cli("once").returncode == 0
    result = project.cli("rotate", "cc", "--compromised", "--accept-unrevoked")
    assert result.returncode == 4, result.stdout + result.stderr
    assert "old token still active" in result.stdout


def test_verify_url_checks_a_protected_resource(project, server):
    project.add_client("inv", grant="password", users={"alice": "pw-alice"}, verify_url=server.resource_url)
    project.write()
    assert project.cli("once").returncode == 0
    result = project.cli("rotate", "inv", "--compromised", "--verify", "--json")
    assert result.returncode == 0, result.stdout
    assert json.loads(result.stdout)["results"][0]["verify_url"] == "verified"


def test_a_sink_failure_is_reported(project, server):
    project.add_client("inv", grant="password", users={"alice": "pw-alice"})
    project.clients[0]["sinks"].append({"type": "file", "path": str(project.root / "gone" / "t")})
    (project.root / "gone").mkdir()
    daemon = project.start()
    try:
        daemon.wait_ready()
        (project.root / "gone").rename(project.root / "moved")
        (project.root / "gone").write_text("now a file, so the sink directory is unusable")
        result = project.cli("rotate", "inv", "--compromised")
        assert result.returncode == 5, result.stdout + result.stderr
        assert "gone/t: write failed" in result.stdout
        assert resource_status(server, project.token("inv")) == 200
    finally:
        daemon.stop()


def test_without_a_daemon_the_cli_rotates_under_the_same_lock_and_updates_state(project, server):
    project.add_client("inv", grant="password", users={"alice": "pw-alice"})
    project.write()
    assert project.cli("once").returncode == 0
    old = project.token("inv")
    result = project.cli("rotate", "inv", "--compromised")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "locally (no daemon running)" in result.stdout
    state = json.loads((project.root / "state" / "inv.json").read_text())
    assert state["access_token"] == project.token("inv") != old
    daemon = project.start()
    try:
        daemon.wait_ready()
        assert project.cli("rotate", "inv").returncode == 0
        assert server.stats["refresh_reuse"] == 0
    finally:
        daemon.stop()


def test_scheduled_refreshes_racing_manual_rotations_spend_each_refresh_token_once(project, server, report):
    project.add_client("inv", grant="password", users={"alice": "pw-alice"}, lifetime=1,
                       refresh={"at_fraction": 0.5, "jitter": 0})
    daemon = project.start()
    try:
        daemon.wait_ready()
        results = []

        def rotate():
            result = project.cli("rotate", "inv", "--compromised", "--json")
            results.append(result.returncode)
            replies.append(json.loads(result.stdout)["results"][0])

        replies = []

        threads = [threading.Thread(target=rotate) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == [0] * 6
        assert server.stats["refresh_reuse"] == 0
        assert "invalid_grant" not in daemon.log
        # concurrent rotations of one client wait for each other or coalesce; every one of them
        # reports a token that is now revoked
        assert all(reply["invalidation"] == "refresh_exchange" for reply in replies)
        issued = {fingerprint(token): token for token in server.issued_tokens("inv")}
        assert all(not server.is_active(issued[reply["old_token"]]) for reply in replies)
        assert server.is_active(project.token("inv"))
    finally:
        daemon.stop()
    report.record('rotate --compromised x6 concurrently during 0.5 s scheduled refreshes', 'each refresh token exchanged once; zero reuse; old tokens revoked')

def test_reload_credentials_after_a_client_secret_reset(project, server):
    project.add_client("inv", grant="password", users={"alice": "pw-alice"})
    daemon = project.start()
    try:
        daemon.wait_ready()
        server.set_client_secret("inv", "brand-new-secret")
        creds_path = project.root / "creds" / "inv.json"
        creds = json.loads(creds_path.read_text())
        creds["client_secret"] = "brand-new-secret"
        creds_path.write_text(json.dumps(creds))
        result = project.cli("rotate", "inv", "--compromised", "--reload-credentials")
        assert result.returncode == 0, result.stdout + result.stderr
        line = audit_lines(project)[-1]
        assert line["reload_credentials"] is True and line["result"] == "rotated"
        assert "brand-new-secret" not in (project.root / "audit" / "audit.log").read_text()
    finally:
        daemon.stop()


def test_hooks_tell_consumers_on_every_new_token(project, server, tmp_path):
    marker = tmp_path / "hook.log"
    project.add_client("inv", grant="password", users={"alice": "pw-alice"},
                       hooks=[{"type": "command", "argv": ["sh", "-c", f'echo "$TOKENSMITH_CLIENT $TOKENSMITH_TOKEN_FINGERPRINT" >> {marker}'],
                               "timeout": 5}])
    daemon = project.start()
    try:
        daemon.wait_ready()
        wait_for(lambda: marker.exists())
        result = project.cli("rotate", "inv", "--compromised", "--json")
        assert result.returncode == 0
        assert json.loads(result.stdout)["results"][0]["hooks"] == [{"hook": "command:sh", "ok": True}]
        lines = marker.read_text().splitlines()
        assert lines[-1] == f"inv {fingerprint(project.token('inv'))}"
        assert len(lines) == 2
    finally:
        daemon.stop()


def test_invalid_client_during_normal_running_is_an_alert_in_status(project, server):
    project.add_client("cc", lifetime=1, refresh={"at_fraction": 0.5, "jitter": 0})
    daemon = project.start()
    try:
        daemon.wait_ready()
        server.set_client_secret("cc", "reset-by-provider")
        wait_for(lambda: "CRITICAL" in daemon.log, timeout=10)
        status = project.cli("status")
        assert "ALERT: invalid_client" in status.stdout
    finally:
        daemon.stop()
