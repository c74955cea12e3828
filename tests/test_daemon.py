"""`tokensmith run` end to end: a real process, the real scheduler, real signals, short lifetimes."""

import datetime
import json
import os
import signal
import stat
import time

import pytest

from daemon_harness import Project, wait_for
from tokensmith.devserver import OAuthServer
from tokensmith.tokens import fingerprint


@pytest.fixture
def server():
    with OAuthServer(access_lifetime=3) as server:
        yield server


@pytest.fixture
def project(tmp_path, server):
    return Project(tmp_path, server)


def test_keeps_tokens_fresh_through_several_lifetimes(project, server):
    project.add_client("form", dialect="post", grant="password", users={"alice": "pw-alice"}, lifetime=2)
    project.add_client("basic", dialect="basic", lifetime=2)
    project.add_client("json", dialect="json", lifetime=2, fmt="json")
    daemon = project.start()
    try:
        daemon.wait_ready()
        seen = {name: set() for name in ("form", "basic", "json")}

        def current(name):
            raw = project.token(name)
            return raw if name != "json" else json.loads(raw)["access_token"]

        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for name in seen:
                token = current(name)
                if not server.is_active(token):
                    # An exchange revokes the old token at the provider an instant before the sink
                    # gets the new one (the seeds' semantics); the sink must catch up. How short that
                    # instant is, is a performance figure (docs/performance.md), not a timing window here.
                    wait_for(lambda: server.is_active(current(name)), timeout=5, interval=0.005)
                    token = current(name)
                seen[name].add(token)
            time.sleep(0.05)
        assert all(len(tokens) >= 3 for tokens in seen.values()), {k: len(v) for k, v in seen.items()}
        assert server.stats["refresh_exchanges"] >= 2 and server.stats["refresh_reuse"] == 0
        mode = stat.S_IMODE(os.stat(project.token_path("form")).st_mode)
        assert mode == 0o600
    finally:
        assert daemon.stop() == 0


def test_restart_keeps_the_fresh_token_and_continues_the_refresh_chain(project, server):
    project.add_client("form", dialect="post", grant="password", users={"alice": "pw-alice"}, lifetime=30)
    daemon = project.start()
    daemon.wait_ready()
    token = project.token("form")
    assert daemon.stop() == 0
    issued = server.stats["issued"]
    again = project.start()
    try:
        again.wait_ready()
        # the restarted daemon kept the token and scheduled its refresh for later, rather than
        # refreshing now (a state to read, not a window to wait through)
        [status] = json.loads(project.cli("status", "--json").stdout)["clients"]
        next_refresh = datetime.datetime.strptime(status["next_refresh"], "%Y-%m-%dT%H:%M:%SZ")  # --json: ISO UTC
        next_refresh = next_refresh.replace(tzinfo=datetime.timezone.utc).timestamp()
        assert status["token"] == fingerprint(token) and next_refresh > time.time() + 5
        assert "kept token" in again.log
        assert project.token("form") == token and server.stats["issued"] == issued
        result = project.cli("rotate", "form")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "by the running daemon" in result.stdout
        assert server.stats["refresh_exchanges"] == 1 and server.stats["refresh_reuse"] == 0
        assert not server.is_active(token)
    finally:
        again.stop()


def test_sighup_adds_removes_and_changes_clients_without_touching_the_others(project, server):
    project.add_client("stay", lifetime=60)
    project.add_client("leave", lifetime=60)
    daemon = project.start()
    try:
        daemon.wait_ready()
        stay_token = project.token("stay")
        project.clients = [c for c in project.clients if c["name"] != "leave"]
        project.add_client("arrive", lifetime=60)
        project.write()
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: project.token("arrive"))
        wait_for(lambda: "config reloaded: 1 added (arrive), 1 removed (leave), 0 changed" in daemon.log)
        assert project.token("stay") == stay_token
        status = project.cli("status", "--json")
        names = [c["client"] for c in json.loads(status.stdout)["clients"]]
        assert sorted(names) == ["arrive", "stay"]
        # a broken config on reload is refused and the running clients carry on
        project.config.write_text("clients: [")
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in daemon.log)
        assert daemon.process.poll() is None
    finally:
        assert daemon.stop() == 0


def test_bad_config_exits_ex_config(project):
    project.add_client("bad", lifetime=60)
    project.clients[0]["grant"] = "telepathy"
    daemon = project.start()
    assert daemon.process.wait(15) == 78
    assert "clients[0](bad).grant" in daemon.log


def test_unusable_state_directory_exits_with_a_clear_error(project, tmp_path, report):
    (tmp_path / "blocker").write_text("a file where a directory should be")
    project.settings["state_dir"] = str(tmp_path / "blocker" / "state")
    project.add_client("c", lifetime=60)
    daemon = project.start()
    assert daemon.process.wait(15) == 73
    assert "state directory" in daemon.log
    report.record('state directory unwritable at start', 'error naming the state directory, exit 73 (EX_CANTCREAT)')

def test_a_missing_sink_directory_fails_before_the_first_refresh(project, server):
    client = project.add_client("c", lifetime=60)
    client["sinks"][0]["path"] = str(project.root / "nowhere" / "token")
    daemon = project.start()
    assert daemon.process.wait(15) == 78
    assert "does not exist" in daemon.log and server.stats["token_requests"] == 0


def test_once_writes_every_token_and_reports_failures(project, server):
    project.add_client("good", lifetime=60)
    project.add_client("bad", lifetime=60)
    project.write()
    result = project.cli("once")
    assert result.returncode == 0, result.stderr
    assert project.token("good") and project.token("bad")
    server.set_client_secret("bad", "changed-at-the-provider")
    result = project.cli("once", "--force")
    assert result.returncode == 1
    assert "invalid_client" in result.stdout + result.stderr


def test_a_second_daemon_on_the_same_state_is_refused(project):
    project.add_client("c", lifetime=60)
    first = project.start()
    try:
        first.wait_ready()
        second = project.start()
        assert second.process.wait(15) == 9  # EXIT_IN_USE
        assert "another tokensmith daemon" in second.log
    finally:
        first.stop()


def test_status_without_a_daemon_reads_the_state_directory(project):
    project.add_client("c", lifetime=60)
    project.write()
    assert project.cli("once").returncode == 0
    result = project.cli("status")
    assert result.returncode == 0 and "no daemon running" in result.stdout and "c: token" in result.stdout


def test_once_with_a_running_daemon_goes_through_it(project, server):
    project.add_client("c", grant="password", users={"alice": "pw"}, lifetime=60)
    daemon = project.start()
    try:
        daemon.wait_ready()
        result = project.cli("once", "--force")
        assert result.returncode == 0, result.stdout + result.stderr
        assert server.stats["refresh_exchanges"] == 1 and server.stats["refresh_reuse"] == 0
        status = json.loads(project.cli("status", "--json").stdout)
        assert status["daemon"] is True
        assert status["clients"][0]["token"] == fingerprint(project.token("c")), "the daemon itself rotated it"
    finally:
        daemon.stop()


def test_first_tokens_come_before_the_scheduler_and_each_client_gets_one_job(tmp_path):
    from tokensmith.config import load_settings
    from tokensmith.daemon import Daemon

    with OAuthServer(access_lifetime=60) as server:
        project = Project(tmp_path, server)
        names = [f"c{i}" for i in range(12)]
        for name in names:
            project.add_client(name)
        settings = load_settings(project.write())
        daemon = Daemon(settings, project.config, serve=False)
        daemon.build()
        scheduler_at_first_token = []
        original = daemon.keepers[names[0]].sinks[0].write

        class Watching(type(daemon.keepers[names[0]].sinks[0])):
            def write(self, token):
                scheduler_at_first_token.append(daemon.scheduler)
                original(token)

        keeper = daemon.keepers[names[0]]
        keeper.sinks = [Watching(keeper.sinks[0].config, names[0])]
        daemon.start()
        try:
            wait_for(lambda: all(project.token(name) for name in names))
            wait_for(lambda: len(daemon.scheduler.get_jobs()) == len(names))
            assert scheduler_at_first_token == [None], "the first token waited for APScheduler"
            assert sorted(job.id for job in daemon.scheduler.get_jobs()) == sorted(names)
            assert server.stats["issued"] == len(names), "a client got two tokens at start-up"
            due = {job.id: job.next_run_time.timestamp() for job in daemon.scheduler.get_jobs()}
            assert all(due[name] == pytest.approx(daemon.keepers[name].next_due(), abs=1) for name in names)
        finally:
            daemon.stop()


def test_a_keeper_replaced_by_a_reload_hands_its_refresh_token_to_its_successor(tmp_path):
    """A rotation or a scheduled run that looked the client up just before a reload replaced it must
    not spend the refresh token the new keeper holds too: it is sent to the new keeper. One for a client
    the reload removed fails alone, without a token request."""
    from tokensmith.commands import rotate_clients
    from tokensmith.compromise import rotate_compromised
    from tokensmith.config import load_settings
    from tokensmith.daemon import Daemon

    with OAuthServer(access_lifetime=60) as server:
        project = Project(tmp_path, server)
        project.add_client("c", grant="password", users={"u": "pw"})
        project.add_client("gone")
        daemon = Daemon(load_settings(project.write()), project.config, serve=False)
        daemon.build()
        try:
            stale = daemon.keepers["c"]
            assert stale.refresh(reason="first").ok
            removed = daemon.keepers["gone"]
            project.clients[0]["refresh"]["min_lead"] = 1
            project.clients.pop()
            project.write()
            assert daemon.reload()
            successor = daemon.keepers["c"]
            assert successor is not stale

            forwarded = stale.refresh(reason="manual", exchange=True)
            assert forwarded.ok and forwarded.fell_back is None and forwarded.keeper is successor
            result = rotate_compromised(stale)
            assert result["result"] == "rotated" and result["steps"] == [{"step": "refresh_exchange", "result": "ok"}]
            again = successor.refresh(reason="manual", exchange=True)
            assert again.ok and again.fell_back is None
            assert server.stats["refresh_exchanges"] == 3 and server.stats["refresh_reuse"] == 0
            assert server.is_active(project.token("c"))
            assert successor.last_compromise is not None and stale.last_compromise is None

            issued = server.stats["issued"]
            late = removed.refresh(reason="manual")
            assert not late.ok and "removed from the config" in str(late.error)
            assert server.stats["issued"] == issued

            # a batch (`rotate --all`) checked before the reload: the removed client fails alone
            results = rotate_clients(daemon, ["gone", "c"])
            assert [(r["client"], r["exit_code"]) for r in results] == [("gone", 1), ("c", 0)]
            assert results[0]["message"] == "the client was removed from the config"
            assert server.stats["issued"] == issued + 1 and server.stats["refresh_reuse"] == 0
        finally:
            daemon.stop()
