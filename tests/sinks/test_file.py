"""FileSink: formats, exact modes and group, atomic replacement, symlinks, check() and failures."""

import grp
import json
import os
import stat
import threading

import pytest

from tokensmith.config import FileSinkConfig
from tokensmith.errors import SinkError
from tokensmith.fsutil import TEMP_PREFIX
from tokensmith.sinks.file import FileSink
from tokensmith.tokens import Token

ACCESS = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJzdmMifQ.c2ln-access-token"
REFRESH = "refresh-Token-Never-Published-3Jd"


def token(access=ACCESS, expires_at=1_800_003_600.5):
    return Token(access_token=access, token_type="Bearer", obtained_at=1_800_000_000.0, expires_at=expires_at,
                 refresh_token=REFRESH)


def sink(path, **fields):
    config = FileSinkConfig(type="file", path=path, **fields)
    return FileSink(config, "billing-api")


def ready(path, **fields):
    made = sink(path, **fields)
    made.check()
    return made


@pytest.fixture
def umask_zero():
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode_of(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


# ---- formats


def test_raw_format_is_the_bare_token(tmp_path):
    path = tmp_path / "api.token"
    ready(path).write(token())
    assert path.read_bytes() == ACCESS.encode()


@pytest.mark.security(threat="consumer in the socket group", claim="A JSON token file holds the token document and "
                                                                   "never the refresh token.")
def test_json_format_is_the_token_document_without_the_refresh_token(tmp_path):
    path = tmp_path / "api.json"
    ready(path, format="json").write(token())
    assert json.loads(path.read_text()) == {"access_token": ACCESS, "token_type": "Bearer",
                                            "expires_at": 1_800_003_600}
    assert REFRESH not in path.read_text()


def test_env_format_uses_the_env_key(tmp_path):
    path = tmp_path / "api.env"
    ready(path, format="env", env_key="PARTNER_TOKEN").write(token())
    assert path.read_text().splitlines() == [f"PARTNER_TOKEN='{ACCESS}'", "PARTNER_TOKEN_TYPE='Bearer'",
                                             "PARTNER_TOKEN_EXPIRES_AT=1800003600"]
    assert REFRESH not in path.read_text()


def test_env_format_default_key(tmp_path):
    path = tmp_path / "api.env"
    ready(path, format="env").write(token())
    assert path.read_text().startswith(f"ACCESS_TOKEN='{ACCESS}'\n")


def test_sink_name_names_the_path(tmp_path):
    assert sink(tmp_path / "api.token").name == f"file:{tmp_path / 'api.token'}"


# ---- modes and group


@pytest.mark.security(threat="local user", claim="A token file is exactly 0600 by default, even under umask 0.")
def test_default_mode_is_exactly_0600_even_with_umask_0(tmp_path, umask_zero):
    path = tmp_path / "api.token"
    ready(path).write(token())
    assert mode_of(path) == 0o600


@pytest.mark.security(threat="consumer in the socket group", claim="A token file shared with a group is exactly its "
                                                                   "configured mode (0640) and owned by that group, "
                                                                   "even under umask 0.")
def test_mode_0640_with_a_group(tmp_path, umask_zero):
    group = grp.getgrgid(os.getgid())
    path = tmp_path / "api.token"
    ready(path, mode="0640", group=group.gr_name).write(token())
    assert mode_of(path) == 0o640
    assert os.stat(path).st_gid == group.gr_gid


@pytest.mark.security(threat="local user", claim="A token file that was wider than its configured mode is narrowed "
                                                 "when it is replaced.")
def test_replacing_a_wider_existing_file_narrows_it(tmp_path, umask_zero):
    path = tmp_path / "api.token"
    path.write_text("old")
    os.chmod(path, 0o666)
    ready(path).write(token())
    assert mode_of(path) == 0o600 and path.read_text() == ACCESS


def test_unknown_group_fails_check_naming_the_group(tmp_path):
    with pytest.raises(SinkError) as info:
        sink(tmp_path / "api.token", group="no-such-group-tokensmith").check()
    assert "no-such-group-tokensmith" in str(info.value) and info.value.retryable is False


# ---- atomic replacement


@pytest.mark.security(threat="consumer in the socket group", claim="A consumer reading its token file while it is "
                                                                   "replaced sees the old token or the new one, "
                                                                   "never an empty or partial file, and no temp file "
                                                                   "is left.")
def test_reader_never_sees_empty_or_partial_content(tmp_path):
    path = tmp_path / "api.token"
    writer = ready(path)
    tokens = [f"tok-{i:04d}-" + "x" * (i % 97) for i in range(500)]
    writer.write(token(tokens[0]))
    allowed = set(tokens)
    bad, reads = [], [0]
    done = threading.Event()

    def reader():
        while not done.is_set():
            with open(path, "rb") as handle:
                content = handle.read().decode()
            reads[0] += 1
            if content not in allowed:
                bad.append(content)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for value in tokens[1:]:
            writer.write(token(value))
    finally:
        done.set()
        thread.join()
    assert bad == []
    assert reads[0] > 0
    assert path.read_text() == tokens[-1]
    assert [p.name for p in tmp_path.iterdir()] == ["api.token"]  # no temp files left behind


# ---- symlinks


@pytest.mark.security(threat="planted file", claim="A symlink at a token file path is replaced by a regular file; "
                                                   "its target is never written.")
def test_symlink_at_the_sink_path_is_replaced_not_written_through(tmp_path, report):
    target = tmp_path / "elsewhere"
    target.write_text("do not touch")
    path = tmp_path / "api.token"
    path.symlink_to(target)
    ready(path).write(token())
    assert target.read_text() == "do not touch"
    assert not path.is_symlink() and stat.S_ISREG(os.lstat(path).st_mode)
    assert path.read_text() == ACCESS
    report.record('sink path replaced by a symlink', 'replaced atomically by a regular file; the link target untouched')

@pytest.mark.security(threat="planted file", claim="A dangling symlink at a token file path is replaced; nothing is "
                                                   "created at its target.")
def test_dangling_symlink_at_the_sink_path_is_replaced(tmp_path):
    path = tmp_path / "api.token"
    path.symlink_to(tmp_path / "would-be-created")
    ready(path).write(token())
    assert not (tmp_path / "would-be-created").exists()
    assert not path.is_symlink() and path.read_text() == ACCESS


# ---- check() and failures


def test_check_fails_for_a_missing_directory(tmp_path):
    path = tmp_path / "absent" / "api.token"
    with pytest.raises(SinkError) as info:
        sink(path).check()
    error = info.value
    assert f"file:{path}" in str(error) and "does not exist" in str(error)
    assert "billing-api" in str(error) and error.retryable is False


def as_nobody(function):
    """Run function() in a forked child that has dropped to uid/gid 65534 when we are root (CI
    runs as root, and root writes anywhere), and return what it returned or raised (repr'd)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            try:
                result = ("returned", repr(function()))
            except Exception as exc:
                result = ("raised", type(exc).__name__, str(exc), getattr(exc, "retryable", None))
            os.write(write_end, json.dumps(result).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        data = reader.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the unprivileged child failed"
    return json.loads(data)


@pytest.fixture
def open_tree():
    """A directory tree everyone may traverse (pytest's tmp_path is 0700, closed to uid 65534)."""
    import shutil
    import tempfile

    root = tempfile.mkdtemp(prefix="tokensmith-sink-")
    os.chmod(root, 0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_check_fails_for_an_unwritable_directory(open_tree, tmp_path):
    from pathlib import Path

    directory = Path(open_tree) / "readonly"
    directory.mkdir()
    os.chmod(directory, 0o555)  # as root: owned by root and closed to 65534; otherwise closed to us
    path = directory / "api.token"
    result = as_nobody(lambda: sink(path).check())
    assert result[:2] == ["raised", "SinkError"]
    assert f"file:{path}: directory {directory} is not writable" in result[2] and "billing-api" in result[2]
    assert result[3] is False
    os.chmod(directory, 0o755)
    writable = Path(open_tree) / "writable"
    writable.mkdir(mode=0o777)
    os.chmod(writable, 0o777)
    assert as_nobody(lambda: sink(writable / "api.token").check()) == ["returned", "None"]


def test_check_fails_when_the_parent_is_a_file(tmp_path):
    parent = tmp_path / "a-file"
    parent.write_text("")
    path = parent / "api.token"
    with pytest.raises(SinkError) as info:
        sink(path).check()
    assert f"file:{path}" in str(info.value) and info.value.retryable is False


def test_check_fails_retryably_when_the_path_is_a_directory(tmp_path):
    """Retryable: a directory planted at one sink path must not stop the daemon (docs/security.md)."""
    (tmp_path / "api.token").mkdir()
    with pytest.raises(SinkError) as info:
        sink(tmp_path / "api.token").check()
    assert "directory" in str(info.value) and info.value.retryable is True


def test_check_leaves_temp_files_alone(tmp_path):
    """check() also runs on config reloads, while another thread may be about to rename its temp."""
    in_flight = tmp_path / f"{TEMP_PREFIX}api.token.deadbeef.tmp"
    in_flight.write_text("half a token")
    sink(tmp_path / "api.token").check()
    assert in_flight.exists()


def test_write_into_an_unusable_directory_is_a_retryable_sink_error(tmp_path):
    parent = tmp_path / "a-file"
    parent.write_text("")
    path = parent / "api.token"
    with pytest.raises(SinkError) as info:
        sink(path).write(token())
    error = info.value
    assert error.retryable is True
    assert f"file:{path}" in str(error) and "billing-api" in str(error)
    assert ACCESS not in str(error)


def test_write_after_the_directory_vanished_is_a_retryable_sink_error(tmp_path):
    directory = tmp_path / "run"
    directory.mkdir()
    writer = ready(directory / "api.token")
    directory.rmdir()
    with pytest.raises(SinkError) as info:
        writer.write(token())
    assert info.value.retryable is True and "file:" in str(info.value)
