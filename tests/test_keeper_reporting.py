"""What the keeper reports about a failed refresh: error text cut against every secret and token it
holds, the alert a rejected client authentication raises, the log line's reason, and the status of a
refresh in progress. The token client is the real one against the real token endpoint; where a
layer below must fail in a way the endpoint cannot produce, a wrapper raises that error instead."""

from __future__ import annotations

import base64
import logging
import random
import re

import pytest

from fakes import FailingSink, MemorySink, StaticSource
from keeper_fixtures import clock, server  # noqa: F401  (fixtures)
from tokensmith.config import ClientConfig
from tokensmith.errors import InternalError, SourceError, StateError, TokenEndpointError
from tokensmith.keeper import Keeper, _internal
from tokensmith.redact import MARK
from tokensmith.state import FencedError, StaleStateError, StateStore
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


def make_keeper(server, clock, tmp_path, *, auth_style="post", refresh=None, source=None, sinks=None, hooks=None):
    config = ClientConfig(name="c1", token_url=server.token_url, grant="password", auth_style=auth_style,
                          source={"type": "env"}, sinks=[{"type": "file", "path": "/unused"}], refresh=refresh or {})
    source = source or StaticSource(client_id="app", client_secret="app-secret", username="alice",
                                    password="alice-password")
    store = StateStore(tmp_path / "state")
    store.prepare()
    client = ScriptedTokenClient(TokenClient(config, clock=clock))
    keeper = Keeper(config, source, sinks if sinks is not None else [MemorySink()], client, store, clock=clock,
                    rng=random.Random(1), hooks=hooks)
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


class ConflictingStore(StateStore):
    """The file store, except that the next save meets another replica's write (as a shared store's CAS does)."""

    conflict = False

    def save(self, client, state, *, sync_dir=True):
        if self.conflict:
            self.conflict = False
            raise StaleStateError(f"another writer moved client {client} on (version 3, this replica last saw "
                                  f"version 2); nothing was written", client=client)
        super().save(client, state, sync_dir=sync_dir)


def test_a_state_write_another_replica_beat_is_a_retryable_failure_and_keeps_the_old_state(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path)
    keeper.store = store = ConflictingStore(tmp_path / "state")
    keeper.run_due()
    held = keeper.state.access_token
    store.conflict = True
    outcome = keeper.refresh(reason="test")
    error = outcome.error
    assert type(error) is StateError and error.retryable and error.client == "c1"
    assert error.message == ("another writer moved client c1 on (version 3, this replica last saw version 2); "
                             "nothing was written")
    assert keeper.state.access_token == held and keeper.sinks[0].current.access_token == held
    assert keeper.failures == 1 and keeper.next_due() - clock() <= keeper.client.refresh.backoff_initial


class Leader:
    """A leadership that can be lost between obtaining a token and writing the sinks."""

    def __init__(self):
        self.lost = False
        self.fenced_with = []
        self.deadlines = []

    def before_request(self, deadline):
        self.deadlines.append(deadline)

    def fence(self):
        if self.lost:
            raise FencedError("lease lost to replica b", client="c1")

    def fenced(self, reason):
        self.fenced_with.append(reason)


def test_a_leader_deposed_after_the_exchange_writes_no_sink(server, clock, tmp_path, caplog):
    sink = MemorySink()
    keeper = make_keeper(server, clock, tmp_path, sinks=[sink])
    keeper.leader = leader = Leader()
    keeper.run_due()
    assert len(sink.tokens) == 1

    class LosingSource(StaticSource):
        def read(self):  # the lease is lost while the token request is in flight
            leader.lost = True
            return super().read()

    keeper.source = LosingSource(client_id="app", client_secret="app-secret", username="alice",
                                 password="alice-password")
    with caplog.at_level(logging.INFO, logger="tokensmith.keeper"):
        outcome = keeper.refresh(reason="test", reload_credentials=True)
    assert isinstance(outcome.error, FencedError) and outcome.sinks == {}
    assert len(sink.tokens) == 1 and leader.fenced_with == ["lease lost to replica b"]
    assert leader.deadlines == [keeper.client.timeout] * 2  # the lease must outlast each token request
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "fenced"]
    assert line.getMessage() == "refresh stopped: lease lost to replica b" and line.client == "c1"


class Metrics:
    def __init__(self):
        self.calls = []

    def refresh_attempt(self, client, grant):
        pass

    def refresh_result(self, client, ok, reason, seconds, token):
        pass

    def sink_failure(self, client, sink_type):
        self.calls.append(("sink_failure", client, sink_type))

    def sink_success(self, client, sink, when):
        self.calls.append(("sink_success", client, sink, when))


def test_a_sink_bug_is_kept_as_the_clients_last_error_and_each_sink_is_counted(server, clock, tmp_path):
    class Broken(MemorySink):
        def write(self, token):
            raise RuntimeError("bug holding at-secret")

    keeper = make_keeper(server, clock, tmp_path, sinks=[Broken("memory:broken"), MemorySink("memory:good")])
    keeper.metrics = metrics = Metrics()
    clock.advance(0.5)
    keeper.refresh(reason="test")
    raised_at = f"test_keeper_reporting.py:{Broken.write.__code__.co_firstlineno + 1}"
    assert keeper.state.last_error == f"client c1: sink memory:broken: unexpected RuntimeError at {raised_at}"
    assert keeper.state.last_error_at == clock()
    assert metrics.calls == [("sink_failure", "c1", "memory"), ("sink_success", "c1", "memory:good", clock())]


def test_a_token_obtained_the_instant_the_old_one_expired_is_spread_as_a_catch_up(server, clock, tmp_path):
    """At its expires_at a token is no longer valid, so the next one is scheduled like a first token."""
    dues = []
    for seed in range(12):
        keeper = make_keeper(server, clock, tmp_path / str(seed), refresh={"at_fraction": 0.75, "jitter": 0.1,
                                                                           "min_lead": 0})
        keeper.rng = random.Random(seed)
        keeper.refresh(reason="test")
        clock.advance(keeper.state.expires_at - clock())
        keeper.refresh(reason="test")
        assert keeper.state.obtained_at == clock()
        dues.append((keeper.next_due() - clock()) / 600)
    assert all(0.375 <= due <= 0.85 for due in dues)
    assert min(dues) < 0.6, "an expired token's successor must be spread from the early catch-up point"


class FullDisk(StateStore):
    """The file store on a disk that fills up after `saves` more successful saves."""

    saves = None

    def save(self, client, state, *, sync_dir=True):
        if self.saves is not None:
            if self.saves == 0:
                raise StateError(f"cannot write state file {self._file(client)}: No space left on device",
                                 client=client)
            self.saves -= 1
        super().save(client, state, sync_dir=sync_dir)


def test_a_sink_record_that_cannot_be_saved_is_logged_for_the_client(server, clock, tmp_path, caplog):
    keeper = make_keeper(server, clock, tmp_path)  # a memory sink cannot tell which token it holds
    keeper.store = store = FullDisk(tmp_path / "state")
    store.saves = 1  # the new token is saved; the record of which sinks hold it is not
    with caplog.at_level(logging.INFO, logger="tokensmith.keeper"):
        outcome = keeper.refresh(reason="test")
    assert outcome.ok and keeper.sinks[0].current.access_token == keeper.state.access_token
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "state_write_failed"]
    assert line.levelno == logging.ERROR and line.client == "c1"
    assert line.getMessage() == f"cannot write state file {tmp_path / 'state' / 'c1.json'}: No space left on device"


def test_a_token_kept_from_state_at_start_up_is_scheduled_on_the_routine_spread(server, clock, tmp_path):
    """Only a token obtained while catching up is spread from the early point; one still valid at a
    restart keeps the routine at_fraction +- jitter schedule."""
    first = make_keeper(server, clock, tmp_path, refresh={"at_fraction": 0.75, "jitter": 0.1, "min_lead": 0})
    first.refresh(reason="test")
    obtained = first.state.obtained_at
    dues = []
    for seed in range(16):
        keeper = make_keeper(server, clock, tmp_path, refresh={"at_fraction": 0.75, "jitter": 0.1, "min_lead": 0})
        keeper.rng = random.Random(seed)
        keeper.load()
        dues.append((keeper.next_due() - obtained) / 600)
    assert all(0.65 - 1e-9 <= due <= 0.85 + 1e-9 for due in dues), dues
    assert max(dues) - min(dues) > 0.05


def test_the_refresh_token_fallback_lines_name_the_client(server, clock, tmp_path, caplog):
    keeper = make_keeper(server, clock, tmp_path, refresh={"refresh_token_lifetime": 1000})
    keeper.refresh(reason="test")
    keeper.store = store = FullDisk(tmp_path / "state")
    keeper.state_unsaved = True
    store.saves = 0
    with caplog.at_level(logging.INFO, logger="tokensmith.keeper"):
        assert keeper.refresh(reason="test", exchange=True).grant == "password"  # not spent while unsaved
        store.saves = None
        clock.advance(1000)
        assert keeper.refresh(reason="test", exchange=True).grant == "password"  # aged
    unsaved = [r for r in caplog.records if getattr(r, "event", None) == "state_write_failed"]
    aged = [r for r in caplog.records if getattr(r, "event", None) == "refresh_token_aged"]
    assert unsaved and all(r.client == "c1" for r in unsaved)
    assert unsaved[0].getMessage() == ("state still cannot be saved: not spending an unsaved refresh token; using "
                                       "the password grant")
    assert [r.client for r in aged] == ["c1"]


def test_invalid_client_on_an_exchange_drops_the_refresh_token_even_from_a_5xx_answer(server, clock, tmp_path, caplog):
    """Some providers answer a refresh token bound to a rotated client secret with invalid_client and
    HTTP 500: the refresh token is dead either way, so it is dropped and the primary grant used."""
    keeper = make_keeper(server, clock, tmp_path)
    keeper.refresh(reason="test")
    server.fail_next(status=500, body='{"error": "invalid_client"}')
    with caplog.at_level(logging.INFO, logger="tokensmith.keeper"):
        outcome = keeper.refresh(reason="test", exchange=True)
    assert outcome.ok and outcome.fell_back == "invalid_client" and outcome.grant == "password"
    assert keeper.token_client.grants[-2:] == ["refresh_token", "password"]
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "refresh_token_rejected"]
    assert line.getMessage() == "refresh token rejected (invalid_client); falling back to the password grant"
    assert line.client == "c1" and line.levelno == logging.WARNING


def test_a_refusal_without_an_oauth_code_is_reported_by_its_http_status(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path)
    keeper.refresh(reason="test")
    server.fail_next(status=400, body="{}")
    outcome = keeper.refresh(reason="test", exchange=True)
    assert outcome.ok and outcome.fell_back == "http_400" and outcome.grant == "password"


def test_a_refused_refresh_token_is_forgotten_on_disk_even_when_the_fallback_fails(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path)
    keeper.refresh(reason="test")
    keeper.token_client.errors = [
        TokenEndpointError("refresh token refused", error="invalid_grant", retryable=False),
        TokenEndpointError("provider down", error="temporarily_unavailable", retryable=True)]
    assert not keeper.refresh(reason="test", exchange=True).ok
    on_disk = StateStore(tmp_path / "state").load("c1")
    assert on_disk.refresh_token is None and on_disk.access_token == keeper.state.access_token
    assert sorted(path.name for path in (tmp_path / "state").glob("*.json")) == ["c1.json"]


def test_the_refresh_token_grant_starts_from_the_sources_refresh_token(server, clock, tmp_path):
    seed = TokenClient(ClientConfig(name="seed", token_url=server.token_url, grant="password", source={"type": "env"},
                                    sinks=[{"type": "file", "path": "/unused"}]), clock=clock)
    from tokensmith.sources import Credentials

    issued = seed.obtain("password", Credentials(client_id="app", client_secret="app-secret", username="alice",
                                                 password="alice-password"))
    config = ClientConfig(name="c1", token_url=server.token_url, grant="refresh_token", source={"type": "env"},
                          sinks=[{"type": "file", "path": "/unused"}])
    store = StateStore(tmp_path / "state")
    store.prepare()
    source = StaticSource(client_id="app", client_secret="app-secret", refresh_token=issued.refresh_token)
    keeper = Keeper(config, source, [MemorySink()], TokenClient(config, clock=clock), store, clock=clock,
                    rng=random.Random(1))
    keeper.load()
    outcome = keeper.refresh(reason="test")
    assert outcome.ok and outcome.grant == "refresh_token" and outcome.exchanged_refresh_token is True
    assert not server.is_active(issued.access_token)  # the exchange spent the bootstrap pair


def test_an_outcome_names_its_client_and_whether_the_held_refresh_token_was_paired(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path)
    first = keeper.refresh(reason="test")
    assert first.client == "c1" and first.ok is True and first.old_paired is False  # nothing held yet
    assert (tmp_path / "state" / "c1.lock").exists()  # the per-client cross-process lock
    assert keeper.refresh(reason="test", exchange=True).old_paired is True
    keeper.state.refresh_token_obtained_at -= 5  # a refresh token kept from an earlier response
    assert keeper.refresh(reason="test").old_paired is False
    keeper.state.refresh_token = None
    assert keeper.refresh(reason="test").old_paired is False
    keeper.token_client.errors = [TokenEndpointError("down", error="temporarily_unavailable", retryable=True)]
    failed = keeper.refresh(reason="test")
    assert failed.ok is False and failed.client == "c1"


def test_a_scheduled_exchange_does_not_reread_the_credential_source(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path, refresh={"strategy": "refresh_token"})
    keeper.run_due()
    reads = keeper.source.reads
    clock.advance(keeper.next_due() - clock())
    keeper.run_due()
    assert keeper.state.last_grant == "refresh_token" and keeper.source.reads == reads


class TimingMetrics(Metrics):
    def __init__(self):
        super().__init__()
        self.seconds = []

    def refresh_result(self, client, ok, reason, seconds, token):
        self.seconds.append((ok, seconds))


def test_refresh_durations_are_measured_from_the_start_of_the_refresh(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path)
    keeper.metrics = metrics = TimingMetrics()
    keeper.refresh(reason="test")
    keeper.token_client.errors = [TokenEndpointError("down", error="temporarily_unavailable", retryable=True),
                                  RuntimeError("bug")]
    keeper.refresh(reason="test")
    keeper.refresh(reason="test")
    assert [ok for ok, _ in metrics.seconds] == [True, False, False]
    assert all(isinstance(seconds, float) and 0 <= seconds < 60 for _, seconds in metrics.seconds), metrics.seconds


def test_a_first_token_is_logged_without_a_replaced_one(server, clock, tmp_path, caplog):
    keeper = make_keeper(server, clock, tmp_path)
    with caplog.at_level(logging.INFO, logger="tokensmith.keeper"):
        keeper.refresh(reason="test")
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "refreshed"]
    assert re.fullmatch(r"new token \S+ via password grant \(test\), expires_at=\d+ next_refresh=\d+",
                        line.getMessage()), line.getMessage()


def test_the_hooks_run_with_the_client_and_the_new_token(server, clock, tmp_path):
    class Hooks:
        def __init__(self):
            self.calls = []

        def run(self, client, token):
            self.calls.append((client.name, token.access_token))
            return [{"hook": "reload", "ok": True}]

    hooks = Hooks()
    keeper = make_keeper(server, clock, tmp_path, hooks=hooks)
    outcome = keeper.refresh(reason="test")
    assert hooks.calls == [("c1", keeper.state.access_token)] and outcome.hooks == [{"hook": "reload", "ok": True}]


def test_a_lease_that_cannot_cover_the_request_stops_the_refresh_without_a_failure(server, clock, tmp_path):
    class Expiring(Leader):
        def before_request(self, deadline):
            raise FencedError("lease ends before the request could be answered", client="c1")

    keeper = make_keeper(server, clock, tmp_path)
    keeper.leader = leader = Expiring()
    outcome = keeper.refresh(reason="test")
    assert isinstance(outcome.error, FencedError) and not outcome.ok and keeper.failures == 0
    assert leader.fenced_with == ["lease ends before the request could be answered"]
    assert keeper.state.access_token is None and keeper.sinks[0].tokens == []


def test_a_chain_another_process_moved_on_at_the_same_instant_is_continued(server, clock, tmp_path):
    """The clock does not move between two processes' refreshes (a coarse clock, or a fake one): the
    newer state on disk is still taken, so its refresh token is the one the next exchange spends."""
    daemon = make_keeper(server, clock, tmp_path, refresh={"strategy": "refresh_token"})
    daemon.refresh(reason="test")
    cli = make_keeper(server, clock, tmp_path, refresh={"strategy": "refresh_token"})
    cli.refresh(reason="test", exchange=True)
    assert cli.state.obtained_at == daemon.state.obtained_at
    outcome = daemon.refresh(reason="test", exchange=True)
    assert outcome.ok and outcome.old_token.access_token == cli.state.access_token
    assert server.stats["refresh_reuse"] == 0


def test_an_unreadable_state_file_at_start_up_is_logged_for_the_client_and_a_new_token_obtained(server, clock,
                                                                                               tmp_path, caplog):
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "state" / "c1.json").write_text("{damaged")
    with caplog.at_level(logging.INFO, logger="tokensmith.keeper"):
        keeper = make_keeper(server, clock, tmp_path)
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "state_unreadable"]
    assert line.levelno == logging.WARNING and line.client == "c1"
    assert re.fullmatch(r"client c1: state file \S+/c1\.json was unreadable and was moved to c1\.json\.corrupt-\d+; "
                        r"a new token will be obtained", line.getMessage()), line.getMessage()
    assert keeper.state.access_token is None and keeper.refresh(reason="test").ok


def test_the_first_sink_retry_after_a_restart_backs_off_from_the_first_step(server, clock, tmp_path):
    first = make_keeper(server, clock, tmp_path, sinks=[])
    first.refresh(reason="test")  # a token in state that no sink holds yet (a crash before the sink write)
    sink = FailingSink(1)
    keeper = make_keeper(server, clock, tmp_path, sinks=[sink], refresh={"backoff_initial": 10, "backoff_max": 600})
    assert keeper.pending_sinks() == [sink]
    keeper.run_due()
    assert sink.attempts == 1 and keeper.sink_failures == 1
    assert keeper.next_due() - clock() <= 10
    clock.advance(keeper.next_due() - clock())
    keeper.run_due()
    assert sink.current.access_token == first.state.access_token and keeper.sink_failures == 0


def test_a_token_kept_at_start_up_is_logged_and_one_at_its_expiry_is_not_kept(server, clock, tmp_path, caplog):
    first = make_keeper(server, clock, tmp_path)
    first.refresh(reason="test")
    token = first.state.token
    first.state_unsaved = True
    with caplog.at_level(logging.INFO, logger="tokensmith.keeper"):
        first.load()  # a restart, or a standby taking over: the state just read is durable
    assert first.state_unsaved is False
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "token_kept"]
    assert line.client == "c1" and line.levelno == logging.INFO
    assert line.getMessage() == (f"kept token {token.fingerprint} from state, expires_at={int(token.expires_at)} "
                                 f"next_refresh={int(first.refresh_at)}")
    clock.advance(token.expires_at - clock())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tokensmith.keeper"):
        restarted = make_keeper(server, clock, tmp_path)
    assert restarted.next_due() == 0.0  # at its expires_at a token is no longer valid: refresh at once
    assert not [r for r in caplog.records if getattr(r, "event", None) == "token_kept"]
