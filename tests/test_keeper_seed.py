"""A `grant: refresh_token` client whose seed is spent keeps using its chain."""

import random

import pytest

from fakes import MemorySink, StaticSource
from keeper_fixtures import clock, server  # noqa: F401  (fixtures)
from tokensmith.config import ClientConfig
from tokensmith.keeper import Keeper
from tokensmith.state import StateStore
from tokensmith.tokenclient import TokenClient


def keeper_for(server, clock, tmp_path, grant, source, refresh=None):
    config = ClientConfig(name="c1", token_url=server.token_url, grant=grant, auth_style="post",
                          source={"type": "env"}, sinks=[{"type": "file", "path": "/unused"}],
                          refresh=refresh or {})
    store = StateStore(tmp_path / grant)
    store.prepare()
    keeper = Keeper(config, source, [MemorySink()], TokenClient(config, clock=clock), store, clock=clock,
                    rng=random.Random(1))
    keeper.load()
    return keeper


def test_an_aged_refresh_token_is_presented_when_the_seed_is_already_spent(server, clock, tmp_path):
    issuer = keeper_for(server, clock, tmp_path, "password",
                        StaticSource(client_id="app", client_secret="app-secret", username="alice",
                                     password="alice-password"))
    issuer.run_due()
    seed = issuer.state.refresh_token
    keeper = keeper_for(server, clock, tmp_path, "refresh_token",
                        StaticSource(client_id="app", client_secret="app-secret", refresh_token=seed),
                        refresh={"refresh_token_lifetime": 100})
    assert keeper.refresh(reason="test").error is None
    held = keeper.state.refresh_token
    assert held != seed and keeper.state.spent_seed
    clock.advance(101)
    outcome = keeper.refresh(reason="test")
    assert outcome.error is None, outcome.error
    assert keeper.state.refresh_token not in (held, seed)
    assert server.stats["refresh_reuse"] == 0
