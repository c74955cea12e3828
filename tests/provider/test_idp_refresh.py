"""Refresh-token behaviours against a real, independent authorization server (panva's oidc-provider,
tests/idp/server.mjs) rather than the project's own dev server, so that a mistake the fake and the daemon
share cannot hide. tokensmith is seeded with a refresh token oidc-provider issued through the
authorization-code flow (offline_access, consent given at once by the test-only auto_login), and refresh
tokens rotate on every use. Every test asserts oidc-provider's own answers (RFC 7662 introspection).

What oidc-provider 9 does, read in lib/actions/grants/refresh_token.js, lib/actions/revocation.js and
lib/helpers/revoke.js:
  - an exchange consumes the refresh token and issues a new one, and leaves the old access token active;
  - a consumed refresh token presented again destroys it and revokes every token of its grant (the family);
  - RFC 7009 revocation of an access or refresh token revokes every token of its grant."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from conftest import IDP_SECRET, Idp
from daemon_harness import Project, wait_for, write_private
from tokensmith.tokens import fingerprint

REDIRECT = "http://127.0.0.1/callback"  # never contacted: the code is read from the redirect itself


class NoDevServer:
    """Project registers clients on the dev server; the clients here live in oidc-provider instead."""

    token_url = None

    def add_client(self, *args, **kwargs):
        pass


@pytest.fixture(scope="module")
def idp_rt(tmp_path_factory):
    client = {"client_id": "rt", "client_secret": IDP_SECRET, "token_endpoint_auth_method": "client_secret_basic",
              "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
              "redirect_uris": [REDIRECT]}
    server = Idp(tmp_path_factory.mktemp("idp-rt"), [client], auto_login="alice",
                 ttl={"AccessToken": 600, "RefreshToken": 3600, "Grant": 3600, "Session": 3600})
    yield server
    server.stop()


def authorize(idp) -> dict:
    """The authorization-code flow with PKCE, as a browser would drive it; returns the token response."""
    session = requests.Session()
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    reply = session.get(idp.issuer + "/auth", allow_redirects=False, timeout=5, params={
        "client_id": "rt", "response_type": "code", "scope": "openid offline_access", "prompt": "consent",
        "redirect_uri": REDIRECT, "code_challenge": challenge, "code_challenge_method": "S256"})
    for _ in range(8):
        location = reply.headers["location"]
        if location.startswith(REDIRECT):
            break
        reply = session.get(location if location.startswith("http") else idp.issuer + location,
                            allow_redirects=False, timeout=5)
    code = parse_qs(urlsplit(location).query)["code"][0]
    token = requests.post(idp.issuer + "/token", auth=("rt", IDP_SECRET), timeout=5, data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "code_verifier": verifier})
    assert token.status_code == 200, token.text
    return token.json()


def active(idp, token: str) -> bool:
    """oidc-provider's own answer (RFC 7662), not tokensmith's."""
    reply = requests.post(idp.issuer + "/token/introspection", auth=("rt", IDP_SECRET), data={"token": token},
                          timeout=5)
    assert reply.status_code == 200, reply.text
    return reply.json()["active"]


def idp_lines(idp) -> list[str]:
    return idp.stderr.read_text().splitlines()


def idp_events(idp, name: str, project) -> list[str]:
    """What oidc-provider logged (grant.success, grant.error, grant.revoked) since the test began."""
    return [line for line in idp_lines(idp)[project.idp_log_start:] if line.startswith(name)]


@pytest.fixture
def project(tmp_path, idp_rt):
    """A tokensmith config with one client, rt, seeded with a refresh token from oidc-provider."""
    seed = authorize(idp_rt)
    project = Project(tmp_path, NoDevServer(), audit_log=str(tmp_path / "audit.log"))
    client = project.add_client("rt", dialect="basic", grant="refresh_token", secret=IDP_SECRET,
                                refresh={"backoff_initial": 1, "backoff_max": 3600})
    del client["token_url"]
    client["issuer"] = idp_rt.issuer  # discovery: token, revocation and introspection endpoints
    write_private(tmp_path / "creds" / "rt.json", {"client_id": "rt", "client_secret": IDP_SECRET,
                                                   "refresh_token": seed["refresh_token"]})
    project.seed = seed
    project.idp_log_start = len(idp_lines(idp_rt))
    project.write()
    return project


def held(project) -> dict:
    """The tokens tokensmith holds: its state file."""
    return json.loads((project.root / "state" / "rt.json").read_text())


def test_each_exchange_rotates_the_refresh_token_and_tokensmith_follows_the_chain(project, idp_rt, report):
    first = project.cli("once")
    assert first.returncode == 0, first.stdout + first.stderr
    state = held(project)
    assert state["refresh_token"] != project.seed["refresh_token"]
    assert not active(idp_rt, project.seed["refresh_token"]), "oidc-provider consumed the seed"
    chain = [state]
    for _ in range(3):
        result = project.cli("rotate", "rt")
        assert result.returncode == 0, result.stdout + result.stderr
        chain.append(held(project))
    refresh_tokens = [state["refresh_token"] for state in chain]
    assert len(set(refresh_tokens)) == 4, "every exchange yields a new refresh token, and tokensmith keeps it"
    assert [active(idp_rt, token) for token in refresh_tokens] == [False, False, False, True]
    assert project.token("rt") == chain[-1]["access_token"] and active(idp_rt, chain[-1]["access_token"])
    # each exchange presented the refresh token the previous one returned: no reuse, so the family lives on
    assert not [line for line in idp_events(idp_rt, "grant.error", project) if "already used" in line]
    # oidc-provider, unlike the dev server and iQmetrix, leaves the access token of a spent refresh token active
    assert active(idp_rt, chain[0]["access_token"])
    report.record("oidc-provider rotates the refresh token on every exchange",
                  "each new refresh token persisted and presented next; the spent ones inactive at the provider; "
                  "no reuse", exchanges=len(idp_events(idp_rt, "grant.success", project)))


def test_compromise_rotation_says_what_oidc_provider_really_did(project, idp_rt, report):
    """The exchange does not invalidate the old access token here, so the rotation must not claim it did;
    RFC 7009 revocation does, and takes the whole grant with it (the new tokens too), which must be said."""
    daemon = project.start()
    try:
        daemon.wait_ready()
        old = held(project)
        result = project.cli("rotate", "rt", "--compromised", "--json")
        reply = json.loads(result.stdout)
        assert reply["via"] == "daemon"
        [outcome] = reply["results"]
        new = held(project)
        assert new["access_token"] != old["access_token"] and project.token("rt") == new["access_token"]
        # what oidc-provider says
        assert not active(idp_rt, old["access_token"]) and not active(idp_rt, old["refresh_token"])
        assert not active(idp_rt, new["access_token"]) and not active(idp_rt, new["refresh_token"])
        # what tokensmith says about it
        steps = {step["step"]: step["result"] for step in outcome["steps"]}
        assert steps["refresh_exchange"] == "ok, but the provider left the old access token active"
        assert steps["revoke_access_token"] == "ok"
        assert outcome["invalidation"] == "revocation" and outcome["verification"] == "verified"
        assert steps["check_new_token"] == "inactive: the provider revoked it with the old one"
        assert (outcome["result"], outcome["exit_code"], result.returncode) == ("new_token_revoked", 1, 1)
        assert "revoked the new token" in outcome["message"]
        audit = json.loads((project.root / "audit.log").read_text().splitlines()[-1])
        assert audit["invalidation"] == "revocation" and audit["result"] == "new_token_revoked"
        assert audit["old_token"] == fingerprint(old["access_token"])
        status = json.loads(project.cli("status", "--json").stdout)
        [client] = status["clients"]
        assert "revoked the new token" in client["alert"]
        report.record("rotate --compromised at oidc-provider (an exchange leaves the old access token active; RFC "
                      "7009 revocation revokes the whole grant)",
                      "the exchange is not claimed; the old token is revoked via RFC 7009 and inactive at the "
                      "provider; the new token, revoked with the grant, is reported (new_token_revoked, exit 1, "
                      "alert)")
    finally:
        daemon.stop()


def test_a_replayed_refresh_token_revokes_the_family_and_tokensmith_stops_with_an_alert(project, idp_rt, report):
    daemon = project.start()
    try:
        daemon.wait_ready()
        spent = held(project)
        assert project.cli("rotate", "rt").returncode == 0
        current = held(project)
        assert active(idp_rt, current["access_token"]) and active(idp_rt, current["refresh_token"])
        # an attacker who copied the spent refresh token presents it
        replay = requests.post(idp_rt.issuer + "/token", auth=("rt", IDP_SECRET), timeout=5,
                               data={"grant_type": "refresh_token", "refresh_token": spent["refresh_token"]})
        assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
        assert not active(idp_rt, current["access_token"]) and not active(idp_rt, current["refresh_token"])
        errors_before = len(idp_events(idp_rt, "grant.error", project))
        result = project.cli("rotate", "rt")
        assert result.returncode == 1
        assert "client rt" in result.stdout + result.stderr and "invalid_grant" in result.stdout + result.stderr
        status = json.loads(project.cli("status", "--json").stdout)
        [client] = status["clients"]
        assert "refused (invalid_grant)" in client["alert"] and "new refresh token" in client["alert"]
        assert "invalid_grant" in client["last_error"] and client["failures"] == 1
        # one refusal (the held refresh token); the spent seed is not replayed, and no retry follows at once
        assert len(idp_events(idp_rt, "grant.error", project)) - errors_before == 1
        with pytest.raises(AssertionError):
            wait_for(lambda: len(idp_events(idp_rt, "grant.error", project)) > errors_before + 1, timeout=1.0)
        assert spent["refresh_token"] not in daemon.log and current["refresh_token"] not in daemon.log
        report.record("an attacker replays a spent refresh token at oidc-provider",
                      "the provider revokes the family (the held tokens inactive); tokensmith: one refused exchange, "
                      "no replay of the seed, a non-retryable error naming the client, an alert in status",
                      provider_refusals=len(idp_events(idp_rt, "grant.error", project)) - errors_before)
    finally:
        daemon.stop()


def test_rfc7009_revocation_of_a_held_refresh_token_ends_its_family(project, idp_rt):
    """What the compromise rotation relies on: revoking one token at oidc-provider takes its grant's tokens."""
    assert project.cli("once").returncode == 0
    state = held(project)
    assert active(idp_rt, state["access_token"]) and active(idp_rt, state["refresh_token"])
    reply = requests.post(idp_rt.issuer + "/token/revocation", auth=("rt", IDP_SECRET), timeout=5,
                          data={"token": state["refresh_token"], "token_type_hint": "refresh_token"})
    assert reply.status_code == 200
    assert not active(idp_rt, state["refresh_token"]) and not active(idp_rt, state["access_token"])
    result = project.cli("rotate", "rt")
    assert result.returncode == 1 and "invalid_grant" in result.stdout + result.stderr


def test_a_spent_seed_is_never_presented_again(project, idp_rt, report):
    """With grant refresh_token the primary grant presents the seed from the source. Once the chain has
    spent it, presenting it again is a replay: oidc-provider would revoke the whole family, the live refresh
    token included. A held refresh token past refresh_token_lifetime is presented instead (the provider
    decides); when the provider refuses the held one, the keeper stops with an alert rather than replay."""
    project.clients[0]["refresh"]["refresh_token_lifetime"] = 0.001
    daemon = project.start()
    try:
        daemon.wait_ready()
        state = held(project)
        result = project.cli("rotate", "rt")
        assert result.returncode == 0, result.stdout + result.stderr
        chained = held(project)
        assert chained["refresh_token"] != state["refresh_token"] and active(idp_rt, chained["refresh_token"])
        assert not idp_events(idp_rt, "grant.revoked", project)
        reply = requests.post(idp_rt.issuer + "/token/revocation", auth=("rt", IDP_SECRET), timeout=5,
                              data={"token": chained["refresh_token"], "token_type_hint": "refresh_token"})
        assert reply.status_code == 200
        result = project.cli("rotate", "rt")
        assert result.returncode == 1
        assert "client rt" in result.stdout and "already spent" in result.stdout
        assert not [line for line in idp_events(idp_rt, "grant.error", project) if "already used" in line], \
            "the spent seed was replayed"
        status = json.loads(project.cli("status", "--json").stdout)
        [client] = status["clients"]
        assert client["alert"].startswith("spent_refresh_token") and "new refresh token" in client["alert"]
        metrics = requests.get(f"http://127.0.0.1:{daemon.health_port()}/metrics", timeout=5).text
        assert 'client="rt",reason="spent_refresh_token"' in metrics
        # the operator's new seed is taken
        write_private(project.root / "creds" / "rt.json", {"client_id": "rt", "client_secret": IDP_SECRET,
                                                           "refresh_token": authorize(idp_rt)["refresh_token"]})
        again = project.cli("rotate", "rt")
        assert again.returncode == 0, again.stdout + again.stderr
        assert active(idp_rt, project.token("rt")) and held(project)["refresh_token"] != chained["refresh_token"]
        report.record("grant refresh_token: the seed in the source already spent; the held refresh token past "
                      "refresh_token_lifetime, then revoked (oidc-provider)",
                      "the aged held token is presented and the chain continues; once the provider refuses it, "
                      "the seed is not presented again (no replay): an alert until a new seed is stored, which "
                      "is then used")
    finally:
        daemon.stop()
