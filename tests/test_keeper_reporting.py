"""What the keeper reports about a failed refresh: error text cut against every secret and token it
holds, the alert a rejected client authentication raises, the log line's reason, and the status of a
refresh in progress. The token client is the real one against the real token endpoint; where a
layer below must fail in a way the endpoint cannot produce, a wrapper raises that error instead."""

from __future__ import annotations

import base64
import logging
import random

import pytest

from fakes import FakeClock, MemorySink, StaticSource
from tokensmith.config import ClientConfig
from tokensmith.devserver import OAuthServer
from tokensmith.errors import InternalError, SourceError, TokenEndpointError
from tokensmith.keeper import Keeper, _internal
from tokensmith.redact import MARK
from tokensmith.state import StateStore
from tokensmith.tokenclient import TokenClient


class ScriptedTokenClient:
    """The real token client, except that queued errors are raised (one per request) first."""

    def __init__(self, real):
        self.real = real
        self.errors = []
        self.grants = []

    def obtain(self, grant, creds, refresh_token=None):
        self.grants.append(grant)
        if self.errors:
            raise self.errors.pop(0)
        return self.real.obtain(grant, creds, refresh_token=refresh_token)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def server(clock):
    with OAuthServer(access_lifetime=600, clock=clock) as server:
        server.add_client("app", "app-secret", dialect="post", users={"alice": "alice-password"})
        yield server


def make_keeper(server, clock, tmp_path, *, auth_style="post", refresh=None, source=None, sinks=None):
    config = ClientConfig(name="c1", token_url=server.token_url, grant="password", auth_style=auth_style,
                          source={"type": "env"}, sinks=[{"type": "file", "path": "/unused"}], refresh=refresh or {})
    source = source or StaticSource(client_id="app", client_secret="app-secret", username="alice",
                                    password="alice-password")
    store = StateStore(tmp_path / "state")
    store.prepare()
    client = ScriptedTokenClient(TokenClient(config, clock=clock))
    keeper = Keeper(config, source, sinks if sinks is not None else [MemorySink()], client, store, clock=clock,
                    rng=random.Random(1))
    keeper.load()
    return keeper


def test_a_failure_that_quotes_secrets_and_tokens_is_cut_before_it_is_kept_or_returned(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path, refresh={"strategy": "refresh_token"})
    keeper.run_due()
    access, dead_refresh = keeper.state.access_token, keeper.state.refresh_token
    assert access and dead_refresh
    basic = base64.b64encode(b"app:app-secret").decode()
    # the exchange is refused (the refresh token is dropped from state), then the primary grant fails
    # with text that quotes the client secret, the password, the Basic pair and the old token pair
    keeper.token_client.errors = [
        TokenEndpointError("refresh token refused", error="invalid_grant", retryable=False),
        TokenEndpointError(f"provider echoed secret=app-secret password=alice-password Basic {basic} "
                           f"access={access} refresh={dead_refresh} end", error="server_error", retryable=True)]
    outcome = keeper.refresh(reason="test")
    assert keeper.token_client.grants[-2:] == ["refresh_token", "password"]
    assert keeper.state.refresh_token is None
    message = outcome.error.message
    assert message == (f"provider echoed secret={MARK} password={MARK} Basic {MARK} access={MARK} "
                       f"refresh={MARK} end")
    assert outcome.error.args == (message,)
    assert keeper.state.last_error == message and keeper.status()["last_error"] == message


@pytest.mark.parametrize("style", ["basic", "post", "json", "query"])
def test_invalid_client_with_a_secret_asks_for_the_secret_to_be_rotated(server, clock, tmp_path, style, caplog):
    keeper = make_keeper(server, clock, tmp_path, auth_style=style)
    keeper.token_client.errors = [TokenEndpointError("client authentication failed", error="invalid_client",
                                                     retryable=False)]
    with caplog.at_level(logging.INFO, logger="tokensmith.keeper"):
        keeper.refresh(reason="test")
    assert keeper.state.alert == "invalid_client: the provider rejected the client secret; rotate it in the source"
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "refresh_failed"]
    assert line.levelno == logging.CRITICAL and line.reason == "invalid_client"


def test_invalid_client_with_a_key_names_the_method_and_the_cut_answer(server, clock, tmp_path, caplog):
    keeper = make_keeper(server, clock, tmp_path, auth_style="private_key_jwt")
    answer = "assertion signature does not verify " + "x" * 200
    keeper.token_client.errors = [TokenEndpointError(answer, error="invalid_client", retryable=False)]
    with caplog.at_level(logging.INFO, logger="tokensmith.keeper"):
        keeper.refresh(reason="test")
    assert keeper.state.alert == (f"invalid_client: the provider rejected the client's private_key_jwt authentication "
                                  f"({answer[:160]}); check the key, certificate or assertion in the source")
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "refresh_failed"]
    assert line.levelno == logging.CRITICAL


def test_client_material_that_cannot_be_used_is_a_critical_alert(server, clock, tmp_path, caplog):
    keeper = make_keeper(server, clock, tmp_path, auth_style="private_key_jwt")
    answer = "private key in the source is not a PEM key " + "y" * 200
    keeper.token_client.errors = [TokenEndpointError(answer, error="invalid_client_material", retryable=False)]
    with caplog.at_level(logging.INFO, logger="tokensmith.keeper"):
        keeper.refresh(reason="test")
    assert keeper.state.alert == f"invalid_client_material: {answer[:200]}"
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "refresh_failed"]
    assert line.levelno == logging.CRITICAL and line.reason == "invalid_client_material"


def test_an_error_without_an_oauth_reason_is_logged_under_its_type(server, clock, tmp_path, caplog):
    source = StaticSource(client_id="app", client_secret="app-secret", username="alice", password="alice-password")
    source.fail = 1
    keeper = make_keeper(server, clock, tmp_path, source=source)
    with caplog.at_level(logging.INFO, logger="tokensmith.keeper"):
        outcome = keeper.refresh(reason="test")
    assert isinstance(outcome.error, SourceError)
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "refresh_failed"]
    assert line.levelno == logging.ERROR and line.reason == "SourceError" and keeper.state.alert is None


def test_status_during_a_refresh_says_since_when_it_has_been_busy(server, clock, tmp_path):
    seen = []

    class WatchingSource(StaticSource):
        def read(self):
            seen.append(keeper.status()["busy_since"])
            return super().read()

    source = WatchingSource(client_id="app", client_secret="app-secret", username="alice", password="alice-password")
    keeper = make_keeper(server, clock, tmp_path, source=source)
    assert keeper.status()["busy_since"] is None
    clock.advance(0.75)
    keeper.refresh(reason="test")
    clock.advance(100)
    keeper.run_due()  # a run with nothing due reads no credentials
    assert keeper.refresh(reason="test", reload_credentials=True).ok
    assert seen == [int(1_800_000_000.75), int(1_800_000_100.75)]
    assert keeper.status()["busy_since"] is None and keeper.busy_since is None


def test_an_unexpected_exception_becomes_a_retryable_internal_error_naming_where_it_was_raised(server, clock,
                                                                                               tmp_path):
    keeper = make_keeper(server, clock, tmp_path)
    bug = RuntimeError("token at-secret-in-a-bug")
    keeper.token_client.errors = [bug]
    outcome = keeper.refresh(reason="test")
    error = outcome.error
    assert isinstance(error, InternalError) and error.retryable and error.client == "c1" and error.__cause__ is bug
    assert error.message.startswith("refresh: unexpected RuntimeError at test_keeper_reporting.py:")
    assert "at-secret" not in str(error)
    never_raised = _internal(ValueError("secret"), "c2", "sink file:x")
    assert never_raised.message == "sink file:x: unexpected ValueError" and never_raised.client == "c2"
    assert never_raised.retryable
