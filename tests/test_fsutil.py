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
