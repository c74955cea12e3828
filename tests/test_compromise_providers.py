"""Compromise rotation against providers that behave as oidc-provider does, modelled on the
project's token server: an exchange that leaves the old access token active, and a revocation that
takes the whole grant (the new token with it). What the rotation claims must match what the
provider did."""

from __future__ import annotations

import threading

import pytest

from test_compromise import make_keeper, rotate
from tokensmith.devserver import OAuthServer


class KeepsAccessServer(OAuthServer):
    """A refresh exchange spends the refresh token but leaves the access token it came with active."""

    def _spend_refresh(self, client_id, token):
        record = self._refresh.get(token)
        kept = self._access.get(record.access) if record else None
        user = super()._spend_refresh(client_id, token)
        if kept is not None:
            self._access[record.access] = kept
        return user


class GrantRevokingServer(KeepsAccessServer):
    """Revoking one token of a grant revokes every token of the client's grant, new ones included."""

    def _revoke(self, query, headers, body):
        answer = super()._revoke(query, headers, body)
        with self._lock:
            for tokens in (self._access, self._refresh):
                for token in [t for t, record in tokens.items() if record.client_id == "kc"]:
                    del tokens[token]
        return answer


LEFT_ACTIVE = {"step": "refresh_exchange", "result": "ok, but the provider left the old access token active"}


@pytest.fixture
def keeps():
    with KeepsAccessServer(access_lifetime=300) as server:
        yield server


def test_an_exchange_that_left_the_old_token_active_is_not_claimed(keeps, tmp_path):
    keeper = make_keeper(keeps, tmp_path, introspection_url=keeps.introspection_url)
    keeper.run_due()
    old = keeper.state.access_token
    result = rotate(keeper, tmp_path)
    assert keeps.is_active(old), "the provider really left the old token active"
    assert result["steps"] == [LEFT_ACTIVE]
    assert (result["result"], result["exit_code"], result["invalidation"]) == ("verification_failed", 4, "none")
    assert result["verification"] == "failed: old token still active"


def test_then_the_old_access_token_is_revoked_explicitly(keeps, tmp_path):
    keeper = make_keeper(keeps, tmp_path, introspection_url=keeps.introspection_url,
                         revocation_url=keeps.revocation_url)
    keeper.run_due()
    old = keeper.state.access_token
    result = rotate(keeper, tmp_path)
    assert not keeps.is_active(old) and keeps.is_active(keeper.state.access_token)
    assert result["steps"] == [LEFT_ACTIVE, {"step": "revoke_access_token", "result": "ok"}]
    assert (result["result"], result["exit_code"], result["invalidation"]) == ("rotated", 0, "revocation")
    assert result["verification"] == "verified" and keeper.state.alert is None


def test_an_exchange_shown_to_have_invalidated_the_token_needs_no_revocation(tmp_path):
    with OAuthServer(access_lifetime=300) as server:
        keeper = make_keeper(server, tmp_path, introspection_url=server.introspection_url,
                             revocation_url=server.revocation_url)
        keeper.run_due()
        result = rotate(keeper, tmp_path)
        assert result["steps"] == [{"step": "refresh_exchange", "result": "ok"}]
        assert server.stats["revocations"] == 0
        assert (result["result"], result["invalidation"], result["verification"]) == ("rotated", "refresh_exchange",
                                                                                     "verified")


def test_an_unanswered_introspection_does_not_skip_the_revocation(tmp_path):
    with OAuthServer(access_lifetime=300) as server:
        keeper = make_keeper(server, tmp_path, introspection_url=server.url + "/no-such-endpoint",
                             revocation_url=server.revocation_url)
        keeper.run_due()
        result = rotate(keeper, tmp_path)
        assert result["steps"] == [{"step": "refresh_exchange", "result": "ok"},
                                   {"step": "revoke_access_token", "result": "ok"}]
        assert result["invalidation"] == "refresh_exchange+revocation"


def test_a_revocation_that_took_the_new_token_too_is_reported(tmp_path):
    with GrantRevokingServer(access_lifetime=300) as server:
        keeper = make_keeper(server, tmp_path, introspection_url=server.introspection_url,
                             revocation_url=server.revocation_url)
        keeper.run_due()
        old = keeper.state.access_token
        result = rotate(keeper, tmp_path)
        assert not server.is_active(old) and not server.is_active(keeper.state.access_token)
        assert result["steps"] == [LEFT_ACTIVE, {"step": "revoke_access_token", "result": "ok"},
                                   {"step": "check_new_token",
                                    "result": "inactive: the provider revoked it with the old one"}]
        assert (result["result"], result["exit_code"], result["invalidation"]) == ("new_token_revoked", 1,
                                                                                   "revocation")
        assert result["message"] == ("old token invalidated by revocation, but the provider revoked the new token with "
                                     "it (the whole grant): new credentials or a new refresh token are needed")
        assert keeper.state.alert == ("compromise rotation: the provider revoked the new token together with the "
                                      "old one (the whole grant); new credentials or a new refresh token are needed")


def test_without_introspection_a_revoked_new_token_cannot_be_seen_and_is_not_claimed(tmp_path):
    with GrantRevokingServer(access_lifetime=300) as server:
        keeper = make_keeper(server, tmp_path, revocation_url=server.revocation_url)
        keeper.run_due()
        result = rotate(keeper, tmp_path)
        assert [step["step"] for step in result["steps"]] == ["refresh_exchange", "revoke_access_token"]
        assert result["result"] == "rotated" and keeper.state.alert is None


def test_discovered_revocation_and_introspection_endpoints_are_used(keeps, tmp_path):
    keeper = make_keeper(keeps, tmp_path, issuer=keeps.issuer, auth_style="post")
    assert keeper.client.revocation_url is None and keeper.client.introspection_url is None
    keeper.run_due()
    old = keeper.state.access_token
    result = rotate(keeper, tmp_path)
    assert not keeps.is_active(old)
    assert result["steps"] == [LEFT_ACTIVE, {"step": "revoke_access_token", "result": "ok"}]
    assert (result["result"], result["invalidation"], result["verification"]) == ("rotated", "revocation", "verified")


class PurgingSink:
    """A sink with a version history (as Vault KV v2 and AWS Secrets Manager have)."""

    type = "memory"

    def __init__(self, name, fail=False):
        self.name, self.fail, self.tokens, self.purged = name, fail, [], []

    def check(self):
        pass

    def write(self, token):
        self.tokens.append(token)

    def holds(self, token):
        return bool(self.tokens) and self.tokens[-1].access_token == token.access_token

    def purge(self, access_token):
        from tokensmith.errors import SinkError

        if self.fail:
            raise SinkError("the store refused to destroy versions", client="kc")
        self.purged.append(access_token)
        return "1 old version destroyed"


def test_the_old_token_is_purged_from_every_sink_that_keeps_a_history(tmp_path):
    from fakes import MemorySink

    with OAuthServer(access_lifetime=300) as server:
        sinks = [MemorySink("memory:a"), PurgingSink("history:b"), PurgingSink("history:c", fail=True)]
        keeper = make_keeper(server, tmp_path, sinks=sinks)
        keeper.run_due()
        old = keeper.state.access_token
        result = rotate(keeper, tmp_path)
        assert result["purged"] == {"memory:a": "nothing to remove: no version history",
                                    "history:b": "1 old version destroyed",
                                    "history:c": "not removed: the store refused to destroy versions"}
        assert sinks[1].purged == [old]


def test_an_audit_log_made_wider_is_tightened_to_0600(tmp_path):
    import os
    import stat

    from tokensmith.compromise import write_audit_line

    path = tmp_path / "audit" / "audit.log"
    path.parent.mkdir(mode=0o700)
    path.write_text('{"earlier": 1}\n')
    os.chmod(path, 0o644)
    write_audit_line(path, {"client": "kc", "result": "rotated"})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_text().splitlines()[-1] == '{"client": "kc", "result": "rotated"}'


def test_the_audit_record_also_goes_to_the_state_backend(tmp_path):
    import json

    from tokensmith.state import StateStore

    class AuditingStore(StateStore):
        def __init__(self, directory):
            super().__init__(directory)
            self.audit = []

        def append_audit(self, record):
            self.audit.append(record)

    with OAuthServer(access_lifetime=300) as server:
        keeper = make_keeper(server, tmp_path)
        keeper.run_due()
        keeper.store = AuditingStore(keeper.store.directory)
        result = rotate(keeper, tmp_path)
        line = json.loads((tmp_path / "kaudit" / "audit.log").read_text().splitlines()[-1])
        assert keeper.store.audit == [line] and line["result"] == result["result"] == "rotated"


def test_the_resource_check_goes_the_clients_way_not_the_environments(tmp_path, monkeypatch):
    from test_compromise import Resource, proxies_to_a_dead_port

    proxies_to_a_dead_port(monkeypatch)
    with OAuthServer(access_lifetime=300) as server:
        keeper = make_keeper(server, tmp_path, proxy="none")
        keeper.run_due()
        old = keeper.state.access_token
        r = Resource({f"Bearer {old}": (401, {})}, default=200)  # the old token refused, any other taken
        try:
            result = rotate(keeper, tmp_path, verify_url=r.url)
        finally:
            r.close()
        assert r.seen == [f"Bearer {old}", f"Bearer {keeper.state.access_token}"]
        assert result["verify_url"] == "verified"


class DenyingIntrospectionServer(OAuthServer):
    """Introspection says every token is inactive (a provider that answers so for tokens it does not
    track there): without a revocation nothing can have taken the new token."""

    def _introspect(self, query, headers, body):
        super()._introspect(query, headers, body)
        return {"active": False}


def test_the_new_token_is_checked_only_after_a_revocation(tmp_path):
    with DenyingIntrospectionServer(access_lifetime=300) as server:
        keeper = make_keeper(server, tmp_path, introspection_url=server.introspection_url)
        keeper.run_due()
        result = rotate(keeper, tmp_path)
        assert result["steps"] == [{"step": "refresh_exchange", "result": "ok"}]
        assert (result["result"], result["exit_code"]) == ("rotated", 0) and keeper.state.alert is None


def test_the_audit_record_goes_to_the_log_stream_and_a_store_failure_is_logged(tmp_path, caplog):
    import json
    import logging

    from tokensmith.compromise import append_audit
    from tokensmith.errors import StateError

    class FailingStore:
        def __init__(self):
            self.seen = []

        def append_audit(self, record):
            self.seen.append(record)
            raise StateError("dynamodb table t: audit write: cannot reach the AWS endpoint", client="kc")

    result = {"time": 1_800_000_000.0, "client": "kc", "operator": {"uid": 0, "user": "test"}, "old_token": "fp-old",
              "new_token": "fp-new", "steps": [], "invalidation": "revocation", "verification": "verified",
              "sinks": {}, "hooks": [], "result": "rotated", "exit_code": 0, "coalesced": False}
    store = FailingStore()
    with caplog.at_level(logging.INFO, logger="tokensmith.compromise"):
        append_audit(tmp_path / "audit.log", result, store=store)
    [audit] = [r for r in caplog.records if getattr(r, "event", None) == "audit"]
    record = json.loads(audit.getMessage())
    assert audit.getMessage() == json.dumps(record, sort_keys=True, separators=(",", ":"))
    assert record["time"] == "2027-01-15T08:00:00Z" and record["client"] == "kc" and "coalesced" not in record
    assert audit.client == "kc" and audit.levelno == logging.INFO
    assert store.seen == [record]
    assert json.loads((tmp_path / "audit.log").read_text()) == record
    [failed] = [r for r in caplog.records if getattr(r, "event", None) == "audit_store_failed"]
    assert failed.levelno == logging.ERROR and failed.client == "kc"
    assert failed.getMessage() == ("audit record not stored in the state backend (it is in the log stream): "
                                   "dynamodb table t: audit write: cannot reach the AWS endpoint")


def test_verify_url_refuses_a_non_http_url_by_name():
    from tokensmith.compromise import verify_with_resource

    assert verify_with_resource("ftp://127.0.0.1/r", "old", "new", timeout=5) == "error: not an http(s) URL"


def test_verify_url_honours_no_proxy_for_the_resource(monkeypatch):
    import socket

    from test_compromise import Resource
    from tokensmith.compromise import verify_with_resource

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{dead}")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1")
    r = Resource({"Bearer new": (200, {})})
    try:
        assert verify_with_resource(r.url, "old", "new", timeout=5) == "verified"
    finally:
        r.close()


class HeaderResource:
    """A resource that records each request's headers and answers 200 (401 to the token "old")."""

    def __init__(self, size=0):
        import http.server
        import threading

        resource = self
        self.size, self.headers = size, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                resource.headers.append({k.lower(): v for k, v in self.headers.items()})
                old = self.headers.get("Authorization") == "Bearer old"
                body = b"" if old else b"x" * resource.size
                self.send_response(401 if old else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/r"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_the_resource_sees_the_bearer_and_nothing_else_of_ours():
    from tokensmith.compromise import verify_with_resource

    r = HeaderResource()
    try:
        assert verify_with_resource(r.url, "old", "new", timeout=5, proxy="none") == "verified"
    finally:
        r.close()
    for headers, token in zip(r.headers, ("old", "new")):
        headers.pop("host"), headers.pop("connection", None)
        assert headers == {"authorization": f"Bearer {token}", "accept-encoding": "identity",
                           "user-agent": "tokensmith"}



class ReloadedWhileWaiting:
    """A keeper's lock as a config reload leaves it: whoever gets it next finds the keeper handed over."""

    def __init__(self, keeper, successor):
        self.keeper, self.successor, self.inner = keeper, successor, threading.Lock()

    def __enter__(self):
        self.inner.acquire()
        if not self.keeper.retired:
            self.keeper.hand_over(self.successor)

    def __exit__(self, *exc):
        self.inner.release()


def test_a_rotation_whose_keeper_a_reload_replaced_is_finished_on_the_successor(tmp_path):
    """Sinks, purge and the coalescing record are the new keeper's: the new token went to its sinks."""
    import random

    from fakes import MemorySink
    from tokensmith.keeper import Keeper
    from tokensmith.tokenclient import TokenClient

    with OAuthServer(access_lifetime=300) as server:
        old = make_keeper(server, tmp_path, sinks=[MemorySink("memory:before-reload")],
                          introspection_url=server.introspection_url)
        old.run_due()
        successor = Keeper(old.client, old.source, [MemorySink("memory:after-reload")], TokenClient(old.client),
                           old.store, rng=random.Random(2))
        successor.load()
        old.lock = ReloadedWhileWaiting(old, successor)
        result = rotate(old, tmp_path)
        assert (result["result"], result["verification"]) == ("rotated", "verified")
        assert result["sinks"] == {"memory:after-reload": "ok"} and list(result["purged"]) == ["memory:after-reload"]
        assert successor.last_compromise is result and old.last_compromise is None
        assert server.is_active(successor.state.access_token) and server.stats["refresh_reuse"] == 0
