"""Compromise rotation at providers that differ from the seeds in what an exchange and a revocation do
(the differences oidc-provider showed, tests/provider/test_idp_refresh.py), on the dev server with one
behaviour changed at a time, so each rule of compromise.py is pinned apart from the others."""

from __future__ import annotations

from test_compromise import make_keeper, rotate
from tokensmith.devserver import OAuthServer


class ExchangeLeavesAccessActive(OAuthServer):
    """An exchange spends the refresh token but leaves the access token that came with it valid
    (oidc-provider); revocation revokes just the token named."""

    def _spend_refresh(self, client_id, token):
        record = self._refresh.get(token) if isinstance(token, str) else None
        access = self._access.get(record.access) if record is not None else None
        user = super()._spend_refresh(client_id, token)
        if access is not None:
            self._access[record.access] = access
        return user


class RevocationTakesTheGrant(ExchangeLeavesAccessActive):
    """As oidc-provider: revoking one token revokes every token of its grant (here: of the client)."""

    def _revoke(self, query, headers, body):
        reply = super()._revoke(query, headers, body)
        with self._lock:
            client_id, _ = self._authenticated_form(headers, body)
            for tokens in (self._access, self._refresh):
                for value in [value for value, record in tokens.items() if record.client_id == client_id]:
                    del tokens[value]
        return reply


def endpoints(server):
    return {"revocation_url": server.revocation_url, "introspection_url": server.introspection_url}


def steps(result):
    return {step["step"]: step["result"] for step in result["steps"]}


def test_an_exchange_is_not_claimed_when_the_provider_leaves_the_old_token_active(tmp_path):
    with ExchangeLeavesAccessActive(access_lifetime=300) as server:
        keeper = make_keeper(server, tmp_path, **endpoints(server))
        keeper.run_due()
        keeper.refresh(reason="routine")
        old = keeper.state.access_token
        result = rotate(keeper, tmp_path)
        assert steps(result)["refresh_exchange"] == "ok, but the provider left the old access token active"
        assert steps(result)["revoke_access_token"] == "ok" and "check_new_token" not in steps(result)
        assert (result["result"], result["exit_code"], result["invalidation"], result["verification"]) == \
               ("rotated", 0, "revocation", "verified")
        assert result["message"] == "old token invalidated by revocation"
        assert not server.is_active(old) and server.is_active(keeper.state.access_token)
        assert keeper.status()["alert"] is None


def test_an_exchange_introspection_shows_effective_is_not_followed_by_a_revocation(tmp_path):
    """The dev server pairs tokens like iQmetrix: the exchange invalidates, introspection shows it, so
    nothing is revoked that could take the new token with it."""
    with OAuthServer(access_lifetime=300) as server:
        keeper = make_keeper(server, tmp_path, **endpoints(server))
        keeper.run_due()
        keeper.refresh(reason="routine")
        old = keeper.state.access_token
        revocations = server.stats["revocations"]
        result = rotate(keeper, tmp_path)
        assert steps(result) == {"refresh_exchange": "ok"}
        assert server.stats["revocations"] == revocations
        assert (result["result"], result["exit_code"], result["invalidation"], result["verification"]) == \
               ("rotated", 0, "refresh_exchange", "verified")
        assert not server.is_active(old) and server.is_active(keeper.state.access_token)


def test_a_revocation_that_takes_the_new_token_too_is_reported_not_hidden(tmp_path):
    with RevocationTakesTheGrant(access_lifetime=300) as server:
        keeper = make_keeper(server, tmp_path, **endpoints(server))
        keeper.run_due()
        keeper.refresh(reason="routine")
        result = rotate(keeper, tmp_path)
        new = keeper.state.access_token
        assert not server.is_active(new)
        assert steps(result)["check_new_token"] == "inactive: the provider revoked it with the old one"
        assert (result["result"], result["exit_code"], result["invalidation"], result["verification"]) == \
               ("new_token_revoked", 1, "revocation", "verified")
        assert "revoked the new token" in result["message"] and "revoked the new token" in keeper.status()["alert"]
