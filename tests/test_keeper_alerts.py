"""The alert a refresh failure raises when only an operator can help: the refresh token a
`grant: refresh_token` client depends on was refused (invalid_grant) or was already spent; and no
alert for the failures the keeper retries or falls back from. Real token client, real token endpoint."""

from __future__ import annotations

import logging
import random

import pytest

from fakes import MemorySink, StaticSource
from keeper_fixtures import clock, server  # noqa: F401  (fixtures)
from tokensmith.config import ClientConfig
from tokensmith.keeper import Keeper
from tokensmith.state import StateStore
from tokensmith.tokenclient import TokenClient
from tokensmith.tokens import fingerprint

INVALID_GRANT_ALERT = ("invalid_grant: the provider refused the refresh token (spent, expired or revoked; a reused "
                       "one makes some providers revoke its whole family); put a new refresh token in the source")


def keeper_for(server, clock, tmp_path, grant, refresh=None, **creds):
    config = ClientConfig(name="c1", token_url=server.token_url, grant=grant, auth_style="post",
                          source={"type": "env"}, sinks=[{"type": "file", "path": "/unused"}], refresh=refresh or {})
    store = StateStore(tmp_path / "state")
    store.prepare()
    keeper = Keeper(config, StaticSource(client_id="app", client_secret="app-secret", **creds), [MemorySink()],
                    TokenClient(config, clock=clock), store, clock=clock, rng=random.Random(1))
    keeper.load()
    return keeper


def failed_line(caplog):
    return [r for r in caplog.records if getattr(r, "event", None) == "refresh_failed"][-1]


def test_a_refused_seed_raises_the_invalid_grant_alert_and_is_never_presented_again(server, clock, tmp_path, caplog):
    keeper = keeper_for(server, clock, tmp_path, "refresh_token", refresh_token="rt-the-provider-never-issued")
    with caplog.at_level(logging.INFO, logger="tokensmith.keeper"):
        outcome = keeper.refresh(reason="test")
    assert outcome.error.error == "invalid_grant"
    assert keeper.state.alert == INVALID_GRANT_ALERT
    assert failed_line(caplog).levelno == logging.CRITICAL
    assert keeper.state.spent_seed == fingerprint("rt-the-provider-never-issued")
    requests = server.stats["token_requests"]
    with caplog.at_level(logging.INFO, logger="tokensmith.keeper"):
        again = keeper.refresh(reason="test")
    assert server.stats["token_requests"] == requests  # a replay is not sent
    assert again.error.error == "spent_refresh_token" and again.error.retryable is False
    assert again.error.client == "c1"
    assert keeper.state.alert == ("spent_refresh_token: the refresh token in the source was already spent; not "
                                  "presenting it again; put a new refresh token in the source")
    assert failed_line(caplog).levelno == logging.CRITICAL


@pytest.mark.parametrize("grant, error", [("password", "invalid_grant"), ("password", "invalid_scope"),
                                          ("refresh_token", "invalid_scope"), ("refresh_token", "server_error")])
def test_other_refusals_raise_no_alert(server, clock, tmp_path, caplog, grant, error):
    creds = {"username": "alice", "password": "alice-password"} if grant == "password" else {}
    if grant == "refresh_token":
        issuer = keeper_for(server, clock, tmp_path / "issuer", "password", username="alice",
                            password="alice-password")
        issuer.run_due()
        creds = {"refresh_token": issuer.state.refresh_token}
    keeper = keeper_for(server, clock, tmp_path, grant, **creds)
    server.fail_next(status=400, body=f'{{"error": "{error}"}}')
    with caplog.at_level(logging.INFO, logger="tokensmith.keeper"):
        outcome = keeper.refresh(reason="test")
    assert outcome.error is not None and outcome.error.error == error
    assert keeper.state.alert is None
    assert failed_line(caplog).levelno == logging.ERROR


def test_the_spent_seed_is_saved_with_the_new_token(server, clock, tmp_path):
    issuer = keeper_for(server, clock, tmp_path / "issuer", "password", username="alice", password="alice-password")
    issuer.run_due()
    seed = issuer.state.refresh_token
    keeper = keeper_for(server, clock, tmp_path, "refresh_token", refresh_token=seed)
    assert keeper.refresh(reason="test").error is None
    assert keeper.store.load("c1").spent_seed == fingerprint(seed)
    assert keeper.refresh(reason="test").error is None  # the chain goes on; the seed stays recorded
    assert keeper.store.load("c1").spent_seed == fingerprint(seed)


def issued_seed(server, clock, tmp_path):
    issuer = keeper_for(server, clock, tmp_path / "issuer", "password", username="alice", password="alice-password")
    issuer.run_due()
    return issuer.state.refresh_token


def test_a_refused_chain_with_a_spent_seed_says_both(server, clock, tmp_path):
    seed = issued_seed(server, clock, tmp_path)
    keeper = keeper_for(server, clock, tmp_path, "refresh_token", refresh_token=seed)
    assert keeper.refresh(reason="test").error is None
    server.fail_next(status=400, body='{"error": "invalid_grant"}')  # the held refresh token is refused
    outcome = keeper.refresh(reason="test")
    assert outcome.fell_back == "invalid_grant" and outcome.error.error == "spent_refresh_token"
    assert outcome.error.message == ("the held refresh token was refused (invalid_grant) and the refresh token in "
                                     "the source was already spent; not presenting it again")
    assert keeper.state.alert == f"spent_refresh_token: {outcome.error.message}; put a new refresh token in the source"


def test_an_aged_chain_from_before_seeds_were_recorded_goes_back_to_the_seed(server, clock, tmp_path):
    seed = issued_seed(server, clock, tmp_path)
    older = issued_seed(server, clock, tmp_path / "older")  # held, but with no record of a spent seed
    keeper = keeper_for(server, clock, tmp_path, "refresh_token", refresh={"refresh_token_lifetime": 100},
                        refresh_token=seed)
    keeper.state.refresh_token, keeper.state.refresh_token_obtained_at = older, clock() - 101
    assert keeper.state.spent_seed is None
    assert keeper.refresh(reason="test").error is None
    assert keeper.state.spent_seed == fingerprint(seed)


def test_a_password_clients_source_refresh_token_is_never_taken_for_a_spent_seed(server, clock, tmp_path):
    keeper = keeper_for(server, clock, tmp_path, "password", refresh={"strategy": "reissue"}, username="alice",
                        password="alice-password", refresh_token="rt-in-the-source-too")
    server.fail_next(status=400, body='{"error": "invalid_grant"}')  # say, the password was being changed
    assert keeper.refresh(reason="test").error.error == "invalid_grant"
    for _ in range(2):
        outcome = keeper.refresh(reason="test")
        assert outcome.error is None and outcome.grant == "password"
    assert keeper.state.spent_seed is None


class FlakyStore(StateStore):
    """A state directory that refuses writes while `down` (a full or read-only disk)."""

    down = False

    def save(self, client, state, *, sync_dir=True):
        from tokensmith.errors import StateError

        if self.down:
            raise StateError("cannot write state file: No space left on device", client=client)
        super().save(client, state, sync_dir=sync_dir)


def flaky_keeper(server, clock, tmp_path, seed):
    keeper = keeper_for(server, clock, tmp_path, "refresh_token", refresh_token=seed)
    keeper.store = FlakyStore(keeper.store.directory)
    return keeper


def test_a_spent_seed_error_is_retried_while_the_dropped_chain_is_not_durable(server, clock, tmp_path):
    keeper = flaky_keeper(server, clock, tmp_path, issued_seed(server, clock, tmp_path))
    assert keeper.refresh(reason="test").error is None
    keeper.store.down = True
    server.fail_next(status=400, body='{"error": "invalid_grant"}')  # the held refresh token is refused
    outcome = keeper.refresh(reason="test")
    assert keeper.state_unsaved and outcome.error.error == "spent_refresh_token"
    assert outcome.error.retryable is True and keeper.state.alert is None


def test_once_an_unsaved_chain_is_saved_a_spent_seed_error_is_final(server, clock, tmp_path):
    keeper = flaky_keeper(server, clock, tmp_path, issued_seed(server, clock, tmp_path))
    assert keeper.refresh(reason="test").error is None
    keeper.store.down = True
    assert keeper.refresh(reason="test").error is None and keeper.state_unsaved  # new chain, not durable
    keeper.store.down = False
    server.fail_next(status=400, body='{"error": "invalid_grant"}')  # saved first, then refused
    outcome = keeper.refresh(reason="test")
    assert keeper.state_unsaved is False and outcome.error.error == "spent_refresh_token"
    assert outcome.error.retryable is False and keeper.state.alert.startswith("spent_refresh_token: ")
