"""At the daemon: a refresh against a dripping endpoint becomes an ordinary retryable failure (counted,
shown in status, and a rotate answers), and a keeper stuck past every deadline of its calls makes the
daemon unhealthy with one keeper_stuck log line."""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from urllib.error import HTTPError

import pytest

from daemon_harness import Project, wait_for, write_private
from fakes import FakeClock
from slow_peers import SlowPeer, drip, response
from tokensmith.cli import format_status_line
from tokensmith.config import Settings, load_settings
from tokensmith.daemon import Daemon
from tokensmith.health import HealthServer
from tokensmith.metrics import Metrics

TIMEOUT = 1.0
MARGIN = 0.6
TOKEN = response(b'{"access_token":"tok-from-a-slow-peer","token_type":"Bearer","expires_in":3600}')


def healthz(health: HealthServer) -> int:
    host, port = health.address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=5) as reply:
            return reply.status
    except HTTPError as error:
        return error.code


@pytest.mark.security(threat="hostile or slow provider", claim="A token endpoint that drips its answer costs one "
                      "refresh attempt: it fails at the deadline as a retryable timeout that status, the log and the "
                      "metrics show, and a rotate for that client answers.")
def test_a_dripping_endpoint_is_an_ordinary_failure_and_rotate_answers(tmp_path):
    creds = write_private(tmp_path / "creds.json", {"client_id": "cid", "client_secret": "s3cr3t-value"})
    with SlowPeer(drip(TOKEN)) as peer:
        settings = Settings(state_dir=tmp_path / "state", runtime_dir=tmp_path / "run", clients=[{
            "name": "slow-api", "token_url": peer.url + "/token", "timeout": TIMEOUT,
            "source": {"type": "file", "path": str(creds)},
            "refresh": {"backoff_initial": 30, "backoff_max": 60},
            "sinks": [{"type": "file", "path": str(tmp_path / "slow-api.token")}]}])
        daemon = Daemon(settings, serve=False)
        daemon.metrics = Metrics(keepers=lambda: daemon.keepers, process=False)
        daemon.build()
        daemon.start()
        try:
            keeper = daemon.keepers["slow-api"]
            # the whole dripped answer would take half a minute; the deadline ends the attempt after one second
            wait_for(lambda: keeper.failures >= 1, timeout=TIMEOUT + 2)
            status = daemon.statuses()[0]
            assert status["failures"] >= 1 and "timed out" in status["last_error"]
            assert daemon.metrics.sample("tokensmith_refresh_failures_total",
                                         {"client": "slow-api", "reason": "timeout"}) >= 1
            rotated_at = time.monotonic()
            outcome = daemon.refresh_now("slow-api", reason="manual")
            assert not outcome.ok and outcome.error.retryable and "timed out" in str(outcome.error)
            assert time.monotonic() - rotated_at < TIMEOUT + MARGIN
        finally:
            daemon.stop()


class BlockingSink:
    """A sink whose write hangs until released: a keeper stuck with its lock held."""

    type = "memory"
    name = "memory:blocking"

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()

    def check(self):
        pass

    def write(self, token):
        self.entered.set()
        self.release.wait(30)


@pytest.mark.security(threat="hostile or slow provider", claim="A keeper whose run is stuck longer than every "
                      "deadline of its calls plus a grace makes /healthz answer 503, is shown in status, and is "
                      "logged once as keeper_stuck.")
def test_a_stuck_keeper_makes_the_daemon_unhealthy_and_is_logged_once(tmp_path, oauth, caplog):
    project = Project(tmp_path, oauth)
    project.add_client("stuck", timeout=2)
    project.add_client("fine")
    settings = load_settings(project.write())
    clock = FakeClock(time.time())
    daemon = Daemon(settings, project.config, serve=False, clock=clock)
    daemon.build()
    sink = BlockingSink()
    daemon.keepers["stuck"].sinks = [sink]
    health = HealthServer("127.0.0.1:0", daemon)
    caplog.set_level(logging.ERROR, logger="tokensmith.daemon")
    daemon.start()
    health.start()
    try:
        assert sink.entered.wait(10)
        wait_for(lambda: daemon.keepers["fine"].ready())
        assert healthz(health) == 200  # busy, but not for longer than its calls may take
        limit = daemon.stuck_after(daemon.keepers["stuck"].client)
        assert limit >= 2 * 2 + 30  # two token requests of 2 s, and the grace
        clock.advance(limit + 1)
        assert healthz(health) == 503
        assert not daemon.healthy()
        stuck = [record for record in caplog.records if getattr(record, "event", None) == "keeper_stuck"]
        assert [(record.client, record.levelname) for record in stuck] == [("stuck", "ERROR")]
        statuses = {status["client"]: status for status in daemon.statuses()}
        assert statuses["stuck"]["stuck_for"] >= limit and "stuck_for" not in statuses["fine"]
        assert "STUCK for" in format_status_line(statuses["stuck"])
        sink.release.set()
        wait_for(lambda: daemon.keepers["stuck"].busy_since is None)
        assert daemon.healthy() and healthz(health) == 200
    finally:
        sink.release.set()
        health.stop()
        daemon.stop()
