"""Who may do what over the control socket, against a real `tokensmith run` (as root) and peers
that are forked from the test and drop to nobody:nogroup, a member of control_socket_group."""

from __future__ import annotations

import io
import json
import os
import pickle
import select
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml

from daemon_harness import Project, wait_for
from tokensmith.config import load_settings
from tokensmith.devserver import OAuthServer
from tokensmith.errors import ConfigError

NOBODY, NOGROUP = 65534, 65534
CONSUMER = "consumer in the socket group"
pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="needs root to drop to another uid")


def as_nobody(function, *args, timeout=20.0):
    """Run function(*args) in a forked child that is nobody:nogroup; returns its (pickled) result."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only stdlib calls and the already imported tokensmith.cli
        os.close(read)
        try:
            os.setgroups([NOGROUP])
            os.setgid(NOGROUP)
            os.setuid(NOBODY)
            result = ("ok", function(*args))
        except BaseException as exc:
            result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        os.write(write, pickle.dumps(result))
        os._exit(0)
    os.close(write)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([read], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError("the unprivileged peer did not finish")
            chunk = os.read(read, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    assert kind == "ok", value
    return value


def raw_request(path: str, data: bytes) -> bytes:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(path)
        sock.sendall(data)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        return reply
    finally:
        sock.close()


def ask(path: str, message: dict) -> dict:
    reply = raw_request(path, json.dumps(message).encode() + b"\n")
    return json.loads(reply) if reply else {"no reply": True}


def run_cli(runtime_dir: str, *argv) -> tuple[int, str, str]:
    from tokensmith import cli

    os.environ["TOKENSMITH_RUNTIME_DIR"] = runtime_dir
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


class Recorder:
    """A loopback listener that records every connection (and what it was sent)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/"
        self.connections: list[bytes] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    self.connections.append(conn.recv(65536))
                    conn.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    self.connections.append(b"")

    def close(self):
        self.stopping = True
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def server():
    with OAuthServer(access_lifetime=300) as server:
        yield server


@pytest.fixture
def runtime_dir():
    # pytest's tmp_path is 0700 root: nobody could not reach a socket in it
    path = Path(tempfile.mkdtemp(prefix="ts-sec-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def recorder():
    recorder = Recorder()
    yield recorder
    recorder.close()


@pytest.fixture
def project(tmp_path, server, runtime_dir):
    project = Project(tmp_path, server, runtime_dir=str(runtime_dir), control_socket_group="nogroup",
                      audit_log=str(tmp_path / "audit.log"))
    project.add_client("billing", grant="password", users={"alice": "pw-alice"})
    project.add_client("vaultonly")
    return project


def audit(project) -> list[dict]:
    path = project.root / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def sock_path(project) -> str:
    return str(Path(project.settings["runtime_dir"]) / "control.sock")


def started(project):
    running = project.start()
    wait_for(lambda: all(project.token(c["name"]) for c in project.clients)
             and Path(sock_path(project)).exists(), timeout=15)
    return running


@pytest.mark.security(threat=CONSUMER, claim="With control_socket_group set, the control socket is 0660 and owned "
                                            "by that group, so group members can connect and no one else can.")
def test_socket_is_0660_with_the_configured_group(project):
    running = started(project)
    try:
        info = os.stat(sock_path(project))
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == NOGROUP
        assert as_nobody(ask, sock_path(project), {"op": "ping"}) == {"ok": True}
    finally:
        running.stop()


@pytest.mark.security(threat=CONSUMER, claim="A member of the socket group can read status but every rotate verb "
                                            "is refused (exit 77), logged and audited, and no token changes.")
def test_a_socket_group_member_reads_status_but_cannot_rotate(project):
    running = started(project)
    try:
        before = {name: project.token(name) for name in ("billing", "vaultonly")}
        status = as_nobody(ask, sock_path(project), {"op": "status"})
        assert status["ok"] and {c["client"] for c in status["clients"]} == {"billing", "vaultonly"}
        for message in ({"op": "rotate", "client": "billing"},
                        {"op": "rotate", "client": "vaultonly", "compromised": True, "accept_unrevoked": True},
                        {"op": "rotate", "all": True, "compromised": True}):
            reply = as_nobody(ask, sock_path(project), message)
            assert reply["ok"] is False and reply["code"] == "forbidden", reply
            assert "uid 65534 (nobody)" in reply["error"] and "control_operators" in reply["error"]
        code, out, err = as_nobody(run_cli, str(Path(sock_path(project)).parent), "rotate", "billing",
                                   "--compromised", "--accept-unrevoked")
        assert code == 77, (out, err)
        assert len(err.strip().splitlines()) == 1 and "refused" in err and out == ""
        assert {name: project.token(name) for name in before} == before
        refused = [line for line in audit(project) if line["result"] == "refused"]
        assert [(line["verb"], line["client"]) for line in refused] == [
            ("rotate", "billing"), ("rotate --compromised", "vaultonly"), ("rotate --compromised", "--all"),
            ("rotate --compromised", "billing")]
        assert all(line["operator"] == {"uid": NOBODY, "user": "nobody"} for line in refused)
        assert not any(line.get("result") not in ("refused",) for line in audit(project))
        wait_for(lambda: running.log.count("control request refused") == 4, timeout=5)
        assert "WARNING" in running.log
    finally:
        running.stop()


@pytest.mark.security(threat=CONSUMER, claim="A user named in control_operators may rotate over the socket, and "
                                            "the list takes effect on reload.")
def test_a_listed_operator_may_rotate(project):
    running = started(project)
    try:
        old = project.token("billing")
        assert as_nobody(ask, sock_path(project), {"op": "rotate", "client": "billing"})["code"] == "forbidden"
        project.settings["control_operators"] = ["nobody"]
        project.write()
        running.signal(signal.SIGHUP)
        reply = wait_for(lambda: (lambda r: r if r.get("ok") else None)(
            as_nobody(ask, sock_path(project), {"op": "rotate", "client": "billing", "compromised": True})),
            timeout=10, interval=0.1)
        [result] = reply["results"]
        assert result["result"] == "rotated" and project.token("billing") != old
        assert audit(project)[-1]["operator"] == {"uid": NOBODY, "user": "nobody"}
        assert audit(project)[-1]["result"] == "rotated"
    finally:
        running.stop()


@pytest.mark.security(threat=CONSUMER, claim="No control request or CLI flag can make the daemon send a token to a "
                                            "destination outside its config: a listener named in the request is "
                                            "never contacted, by an operator or a group member.")
def test_a_request_cannot_choose_where_tokens_go(project, recorder):
    running = started(project)
    try:
        before = project.token("vaultonly")
        for message in ({"op": "rotate", "client": "vaultonly", "compromised": True, "accept_unrevoked": True,
                         "verify_url": recorder.url},
                        {"op": "rotate", "client": "vaultonly", "compromised": True, "url": recorder.url}):
            for reply in (ask(sock_path(project), message), as_nobody(ask, sock_path(project), message)):
                assert reply["ok"] is False and reply["code"] == "bad_request", reply
        result = project.cli("rotate", "vaultonly", "--compromised", "--accept-unrevoked", "--verify-url",
                             recorder.url, env={"TOKENSMITH_RUNTIME_DIR": project.settings["runtime_dir"]})
        assert result.returncode == 2 and "verify_url" in result.stderr
        time.sleep(0.3)
        assert recorder.connections == []
        assert project.token("vaultonly") == before
    finally:
        running.stop()


@pytest.mark.security(threat=CONSUMER, claim="\"compromised\": \"false\" and other non-boolean flags are refused "
                                            "with a one-line error instead of triggering a compromise rotation.")
def test_a_string_flag_does_not_trigger_a_compromise_rotation(project):
    running = started(project)
    try:
        before = project.token("billing")
        reply = ask(sock_path(project), {"op": "rotate", "client": "billing", "compromised": "false"})  # as root
        assert reply["ok"] is False and reply["code"] == "bad_request" and "compromised" in reply["error"]
        assert project.token("billing") == before and audit(project) == []
    finally:
        running.stop()


@pytest.mark.security(threat=CONSUMER, claim="A deeply nested or malformed control request gets a one-line error "
                                            "reply and the socket keeps serving.")
def test_malformed_requests_get_a_reply_and_the_socket_lives_on(project):
    running = started(project)
    try:
        path = sock_path(project)
        for data in (b"[" * 200000 + b"\n", b'{"op": "status"\n', b"\xff\xfe\n", b'{"op": "reboot"}\n', b"\n"):
            reply = as_nobody(raw_request, path, data)
            assert reply.endswith(b"\n") and reply.count(b"\n") == 1, reply
            parsed = json.loads(reply)
            assert parsed["ok"] is False and parsed["code"] == "bad_request"
        assert as_nobody(ask, path, {"op": "status"})["ok"]
        assert "Traceback" not in running.log
    finally:
        running.stop()


@pytest.mark.security(threat=CONSUMER, claim="rotate --compromised --verify fails clearly when the client has no "
                                            "configured verify_url, and rotates nothing.")
def test_verify_needs_a_configured_verify_url(project, server):
    project.clients[0]["verify_url"] = server.resource_url
    running = started(project)
    try:
        before = project.token("vaultonly")
        result = project.cli("rotate", "vaultonly", "--compromised", "--verify",
                             env={"TOKENSMITH_RUNTIME_DIR": project.settings["runtime_dir"]})
        assert result.returncode == 78 and "vaultonly have no verify_url" in result.stderr
        assert project.token("vaultonly") == before
        result = project.cli("rotate", "billing", "--compromised", "--verify", "--json",
                             env={"TOKENSMITH_RUNTIME_DIR": project.settings["runtime_dir"]})
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads(result.stdout)["results"][0]["verify_url"] == "verified"
    finally:
        running.stop()


def config_with(tmp_path, **fields) -> Path:
    client = {"name": "billing", "token_url": "https://idp.example/token",
              "source": {"type": "env"}, "sinks": [{"type": "file", "path": str(tmp_path / "t")}]}
    client.update(fields.pop("client", {}))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "clients": [client], **fields}))
    return path


@pytest.mark.security(threat="local user", claim="verify_url is checked like token_url (http only to loopback) "
                                                 "and control_operators names must be real users; both errors "
                                                 "name the field.")
def test_config_checks_verify_url_and_operators(tmp_path):
    settings = load_settings(config_with(tmp_path, control_operators=["nobody", 1002, "0"],
                                         client={"verify_url": "https://api.example/me"}))
    assert settings.control_operators == [NOBODY, 1002, 0]
    assert settings.clients[0].verify_url == "https://api.example/me"
    with pytest.raises(ConfigError, match=r"clients\[0\]\(billing\): verify_url plain http is refused"):
        load_settings(config_with(tmp_path, client={"verify_url": "http://api.example/me"}))
    with pytest.raises(ConfigError, match=r"control_operators: unknown user 'no-such-user-x'"):
        load_settings(config_with(tmp_path, control_operators=["no-such-user-x"]))
    with pytest.raises(ConfigError, match=r"control_operators"):
        load_settings(config_with(tmp_path, control_operators=[True]))
