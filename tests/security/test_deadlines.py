"""Every exchange with a token, revocation, introspection or --verify-url endpoint ends by one absolute
deadline: a peer that drips its answer, streams interim responses or never ends its trailers gets a
typed, retryable timeout at `timeout` seconds, not a worker held for ever."""

from __future__ import annotations

import time

import pytest

from slow_peers import SlowPeer, drip, interim, response, tls_pair, trailers
from tokensmith.compromise import verify_with_resource
from tokensmith.config import ClientConfig
from tokensmith.errors import TokenEndpointError
from tokensmith.sources import Credentials
from tokensmith.tokenclient import TokenClient
from tokensmith.transport import MAX_INTERIM

TIMEOUT = 1.0
MARGIN = 0.6  # thread start-up and a loaded CI machine; the dripping peers would take minutes
TOKEN = response(b'{"access_token":"tok-from-a-slow-peer","token_type":"Bearer","expires_in":3600}')
CREDS = Credentials(client_id="cid", client_secret="s3cr3t-Client-Secret-7Hq2")
SLOW = "hostile or slow provider"


def client_for(url: str, timeout: float = TIMEOUT, **fields) -> TokenClient:
    config = ClientConfig(name="slow-api", token_url=url + "/token", source={"type": "env"}, timeout=timeout,
                          sinks=[{"type": "file", "path": "/run/tokensmith/slow-api.token"}], **fields)
    return TokenClient(config)


def timed(fn):
    started = time.monotonic()
    with pytest.raises(TokenEndpointError) as caught:
        fn()
    return caught.value, time.monotonic() - started


def assert_timeout(error: TokenEndpointError, elapsed: float) -> None:
    assert error.error == "timeout" and error.retryable is True, str(error)
    assert "timed out" in str(error) and error.client == "slow-api"
    assert TIMEOUT - 0.05 <= elapsed < TIMEOUT + MARGIN, elapsed


HOSTILE = {
    "drip": drip(TOKEN),
    "interim_responses": interim(interval=0.2),
    "endless_trailers": trailers(b'{"access_token":"tok","expires_in":3600}', interval=0.2),
}


@pytest.mark.security(threat=SLOW, claim="A token endpoint that drips a valid response, streams interim 1xx "
                      "responses or never ends its trailers gets a retryable timeout when the exchange's one "
                      "absolute deadline passes.")
@pytest.mark.parametrize("behaviour", list(HOSTILE))
def test_token_exchange_ends_at_its_deadline(behaviour):
    with SlowPeer(HOSTILE[behaviour]) as peer:
        error, elapsed = timed(lambda: client_for(peer.url).obtain("client_credentials", CREDS))
    assert_timeout(error, elapsed)


@pytest.mark.security(threat=SLOW, claim="Revocation and introspection requests have the same absolute deadline "
                      "as the token request.")
@pytest.mark.parametrize("call", ["revoke", "introspect"])
def test_revocation_and_introspection_end_at_their_deadline(call):
    with SlowPeer(drip(response(b'{"active":false}'))) as peer:
        client = client_for(peer.url, revocation_url=peer.url + "/revoke", introspection_url=peer.url + "/introspect")
        if call == "revoke":
            error, elapsed = timed(lambda: client.revoke("old-access-token", "access_token", CREDS))
        else:
            error, elapsed = timed(lambda: client.introspect("old-access-token", CREDS))
    assert_timeout(error, elapsed)


@pytest.mark.security(threat=SLOW, claim="The deadline covers the TLS session too: a response dripped over TLS "
                      "ends at the deadline.")
def test_tls_exchange_ends_at_its_deadline(tmp_path):
    ca, server_context = tls_pair(tmp_path)
    with SlowPeer(drip(TOKEN), tls=server_context) as peer:
        error, elapsed = timed(lambda: client_for(peer.url, ca_bundle=ca).obtain("client_credentials", CREDS))
    assert_timeout(error, elapsed)


@pytest.mark.security(threat=SLOW, claim="Interim responses and trailer lines are bounded in number, so a fast "
                      "endless stream of them fails at once, without waiting for the deadline.")
@pytest.mark.parametrize("act", [interim(interval=0), trailers(b"{}", interval=0)], ids=["interim", "trailers"])
def test_fast_endless_interim_responses_or_trailers_are_cut_off(act):
    with SlowPeer(act) as peer:
        client = client_for(peer.url, timeout=30.0)
        error, elapsed = timed(lambda: client.obtain("client_credentials", CREDS))
    assert error.error == "unreachable" and error.retryable is True, str(error)
    assert elapsed < 5


@pytest.mark.security(threat=SLOW, claim="The --verify-url check goes through the same transport: a protected "
                      "resource that drips its answer is reported as timed out at the deadline.")
@pytest.mark.parametrize("behaviour", ["drip", "interim_responses"])
def test_verify_url_request_ends_at_its_deadline(behaviour):
    with SlowPeer(HOSTILE[behaviour]) as peer:
        started = time.monotonic()
        result = verify_with_resource(peer.url + "/resource", "old-access-token", "new-access-token",
                                      timeout=TIMEOUT)
        elapsed = time.monotonic() - started
    assert result.startswith("error: timed out"), result
    assert "old-access-token" not in result and "new-access-token" not in result
    assert elapsed < TIMEOUT + MARGIN, elapsed


def test_verify_url_uses_the_clients_ca_bundle_and_follows_no_redirect(tmp_path):
    ca, server_context = tls_pair(tmp_path)
    seen = []

    def answer(send, stop):
        seen.append(1)
        if len(seen) == 1:
            send(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
        else:
            send(b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/\r\nContent-Length: 0\r\n\r\n")

    with SlowPeer(answer, tls=server_context) as peer:
        assert verify_with_resource(peer.url, "old", "new", timeout=TIMEOUT) == "error: TLS verification failed"
        assert seen == []  # nothing went over the unverified channel
        assert verify_with_resource(peer.url, "old", "new", timeout=TIMEOUT, ca_bundle=ca) \
            == "failed: new token got HTTP 302"


@pytest.mark.parametrize("interims, ok", [(MAX_INTERIM, True), (MAX_INTERIM + 1, False)])
def test_up_to_ten_interim_responses_are_skipped(interims, ok):
    answer = b"HTTP/1.1 102 Processing\r\n\r\n" * interims + TOKEN
    with SlowPeer(lambda send, stop: send(answer)) as peer:
        client = client_for(peer.url)
        if ok:
            assert client.obtain("client_credentials", CREDS).access_token == "tok-from-a-slow-peer"
        else:
            error, _ = timed(lambda: client.obtain("client_credentials", CREDS))
            assert error.error == "unreachable" and error.retryable


@pytest.mark.parametrize("lines, ok", [(99, True), (100, False)])
def test_trailer_lines_are_bounded_like_header_lines(lines, ok):
    body = b'{"access_token":"tok-with-trailers","expires_in":3600}'
    answer = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + f"{len(body):x}\r\n".encode() + body
              + b"\r\n0\r\n" + b"X-Trailer: 1\r\n" * lines + b"\r\n")
    with SlowPeer(lambda send, stop: send(answer)) as peer:
        client = client_for(peer.url)
        if ok:
            assert client.obtain("client_credentials", CREDS).access_token == "tok-with-trailers"
        else:
            error, _ = timed(lambda: client.obtain("client_credentials", CREDS))
            assert error.error == "unreachable" and error.retryable
