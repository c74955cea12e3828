"""Local disk faults on a real small tmpfs: a full or read-only sink directory never costs the
token file already there, the write is retried and lands once the disk recovers; a full state
directory does not stop consumers from getting fresh tokens."""

import os
import random
import subprocess
import uuid

import pytest

from fakes import FakeClock, StaticSource
from tokensmith.config import ClientConfig
from tokensmith.devserver import OAuthServer
from tokensmith.keeper import Keeper
from tokensmith.sinks.file import FileSink
from tokensmith.state import StateStore
from tokensmith.tokenclient import TokenClient


@pytest.fixture
def tmpfs(tmp_path):
    """A 256 KiB tmpfs. Tests run as root in CI and on developer machines here; mounting is how a
    full disk is made real. Without the privilege this fixture fails: it does not skip."""
    mount = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"cannot mount a tmpfs (needs root): {result.stderr.strip()}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory):
    """Fill the filesystem to the last byte (unbuffered: every byte that fits is written)."""
    fd = os.open(directory / "ballast", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


def remount(directory, mode):
    subprocess.run(["mount", "-o", f"remount,{mode}", str(directory)], check=True)


def file_keeper(server, clock, sink_path, state_dir, grant="client_credentials"):
    server.add_client("c", "c-secret", users={"alice": "pw"})
    config = ClientConfig(name="c", token_url=server.token_url, grant=grant, source={"type": "env"},
                          sinks=[{"type": "file", "path": str(sink_path)}],
                          refresh={"backoff_initial": 1, "backoff_max": 10})
    sink = FileSink(config.sinks[0], "c")
    sink.check()
    store = StateStore(state_dir)
    store.prepare()
    source = StaticSource(client_id="c", client_secret="c-secret", username="alice", password="pw")
    keeper = Keeper(config, source, [sink], TokenClient(config, clock=clock), store, clock=clock,
                    rng=random.Random(1))
    keeper.load()
    return keeper


@pytest.fixture
def setup(tmp_path, tmpfs):
    clock = FakeClock()
    server = OAuthServer(access_lifetime=600, clock=clock).start()
    yield file_keeper(server, clock, tmpfs / "c.token", tmp_path / "state"), clock, server, tmpfs
    server.stop()


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_sink_directory_fault_keeps_the_old_file_and_retries(fault, setup, report):
    keeper, clock, server, tmpfs = setup
    keeper.run_due()
    token_file = tmpfs / "c.token"
    first = token_file.read_text()
    if fault == "full":
        fill(tmpfs)
    else:
        remount(tmpfs, "ro")
    attempts = 0
    try:
        clock.advance(keeper.next_due() - clock())
        for _ in range(4):
            keeper.run_due()
            attempts += 1
            assert token_file.read_text() == first, "the token file already there was damaged"
            assert keeper.pending_sinks()
            assert keeper.next_due() - clock() <= 10
            clock.advance(keeper.next_due() - clock())
        assert not [p for p in os.listdir(tmpfs) if p.endswith(".tmp")], "temp files left on the full disk"
    finally:
        if fault == "full":
            (tmpfs / "ballast").unlink()
        else:
            remount(tmpfs, "rw")
    issued = server.stats["issued"]
    keeper.run_due()
    assert token_file.read_text() == keeper.state.access_token != first
    assert server.stats["issued"] == issued, "the pending sink got the existing token, not a new one"
    report.record(f"sink directory {fault} (256 KiB tmpfs)",
                  "old token file intact; write retried with backoff and landed after recovery",
                  failed_writes=attempts)


def test_full_state_directory_still_gets_consumers_a_fresh_token(tmp_path, tmpfs, report):
    clock = FakeClock()
    with OAuthServer(access_lifetime=600, clock=clock) as server:
        keeper = file_keeper(server, clock, tmp_path / "c.token", tmpfs / "state", grant="password")
        keeper.run_due()
        saved = (tmpfs / "state" / "c.json").read_text()
        fill(tmpfs)
        try:
            clock.advance(keeper.next_due() - clock())
            keeper.run_due()
            assert (tmpfs / "state" / "c.json").read_text() == saved, "the durable state was damaged"
            assert (tmp_path / "c.token").read_text() == keeper.state.access_token
            assert server.is_active(keeper.state.access_token)
            assert keeper.state_unsaved and "not durable" in keeper.status()["last_error"]
            unsaved = keeper.state.refresh_token
            exchanges = server.stats["refresh_exchanges"]
            refreshes_while_full = 0
            for _ in range(2):  # the disk is still full: the next refreshes must not spend `unsaved`
                clock.advance(keeper.next_due() - clock())
                keeper.run_due()
                refreshes_while_full += 1
                assert keeper.state.last_grant == "password", "a refresh token that is not durable was spent"
                assert (tmp_path / "c.token").read_text() == keeper.state.access_token
                assert server.is_active(keeper.state.access_token) and keeper.state_unsaved
            exchanges_while_full = server.stats["refresh_exchanges"] - exchanges
            assert exchanges_while_full == 0
            assert unsaved not in (tmpfs / "state" / "c.json").read_text()
        finally:
            (tmpfs / "ballast").unlink()
        clock.advance(keeper.next_due() - clock())
        keeper.run_due()
        assert not keeper.state_unsaved and keeper.state.last_grant == "refresh_token"
        assert keeper.state.access_token in (tmpfs / "state" / "c.json").read_text()
        assert server.stats["refresh_reuse"] == 0
        report.record("state directory full mid-run (256 KiB tmpfs)",
                      "sinks still get fresh tokens; while the disk stays full, refreshes use the primary grant "
                      "instead of spending the refresh token that could not be saved; the exchange resumes once "
                      "state is durable", refreshes_while_full=refreshes_while_full,
                      exchanges_while_full=exchanges_while_full,
                      refresh_token_reuse=server.stats["refresh_reuse"])
