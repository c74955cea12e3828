"""StateStore: durable per-client state, permissions, corruption handling and the cross-process locks."""

import json
import os
import stat
import subprocess
import sys
import textwrap
import threading

import pytest

from tokensmith.errors import StateError
from tokensmith.fsutil import TEMP_PREFIX
from tokensmith.state import ClientState, StateStore


def full_state():
    return ClientState(access_token="access-Value-1", token_type="Bearer", obtained_at=1_800_000_000.0,
                       expires_at=1_800_003_600.0, refresh_token="refresh-Value-2",
                       refresh_token_obtained_at=1_799_990_000.0, client_id="billing",
                       sinks_written={"file:/run/t/a": "abc123def456"}, last_refresh=1_800_000_000.0,
                       last_grant="password", last_error="HTTP 503", last_error_at=1_799_999_000.0,
                       alert="compromise rotation incomplete")


@pytest.fixture
def store(tmp_path):
    made = StateStore(tmp_path / "state")
    made.prepare()
    return made


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_save_load_roundtrip(store):
    state = full_state()
    store.save("billing-api", state)
    assert store.load("billing-api") == state


def test_loaded_state_gives_back_the_token(store):
    store.save("billing-api", full_state())
    token = store.load("billing-api").token
    assert (token.access_token, token.refresh_token, token.expires_at) == \
        ("access-Value-1", "refresh-Value-2", 1_800_003_600.0)


def test_unknown_client_loads_none(store):
    assert store.load("never-saved") is None


def test_secrets_are_not_in_the_repr(store):
    assert "access-Value-1" not in repr(full_state()) and "refresh-Value-2" not in repr(full_state())


@pytest.mark.security(threat="local user", claim="A state file, which holds the refresh token, is exactly 0600 even "
                                                 "under umask 0.")
def test_state_file_is_0600_even_with_umask_0(store):
    old = os.umask(0)
    try:
        store.save("billing-api", full_state())
    finally:
        os.umask(old)
    assert mode_of(store.path("billing-api")) == 0o600


@pytest.mark.security(threat="local user", claim="The state directory is created 0700 even under umask 0.")
def test_prepare_creates_the_directory_0700(tmp_path):
    old = os.umask(0)
    try:
        store = StateStore(tmp_path / "var" / "lib" / "tokensmith")
        store.prepare()
    finally:
        os.umask(old)
    assert store.directory.is_dir()
    assert mode_of(store.directory) == 0o700


@pytest.mark.security(threat="local user", claim="An existing state directory wider than 0700 is narrowed to 0700.")
def test_prepare_tightens_an_existing_wide_directory(tmp_path):
    directory = tmp_path / "state"
    directory.mkdir()
    os.chmod(directory, 0o755)
    StateStore(directory).prepare()
    assert mode_of(directory) == 0o700


def test_prepare_fails_clearly_when_the_directory_cannot_be_made(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(StateError) as info:
        StateStore(blocker / "state").prepare()
    assert str(blocker / "state") in str(info.value)


def test_stale_temp_files_are_removed_on_request_not_by_prepare(tmp_path):
    directory = tmp_path / "state"
    directory.mkdir()
    stale = directory / f"{TEMP_PREFIX}billing-api.json.0badc0de.tmp"
    stale.write_text('{"access_token": "half')
    keep = directory / "billing-api.json"
    keep.write_text("{}")
    store = StateStore(directory)
    store.prepare()
    assert stale.exists()
    store.remove_stale_temps()
    assert not stale.exists()
    assert keep.exists()
    assert not (directory / ".write-probe").exists()


def test_save_replaces_the_previous_state(store):
    store.save("billing-api", full_state())
    store.save("billing-api", ClientState(access_token="newer", expires_at=5.0))
    loaded = store.load("billing-api")
    assert loaded.access_token == "newer" and loaded.refresh_token is None
    assert sorted(p.name for p in store.directory.iterdir() if p.name.startswith(TEMP_PREFIX)) == []


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe", b'{"access_token": 5, "nope"',
                                     b"[1, 2]", b"null", b"42", b'"text"'])
@pytest.mark.security(threat="planted file", claim="A state file that is not valid state is moved aside with a "
                                                   "StateError naming the client, and is never loaded again.")
def test_corrupt_state_file_is_moved_aside_with_a_state_error(store, content):
    path = store.path("billing-api")
    path.write_bytes(content)
    with pytest.raises(StateError) as info:
        store.load("billing-api")
    assert "billing-api" in str(info.value)
    assert not path.exists()
    aside = [p for p in store.directory.iterdir() if p.name.startswith("billing-api.json.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert aside[0].name in str(info.value)
    assert store.load("billing-api") is None  # the next start obtains a new token


def test_unknown_keys_are_ignored_for_forward_compatibility(store):
    data = {"version": 2, "access_token": "tok", "expires_at": 1_800_003_600.0, "added_in_v2": {"x": 1},
            "dpop_key": "k"}
    store.path("billing-api").write_text(json.dumps(data))
    loaded = store.load("billing-api")
    assert loaded.access_token == "tok" and loaded.expires_at == 1_800_003_600.0
    assert store.path("billing-api").exists()


def test_saved_file_records_the_format_version(store):
    store.save("billing-api", full_state())
    assert json.loads(store.path("billing-api").read_text())["version"] == 1


# ---- cross-process locks

HOLDER = textwrap.dedent("""
    import sys
    from tokensmith.state import StateStore
    store = StateStore(sys.argv[1])
    if sys.argv[2] == "client":
        with store.client_lock(sys.argv[3]):
            print("held", flush=True)
            sys.stdin.read()
    else:
        fd = store.try_daemon_lock()
        print("held" if fd is not None else "refused", flush=True)
        sys.stdin.read()
""")


def holder(store, *args):
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(store.directory), *args], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def release(process):
    process.stdin.close()
    assert process.wait(timeout=10) == 0
    process.stdout.close()


def test_client_lock_excludes_a_second_process(store):
    process = holder(store, "client", "billing-api")
    acquired = threading.Event()

    def contender():
        with store.client_lock("billing-api"):
            acquired.set()

    thread = threading.Thread(target=contender, daemon=True)
    try:
        thread.start()
        assert not acquired.wait(0.3)
        with store.client_lock("other-client"):  # other clients are not blocked
            pass
    finally:
        release(process)
    assert acquired.wait(10)
    thread.join(10)


def test_try_daemon_lock_returns_none_while_another_process_holds_it(store):
    process = holder(store, "daemon")
    try:
        assert store.try_daemon_lock() is None
    finally:
        release(process)
    fd = store.try_daemon_lock()
    try:
        assert isinstance(fd, int)
        second = subprocess.run([sys.executable, "-c", HOLDER, str(store.directory), "daemon"], input="",
                                capture_output=True, text=True, timeout=30)
        assert second.stdout.strip() == "refused"
    finally:
        os.close(fd)


@pytest.mark.parametrize("field, value", [("expires_at", "soon"), ("obtained_at", [1]), ("access_token", 12345),
                                          ("sinks_written", "file:/run/t/a")])
@pytest.mark.security(threat="planted file", claim="A state file that is not valid state is moved aside with a "
                                                   "StateError naming the client, and is never loaded again.")
def test_state_file_with_wrongly_typed_fields_is_treated_as_corrupt(store, field, value):
    # A state file that parses but holds the wrong types would crash the keeper at start-up
    # (token.expires_at > clock() raises TypeError) on every restart; it must be moved aside like any corrupt file.
    data = {"access_token": "tok", "obtained_at": 1_800_000_000.0, "expires_at": 1_800_003_600.0, field: value}
    store.path("billing-api").write_text(json.dumps(data))
    with pytest.raises(StateError):
        store.load("billing-api")
    assert not store.path("billing-api").exists()


# ---- what the keeper relies on: change detection, durability, errors that name the client

from tokensmith import fsutil  # noqa: E402
from tokensmith.state import check_types  # noqa: E402


@pytest.mark.parametrize("field", ["obtained_at", "access_token", "sinks_written"])
def test_check_types_names_the_bad_field(field):
    state = full_state()
    setattr(state, field, True if field != "sinks_written" else {"file:/a": 1})
    with pytest.raises(TypeError) as info:
        check_types(state)
    assert str(info.value) == field


def test_sinks_written_needs_string_keys_and_values():
    for bad in ({1: "abc"}, {"file:/a": None}):
        state = full_state()
        state.sinks_written = bad
        with pytest.raises(TypeError, match="^sinks_written$"):
            check_types(state)


def test_prepare_tightens_a_directory_open_to_group_and_others_only(tmp_path):
    directory = tmp_path / "state"
    directory.mkdir()
    os.chmod(directory, 0o077)
    StateStore(directory).prepare()
    assert mode_of(directory) == 0o700


def test_prepare_error_gives_the_reason_not_the_exception(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(StateError) as info:
        StateStore(blocker / "state").prepare()
    assert str(info.value) == f"state directory {blocker / 'state'} is not usable: Not a directory"


def test_load_if_changed_skips_the_file_this_store_wrote_or_read(store, tmp_path):
    assert store.load_if_changed("billing-api") is None  # no file
    store.save("billing-api", full_state())
    assert store.load_if_changed("billing-api") is None, "re-read the file it had just written"
    other = StateStore(store.directory)
    changed = full_state()
    changed.access_token = "access-Value-9"
    other.save("billing-api", changed)
    assert store.load_if_changed("billing-api").access_token == "access-Value-9"
    assert store.load_if_changed("billing-api") is None, "re-read the file it had just read"
    reader = StateStore(store.directory)
    reader.load("billing-api")
    assert reader.load_if_changed("billing-api") is None
    assert other.load_if_changed("other-client") is None


def test_load_if_changed_raises_a_state_error_when_the_directory_is_gone(store, tmp_path):
    store.save("billing-api", full_state())
    store.directory.rename(tmp_path / "moved")
    store.directory.write_text("not a directory")
    with pytest.raises(StateError) as info:
        store.load_if_changed("billing-api")
    assert info.value.client == "billing-api"
    assert str(info.value).endswith(f"cannot read state file {store.directory}/billing-api.json: Not a directory")


def test_an_unreadable_or_corrupt_state_file_error_names_the_client(store):
    store.path("billing-api").write_text("{")
    with pytest.raises(StateError) as info:
        store.load("billing-api")
    assert info.value.client == "billing-api"


def test_save_error_names_the_client_and_the_reason(store):
    store.path("billing-api").mkdir()
    with pytest.raises(StateError) as info:
        store.save("billing-api", full_state())
    assert info.value.client == "billing-api"
    assert info.value.message == f"cannot write state file {store.path('billing-api')}: Is a directory"


def test_save_syncs_the_directory_unless_told_not_to(store, monkeypatch):
    synced = []
    real_fsync_dir = fsutil.fsync_dir
    monkeypatch.setattr(fsutil, "fsync_dir", lambda d: (synced.append(str(d)), real_fsync_dir(d)))
    store.save("billing-api", full_state())
    assert synced == [str(store.directory)]
    store.save("billing-api", full_state(), sync_dir=False)
    assert synced == [str(store.directory)]


def test_the_daemon_lock_file_is_created_0600(tmp_path):
    old = os.umask(0)
    try:
        store = StateStore(tmp_path / "fresh")
        store.prepare()
        fd = store.try_daemon_lock()
    finally:
        os.umask(old)
    try:
        assert isinstance(fd, int) and mode_of(store.directory / "daemon.lock") == 0o600
    finally:
        os.close(fd)


def test_a_directory_at_the_state_path_is_a_state_error_naming_the_client(store):
    path = store.path("billing-api")
    path.mkdir()
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(StateError) as info:
        store.load("billing-api")
    assert info.value.client == "billing-api"
    assert info.value.message == f"cannot read state file {path}: Is a directory"
    assert set(os.listdir("/proc/self/fd")) <= before  # the descriptor open() refused is closed
    assert path.is_dir()


def test_a_read_error_is_a_state_error_naming_the_client(store, monkeypatch):
    import builtins

    from tokensmith.state import file as state_file

    class FailingRead:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def read(self):
            raise OSError(5, "Input/output error")

    store.save("billing-api", full_state())
    monkeypatch.setattr(state_file, "open", lambda fd, mode: FailingRead(builtins.open(fd, mode)), raising=False)
    with pytest.raises(StateError) as info:
        store.load("billing-api")
    assert info.value.client == "billing-api"
    assert info.value.message == f"cannot read state file {store.path('billing-api')}: Input/output error"


def test_the_saved_file_holds_exactly_the_state_fields_and_the_version(store):
    store.save("billing-api", full_state())
    data = json.loads(store.path("billing-api").read_text())
    assert set(data) == {f for f in ClientState.__slots__} | {"version"}
    assert data["sinks_written"] == {"file:/run/t/a": "abc123def456"}


def test_load_all_goes_on_past_a_damaged_record_in_the_middle(store):
    store.save("a", ClientState(access_token="t-a"))
    store.path("b").write_text("{not json")
    store.save("c", ClientState(access_token="t-c"))
    assert sorted(store.load_all()) == ["a", "c"]
