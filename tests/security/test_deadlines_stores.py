"""Vault and AWS (botocore) calls end by one absolute deadline too, so a store that drips its answer cannot
hold a worker for ever: Vault goes through tokensmith.transport, whose exchanges have the deadline natively;
urllib3 (under botocore) times out each recv only, so the deadline reaper shuts the call's socket down. Either
way the call fails as a typed, retryable timeout."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from fixtures_stores import fake_aws_env, store_settings
from slow_peers import SlowPeer, drip, interim, response, tls_pair, trailers
from tokensmith.backends import Backends
from tokensmith.config import VaultConfig
from tokensmith.errors import SinkError, SourceError
from tokensmith.sinks import build_sinks
from tokensmith.sources import build_source
from tokensmith.tokens import Token
from tokensmith.vault import VaultClient

TIMEOUT = 1.0
MARGIN = 0.6
STORE = "hostile secret store"
VAULT_BODY = json.dumps({"data": {"data": {"client_id": "cid", "client_secret": "s3cr3t"},
                                  "metadata": {"version": 1}}}).encode()
AWS_BODY = json.dumps({"Name": "slow", "SecretString": json.dumps({"client_id": "cid", "client_secret": "s"})}).encode()
HOSTILE = {  # http.client takes a 1xx other than 100 for the final response: interim ones cannot stall it
    "drip": lambda body: drip(response(body)),
    "endless_trailers": lambda body: trailers(body, interval=0.2),
}
# tokensmith.transport skips interim responses (up to a limit), so a stream of them must end at the deadline
VAULT_HOSTILE = {**HOSTILE, "endless_interim": lambda body: interim(interval=0.2)}


def vault_settings(tmp_path, address, sinks=None, **vault):
    return store_settings(tmp_path, vault={"address": address, "timeout": TIMEOUT, "auth": {"method": "token",
                                                                                           "token": "t"}, **vault},
                          source={"type": "vault", "mount": "secret", "path": "slow"}, sinks=sinks)


def aws_settings(tmp_path, endpoint_url, sinks=None):
    return store_settings(tmp_path, aws={"region": "us-east-1", "endpoint_url": endpoint_url, "timeout": TIMEOUT},
                          source={"type": "aws", "secret_id": "slow"}, sinks=sinks)


def ready(settings) -> Backends:
    """Backends whose clients exist already: the time measured is the call's, not boto3's start-up."""
    backends = Backends(settings)
    if settings.vault:
        backends.vault()
    if settings.aws:
        backends.aws("secretsmanager")
    return backends


def timed(fn, error_cls):
    started = time.monotonic()
    with pytest.raises(error_cls) as caught:
        fn()
    return caught.value, time.monotonic() - started


def assert_timeout(error, elapsed) -> None:
    assert "timed out" in error.message and error.retryable is True, str(error)
    assert error.client == "billing-api"
    assert TIMEOUT - 0.05 <= elapsed < TIMEOUT + MARGIN, elapsed


@pytest.mark.security(threat=STORE, claim="A Vault server that drips its answer, never ends its trailers or "
                      "sends interim responses without end fails the source read as a retryable timeout at the "
                      "deadline.")
@pytest.mark.parametrize("behaviour", list(VAULT_HOSTILE))
def test_vault_read_ends_at_its_deadline(tmp_path, behaviour):
    with SlowPeer(VAULT_HOSTILE[behaviour](VAULT_BODY)) as peer:
        settings = vault_settings(tmp_path, peer.url)
        source = build_source(settings.clients[0], ready(settings))
        error, elapsed = timed(source.read, SourceError)
    assert_timeout(error, elapsed)


@pytest.mark.security(threat=STORE, claim="A Vault sink write to a dripping server fails as a retryable timeout "
                      "at the deadline.")
def test_vault_sink_write_ends_at_its_deadline(tmp_path):
    with SlowPeer(drip(response(VAULT_BODY))) as peer:
        settings = vault_settings(tmp_path, peer.url, sinks=[{"type": "vault", "mount": "secret", "path": "out"}])
        sink = build_sinks(settings.clients[0], ready(settings))[0]
        token = Token(access_token="tok-abc", token_type="Bearer", obtained_at=time.time(),
                      expires_at=time.time() + 3600)
        error, elapsed = timed(lambda: sink.write(token), SinkError)
    assert_timeout(error, elapsed)


@pytest.mark.security(threat=STORE, claim="Over TLS a Vault call past its deadline is still reported as a retryable "
                      "timeout, not as a TLS verification failure.")
def test_vault_over_tls_ends_at_its_deadline_as_a_timeout(tmp_path):
    ca, server_context = tls_pair(tmp_path)
    with SlowPeer(drip(response(VAULT_BODY)), tls=server_context) as peer:
        settings = vault_settings(tmp_path, peer.url, ca_bundle=str(ca))
        source = build_source(settings.clients[0], ready(settings))
        error, elapsed = timed(source.read, SourceError)
    assert_timeout(error, elapsed)


@pytest.mark.security(threat=STORE, claim="An AWS endpoint that drips its answer or never ends its "
                      "trailers fails the source read as a retryable timeout at the deadline.")
@pytest.mark.parametrize("behaviour", list(HOSTILE))
def test_aws_read_ends_at_its_deadline(tmp_path, monkeypatch, behaviour):
    fake_aws_env(monkeypatch, tmp_path)
    with SlowPeer(HOSTILE[behaviour](AWS_BODY)) as peer:
        settings = aws_settings(tmp_path, peer.url)
        source = build_source(settings.clients[0], ready(settings))
        error, elapsed = timed(source.read, SourceError)
    assert_timeout(error, elapsed)
    assert peer.connections == 1  # one attempt: the keeper is the layer that retries


@pytest.mark.security(threat=STORE, claim="An AWS sink write over TLS to a dripping endpoint fails as a retryable "
                      "timeout at the deadline.")
def test_aws_sink_write_over_tls_ends_at_its_deadline(tmp_path, monkeypatch):
    fake_aws_env(monkeypatch, tmp_path)
    ca, server_context = tls_pair(tmp_path)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(ca))
    with SlowPeer(drip(response(AWS_BODY)), tls=server_context) as peer:
        settings = aws_settings(tmp_path, peer.url, sinks=[{"type": "aws", "secret_id": "out"}])
        sink = build_sinks(settings.clients[0], ready(settings))[0]
        token = Token(access_token="tok-abc", token_type="Bearer", obtained_at=time.time(),
                      expires_at=time.time() + 3600)
        error, elapsed = timed(lambda: sink.write(token), SinkError)
    assert_timeout(error, elapsed)


def test_a_finished_call_keeps_its_pooled_connection_past_the_deadline():
    """The deadline ends only calls still running: a keep-alive connection outlives its call's deadline."""
    with SlowPeer(lambda send, stop: send(response(VAULT_BODY))) as peer:
        vault = VaultClient(VaultConfig(address=peer.url, timeout=0.3, auth={"method": "token", "token": "t"}))
        assert vault.read_kv("secret", "slow", 2)["client_id"] == "cid"
        time.sleep(0.5)  # past the first call's deadline
        assert vault.read_kv("secret", "slow", 2)["client_id"] == "cid"
    assert peer.connections == 1


def test_one_reaper_thread_serves_every_call(tmp_path, monkeypatch):
    fake_aws_env(monkeypatch, tmp_path)
    with SlowPeer(lambda send, stop: send(response(AWS_BODY))) as peer:
        settings = aws_settings(tmp_path, peer.url)
        source = build_source(settings.clients[0], ready(settings))
        threads = [threading.Thread(target=lambda: [source.read() for _ in range(20)]) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert [t.name for t in threading.enumerate()].count("deadline-reaper") == 1


@pytest.mark.security(threat=STORE, claim="A Vault answer that is not a JSON object (text after an interim status, "
                      "HTML, a list) is a typed 'unreadable response' error, never an untyped exception.")
@pytest.mark.parametrize("answer", [b"HTTP/1.1 102 Processing\r\n\r\n" + response(b"ok", content_type="text/plain"),
                                    response(b"<html>not vault</html>", content_type="text/html"),
                                    response(b'["a list"]')])
def test_a_vault_answer_that_is_no_json_object_is_a_typed_error(tmp_path, answer):
    with SlowPeer(lambda send, stop: send(answer)) as peer:
        settings = vault_settings(tmp_path, peer.url)
        source = build_source(settings.clients[0], ready(settings))
        error, _ = timed(source.read, SourceError)
    assert "unreadable response" in error.message and error.client == "billing-api"


def test_the_reaper_wakes_a_blocked_recv_at_the_deadline_and_forgets_ended_calls():
    from tokensmith import deadline

    left, right = socket.socketpair()
    with left, right:
        started = time.monotonic()
        with deadline.limit(0.3) as call:
            deadline.REAPER.watch(call, left)
            assert left.recv(10) == b""  # shut down: no byte ever arrived
        assert call.expired and 0.25 <= time.monotonic() - started < 0.3 + MARGIN
    left, right = socket.socketpair()
    with left, right:
        for _ in range(5000):
            with deadline.limit(60) as call:
                deadline.REAPER.watch(call, right)
        assert not call.expired and right.send(b"x") == 1  # ended calls leave their sockets alone
    assert len(deadline.REAPER._heap) < 2 * 1024 + 64
