"""fsutil.make_dirs: the directory itself 0700 and missing parents 0755 whatever the umask, existing
directories left alone, and a file in the way named as such."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from tokensmith.fsutil import atomic_write, make_dirs


@pytest.fixture
def open_umask():
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_directory_is_0700_and_each_missing_parent_0755_under_umask_0(tmp_path, open_umask):
    target = tmp_path / "a" / "b" / "state"
    assert make_dirs(target) is True
    assert (mode(target), mode(tmp_path / "a" / "b"), mode(tmp_path / "a")) == (0o700, 0o755, 0o755)
    assert make_dirs(str(target) + "/") is False  # already there: left as it is


def test_the_modes_given_are_applied_exactly(tmp_path, open_umask):
    assert make_dirs(tmp_path / "p" / "d", 0o750, 0o711) is True
    assert (mode(tmp_path / "p" / "d"), mode(tmp_path / "p")) == (0o750, 0o711)
    make_dirs(tmp_path / "q" / "r" / "d", parent_mode=0o710)
    assert (mode(tmp_path / "q"), mode(tmp_path / "q" / "r")) == (0o710, 0o710)


def test_an_existing_directory_keeps_its_mode(tmp_path, open_umask):
    existing = tmp_path / "shared"
    existing.mkdir(mode=0o775)
    assert make_dirs(existing) is False and mode(existing) == 0o775
    assert make_dirs(existing / "mine") is True and mode(existing) == 0o775 and mode(existing / "mine") == 0o700


def test_a_file_in_the_way_is_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(NotADirectoryError) as caught:
            make_dirs(path)
        assert caught.value.errno == errno.ENOTDIR


def test_an_atomic_write_is_0600_by_default(tmp_path, open_umask):
    atomic_write(tmp_path / "secret", b"token")
    assert mode(tmp_path / "secret") == 0o600
