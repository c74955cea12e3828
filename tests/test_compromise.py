"""`tokensmith rotate --compromised`: invalidate, prove, write every sink, audit; with and
without a running daemon, against the seed semantics plus RFC 7009/7662 endpoints."""

import json
import os
import socket
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
        results, replies, errors = [], [], []

        def rotate():
            try:
                result = project.cli("rotate", "inv", "--compromised", "--json")
                results.append(result.returncode)
                replies.append(json.loads(result.stdout)["results"][0])
            except Exception as exc:  # a worker's failure must fail the test, not vanish with its thread
                errors.append(repr(exc))

        threads = [threading.Thread(target=rotate) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert results == [0] * 6 and len(replies) == 6
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
    report.record('rotate --compromised x6 concurrently during 0.5 s scheduled refreshes',
                  'all six replied, exit 0; no refresh token presented twice; every reported old token revoked at '
                  'the provider')

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


# ---- rotate_compromised on a keeper, no daemon: what it claims against what the provider did

class NonRotatingServer(OAuthServer):
    """A provider whose refresh exchange returns a new access token but no new refresh token (the
    held one stays valid, as Google's and Azure AD's do). An exchange still revokes the access
    token that came with the refresh token, and only that one."""

    def _spend_refresh(self, client_id, token):
        user = super()._spend_refresh(client_id, token)
        self._refresh[token].spent = False
        return user

    def _issue(self, client_id, client, grant, user):
        rotating, self.issue_refresh_tokens = self.issue_refresh_tokens, grant != "refresh_token"
        try:
            return super()._issue(client_id, client, grant, user)
        finally:
            self.issue_refresh_tokens = rotating


def proxies_to_a_dead_port(monkeypatch) -> int:
    """Every proxy variable of the environment names a closed loopback port (returned); NO_PROXY unset."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{dead}")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    return dead


def make_keeper(server, tmp_path, *, sinks=None, **fields):
    import random

    from fakes import MemorySink, StaticSource
    from tokensmith.config import ClientConfig
    from tokensmith.keeper import Keeper
    from tokensmith.state import StateStore
    from tokensmith.tokenclient import TokenClient

    server.add_client("kc", "kc-secret", dialect="post", users={"alice": "pw-alice"})
    config = ClientConfig(name="kc", token_url=server.token_url, grant="password", source={"type": "env"},
                          sinks=[{"type": "file", "path": "/unused"}], **fields)
    store = StateStore(tmp_path / "kstate")
    store.prepare()
    source = StaticSource(client_id="kc", client_secret="kc-secret", username="alice", password="pw-alice")
    keeper = Keeper(config, source, sinks if sinks is not None else [MemorySink()], TokenClient(config), store,
                    rng=random.Random(1))
    keeper.load()
    return keeper


def rotate(keeper, tmp_path, verify_url=None, **options):
    """verify_url, when given, becomes the client's configured `verify_url`: only the config names
    the resource both tokens are shown to."""
    from tokensmith.compromise import rotate_compromised

    if verify_url is not None:
        from tokensmith.config import ClientConfig

        keeper.client = ClientConfig.model_validate({**keeper.client.model_dump(),
                                                     "verify_url": verify_url})
    return rotate_compromised(keeper, audit_path=tmp_path / "kaudit" / "audit.log",
                              operator={"uid": 0, "user": "test"}, **options)


def active(server, keeper, token):
    return keeper.token_client.introspect(token, keeper.source.creds)


def test_a_paired_refresh_exchange_is_reported_as_the_invalidation(server, tmp_path):
    keeper = make_keeper(server, tmp_path)
    keeper.run_due()
    old = keeper.state.access_token
    result = rotate(keeper, tmp_path)
    assert (result["result"], result["exit_code"], result["invalidation"]) == ("rotated", 0, "refresh_exchange")
    assert {"step": "refresh_exchange", "result": "ok"} in result["steps"]
    assert not server.is_active(old) and server.is_active(keeper.state.access_token)
    assert result["old_token"] == fingerprint(old) and result["new_token"] == keeper.state.token.fingerprint
    assert result["reload_credentials"] is False, "credentials are re-read only when asked"


def test_an_unpaired_refresh_exchange_is_not_claimed_as_invalidation(tmp_path):
    """The held refresh token came with an earlier access token (the provider does not rotate
    refresh tokens): exchanging it does not touch the current one, and the result says so."""
    with NonRotatingServer(access_lifetime=300) as server:
        keeper = make_keeper(server, tmp_path, introspection_url=server.introspection_url)
        keeper.run_due()
        assert keeper.refresh(reason="routine").grant == "refresh_token"
        old = keeper.state.access_token
        assert keeper.state.refresh_token_obtained_at < keeper.state.obtained_at
        result = rotate(keeper, tmp_path)
        assert server.is_active(old), "the provider really left the old token valid"
        assert result["invalidation"] == "none" and result["result"] == "verification_failed"
        assert result["exit_code"] == 4 and result["verification"] == "failed: old token still active"
        assert {"step": "refresh_exchange",
                "result": "ok, but the old access token was not issued with that refresh token"} in result["steps"]
        line = json.loads((tmp_path / "kaudit" / "audit.log").read_text().splitlines()[-1])
        assert line["invalidation"] == "none" and line["result"] == "verification_failed"


def test_an_unpaired_exchange_without_any_other_means_exits_unrevoked(tmp_path):
    with NonRotatingServer(access_lifetime=300) as server:
        keeper = make_keeper(server, tmp_path)
        keeper.run_due()
        keeper.refresh(reason="routine")
        old = keeper.state.access_token
        result = rotate(keeper, tmp_path)
        assert server.is_active(old)
        assert (result["result"], result["exit_code"], result["invalidation"]) == ("unrevoked", 3, "none")
        assert "stays valid until" in result["message"]
        accepted = rotate(keeper, tmp_path, accept_unrevoked=True)
        assert (accepted["result"], accepted["exit_code"]) == ("unrevoked", 0)


def test_an_unpaired_exchange_falls_to_revocation_which_really_invalidates(tmp_path):
    with NonRotatingServer(access_lifetime=300) as server:
        keeper = make_keeper(server, tmp_path, revocation_url=server.revocation_url,
                             introspection_url=server.introspection_url)
        keeper.run_due()
        keeper.refresh(reason="routine")
        old = keeper.state.access_token
        result = rotate(keeper, tmp_path)
        assert not server.is_active(old)
        assert (result["result"], result["exit_code"], result["invalidation"]) == ("rotated", 0, "revocation")
        assert result["verification"] == "verified"
        assert {"step": "revoke_access_token", "result": "ok"} in result["steps"]


def test_an_unspent_old_refresh_token_is_revoked_as_well(server, tmp_path):
    """The held refresh token is past refresh_token_lifetime, so the rotation does not exchange it
    (it uses the primary grant); with a revocation endpoint both old tokens are revoked."""
    keeper = make_keeper(server, tmp_path, revocation_url=server.revocation_url,
                         introspection_url=server.introspection_url, refresh={"refresh_token_lifetime": 0.001})
    keeper.run_due()
    old_access, old_refresh = keeper.state.access_token, keeper.state.refresh_token
    assert active(server, keeper, old_refresh)
    result = rotate(keeper, tmp_path)
    assert result["grant"] == "password"
    assert {"step": "revoke_access_token", "result": "ok"} in result["steps"]
    assert {"step": "revoke_refresh_token", "result": "ok"} in result["steps"]
    assert not active(server, keeper, old_refresh), "the unspent old refresh token is still usable"
    assert not server.is_active(old_access)
    assert (result["result"], result["invalidation"], result["verification"]) == ("rotated", "revocation", "verified")


def test_a_spent_refresh_token_is_not_revoked_again(server, tmp_path):
    keeper = make_keeper(server, tmp_path, revocation_url=server.revocation_url)
    keeper.run_due()
    result = rotate(keeper, tmp_path)
    assert [step["step"] for step in result["steps"]] == ["refresh_exchange", "revoke_access_token"]
    assert result["invalidation"] == "refresh_exchange+revocation"


def test_a_failed_revocation_is_reported_and_not_claimed(server, tmp_path):
    keeper = make_keeper(server, tmp_path, revocation_url=server.url + "/no-such-endpoint",
                         refresh={"refresh_token_lifetime": 0.001})
    keeper.run_due()
    old = keeper.state.access_token
    result = rotate(keeper, tmp_path)
    assert server.is_active(old)
    assert [step["result"][:7] for step in result["steps"]] == ["failed:", "failed:"]
    assert (result["result"], result["exit_code"], result["invalidation"]) == ("unrevoked", 3, "none")


def test_a_refresh_token_spent_elsewhere_is_reported_as_rejected(server, tmp_path):
    keeper = make_keeper(server, tmp_path)
    keeper.run_due()
    keeper.token_client.obtain("refresh_token", keeper.source.creds, refresh_token=keeper.state.refresh_token)
    old = keeper.state.access_token
    result = rotate(keeper, tmp_path, accept_unrevoked=True)
    assert {"step": "refresh_exchange", "result": "rejected (invalid_grant)"} in result["steps"]
    assert result["invalidation"] == "none" and result["result"] == "unrevoked" and result["exit_code"] == 0
    assert not server.is_active(old)  # spent elsewhere; rotation does not claim it


def test_no_new_token_is_a_failure_that_keeps_the_old_token(server, tmp_path):
    keeper = make_keeper(server, tmp_path)
    keeper.run_due()
    old = keeper.state.access_token
    server.fail_next(status=503)
    result = rotate(keeper, tmp_path)
    assert (result["result"], result["exit_code"], result["new_token"]) == ("failed", 1, None)
    assert "the old token is still valid" in result["message"] and server.is_active(old)
    assert keeper.state.access_token == old


def test_a_rejected_refresh_and_a_failed_grant_report_both(server, tmp_path):
    keeper = make_keeper(server, tmp_path)
    keeper.run_due()
    keeper.token_client.obtain("refresh_token", keeper.source.creds, refresh_token=keeper.state.refresh_token)
    server.set_client_secret("kc", "reset")
    result = rotate(keeper, tmp_path)
    assert result["result"] == "failed" and result["exit_code"] == 1
    assert result["steps"] == [{"step": "refresh_exchange", "result": "rejected (invalid_client)"}]


def test_nothing_to_invalidate_when_there_was_no_token(server, tmp_path):
    keeper = make_keeper(server, tmp_path, revocation_url=server.revocation_url)
    result = rotate(keeper, tmp_path)
    assert (result["result"], result["exit_code"], result["old_token"]) == ("no_old_token", 0, None)
    assert result["steps"] == [] and keeper.state.access_token
    assert server.stats["revocations"] == 0


def test_a_sink_failure_sets_exit_5_on_an_otherwise_good_rotation(server, tmp_path):
    from fakes import FailingSink, MemorySink

    keeper = make_keeper(server, tmp_path)
    keeper.run_due()
    failing = FailingSink(5)
    keeper.sinks = [MemorySink(), failing]
    result = rotate(keeper, tmp_path)
    assert result["result"] == "rotated" and result["exit_code"] == 5
    assert result["message"].endswith("; some sinks were not written")
    assert result["sinks"][failing.name].startswith("memory:failing: injected failure")


def test_a_sink_failure_outranks_unrevoked(server, tmp_path):
    from fakes import FailingSink

    keeper = make_keeper(server, tmp_path, refresh={"refresh_token_lifetime": 0.001})
    keeper.run_due()
    keeper.sinks = [FailingSink(5)]
    result = rotate(keeper, tmp_path)
    assert result["result"] == "unrevoked" and result["exit_code"] == 5


def test_verification_failure_outranks_a_sink_failure(server, tmp_path):
    from fakes import FailingSink

    keeper = make_keeper(server, tmp_path, introspection_url=server.introspection_url,
                         refresh={"refresh_token_lifetime": 0.001})
    keeper.run_due()
    keeper.sinks = [FailingSink(5)]
    result = rotate(keeper, tmp_path)
    assert result["result"] == "verification_failed" and result["exit_code"] == 4


def test_a_failed_hook_is_named_in_the_message(server, tmp_path):
    keeper = make_keeper(server, tmp_path)
    keeper.run_due()

    class Hooks:
        def run(self, client, token):
            return [{"hook": "command:false", "ok": False}]

    keeper.hooks = Hooks()
    result = rotate(keeper, tmp_path)
    assert result["exit_code"] == 0 and result["message"].endswith("; a consumer hook failed")
    assert result["hooks"] == [{"hook": "command:false", "ok": False}]


def test_introspection_errors_are_reported_as_unverified_errors(server, tmp_path):
    keeper = make_keeper(server, tmp_path, introspection_url=server.url + "/no-such-endpoint")
    keeper.run_due()
    result = rotate(keeper, tmp_path)
    assert result["verification"].startswith("error: ") and result["exit_code"] == 4
    assert result["result"] == "verification_failed"


def test_verify_url_is_checked_and_wins_over_introspection(server, tmp_path):
    keeper = make_keeper(server, tmp_path, introspection_url=server.introspection_url)
    keeper.run_due()
    result = rotate(keeper, tmp_path, verify_url=server.resource_url)
    assert result["verify_url"] == "verified" and result["verification"] == "verified"
    failing = rotate(keeper, tmp_path, verify_url=server.url + "/no-such-endpoint")
    assert failing["verify_url"] == "failed: old token got HTTP 404"
    assert failing["verification"] == "failed: old token got HTTP 404" and failing["exit_code"] == 4


def test_the_audit_line_names_tokens_only_by_fingerprint_and_is_0600(server, tmp_path):
    keeper = make_keeper(server, tmp_path)
    keeper.run_due()
    old = keeper.state.access_token
    result = rotate(keeper, tmp_path)
    path = tmp_path / "kaudit" / "audit.log"
    text = path.read_text()
    [line] = [json.loads(raw) for raw in text.splitlines()]
    assert old not in text and keeper.state.access_token not in text and "pw-alice" not in text
    assert line["old_token"] == fingerprint(old) and line["operator"] == {"uid": 0, "user": "test"}
    assert set(line) == {"time", "client", "operator", "old_token", "new_token", "grant", "reload_credentials",
                         "steps", "invalidation", "verification", "sinks", "purged", "hooks", "result", "exit_code"}
    assert line["purged"] == {"memory:a": "nothing to remove: no version history"}
    assert line["time"].endswith("Z") and line["exit_code"] == result["exit_code"] == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_a_rotation_requested_while_one_runs_is_coalesced_into_it(server, tmp_path):
    """Two operators report the same leak at once: the second waits for the first and gets its
    result (marked coalesced) instead of rotating the fresh token again."""
    from tokensmith import compromise

    keeper = make_keeper(server, tmp_path)
    keeper.run_due()
    waiting, results = threading.Event(), {}
    real_lock = threading.Lock()

    class WatchedLock:
        def __enter__(self):
            if threading.current_thread().name == "second":
                waiting.set()
            real_lock.acquire()

        def __exit__(self, *exc):
            real_lock.release()

    compromise._locks[keeper.name] = WatchedLock()
    second = threading.Thread(target=lambda: results.setdefault("second", rotate(keeper, tmp_path)), name="second")

    class StartSecondDuringTheFirst:
        def refresh_attempt(self, client, grant):
            if not second.is_alive() and "second" not in results:
                second.start()
                assert waiting.wait(10)

        def refresh_result(self, *args):
            pass

        def sink_failure(self, *args):
            pass

        def sink_success(self, *args):
            pass

    keeper.metrics = StartSecondDuringTheFirst()
    try:
        issued = server.stats["issued"]
        first = rotate(keeper, tmp_path)
        second.join(10)
    finally:
        compromise._locks.pop(keeper.name, None)
    assert server.stats["issued"] == issued + 1, "the second request rotated again"
    assert first["coalesced"] is False and results["second"]["coalesced"] is True
    assert results["second"]["new_token"] == first["new_token"] and results["second"]["exit_code"] == 0
    later = rotate(keeper, tmp_path)
    assert later["coalesced"] is False and later["old_token"] == first["new_token"]


def test_metrics_and_the_log_line_carry_the_result(server, tmp_path, caplog):
    keeper = make_keeper(server, tmp_path)
    keeper.run_due()
    seen = []

    class Metrics:
        def compromise_rotation(self, client, result):
            seen.append((client, result))

    from tokensmith.compromise import rotate_compromised

    with caplog.at_level("INFO", logger="tokensmith.compromise"):
        ok = rotate_compromised(keeper, metrics=Metrics(), operator={"uid": 1, "user": "op"})
        server.fail_next(status=503)
        rotate_compromised(keeper, metrics=Metrics(), operator={"uid": 1, "user": "op"})
    assert seen == [("kc", "rotated"), ("kc", "failed")]
    records = [r for r in caplog.records if getattr(r, "event", None) == "compromise_rotation"]
    assert [r.levelname for r in records] == ["INFO", "WARNING"] and all(r.client == "kc" for r in records)
    assert records[0].getMessage() == (f"compromise rotation: rotated (old {ok['old_token']}, new "
                                       f"{ok['new_token']}, invalidation refresh_exchange, verification unverified)")
    assert ok["finished_at"] >= ok["time"] and ok["operator"] == {"uid": 1, "user": "op"}


def test_the_operator_is_named_by_uid_and_user(server):
    from tokensmith.compromise import operator_identity

    assert operator_identity(0) == {"uid": 0, "user": "root"}
    assert operator_identity(4_000_000) == {"uid": 4_000_000, "user": "4000000"}
    assert operator_identity()["uid"] == os.getuid()


def test_verify_url_reports_what_the_resource_said(server):
    from tokensmith.compromise import verify_with_resource

    with OAuthServer(access_lifetime=300) as other:
        other.add_client("x", "x-secret")
    assert verify_with_resource(server.resource_url, "not-a-token", "also-not", timeout=5) == \
        "failed: new token got HTTP 401"
    assert verify_with_resource(other.resource_url, "a", "b", timeout=5) == "error: ConnectionRefusedError"


class Resource:
    """A protected resource on loopback that answers per bearer token, records what it was sent,
    and can serve TLS."""

    def __init__(self, answers, ssl_context=None, default=401):
        import http.server

        resource = self
        self.answers, self.seen, self.default = answers, [], default

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                auth = self.headers.get("Authorization")
                resource.seen.append(auth)
                status, headers = resource.answers.get(auth, (resource.default, {}))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
        scheme = "https" if ssl_context else "http"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}/r"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def resource():
    made = []
    yield lambda answers, **kw: made.append(Resource(answers, **kw)) or made[-1]
    for r in made:
        r.close()


def test_verify_url_sends_each_token_as_a_bearer_and_reads_the_exact_status(resource):
    from tokensmith.compromise import verify_with_resource

    r = resource({"Bearer old": (401, {}), "Bearer new": (204, {})})
    assert verify_with_resource(r.url, "old", "new", timeout=5) == "verified"
    assert r.seen == ["Bearer old", "Bearer new"]
    r.answers["Bearer old"] = (200, {})
    assert verify_with_resource(r.url, "old", "new", timeout=5) == "failed: old token got HTTP 200"
    r.answers.update({"Bearer old": (401, {}), "Bearer new": (300, {})})
    assert verify_with_resource(r.url, "old", "new", timeout=5) == "failed: new token got HTTP 300"


def test_verify_url_does_not_follow_a_redirect_with_a_token(resource):
    from tokensmith.compromise import verify_with_resource

    elsewhere = resource({})
    r = resource({"Bearer old": (302, {"Location": elsewhere.url}), "Bearer new": (200, {})})
    assert verify_with_resource(r.url, "old", "new", timeout=5) == "failed: old token got HTTP 302"
    assert elsewhere.seen == []


def test_verify_url_follows_the_clients_proxy_setting_not_a_separate_rule(resource, monkeypatch):
    """The resource check goes the way every call of the client goes: the client's `proxy: none`
    overrules the environment's proxy; without a `proxy` setting the environment's proxy is used."""
    from tokensmith.compromise import verify_with_resource

    dead = proxies_to_a_dead_port(monkeypatch)
    r = resource({"Bearer new": (200, {})})
    assert verify_with_resource(r.url, "old", "new", timeout=5, proxy="none") == "verified"
    assert r.seen == ["Bearer old", "Bearer new"]
    via_env = verify_with_resource(r.url, "old", "new", timeout=5)
    assert via_env == f"error: cannot reach proxy 127.0.0.1:{dead} (Connection refused)"
    assert r.seen == ["Bearer old", "Bearer new"], "the environment's proxy was bypassed"


def test_verify_url_over_tls_trusts_exactly_the_configured_ca_bundle(resource, tmp_path):
    import ssl

    from test_tokenclient import self_signed
    from tokensmith.compromise import verify_with_resource

    cert, key = self_signed(tmp_path, "resource")
    other, _ = self_signed(tmp_path, "other")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    r = resource({"Bearer new": (200, {})}, ssl_context=context)
    assert verify_with_resource(r.url, "old", "new", timeout=5, ca_bundle=cert) == "verified"
    assert verify_with_resource(r.url, "old", "new", timeout=5, ca_bundle=other) == "error: TLS verification failed"
    assert verify_with_resource(r.url, "old", "new", timeout=5) == "error: TLS verification failed", \
        "system store must not trust it"
    assert r.seen == ["Bearer old", "Bearer new"], "a token was sent over an unverified connection"


def test_an_operator_without_a_passwd_entry_is_named_from_the_login(monkeypatch):
    import pwd

    from tokensmith.compromise import operator_identity

    def missing(uid):
        raise KeyError(uid)

    monkeypatch.setattr(pwd, "getpwuid", missing)
    monkeypatch.setenv("LOGNAME", "operator-from-login")
    assert operator_identity() == {"uid": os.getuid(), "user": "operator-from-login"}
    assert operator_identity(4_000_000)["user"] == "4000000"


def test_the_audit_time_is_the_rotation_time_in_utc(tmp_path):
    from tokensmith.compromise import append_audit

    append_audit(tmp_path / "a" / "audit.log", {"time": 86400 * 365, "client": "c", "result": "rotated",
                                                 "exit_code": 0, "ignored": "not an audit field"})
    assert json.loads((tmp_path / "a" / "audit.log").read_text()) == {
        "time": "1971-01-01T00:00:00Z", "client": "c", "result": "rotated", "exit_code": 0}


def test_a_failed_rotation_reports_nothing_done(server, tmp_path):
    keeper = make_keeper(server, tmp_path)
    keeper.run_due()
    server.fail_next(status=503)
    result = rotate(keeper, tmp_path)
    assert {key: result[key] for key in ("invalidation", "verification", "sinks", "hooks", "steps", "new_token")} == \
        {"invalidation": "none", "verification": "unverified", "sinks": {}, "hooks": [], "steps": [], "new_token": None}


def test_rotation_exchanges_even_under_the_reissue_strategy_and_reloads_on_request(server, tmp_path, caplog):
    keeper = make_keeper(server, tmp_path, refresh={"strategy": "reissue"})
    keeper.run_due()
    reads = keeper.source.reads
    called = []
    from tokensmith.compromise import rotate_compromised

    with caplog.at_level("INFO", logger="tokensmith.keeper"):
        result = rotate_compromised(keeper, reload_credentials=True, operator={"uid": 0, "user": "t"},
                                    on_refreshed=lambda: called.append(keeper.state.access_token))
    assert result["grant"] == "refresh_token" and result["invalidation"] == "refresh_exchange"
    assert result["reload_credentials"] is True and keeper.source.reads == reads + 1
    assert called == [keeper.state.access_token]
    assert any("(compromised)" in r.getMessage() for r in caplog.records if getattr(r, "event", "") == "refreshed")
    assert result["sinks"] == {"memory:a": "ok"}


def test_metrics_without_a_compromise_counter_are_left_alone(server, tmp_path):
    from tokensmith.compromise import rotate_compromised

    keeper = make_keeper(server, tmp_path)
    keeper.run_due()
    assert rotate_compromised(keeper, metrics=object(), operator={"uid": 0, "user": "t"})["result"] == "rotated"


def test_revocation_names_each_token_kind(server, tmp_path):
    keeper = make_keeper(server, tmp_path, revocation_url=server.revocation_url, refresh={"refresh_token_lifetime": 0.001})
    keeper.run_due()
    hints = []
    real_revoke = keeper.token_client.revoke
    keeper.token_client.revoke = lambda token, hint, creds: (hints.append(hint), real_revoke(token, hint, creds))
    rotate(keeper, tmp_path)
    assert hints == ["access_token", "refresh_token"]


def test_failed_revocations_are_listed_step_by_step(server, tmp_path):
    keeper = make_keeper(server, tmp_path, revocation_url=server.url + "/no-such-endpoint",
                         refresh={"refresh_token_lifetime": 0.001})
    keeper.run_due()
    result = rotate(keeper, tmp_path)
    assert [step["step"] for step in result["steps"]] == ["revoke_access_token", "revoke_refresh_token"]
    assert all(step["result"].startswith("failed: revoke ") for step in result["steps"])


def test_verify_url_sends_the_old_token_and_can_overrule_introspection(server, tmp_path, resource):
    keeper = make_keeper(server, tmp_path, introspection_url=server.introspection_url)
    keeper.run_due()
    old = keeper.state.access_token
    still_open = resource({f"Bearer {old}": (200, {})})  # a resource that caches tokens, say
    result = rotate(keeper, tmp_path, verify_url=still_open.url)
    assert still_open.seen[0] == f"Bearer {old}" and still_open.seen[1] == f"Bearer {keeper.state.access_token}"
    assert result["verify_url"] == "failed: old token got HTTP 200"
    assert result["verification"] == "failed: old token got HTTP 200" and result["exit_code"] == 4


def test_verify_url_cannot_overrule_failed_introspection(server, tmp_path, resource):
    server.add_client("cc2", "cc2-secret")
    keeper = make_keeper(server, tmp_path, introspection_url=server.introspection_url,
                         refresh={"refresh_token_lifetime": 0.001})
    keeper.run_due()
    old = keeper.state.access_token
    r = resource({f"Bearer {old}": (401, {})}, default=200)  # the resource says the old token is refused
    result = rotate(keeper, tmp_path, verify_url=r.url, accept_unrevoked=True)
    assert server.is_active(old) and r.seen == [f"Bearer {old}", f"Bearer {keeper.state.access_token}"]
    assert result["verify_url"] == "verified"
    assert result["verification"] == "failed: old token still active" and result["exit_code"] == 4


def test_verify_url_uses_the_clients_timeout_and_ca_bundle(server, tmp_path, resource):
    import ssl

    from test_tokenclient import self_signed

    cert, key = self_signed(tmp_path, "resource")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    keeper = make_keeper(server, tmp_path, ca_bundle=str(cert), timeout=0.5)
    keeper.run_due()
    r = resource({}, ssl_context=context)
    result = rotate(keeper, tmp_path, verify_url=r.url)
    assert result["verify_url"] == "failed: new token got HTTP 401", "the TLS resource was not reached"
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        hung = rotate(keeper, tmp_path, verify_url=f"http://127.0.0.1:{silent.getsockname()[1]}/r")
    assert hung["verify_url"] == "error: timed out after 0.5s"


def test_result_messages_say_what_happened(server, tmp_path):
    from fakes import FailingSink

    keeper = make_keeper(server, tmp_path, revocation_url=server.revocation_url)
    first = rotate(keeper, tmp_path)
    assert first["message"] == "there was no token to invalidate; a new one was written"
    keeper.sinks = [FailingSink(5)]
    sinks = rotate(keeper, tmp_path)
    assert sinks["message"] == "old token invalidated by refresh_exchange+revocation; some sinks were not written"

    class Hooks:
        def run(self, client, token):
            return [{"hook": "command:false", "ok": False}]

    keeper.sinks, keeper.hooks = [], Hooks()
    hooks = rotate(keeper, tmp_path)
    assert hooks["message"] == "old token invalidated by refresh_exchange+revocation; a consumer hook failed"


def test_the_unrevoked_message_says_until_when(server, tmp_path):
    import time as _time

    keeper = make_keeper(server, tmp_path, refresh={"refresh_token_lifetime": 0.001})
    keeper.run_due()
    expires = keeper.state.expires_at
    result = rotate(keeper, tmp_path)
    until = _time.strftime("%Y-%m-%dT%H:%M:%SZ", _time.gmtime(expires))
    assert result["message"] == f"the provider offers no way to invalidate the old token: it stays valid until {until}"


def test_verification_failed_message(server, tmp_path):
    keeper = make_keeper(server, tmp_path, introspection_url=server.introspection_url,
                         refresh={"refresh_token_lifetime": 0.001})
    keeper.run_due()
    assert rotate(keeper, tmp_path)["message"] == "the old token could not be shown to be invalid"


def test_the_audit_log_is_sorted_json_in_new_directories_and_never_follows_a_link(tmp_path):
    from tokensmith.compromise import append_audit

    path = tmp_path / "a" / "b" / "audit.log"
    append_audit(path, {"time": 0, "result": "rotated", "client": "c"})
    assert path.read_text() == '{"client": "c", "result": "rotated", "time": "1970-01-01T00:00:00Z"}\n'
    target = tmp_path / "elsewhere"
    target.write_text("")
    link = tmp_path / "a" / "link.log"
    link.symlink_to(target)
    with pytest.raises(OSError):
        append_audit(link, {"time": 0, "result": "rotated"})
    assert target.read_text() == ""


def test_verify_url_alone_can_verify(server, tmp_path):
    keeper = make_keeper(server, tmp_path)
    keeper.run_due()
    result = rotate(keeper, tmp_path, verify_url=server.resource_url)
    assert (result["verify_url"], result["verification"]) == ("verified", "verified")


def test_when_both_checks_fail_the_resource_is_reported(server, tmp_path, resource):
    keeper = make_keeper(server, tmp_path, introspection_url=server.introspection_url,
                         refresh={"refresh_token_lifetime": 0.001})
    keeper.run_due()
    r = resource({f"Bearer {keeper.state.access_token}": (200, {})}, default=200)
    result = rotate(keeper, tmp_path, verify_url=r.url)
    assert result["verification"] == "failed: old token got HTTP 200" and result["exit_code"] == 4
