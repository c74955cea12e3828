"""The issue's done-when: one config with a Vault-sourced password+refresh_token client (form
dialect), an AWS-sourced client_credentials client (Basic dialect) and a JSON-dialect client keeps
all three tokens fresh in their file, Vault and AWS sinks across a daemon restart.

Real processes and real servers on loopback: `tokensmith run`, OpenBao dev server, moto's server,
the stateful token endpoint."""

import json
import time
import uuid

import boto3
import pytest

from daemon_harness import Project, wait_for
from fixtures_stores import AWS_ENV
from tokensmith.devserver import OAuthServer


@pytest.fixture
def server():
    with OAuthServer(access_lifetime=3) as server:
        yield server


def test_three_dialects_three_stores_fresh_across_a_restart(tmp_path, server, vault_kv, moto_server):
    run = uuid.uuid4().hex[:8]
    aws_env = {**AWS_ENV, "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    sm = boto3.client("secretsmanager", region_name=AWS_ENV["AWS_REGION"], endpoint_url=moto_server,
                      aws_access_key_id="testing", aws_secret_access_key="testing")

    project = Project(tmp_path, server, vault=vault_kv.vault_config(auth=vault_kv.approle()),
                      aws={"region": AWS_ENV["AWS_REGION"], "endpoint_url": moto_server})
    refresh = {"min_lead": 0, "backoff_initial": 0.05, "backoff_max": 0.5}

    server.add_client("inventory", "inventory-secret", dialect="post", users={"alice": "alice-pw"}, access_lifetime=3)
    vault_kv.put("inventory", {"client_id": "inventory", "client_secret": "inventory-secret",
                               "username": "alice", "password": "alice-pw"})
    project.clients.append({
        "name": "inventory", "token_url": server.token_url, "grant": "password", "auth_style": "post",
        "source": {"type": "vault", "mount": "secret", "path": vault_kv.path("inventory")}, "refresh": refresh,
        "sinks": [{"type": "file", "path": str(project.token_path("inventory"))},
                  {"type": "vault", "mount": "secret", "path": vault_kv.path("inventory-token")}]})

    server.add_client("reports", "reports-secret", dialect="basic", access_lifetime=3)
    sm.create_secret(Name=f"creds/reports-{run}", SecretString=json.dumps(
        {"id": "reports", "secret": "reports-secret"}))
    project.clients.append({
        "name": "reports", "token_url": server.token_url, "grant": "client_credentials", "auth_style": "basic",
        "source": {"type": "aws", "secret_id": f"creds/reports-{run}",
                   "keys": {"client_id": "id", "client_secret": "secret"}}, "refresh": refresh,
        "sinks": [{"type": "file", "path": str(project.token_path("reports")), "format": "json"},
                  {"type": "aws", "secret_id": f"tokens/reports-{run}"}]})

    project.add_client("billing", dialect="json", lifetime=3, fmt="env", refresh=refresh)

    def tokens_everywhere():
        vault_doc = vault_kv.get("inventory-token")["data"]
        aws_doc = json.loads(sm.get_secret_value(SecretId=f"tokens/reports-{run}")["SecretString"])
        return {
            "inventory": (project.token("inventory"), vault_doc["access_token"]),
            "reports": (json.loads(project.token("reports"))["access_token"], aws_doc["access_token"]),
            "billing": (project.token("billing").splitlines()[0].split("=", 1)[1].strip("'"),),
        }

    def all_fresh():
        try:
            current = tokens_everywhere()
        except Exception:
            return False
        return all(server.is_active(token) for copies in current.values() for token in copies) and \
            all(len(set(copies)) == 1 for copies in current.values())

    daemon = project.start(env=aws_env)
    try:
        wait_for(all_fresh, timeout=20)
        first = tokens_everywhere()
        # two lifetimes later every sink holds a newer, valid token
        time.sleep(4)
        wait_for(all_fresh, timeout=5)
        later = tokens_everywhere()
        assert all(later[name] != first[name] for name in first)
        assert server.stats["refresh_exchanges"] >= 1, "the form client should refresh with its refresh token"
    finally:
        assert daemon.stop() == 0, daemon.log

    before_restart = tokens_everywhere()
    exchanges = server.stats["refresh_exchanges"]
    again = project.start(env=aws_env)
    try:
        wait_for(lambda: again.socket_up(), timeout=15)
        wait_for(all_fresh, timeout=15)
        time.sleep(4)
        wait_for(all_fresh, timeout=5)
        assert all(tokens_everywhere()[name] != before_restart[name] for name in before_restart)
        # the refresh-token chain survived the restart: it was exchanged again, never reused
        assert server.stats["refresh_exchanges"] > exchanges
        assert server.stats["refresh_reuse"] == 0 and "falling back" not in again.log
    finally:
        assert again.stop() == 0, again.log
