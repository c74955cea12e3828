"""Secret store outages, against a real OpenBao dev server and botocore talking to a loopback
endpoint: credential reads fall back to the last good credentials in memory, sink writes are
retried until they land, and other clients are unaffected."""

import json
import random

import pytest

from fakes import FakeClock, MemorySink
from tokensmith.backends import Backends
from tokensmith.config import Settings
from tokensmith.devserver import OAuthServer
from tokensmith.keeper import Keeper
from tokensmith.sinks import build_sinks
from tokensmith.sources import build_source
from tokensmith.state import StateStore
from tokensmith.tokenclient import TokenClient

LIFETIME = 300


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def server(clock):
    with OAuthServer(access_lifetime=LIFETIME, clock=clock) as server:
        server.add_client("app", "app-secret")
        yield server


def build(tmp_path, clock, settings):
    backends = Backends(settings)
    store = StateStore(tmp_path / "state")
    store.prepare()
    keepers = {}
    for client in settings.clients:
        sinks = build_sinks(client, backends)
        keeper = Keeper(client, build_source(client, backends), sinks, TokenClient(client, clock=clock), store,
                        clock=clock, rng=random.Random(3))
        keeper.load()
        keepers[client.name] = keeper
    return keepers


def client(name, server, source, sinks, strategy="reissue"):
    return {"name": name, "token_url": server.token_url, "grant": "client_credentials", "source": source,
            "sinks": sinks, "refresh": {"strategy": strategy, "backoff_initial": 1, "backoff_max": 10, "jitter": 0}}


def step(keepers, clock):
    due = min(keeper.next_due() for keeper in keepers.values())
    clock.advance(max(due - clock(), 0))
    for keeper in keepers.values():
        keeper.run_due()


@pytest.mark.parametrize("outage", ["sealed", "stopped"])
def test_vault_outage_uses_last_good_credentials_retries_the_sink_and_spares_other_clients(
        outage, tmp_path, clock, server, vault_kv, openbao, report):
    vault_kv.put("app", {"client_id": "app", "client_secret": "app-secret"})
    file_sink = tmp_path / "other.token"
    settings = Settings(state_dir=tmp_path / "state", runtime_dir=tmp_path, vault=vault_kv.vault_config(), clients=[
        client("vaulted", server, {"type": "vault", "path": vault_kv.path("app")},
               [{"type": "vault", "path": vault_kv.path("app-token")}]),
        client("other", server, {"type": "file", "path": str(tmp_path / "other.json")},
               [{"type": "file", "path": str(file_sink)}])])
    (tmp_path / "other.json").write_text('{"client_id": "app", "client_secret": "app-secret"}')
    (tmp_path / "other.json").chmod(0o600)
    keepers = build(tmp_path, clock, settings)
    step(keepers, clock)
    assert vault_kv.get("app-token")["data"]["access_token"] == keepers["vaulted"].state.access_token

    openbao.seal() if outage == "sealed" else openbao.stop()
    try:
        refreshed = {"vaulted": 0, "other": 0}
        for _ in range(3):
            before = {name: keeper.state.access_token for name, keeper in keepers.items()}
            clock.advance(keepers["vaulted"].refresh_at - clock())
            for keeper in keepers.values():
                keeper.run_due()
            for name, keeper in keepers.items():
                refreshed[name] += keeper.state.access_token != before[name]
                assert keeper.state.expires_at > clock()
            assert keepers["vaulted"].pending_sinks(), "the Vault sink cannot have been written during the outage"
        assert refreshed == {"vaulted": 3, "other": 3}, "tokens kept coming from last-good credentials"
        assert file_sink.read_text() == keepers["other"].state.access_token
    finally:
        openbao.ensure_up()
    if outage == "stopped":
        vault_kv.put("app", {"client_id": "app", "client_secret": "app-secret"})  # dev mode lost its data
    for _ in range(5):
        if not keepers["vaulted"].pending_sinks():
            break
        clock.advance(max(keepers["vaulted"].next_due() - clock(), 0))
        keepers["vaulted"].run_due()
    assert vault_kv.get("app-token")["data"]["access_token"] == keepers["vaulted"].state.access_token
    report.record(f"OpenBao {outage} mid-run", "credentials from memory; Vault sink retried until written; "
                  "other client unaffected", refreshes_during_outage=3)


def test_revoked_vault_token_is_replaced_by_an_approle_login(tmp_path, clock, server, vault_kv, report):
    vault_kv.put("app", {"client_id": "app", "client_secret": "app-secret"})
    auth = vault_kv.approle()
    settings = Settings(state_dir=tmp_path / "state", runtime_dir=tmp_path, vault=vault_kv.vault_config(auth=auth),
                        clients=[client("vaulted", server, {"type": "vault", "path": vault_kv.path("app")},
                                        [{"type": "vault", "path": vault_kv.path("app-token")}])])
    keepers = build(tmp_path, clock, settings)
    keeper = keepers["vaulted"]
    keeper.run_due()
    vault_kv.revoke_logins(auth["mount_point"])
    clock.advance(keeper.next_due() - clock())
    keeper.creds = None  # no fallback: the read itself must succeed after re-authenticating
    outcome = keeper.refresh(reason="test")
    assert outcome.ok and outcome.sinks_ok
    assert vault_kv.get("app-token")["data"]["access_token"] == keeper.state.access_token
    report.record("Vault token revoked", "re-authenticated with AppRole; read and write succeeded")


@pytest.mark.parametrize("status,code", [(400, "ThrottlingException"), (500, "InternalServiceError"),
                                         (503, "ServiceUnavailable")])
def test_aws_throttling_and_5xx(status, code, tmp_path, clock, server, aws_fault_server, report):
    settings = Settings(state_dir=tmp_path / "state", runtime_dir=tmp_path,
                        aws={"region": "us-east-1", "endpoint_url": aws_fault_server.url}, clients=[
                            client("aws", server, {"type": "aws", "secret_id": "creds/app"},
                                   [{"type": "aws", "secret_id": "tokens/app"}])])
    keepers = build(tmp_path, clock, settings)
    keeper = keepers["aws"]
    memory = MemorySink("memory:alongside")
    keeper.sinks.append(memory)
    healthy = json.dumps({"ARN": "arn:aws:secretsmanager:us-east-1:123456789012:secret:creds/app-AbCdEf",
                          "Name": "creds/app", "VersionId": "v1",
                          "SecretString": json.dumps({"client_id": "app", "client_secret": "app-secret"})}).encode()
    aws_fault_server.status, aws_fault_server.body = 200, healthy
    assert keeper.refresh(reason="test").ok

    aws_fault_server.respond(status, code)
    requests_before = aws_fault_server.requests
    outcome = keeper.refresh(reason="test")
    assert outcome.ok, "the last good credentials carry the refresh through the outage"
    assert outcome.sinks["aws:tokens/app"] is not None and memory.current.access_token == keeper.state.access_token
    assert aws_fault_server.requests - requests_before == 2, "botocore must try once per call: the keeper retries"
    assert keeper.pending_sinks() and keeper.next_due() - clock() <= 10

    aws_fault_server.status, aws_fault_server.body = 200, healthy
    clock.advance(keeper.next_due() - clock())
    keeper.run_due()
    assert not keeper.pending_sinks()
    report.record(f"AWS {code} (HTTP {status})", "typed retryable error, one request per call; other sinks "
                  "written; AWS sink retried with backoff", requests_per_call=1)


def test_vault_down_at_start_up_is_not_a_config_error(tmp_path, clock, server, vault_kv, openbao, report):
    """A store that is down when the daemon starts is retried, not treated as a bad config (which
    would exit 78 and stop systemd from restarting it)."""
    vault_kv.put("app", {"client_id": "app", "client_secret": "app-secret"})
    settings = Settings(state_dir=tmp_path / "state", runtime_dir=tmp_path, vault=vault_kv.vault_config(), clients=[
        client("vaulted", server, {"type": "file", "path": str(tmp_path / "creds.json")},
               [{"type": "vault", "path": vault_kv.path("app-token")}])])
    (tmp_path / "creds.json").write_text('{"client_id": "app", "client_secret": "app-secret"}')
    (tmp_path / "creds.json").chmod(0o600)
    openbao.stop()
    try:
        keepers = build(tmp_path, clock, settings)
        keepers["vaulted"].check_sinks()
        keepers["vaulted"].run_due()
        assert keepers["vaulted"].pending_sinks()
    finally:
        openbao.ensure_up()
    clock.advance(keepers["vaulted"].next_due() - clock())
    keepers["vaulted"].run_due()
    assert vault_kv.get("app-token")["data"]["access_token"] == keepers["vaulted"].state.access_token
    report.record("OpenBao down at start-up", "sink check logged and retried; token written once it came back")
