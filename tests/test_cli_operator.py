"""The CLI and daemon as an operator meets them: the default config path, start-up failures, exit
codes, messages, check-config's look at the machine, SIGHUP, and status --json."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from daemon_harness import Project, wait_for
from tokensmith.cli import EXIT_CODES
from tokensmith.devserver import OAuthServer

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


@pytest.fixture
def server():
    with OAuthServer(access_lifetime=60) as server:
        yield server


@pytest.fixture
def project(tmp_path, server):
    return Project(tmp_path, server)


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TOKENSMITH_") and k not in ("CONFIGURATION_DIRECTORY", "RUNTIME_DIRECTORY")}
    env.update(extra)
    return env


def tokensmith(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokensmith", *args], capture_output=True, text=True,
                          timeout=timeout, env=env if env is not None else clean_env())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- the config file

def test_the_config_is_found_in_systemds_configuration_directory(project):
    project.add_client("found", lifetime=60)
    project.write()
    config_dir = project.root / "etc"
    config_dir.mkdir()
    (config_dir / "config.yaml").write_text(project.config.read_text())
    result = tokensmith("check-config", "--config-only", env=clean_env(CONFIGURATION_DIRECTORY=str(config_dir)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "config ok: 1 client(s): found" in result.stdout


def test_without_a_config_file_it_says_so(tmp_path):
    assert not os.path.exists("/etc/tokensmith/config.yaml"), "this machine has a real config"
    env = clean_env(CONFIGURATION_DIRECTORY=str(tmp_path))
    for command, code in (("status", 78), ("once", 78), ("check-config", 7)):
        result = tokensmith(command, env=env)
        output = result.stdout + result.stderr
        assert result.returncode == code, (command, output)
        assert f"no config file: looked for {tmp_path}/config.yaml and /etc/tokensmith/config.yaml" in output
        assert "Field required" not in output


# ---- start-up failures

def test_a_busy_health_port_is_one_line_exit_9_and_leaves_nothing_behind(project):
    project.add_client("c", lifetime=60)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        project.settings["health"] = {"listen": f"127.0.0.1:{port}"}
        daemon = project.start()
        assert daemon.process.wait(15) == 9
    errors = [line for line in daemon.log.splitlines() if line.startswith("tokensmith:")]
    assert errors == [f"tokensmith: health.listen 127.0.0.1:{port}: address already in use "
                      f"(another process listens there; change health.listen or stop it)"], daemon.log
    assert "Traceback" not in daemon.log
    assert not (project.root / "run" / "control.sock").exists()
    # the state directory's lock went with it: a daemon on a free port starts
    project.settings["health"] = {"listen": "127.0.0.1:0"}
    second = project.start()
    try:
        second.wait_ready()
    finally:
        assert second.stop() == 0


def test_the_unit_stops_restarting_on_the_in_use_code():
    unit = (os.path.dirname(__file__) + "/../systemd/tokensmith.service")
    lines = [line for line in open(unit).read().splitlines() if line.startswith("RestartPreventExitStatus=")]
    assert lines == ["RestartPreventExitStatus=78 9"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own a directory as another uid (CI runs as root)")
def test_a_cli_refresh_never_leaves_files_the_service_cannot_read(project):
    project.add_client("c", lifetime=60)
    project.write()
    state = project.root / "state"
    state.mkdir()
    os.chown(state, 4242, 4242)  # the service's (dynamic) user
    result = project.cli("once")
    assert result.returncode == 73, result.stdout + result.stderr
    assert f"state directory {state} belongs to uid 4242" in result.stderr
    assert "systemctl start tokensmith" in result.stderr
    assert os.listdir(state) == [] and project.token("c") is None
    result = project.cli("rotate", "c")
    assert result.returncode == 73 and os.listdir(state) == []


# ---- exit codes and help

def test_help_lists_the_exit_codes_and_rotate_explains_its_arguments():
    top = tokensmith("--help").stdout
    for code in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 73, 77, 78):
        assert re.search(rf"^\s+{code}\s+\S", top, re.M), code
    assert set(EXIT_CODES) == {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 73, 77, 78}
    rotate = tokensmith("rotate", "--help").stdout
    assert re.search(r"^\s+client\s+the client to refresh", rotate, re.M)
    assert re.search(r"^\s+--all\s+refresh every client", rotate, re.M)
    assert re.search(r"^\s+--json\s+print the results as JSON", rotate, re.M)


def test_an_unknown_client_has_its_own_code_with_and_without_a_daemon(project):
    project.add_client("alpha", lifetime=60)
    project.add_client("beta", lifetime=60)
    project.write()
    result = project.cli("rotate", "gamma")
    assert result.returncode == 8, result.stderr
    assert "no client named 'gamma' in the config (clients: alpha, beta)" in result.stderr
    daemon = project.start()
    try:
        daemon.wait_ready()
        result = project.cli("rotate", "gamma")
        assert result.returncode == 8, result.stderr
        assert "gamma" in result.stderr
    finally:
        assert daemon.stop() == 0


def test_check_config_findings_are_not_usage_errors(project):
    project.add_client("c", lifetime=60)
    project.clients[0]["grant"] = "telepathy"
    project.write()
    assert project.cli("check-config", "--config-only").returncode == 7
    assert tokensmith("check-config", "--no-such-flag").returncode == 2


# ---- messages

def test_messages_name_the_url_the_variable_and_both_duplicates(project):
    port = free_port()  # nothing listens there
    project.add_client("down", lifetime=60, token_url=f"http://127.0.0.1:{port}/oauth2/token")
    project.write()
    result = project.cli("once", "--wait", "0")
    assert result.returncode == 1
    assert f"cannot reach http://127.0.0.1:{port}/oauth2/token (ConnectionRefusedError" in result.stdout

    result = project.cli("check-config", "--config-only", env={"TOKENSMITH_LOG__LEVEL": "LOUD"})
    assert result.returncode == 7
    assert "log.level: " in result.stdout and "(set by TOKENSMITH_LOG__LEVEL)" in result.stdout

    project.clients.append(dict(project.clients[0]))
    project.clients[1]["timeout"] = "soon"  # a field error must not hide the duplicate
    project.write()
    result = project.cli("check-config", "--config-only")
    assert "clients[1](down).timeout" in result.stdout
    assert "clients[0] and clients[1] are both named 'down'; names must be unique" in result.stdout


def test_a_yaml_credentials_file_gets_a_hint(project):
    project.add_client("c", lifetime=60)
    creds = project.root / "creds" / "c.json"
    creds.write_text("client_id: c\nclient_secret: c-secret-value\n")
    project.write()
    result = project.cli("once", "--wait", "0")
    assert result.returncode == 1 and "looks like YAML" in result.stdout
    result = project.cli("check-config")
    assert result.returncode == 7 and "looks like YAML" in result.stdout


def test_once_retries_a_transient_failure_within_its_wait(project, server):
    project.add_client("c", lifetime=60)
    project.write()
    server.fail_next(2, status=503)
    started = time.monotonic()
    result = project.cli("once", "--wait", "10")
    assert result.returncode == 0, result.stdout + result.stderr
    assert project.token("c") and time.monotonic() - started < 30  # 1 s + 2 s of backoff, then success
    assert "0s ago" not in result.stdout and "(now)" in result.stdout


def test_once_gives_up_on_a_transient_failure_after_its_wait(project, server):
    project.add_client("c", lifetime=60)
    project.write()
    server.fail_next(100, status=503)
    started = time.monotonic()
    result = project.cli("once", "--wait", "1.5")
    assert result.returncode == 1 and 1.5 <= time.monotonic() - started < 10
    assert server.stats["token_requests"] >= 2


# ---- check-config looks at the machine

def test_check_config_reports_every_problem_of_the_machine_in_one_run(project):
    project.add_client("missing-creds", lifetime=60)
    project.add_client("open-creds", lifetime=60)
    project.add_client("no-dir", lifetime=60)
    project.add_client("no-program", lifetime=60, hooks=[{"type": "command", "argv": ["/nonexistent/reload"]}])
    os.unlink(project.root / "creds" / "missing-creds.json")
    os.chmod(project.root / "creds" / "open-creds.json", 0o644)
    project.clients[2]["sinks"][0]["path"] = str(project.root / "nowhere" / "token")
    project.write()
    result = project.cli("check-config")
    assert result.returncode == 7
    expected = [f"clients[0](missing-creds).source.path: credentials file {project.root}/creds/missing-creds.json "
                f"does not exist",
                "clients[1](open-creds).source.path: credentials file",
                "is accessible by group or others (mode 0644); chmod 600 it",
                f"clients[2](no-dir).sinks[0]: file:{project.root}/nowhere/token: directory {project.root}/nowhere "
                f"does not exist",
                "clients[3](no-program).hooks[0]: command /nonexistent/reload is not an executable program"]
    for text in expected:
        assert text in result.stdout, (text, result.stdout)
    assert "4 problem(s) found" in result.stderr

    findings = json.loads(project.cli("check-config", "--json").stdout)
    assert findings["ok"] is False and len(findings["problems"]) == 4
    assert findings["clients"] == ["missing-creds", "open-creds", "no-dir", "no-program"]
    assert {p["where"] for p in findings["problems"]} == {
        "clients[0](missing-creds).source.path", "clients[1](open-creds).source.path", "clients[2](no-dir).sinks[0]",
        "clients[3](no-program).hooks[0]"}


def test_check_config_online_reaches_the_token_endpoint(project):
    project.add_client("up", lifetime=60)
    port = free_port()
    project.add_client("down", lifetime=60, token_url=f"http://127.0.0.1:{port}/token")
    project.write()
    assert project.cli("check-config").returncode == 0  # offline: nothing wrong on this machine
    result = project.cli("check-config", "--online")
    assert result.returncode == 7
    assert f"clients[1](down).token_url: cannot reach token endpoint http://127.0.0.1:{port}/token" in result.stdout
    assert "clients[0](up)" not in result.stdout


# ---- SIGHUP

def test_sighup_logs_one_summary_applies_a_mode_change_at_once_and_keeps_tokens_once(project):
    project.add_client("keep", lifetime=60)
    project.add_client("change", lifetime=60)
    project.add_client("drop", lifetime=60)
    daemon = project.start()
    try:
        daemon.wait_ready()
        token = project.token("change")
        path = project.token_path("change")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        project.clients = [c for c in project.clients if c["name"] != "drop"]
        project.clients[1]["sinks"][0]["mode"] = "0640"
        project.add_client("new", lifetime=60)
        project.write()
        kept_before = daemon.log.count("event=token_kept")
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "config reloaded" in daemon.log)
        (summary,) = [line for line in daemon.log.splitlines() if "config reloaded" in line]
        assert summary.endswith("config reloaded: 1 added (new), 1 removed (drop), 1 changed (change); 3 clients")
        assert "client_removed" not in daemon.log and "client_added" not in daemon.log  # the summary says it
        # the changed client's state is taken over once, not logged twice
        assert daemon.log.count("event=token_kept") - kept_before == 1
        wait_for(lambda: stat.S_IMODE(path.stat().st_mode) == 0o640, timeout=5)
        assert project.token("change") == token  # the same token, rewritten with the new mode
    finally:
        assert daemon.stop() == 0


def test_sighup_during_start_up_is_applied_before_ready_timeout(project):
    project.settings["scheduler"] = {"ready_timeout": 60}
    project.add_client("good", lifetime=60)
    project.add_client("stuck", lifetime=60, token_url=f"http://127.0.0.1:{free_port()}/token")
    daemon = project.start()
    try:
        wait_for(lambda: project.token("good") and "event=refresh_failed" in daemon.log)
        project.clients = [c for c in project.clients if c["name"] != "stuck"]
        project.write()
        sent = time.monotonic()
        daemon.signal(signal.SIGHUP)
        # well before ready_timeout (60 s), which is what the old code waited for
        wait_for(lambda: "ready: 1 clients have fresh tokens" in daemon.log, timeout=30)
        assert time.monotonic() - sent < 30
        assert "1 removed (stuck)" in daemon.log
    finally:
        assert daemon.stop() == 0


# ---- status --json

def test_status_json_has_the_same_fields_with_and_without_a_daemon(project):
    project.add_client("c", lifetime=60)
    daemon = project.start()
    try:
        daemon.wait_ready()
        running = json.loads(project.cli("status", "--json").stdout)
    finally:
        assert daemon.stop() == 0
    stopped = json.loads(project.cli("status", "--json").stdout)
    assert running["daemon"] is True and stopped["daemon"] is False
    (live,), (offline,) = running["clients"], stopped["clients"]
    assert set(live) == set(offline)
    for record in (live, offline):
        assert ISO.fullmatch(record["expires_at"]) and ISO.fullmatch(record["last_refresh"])
        assert record["token"] and record["valid"] is True and record["last_grant"] == "client_credentials"
    assert live["expires_at"] == offline["expires_at"] and live["token"] == offline["token"]


def test_the_readme_and_the_docstring_list_the_same_exit_codes():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    table = readme.split("### Exit codes", 1)[1].split("\n\n", 2)[1]
    documented = {int(match) for match in re.findall(r"^\| (\d+) \|", table, re.M)}
    assert documented == set(EXIT_CODES)
    import tokensmith.cli

    for code in EXIT_CODES:
        assert re.search(rf"\b{code} ", tokensmith.cli.__doc__), code
