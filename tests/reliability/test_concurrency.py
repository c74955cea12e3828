"""Concurrency in a real daemon: many clients refreshing at once, config reloads in the middle
of refreshes, manual rotations racing scheduled ones — each refresh token is spent exactly once."""

import re
import signal
import threading
import time

import pytest

from daemon_harness import Project, wait_for
from tokensmith.devserver import OAuthServer

CLIENTS = 40


@pytest.fixture
def server():
    with OAuthServer(access_lifetime=2) as server:
        yield server


@pytest.mark.slow
def test_many_clients_reloads_and_rotations_at_once(tmp_path, server, report):
    project = Project(tmp_path, server, scheduler={"max_workers": 4})
    fast = {"at_fraction": 0.5, "jitter": 0.1}
    for index in range(CLIENTS):
        project.add_client(f"c{index:02d}", grant="password", users={"u": "pw"}, lifetime=2, refresh=fast)
    daemon = project.start()
    try:
        daemon.wait_ready(timeout=30)
        stop = threading.Event()
        rotations = []

        def rotate_loop():
            index = 0
            while not stop.is_set():
                result = project.cli("rotate", f"c{index % CLIENTS:02d}", "--compromised")
                rotations.append((result.returncode, result.stdout[-600:] + result.stderr[-600:]))
                index += 7

        rotator = threading.Thread(target=rotate_loop)
        rotator.start()
        reloads = 0
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            # alternate a changed and the original refresh policy for a third of the clients
            for client in project.clients[: CLIENTS // 3]:
                client["refresh"]["min_lead"] = 0.2 if reloads % 2 else 0
            project.write()
            daemon.signal(signal.SIGHUP)
            reloads += 1
            # one reload applied before the next is written: SIGHUPs sent while one is pending coalesce
            wait_for(lambda: daemon.log.count("config reloaded:") >= reloads, timeout=30)
            time.sleep(0.5)
        stop.set()
        rotator.join()
        # each reload logs one summary line: "config reloaded: ..., N changed (...); M clients"
        changed = [int(n) for n in re.findall(r"config reloaded: .*?, (\d+) changed", daemon.log)]
        assert changed == [0] + [CLIENTS // 3] * (reloads - 1)  # the first write repeats the original policy
        for client in project.clients:
            assert server.is_active(project.token(client["name"])) or \
                wait_for(lambda: server.is_active(project.token(client["name"])), timeout=10)
        assert rotations and [output for code, output in rotations if code] == []
        assert server.stats["refresh_reuse"] == 0
        assert "invalid_grant" not in daemon.log and "rejected" not in daemon.log
        report.record(f"{CLIENTS} clients refreshing every ~1 s, a SIGHUP reload every ~0.5 s, "
                      "compromise rotations in a loop", "no refresh token presented twice; every rotation succeeded; all tokens "
                      "valid at the end",
                      refresh_exchanges=server.stats["refresh_exchanges"], reloads=reloads,
                      compromise_rotations=len(rotations), refresh_token_reuse=server.stats["refresh_reuse"])
    finally:
        assert daemon.stop() == 0
