"""The keeper tests' fixtures: a fake clock, and the project's token server on it with the clients
they use (app: a password client of user alice; svc: a Basic-auth client)."""

import pytest

from fakes import FakeClock
from tokensmith.devserver import OAuthServer


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def server(clock):
    with OAuthServer(access_lifetime=600, clock=clock) as server:
        server.add_client("app", "app-secret", dialect="post", users={"alice": "alice-password"})
        server.add_client("svc", "svc-secret", dialect="basic")
        yield server
