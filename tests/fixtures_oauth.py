"""The stateful token endpoint (tokensmith.devserver) as fixtures on free loopback ports."""

import pytest

from tokensmith.devserver import OAuthServer


@pytest.fixture
def oauth():
    """A fresh server per test: its counters (reuse, revocations) then belong to that test alone."""
    with OAuthServer(access_lifetime=3600) as server:
        yield server


@pytest.fixture(scope="session")
def oauth_session():
    with OAuthServer(access_lifetime=3600) as server:
        yield server
