"""A real `tokensmith run` leading on the vault backend: once it has written a client's record
itself, its later refreshes of that client go to OpenBao once (the check-and-set write), not twice
(no re-read before each exchange); /metrics counts the store operations actually made."""

from __future__ import annotations

import re

import pytest
import requests

from daemon_harness import Project, wait_for
from tokensmith.devserver import OAuthServer


@pytest.fixture
def server():
    with OAuthServer(access_lifetime=300) as server:
        yield server


def store_ops(metrics: str, op: str) -> int:
    found = re.search(r'tokensmith_state_store_duration_seconds_count\{op="%s"\} ([0-9.]+)' % op, metrics)
    return int(float(found.group(1))) if found else 0


def test_a_leader_does_not_reread_what_it_wrote_itself(tmp_path, server, vault_kv):
    project = Project(tmp_path, server, state={"type": "vault", "mount": "secret", "prefix": vault_kv.prefix},
                      vault=vault_kv.vault_config(), leader={"lease_ttl": 6, "renew_every": 1})
    project.add_client("quick", lifetime=2, timeout=2)
    daemon = project.start()
    try:
        port = daemon.health_port(timeout=30)
        wait_for(lambda: server.stats["issued"] >= 6, timeout=30, interval=0.1)
        metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        daemon.stop()
    counts = {op: store_ops(metrics, op) for op in ("load_if_changed", "save", "load_all")}
    assert server.stats["issued"] >= 6 and counts["save"] >= 5 and counts["load_all"] == 1, counts
    # the first refresh reads the record (this leader has not written it yet); the later ones were its
    # own writes: no read. (2: one retry, should a slow renewal on a loaded machine refuse a request.)
    assert 1 <= counts["load_if_changed"] <= 2, counts
