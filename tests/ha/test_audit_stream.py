"""A compromise rotation's audit record survives a pod loss: it is one JSON line at INFO with
event=audit in the log stream, and with a shared state backend it is stored there too."""

from __future__ import annotations

import json

import pytest

from daemon_harness import Project
from tokensmith.devserver import OAuthServer
from tokensmith.tokens import fingerprint


@pytest.fixture
def server():
    with OAuthServer(access_lifetime=300) as server:
        yield server


def test_rotate_compromised_audits_to_the_log_stream_and_to_vault(tmp_path, server, vault_kv):
    project = Project(tmp_path, server, vault=vault_kv.vault_config(),
                      state={"type": "vault", "mount": "secret", "prefix": vault_kv.prefix})
    project.add_client("inv", grant="password", users={"alice": "pw-alice"})
    project.write()
    first = project.cli("once")
    assert first.returncode == 0, first.stderr
    old = project.token("inv")
    result = project.cli("rotate", "inv", "--compromised", "--json", "--log-format", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    new = project.token("inv")
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    [audit] = [line for line in lines if line.get("event") == "audit"]
    assert audit["level"] == "INFO" and audit["client"] == "inv"
    record = json.loads(audit["message"])
    assert record["old_token"] == fingerprint(old) and record["new_token"] == fingerprint(new)
    assert record["result"] == "rotated"
    keys = vault_kv.root.secrets.kv.v2.list_secrets(f"{vault_kv.prefix}/audit", mount_point="secret")["data"]["keys"]
    [key] = keys
    stored = vault_kv.get(f"audit/{key}")["data"]
    assert stored == record
    everything = result.stdout + result.stderr + json.dumps(stored)
    for secret in (old, new, "pw-alice", "inv-secret-value", *server.issued_refresh_tokens("inv")):
        assert secret not in everything
