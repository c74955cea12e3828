"""Temp-file clean-up after a crash: one listing, exactly the named targets' temps."""

from tokensmith.fsutil import TEMP_PREFIX, atomic_write, remove_stale_temps


def test_removes_only_the_named_targets_temps(tmp_path):
    stale = tmp_path / f"{TEMP_PREFIX}api.token.deadbeef.tmp"
    other = tmp_path / f"{TEMP_PREFIX}other.token.deadbeef.tmp"
    lookalike = tmp_path / f"{TEMP_PREFIX}api.token.bak.0badc0de.tmp"  # a different file's temp
    unrelated = tmp_path / "api.token.bak"
    for path in (stale, other, lookalike, unrelated):
        path.write_text("x")
    assert remove_stale_temps(tmp_path, {"api.token"}) == 1
    assert not stale.exists()
    assert other.exists() and lookalike.exists() and unrelated.exists()


def test_without_targets_removes_every_temp_of_ours_and_nothing_else(tmp_path):
    atomic_write(tmp_path / "kept.json", b"{}")
    for name in ("a.json.12345678.tmp", "b.json.abcdef01.tmp"):
        (tmp_path / f"{TEMP_PREFIX}{name}").write_text("half")
    (tmp_path / "someone-elses.tmp").write_text("keep")
    assert remove_stale_temps(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json", "someone-elses.tmp"]


# ---- atomic_write: the durability order, observed on the real system calls

import os  # noqa: E402
import stat  # noqa: E402

import pytest  # noqa: E402

from tokensmith import fsutil  # noqa: E402


@pytest.fixture
def syscalls(monkeypatch):
    """Record fsync (with what the descriptor is: file or directory, and its path), replace and
    close in order, while still doing them."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
        calls.append(("fsync", kind, os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "fsync", fsync)
    monkeypatch.setattr(fsutil.os, "replace", replace)
    return calls


def test_atomic_write_fsyncs_the_file_then_renames_then_fsyncs_the_directory(tmp_path, syscalls):
    target = tmp_path / "api.token"
    atomic_write(target, b"new-token")
    assert [call[:2] for call in syscalls] == [("fsync", "file"), ("replace", syscalls[1][1]), ("fsync", "dir")]
    temp = syscalls[1][1]
    assert syscalls[0][2] == temp, "the file fsynced is not the one renamed into place"
    assert syscalls[1][2] == str(target) and syscalls[2][2] == str(tmp_path)
    assert os.path.basename(temp).startswith(TEMP_PREFIX) and os.path.dirname(temp) == str(tmp_path)
    assert target.read_bytes() == b"new-token" and not os.path.exists(temp)


def test_sync_dir_false_still_makes_the_content_durable_before_the_rename(tmp_path, syscalls):
    atomic_write(tmp_path / "state.json", b"{}", sync_dir=False)
    assert [call[:2] for call in syscalls] == [("fsync", "file"), ("replace", syscalls[1][1])]
    assert syscalls[0][2] == syscalls[1][1]


def test_a_failed_fsync_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "api.token"
    target.write_bytes(b"old")

    def fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fsutil.os, "fsync", fsync)
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["api.token"]


def test_the_temp_file_never_has_a_wider_mode_than_asked(tmp_path, syscalls):
    old = os.umask(0)
    try:
        written = atomic_write(tmp_path / "t", b"x" * 10, mode=0o640)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "t").st_mode) == 0o640
    assert (written.st_size, written.st_ino) == (10, os.stat(tmp_path / "t").st_ino)


def test_a_symlink_at_the_path_is_replaced_not_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"theirs")
    (tmp_path / "t").symlink_to(elsewhere)
    atomic_write(tmp_path / "t", b"ours")
    assert elsewhere.read_bytes() == b"theirs" and not (tmp_path / "t").is_symlink()
    assert (tmp_path / "t").read_bytes() == b"ours"


def test_a_relative_path_is_written_in_the_current_directory(tmp_path, monkeypatch, syscalls):
    monkeypatch.chdir(tmp_path)
    atomic_write("rel.token", b"x")
    assert (tmp_path / "rel.token").read_bytes() == b"x"
    assert syscalls[-1] == ("fsync", "dir", str(tmp_path))


def test_a_large_write_is_complete(tmp_path):
    data = os.urandom(3 << 20)
    atomic_write(tmp_path / "big", data)
    assert (tmp_path / "big").read_bytes() == data


def test_the_group_is_set_on_the_file(tmp_path):
    gid = os.getgid()
    assert atomic_write(tmp_path / "g", b"x", gid=gid).st_gid == gid


def test_holds_compares_exact_content_and_refuses_symlinks(tmp_path):
    from tokensmith.fsutil import holds

    (tmp_path / "f").write_bytes(b"abc")
    assert holds(tmp_path / "f", b"abc")
    assert not holds(tmp_path / "f", b"ab") and not holds(tmp_path / "f", b"abcd")
    (tmp_path / "link").symlink_to(tmp_path / "f")
    assert not holds(tmp_path / "link", b"abc") and not holds(tmp_path / "absent", b"abc")
    (tmp_path / "d").mkdir()
    assert not holds(tmp_path / "d", b"")


def test_the_temp_file_is_created_with_its_final_mode_never_briefly_wider(tmp_path, monkeypatch):
    seen = []
    real_fchmod = os.fchmod

    def fchmod(fd, mode):
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))  # as created, before the narrowing
        return real_fchmod(fd, mode)

    monkeypatch.setattr(fsutil.os, "fchmod", fchmod)
    old = os.umask(0)
    try:
        atomic_write(tmp_path / "t", b"x", mode=0o600)
    finally:
        os.umask(old)
    assert seen == [0o600]


def test_descriptors_are_close_on_exec_so_a_hook_child_never_inherits_a_token_file(tmp_path, monkeypatch):
    import fcntl

    flags = []
    real_fsync = os.fsync

    def fsync(fd):
        flags.append(bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC))
        return real_fsync(fd)

    monkeypatch.setattr(fsutil.os, "fsync", fsync)
    atomic_write(tmp_path / "t", b"x")
    assert flags == [True, True]  # the temp file and the directory


def test_a_planted_file_at_the_temp_name_is_never_written_through(tmp_path, monkeypatch):
    monkeypatch.setattr(fsutil.os, "urandom", lambda n: b"\x01" * n)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"theirs")
    (tmp_path / f"{TEMP_PREFIX}t.{'01' * 4}{fsutil.TEMP_SUFFIX}").symlink_to(elsewhere)
    with pytest.raises(FileExistsError):
        atomic_write(tmp_path / "t", b"ours")
    assert elsewhere.read_bytes() == b"theirs" and not (tmp_path / "t").exists()


def test_the_file_keeps_its_owner_when_a_group_is_set(tmp_path):
    written = atomic_write(tmp_path / "g", b"x", gid=os.getgid())
    assert (written.st_uid, os.stat(tmp_path / "g").st_uid) == (os.geteuid(), os.geteuid())


def test_fsync_dir_refuses_a_path_that_is_not_a_directory(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        fsutil.fsync_dir(tmp_path / "f")


def test_remove_stale_temps_in_a_missing_directory_removes_nothing(tmp_path):
    assert remove_stale_temps(tmp_path / "absent") == 0
