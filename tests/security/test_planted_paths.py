"""Planted and pre-existing paths (issue 10, findings 8 and 9): a directory at a sink path, wide
or foreign-owned directories, symlinked or foreign state and lock files, and umask 000. Tests run
as root; "another user" is uid 65534 (nobody)."""

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from daemon_harness import Project, Running, wait_for
from tokensmith.control import ControlServer
from tokensmith.devserver import OAuthServer
from tokensmith.errors import StateError
from tokensmith.state import ClientState, StateStore

NOBODY = 65534
PLANTED = "planted-Access-Token-c0ffee"
LOCAL, PLANTED_FILE = "local user", "planted file"



@pytest.fixture
def server():
    with OAuthServer(access_lifetime=300) as server:
        yield server


@pytest.fixture
def project(tmp_path, server):
    return Project(tmp_path, server)


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def status_of(project, name) -> dict:
    result = project.cli("status", "--json")
    return next(c for c in json.loads(result.stdout)["clients"] if c["client"] == name)


def one_line_error(output: str, needle: str) -> str:
    [line] = [line for line in output.splitlines() if needle in line]
    return line


# ---- finding 8: a directory at a sink path


@pytest.mark.security(threat=PLANTED_FILE, claim="A directory planted at one sink path fails only that sink, "
                                                 "retried: the daemon starts, the other clients get tokens, status "
                                                 "shows the sink pending, and the token lands once it is removed.")
def test_a_directory_at_a_sink_path_fails_only_that_sink_until_removed(project, server):
    project.add_client("blocked")
    project.add_client("other")
    project.token_path("blocked").mkdir()
    (project.token_path("blocked") / "inside").write_text("left alone")
    daemon = project.start()
    try:
        daemon.wait_ready(["other"])
        assert server.is_active(project.token("other"))
        wait_for(lambda: status_of(project, "blocked")["sinks_pending"] == [f"file:{project.token_path('blocked')}"])
        assert daemon.process.poll() is None
        assert "path is a directory" in daemon.log
        (project.token_path("blocked") / "inside").unlink()
        project.token_path("blocked").rmdir()
        wait_for(lambda: project.token_path("blocked").is_file() and project.token("blocked"), timeout=10)
        assert server.is_active(project.token("blocked"))
        wait_for(lambda: status_of(project, "blocked")["sinks_pending"] == [])
    finally:
        assert daemon.stop() == 0


@pytest.mark.security(threat=PLANTED_FILE, claim="A symlink to a directory at a sink path is replaced by the token "
                                                 "file; the directory it names is not written.")
def test_a_symlink_to_a_directory_at_a_sink_path_is_replaced(project, server, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    project.add_client("linked")
    project.add_client("other")
    project.token_path("linked").symlink_to(target)
    daemon = project.start()
    try:
        link = project.token_path("linked")
        wait_for(lambda: not link.is_symlink() and link.is_file(), timeout=15)
        daemon.wait_ready()
        assert server.is_active(project.token("linked"))
        assert list(target.iterdir()) == []
    finally:
        assert daemon.stop() == 0


# ---- finding 9: existing paths are no longer trusted


@pytest.mark.security(threat=LOCAL, claim="An existing audit log wider than 0600 is made 0600 when a rotation "
                                          "appends to it.")
def test_a_wide_audit_log_is_tightened_by_a_compromise_rotation(project, server):
    project.add_client("inv", grant="password", users={"alice": "pw-alice"})
    audit = project.root / "state" / "audit.log"
    audit.parent.mkdir(mode=0o700)
    audit.write_text("")
    os.chmod(audit, 0o644)
    project.write()
    assert project.cli("once").returncode == 0
    result = project.cli("rotate", "inv", "--compromised")
    assert result.returncode == 0, result.stdout + result.stderr
    assert mode_of(audit) == 0o600
    assert json.loads(audit.read_text().splitlines()[-1])["client"] == "inv"


def control_server(runtime_dir: Path, group=None) -> ControlServer:
    settings = SimpleNamespace(control_socket=runtime_dir / "control.sock", control_socket_group=group)
    return ControlServer(settings, daemon=None)


@pytest.mark.security(threat=LOCAL, claim="An existing world-writable runtime directory loses group and other "
                                          "write before the control socket is bound in it.")
def test_a_wide_runtime_directory_is_tightened_at_control_socket_start(tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir()
    os.chmod(runtime, 0o777)
    server = control_server(runtime)
    server.start()
    try:
        assert mode_of(runtime) == 0o755
        assert mode_of(runtime / "control.sock") == 0o600
    finally:
        server.stop()


@pytest.mark.security(threat=LOCAL, claim="A runtime directory owned by another user is refused with a one-line "
                                          "error before any socket is bound in it.")
def test_a_runtime_directory_owned_by_another_user_is_refused(tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    os.chown(runtime, NOBODY, NOBODY)
    with pytest.raises(RuntimeError) as info:
        control_server(runtime).start()
    assert str(runtime) in str(info.value) and f"uid {NOBODY}" in str(info.value) and "\n" not in str(info.value)
    assert not (runtime / "control.sock").exists()


@pytest.mark.security(threat=LOCAL, claim="In a shared sticky runtime directory (like /tmp or a Kubernetes memory "
                                          "emptyDir) the control socket is still 0600, and the shared directory is "
                                          "left as it is.")
def test_a_shared_sticky_runtime_directory_is_left_alone_and_the_socket_is_private(tmp_path):
    runtime = tmp_path / "shared"
    runtime.mkdir()
    os.chmod(runtime, 0o1777)
    server = control_server(runtime)
    server.start()
    try:
        assert mode_of(runtime) == 0o1777
        assert mode_of(runtime / "control.sock") == 0o600
    finally:
        server.stop()


@pytest.mark.security(threat=LOCAL, claim="A state directory owned by another user is refused: `run` and `once` "
                                          "exit 73 with a one-line error and publish nothing.")
def test_a_state_directory_owned_by_another_user_is_refused(project, server):
    project.add_client("c")
    state = project.root / "state"
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    daemon = project.start()
    assert daemon.process.wait(15) == 73
    line = one_line_error(daemon.log, "state directory")
    assert f"owned by uid {NOBODY}" in line and "refusing" in line
    result = project.cli("once")
    assert result.returncode == 73
    # the CLI run as root refuses first (it would leave root-owned state behind); either way, uid named
    assert str(NOBODY) in one_line_error(result.stderr, "state directory")
    assert project.token("c") is None and server.stats["token_requests"] == 0
    assert os.stat(state).st_uid == NOBODY and os.listdir(state) == []


@pytest.mark.security(threat=LOCAL, claim="A shared sticky directory such as /tmp is refused as the state "
                                          "directory with a one-line StateError and left as it is.")
def test_a_shared_sticky_state_directory_is_refused_and_left_alone(tmp_path):
    shared = tmp_path / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    with pytest.raises(StateError) as info:
        StateStore(shared).prepare()
    assert "sticky" in str(info.value) and str(shared) in str(info.value)
    assert mode_of(shared) == 0o1777 and os.listdir(shared) == []


@pytest.mark.security(threat=PLANTED_FILE, claim="A symlink planted at a client's .lock creates nothing at its "
                                                 "target; that client's refresh fails with a clear error.")
def test_a_planted_client_lock_symlink_creates_nothing_at_its_target(project, server, tmp_path):
    project.add_client("c")
    project.write()
    state = project.root / "state"
    state.mkdir(mode=0o700)
    target = tmp_path / "created-by-root"
    (state / "c.lock").symlink_to(target)
    result = project.cli("once")
    assert result.returncode == 1
    assert not target.exists() and not target.is_symlink()
    assert "lock file" in result.stdout + result.stderr and "is a symlink" in result.stdout + result.stderr
    assert project.token("c") is None


@pytest.mark.security(threat=PLANTED_FILE, claim="A symlink planted at daemon.lock creates nothing at its target; "
                                                 "`run` exits 73.")
def test_a_planted_daemon_lock_symlink_creates_nothing_at_its_target(project, server, tmp_path):
    project.add_client("c")
    state = project.root / "state"
    state.mkdir(mode=0o700)
    target = tmp_path / "created-by-root"
    (state / "daemon.lock").symlink_to(target)
    daemon = project.start()
    assert daemon.process.wait(15) == 73
    assert "is a symlink" in one_line_error(daemon.log, "daemon.lock")
    assert not target.exists()


def plant_state(path: Path) -> None:
    now = time.time()
    state = {"access_token": PLANTED, "token_type": "Bearer", "obtained_at": now, "expires_at": now + 3600,
             "refresh_token": "planted-Refresh-Token", "refresh_token_obtained_at": now, "sinks_written": {},
             "version": 1}
    path.write_text(json.dumps(state))
    os.chmod(path, 0o600)


@pytest.mark.security(threat=PLANTED_FILE, claim="A state file that is a symlink or owned by another user is moved "
                                                 "aside and never published; the client gets a new token from the "
                                                 "provider.")
@pytest.mark.parametrize("case", ["symlink", "foreign"])
def test_a_planted_state_file_is_never_published(project, server, tmp_path, case):
    project.add_client("c")
    state = project.root / "state"
    state.mkdir(mode=0o700)
    if case == "symlink":
        source = tmp_path / "planted.json"
        plant_state(source)
        (state / "c.json").symlink_to(source)
    else:
        plant_state(state / "c.json")
        os.chown(state / "c.json", NOBODY, NOBODY)
    daemon = project.start()
    try:
        daemon.wait_ready()
        token = project.token("c")
        assert token != PLANTED and server.is_active(token)
        assert "state_unreadable" in daemon.log or "moved to" in daemon.log
        [aside] = [name for name in os.listdir(state) if name.startswith("c.json.refused-")]
        saved = json.loads((state / "c.json").read_text())
        assert saved["access_token"] == token and not (state / "c.json").is_symlink()
        assert server.stats["refresh_reuse"] == 0
    finally:
        assert daemon.stop() == 0
    if case == "symlink":
        assert json.loads(source.read_text())["access_token"] == PLANTED  # the target is not written through


@pytest.mark.security(threat=PLANTED_FILE, claim="A FIFO planted at a state file path is refused at once instead "
                                                 "of hanging the read.")
def test_a_fifo_at_a_state_path_is_refused_without_blocking(tmp_path):
    store = StateStore(tmp_path / "state")
    store.prepare()
    os.mkfifo(store.path("c"), 0o600)
    with pytest.raises(StateError) as info:
        store.load("c")
    assert "not a regular file" in str(info.value) and "client c" in str(info.value)
    assert not store.path("c").exists()
    store.save("c", ClientState(access_token="fresh"))
    assert store.load("c").access_token == "fresh"


@pytest.mark.security(threat=LOCAL, claim="Under umask 000 missing parents are created 0755, the state and runtime "
                                          "directories 0700, and state, lock, audit, token files and the socket "
                                          "0600.")
def test_umask_000_creates_parents_0755_and_private_files(tmp_path, server):
    project = Project(tmp_path, server, state_dir=str(tmp_path / "deep" / "a" / "state"),
                      runtime_dir=str(tmp_path / "rundeep" / "b" / "run"),
                      audit_log=str(tmp_path / "auditdeep" / "c" / "log" / "audit.log"))
    project.add_client("u", grant="password", users={"alice": "pw-alice"})
    project.write()
    log = open(tmp_path / "daemon.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "tokensmith", "run", "--config", str(project.config)],
                               stdout=log, stderr=subprocess.STDOUT, preexec_fn=lambda: os.umask(0))
    daemon = Running(process, Path(log.name), project)
    socket = tmp_path / "rundeep" / "b" / "run" / "control.sock"
    try:
        wait_for(lambda: project.token("u") and socket.exists(), timeout=15)
        result = project.cli("rotate", "u", "--compromised")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "by the running daemon" in result.stdout
        for parent in ("deep", "deep/a", "rundeep", "rundeep/b", "auditdeep", "auditdeep/c"):
            assert mode_of(tmp_path / parent) == 0o755, parent
        for directory in ("deep/a/state", "rundeep/b/run", "auditdeep/c/log"):
            assert mode_of(tmp_path / directory) == 0o700, directory
        for name in ("deep/a/state/u.json", "deep/a/state/u.lock", "deep/a/state/daemon.lock",
                     "auditdeep/c/log/audit.log", "rundeep/b/run/control.sock"):
            assert mode_of(tmp_path / name) == 0o600, name
        assert mode_of(project.token_path("u")) == 0o600
    finally:
        assert daemon.stop() == 0


# ---- the same checks in-process, on StateStore itself (the daemon tests above run it in a child)

OTHER_UID = 1  # neither this user (root) nor root: the owner checks accept exactly those two


@pytest.fixture
def store(tmp_path):
    made = StateStore(tmp_path / "state")
    made.prepare()
    return made


def test_a_state_directory_owned_by_any_other_uid_is_refused_naming_it(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, OTHER_UID, OTHER_UID)
    with pytest.raises(StateError) as info:
        StateStore(state).prepare()
    assert info.value.message == (f"state directory {state} is owned by uid {OTHER_UID}, not by this user "
                                  f"(uid {os.geteuid()}); refusing to use it")
    assert os.listdir(state) == []


def test_a_state_file_owned_by_any_other_uid_is_set_aside_naming_it(store):
    path = store.path("c")
    plant_state(path)
    os.chown(path, OTHER_UID, OTHER_UID)
    with pytest.raises(StateError) as info:
        store.load("c")
    [aside] = [name for name in os.listdir(store.directory) if name.startswith("c.json.refused-")]
    assert info.value.client == "c"
    assert info.value.message == (f"state file {path} is owned by uid {OTHER_UID}, not by this user; it was moved "
                                  f"to {aside} and is not used; a new token will be obtained")
    assert not path.exists()


def test_a_state_file_owned_by_root_is_accepted(store):
    assert os.geteuid() == 0  # as root this is also "this user"; the check accepts root-owned files by design
    store.save("c", ClientState(access_token="mine"))
    os.chown(store.path("c"), 0, 0)
    assert store.load("c").access_token == "mine"


def test_a_symlinked_state_file_is_set_aside_and_its_target_left_alone(store, tmp_path):
    source = tmp_path / "planted.json"
    plant_state(source)
    path = store.path("c")
    path.symlink_to(source)
    with pytest.raises(StateError) as info:
        store.load("c")
    [aside] = [name for name in os.listdir(store.directory) if name.startswith("c.json.refused-")]
    assert info.value.client == "c"
    assert info.value.message == (f"state file {path} is a symlink; it was moved to {aside} and is not used; "
                                  f"a new token will be obtained")
    assert (store.directory / aside).is_symlink() and json.loads(source.read_text())["access_token"] == PLANTED


@pytest.mark.timeout(10)  # a blocking open of the FIFO fails the test instead of hanging it
def test_a_fifo_state_file_is_set_aside_with_its_reason(store):
    path = store.path("c")
    os.mkfifo(path, 0o600)
    with pytest.raises(StateError) as info:
        store.load("c")
    [aside] = [name for name in os.listdir(store.directory) if name.startswith("c.json.refused-")]
    assert info.value.message == (f"state file {path} is not a regular file; it was moved to {aside} and is not "
                                  f"used; a new token will be obtained")


def test_a_planted_file_that_cannot_be_moved_aside_is_still_refused(store):
    path = store.path("c")
    plant_state(path)
    os.chown(path, OTHER_UID, OTHER_UID)
    now = int(time.time())
    for second in range(now - 1, now + 30):  # every name the move could take is a non-empty directory
        blocker = store.directory / f"c.json.refused-{second}"
        blocker.mkdir()
        (blocker / "x").touch()
    with pytest.raises(StateError) as info:
        store.load("c")
    assert info.value.client == "c"
    assert info.value.message == (f"state file {path} is owned by uid {OTHER_UID}, not by this user and could not "
                                  f"be moved aside (Is a directory); it is not used")
    assert json.loads(path.read_text())["access_token"] == PLANTED


def test_a_planted_lock_symlink_is_refused_in_process_and_creates_nothing(store, tmp_path):
    target = tmp_path / "created-by-root"
    lock = store.directory / "c.lock"
    lock.symlink_to(target)
    with pytest.raises(StateError) as info:
        with store.client_lock("c"):
            pass
    assert info.value.client == "c"
    assert info.value.message == f"lock file {lock} is a symlink; remove it"
    assert not target.exists()


def test_a_lock_path_that_cannot_be_opened_is_a_state_error_naming_the_client(store):
    lock = store.directory / "c.lock"
    lock.mkdir()
    with pytest.raises(StateError) as info:
        with store.client_lock("c"):
            pass
    assert info.value.client == "c"
    assert info.value.message == f"cannot open lock file {lock}: Is a directory"
