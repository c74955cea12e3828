"""The keeper's timing, grant choice, retries and fan-out, on a fake clock against the real
stateful token endpoint over loopback."""

import json
import random

import pytest

from fakes import FailingSink, MemorySink, StaticSource
from keeper_fixtures import clock, server  # noqa: F401  (fixtures)
from tokensmith.config import ClientConfig, FileSinkConfig
from tokensmith.errors import ConfigError, TokenEndpointError
from tokensmith.keeper import Keeper
from tokensmith.metrics import reason_label
from tokensmith.sinks.file import FileSink
from tokensmith.sources import Credentials
from tokensmith.state import StateStore
from tokensmith.tokenclient import TokenClient


def make_keeper(server, clock, tmp_path, *, grant="password", auth_style="post", client_id="app",
                secret="app-secret", sinks=None, source=None, refresh=None, seed=1):
    config = ClientConfig(name="c1", token_url=server.token_url, grant=grant, auth_style=auth_style,
                          source={"type": "env"}, sinks=[{"type": "file", "path": "/unused"}],
                          refresh=refresh or {})
    source = source or StaticSource(client_id=client_id, client_secret=secret, username="alice",
                                    password="alice-password")
    sinks = sinks if sinks is not None else [MemorySink()]
    store = StateStore(tmp_path / "state")
    store.prepare()
    keeper = Keeper(config, source, sinks, TokenClient(config, clock=clock), store, clock=clock,
                    rng=random.Random(seed))
    keeper.load()
    return keeper


def test_first_run_obtains_with_primary_grant_and_writes_every_sink(server, clock, tmp_path):
    sinks = [MemorySink("memory:a"), MemorySink("memory:b")]
    keeper = make_keeper(server, clock, tmp_path, sinks=sinks)
    keeper.run_due()
    assert keeper.state.last_grant == "password"
    assert [s.current.access_token for s in sinks] == [keeper.state.access_token] * 2
    assert server.is_active(keeper.state.access_token)
    assert keeper.state.expires_at == pytest.approx(clock() + 600)


def steady(keeper, clock):
    """Past the first token (whose refresh is spread wider), to the routine schedule."""
    keeper.run_due()
    clock.advance(keeper.next_due() - clock())
    keeper.run_due()
    return keeper.state.obtained_at


def test_refresh_is_scheduled_at_the_fraction_of_lifetime_within_jitter(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path, refresh={"at_fraction": 0.75, "jitter": 0.1, "min_lead": 0})
    obtained = steady(keeper, clock)
    due = keeper.next_due() - obtained
    assert 0.65 * 600 <= due <= 0.85 * 600
    clock.advance(keeper.next_due() - clock() - 1)
    current = keeper.state.access_token
    keeper.run_due()
    assert keeper.state.access_token == current, "refreshed before it was due"
    clock.advance(1)
    keeper.run_due()
    assert keeper.state.access_token != current


def test_min_lead_pulls_the_refresh_earlier_and_jitter_still_spreads_it(server, clock, tmp_path):
    dues = []
    for seed in range(10):
        keeper = make_keeper(server, clock, tmp_path / str(seed), seed=seed,
                             refresh={"at_fraction": 0.95, "jitter": 0.1, "min_lead": 120})
        obtained = steady(keeper, clock)
        dues.append(keeper.next_due() - obtained)
    assert all(600 - 120 - 2 * 60 <= due <= 600 - 120 for due in dues), "never later than min_lead before expiry"
    assert max(dues) - min(dues) > 30, "the clamp must not line every client up on one instant"


def test_lifetime_shorter_than_min_lead_does_not_refresh_in_a_loop(server, clock, tmp_path):
    server.add_client("short", "short-secret", dialect="post", access_lifetime=30)
    keeper = make_keeper(server, clock, tmp_path, grant="client_credentials", client_id="short",
                         secret="short-secret", refresh={"min_lead": 60, "jitter": 0})
    keeper.run_due()
    assert keeper.next_due() - clock() >= 30 * 0.3
    obtained = steady(keeper, clock)
    assert keeper.next_due() - obtained >= 15


def test_jitter_spreads_clients(server, clock, tmp_path):
    dues = set()
    for seed in range(8):
        keeper = make_keeper(server, clock, tmp_path / str(seed), seed=seed, refresh={"min_lead": 0})
        obtained = steady(keeper, clock)
        dues.add(round(keeper.next_due() - obtained))
    assert len(dues) >= 6


def test_clients_started_together_spread_their_first_refresh_widely(server, clock, tmp_path):
    dues = []
    for seed in range(20):
        keeper = make_keeper(server, clock, tmp_path / str(seed), seed=seed,
                             refresh={"at_fraction": 0.75, "jitter": 0.1, "min_lead": 0})
        keeper.run_due()
        dues.append(keeper.next_due() - clock())
    assert all(0.375 * 600 <= due <= 0.85 * 600 for due in dues)
    assert max(dues) - min(dues) > 0.3 * 600, "a cold start must not become a refresh wave"


def test_routine_refresh_exchanges_the_refresh_token_and_revokes_the_old_access_token(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path)
    keeper.run_due()
    old = keeper.state.access_token
    clock.advance(keeper.next_due() - clock())
    keeper.run_due()
    assert keeper.state.last_grant == "refresh_token"
    assert not server.is_active(old), "the seeds say a refresh exchange revokes the old access token"
    assert server.is_active(keeper.state.access_token)
    assert server.stats["refresh_reuse"] == 0


def test_reissue_strategy_leaves_the_old_token_valid(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path, refresh={"strategy": "reissue"})
    keeper.run_due()
    old = keeper.state.access_token
    clock.advance(keeper.next_due() - clock())
    keeper.run_due()
    assert keeper.state.last_grant == "password"
    assert server.is_active(old) and server.is_active(keeper.state.access_token)


def test_rejected_refresh_token_falls_back_to_the_primary_grant(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path)
    keeper.run_due()
    # someone else spends the refresh token (e.g. a crash lost the response)
    TokenClient(keeper.client, clock=clock).obtain("refresh_token", keeper.source.creds,
                                                   refresh_token=keeper.state.refresh_token)
    outcome = keeper.refresh(reason="test")
    assert outcome.ok and outcome.fell_back == "invalid_grant" and outcome.grant == "password"
    assert server.is_active(keeper.state.access_token)
    assert keeper.state.refresh_token and keeper.state.refresh_token != outcome.old_token.refresh_token


def test_refresh_token_older_than_its_lifetime_is_not_presented(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path, refresh={"refresh_token_lifetime": 1000})
    keeper.run_due()
    clock.advance(1001)
    outcome = keeper.refresh(reason="test")
    assert outcome.grant == "password"
    assert server.stats["refresh_exchanges"] == 0


def test_state_is_persisted_before_any_sink_sees_the_token(server, clock, tmp_path):
    store_path = tmp_path / "state" / "c1.json"
    seen = []

    class Spy(MemorySink):
        def write(self, token):
            seen.append(token.access_token in store_path.read_text())
            super().write(token)

    keeper = make_keeper(server, clock, tmp_path, sinks=[Spy()])
    keeper.run_due()
    clock.advance(keeper.next_due() - clock())
    keeper.run_due()
    assert seen == [True, True]


def test_restart_keeps_a_fresh_token_and_the_refresh_chain(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path)
    keeper.run_due()
    token, refresh = keeper.state.access_token, keeper.state.refresh_token
    issued = server.stats["issued"]
    again = make_keeper(server, clock, tmp_path)
    assert again.state.access_token == token and again.state.refresh_token == refresh
    again.run_due()
    assert server.stats["issued"] == issued, "a fresh token was refreshed again after restart"
    clock.advance(again.next_due() - clock())
    again.run_due()
    assert again.state.last_grant == "refresh_token" and server.stats["refresh_reuse"] == 0


def file_sink(path):
    sink = FileSink(FileSinkConfig(type="file", path=path, format="json"), "c1")
    sink.check()
    return sink


def test_a_file_sink_is_its_own_record_so_a_refresh_writes_state_once(server, clock, tmp_path):
    token_file = tmp_path / "c1.token"
    keeper = make_keeper(server, clock, tmp_path, sinks=[file_sink(token_file)], grant="client_credentials",
                         client_id="svc", secret="svc-secret", auth_style="basic")
    keeper.run_due()
    state_file = tmp_path / "state" / "c1.json"
    saved = state_file.stat().st_ino
    clock.advance(keeper.next_due() - clock())
    keeper.run_due()
    assert state_file.stat().st_ino != saved
    rewrites = []
    keeper.store.save = lambda *args, **kwargs: rewrites.append(args)
    clock.advance(keeper.next_due() - clock())
    keeper.run_due()
    assert len(rewrites) == 1, "state was saved again after the file sink write"
    assert keeper.state.access_token in token_file.read_text() and keeper.ready()


def test_restart_reads_the_file_sink_back_instead_of_rewriting_it(server, clock, tmp_path):
    token_file = tmp_path / "c1.token"
    keeper = make_keeper(server, clock, tmp_path, sinks=[file_sink(token_file)])
    keeper.run_due()
    before = token_file.stat()
    again = make_keeper(server, clock, tmp_path, sinks=[file_sink(token_file)])
    assert again.ready() and again.status()["sinks_pending"] == []
    again.run_due()
    after = token_file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_restart_after_a_crash_before_the_sink_write_writes_the_sink(server, clock, tmp_path):
    token_file = tmp_path / "c1.token"
    keeper = make_keeper(server, clock, tmp_path, sinks=[file_sink(token_file)])
    keeper.run_due()
    old = token_file.read_text()
    clock.advance(keeper.next_due() - clock())

    class CrashBeforeSinks(BaseException):  # not an Exception: the keeper must not catch it
        pass

    class Dying(FileSink):
        def write(self, token):
            raise CrashBeforeSinks()

    keeper.sinks = [Dying(keeper.sinks[0].config, "c1")]  # the process dies after the state save
    with pytest.raises(CrashBeforeSinks):
        keeper.run_due()
    again = make_keeper(server, clock, tmp_path, sinks=[file_sink(token_file)])
    assert token_file.read_text() == old and not again.ready()
    again.run_due()
    assert again.state.access_token in token_file.read_text() and again.ready()


def test_a_symlink_holding_the_token_is_still_replaced(server, clock, tmp_path):
    token_file = tmp_path / "c1.token"
    keeper = make_keeper(server, clock, tmp_path, sinks=[file_sink(token_file)])
    keeper.run_due()
    elsewhere = tmp_path / "elsewhere"
    token_file.rename(elsewhere)
    token_file.symlink_to(elsewhere)
    again = make_keeper(server, clock, tmp_path, sinks=[file_sink(token_file)])
    assert not again.ready()
    again.run_due()
    assert not token_file.is_symlink() and again.ready()


def test_failures_back_off_with_full_jitter_and_honour_retry_after(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path, refresh={"backoff_initial": 1, "backoff_max": 8})
    delays = []
    for _ in range(6):
        server.fail_next(status=503)
        keeper.run_due()
        delays.append(keeper.next_due() - clock())
        clock.advance(delays[-1])
    caps = [1, 2, 4, 8, 8, 8]
    assert all(0.05 <= delay <= cap for delay, cap in zip(delays, caps))
    assert len(set(delays)) == len(delays), "the same delay every time is not jitter"
    server.fail_next(status=429, headers={"Retry-After": "30"})
    keeper.run_due()
    assert keeper.next_due() - clock() >= 30
    clock.advance(30)
    keeper.run_due()
    assert keeper.failures == 0 and keeper.state.access_token


def test_keeps_retrying_past_expiry_and_recovers(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path, refresh={"backoff_max": 5})
    keeper.run_due()
    server.fail_next(100, status=500)
    clock.advance(700)
    for _ in range(100):
        keeper.run_due()
        clock.advance(keeper.next_due() - clock())
    assert keeper.failures == 100 and not keeper.ready()
    keeper.run_due()
    assert keeper.ready()


def test_a_failing_sink_is_retried_without_a_new_token_and_others_still_get_it(server, clock, tmp_path):
    good, flaky = MemorySink("memory:good"), FailingSink(2, "memory:flaky")
    keeper = make_keeper(server, clock, tmp_path, sinks=[flaky, good])
    keeper.run_due()
    assert good.current is not None and flaky.current is None
    issued = server.stats["issued"]
    for _ in range(2):
        clock.advance(keeper.next_due() - clock())
        keeper.run_due()
    assert flaky.current.access_token == good.current.access_token == keeper.state.access_token
    assert server.stats["issued"] == issued
    assert keeper.ready()


def test_source_outage_uses_last_good_credentials(server, clock, tmp_path):
    source = StaticSource(client_id="app", client_secret="app-secret", username="alice", password="alice-password")
    keeper = make_keeper(server, clock, tmp_path, source=source, refresh={"strategy": "reissue"})
    keeper.run_due()
    source.fail = 5
    clock.advance(keeper.next_due() - clock())
    outcome = keeper.refresh(reason="test")
    assert outcome.ok and outcome.grant == "password"


def test_credentials_are_reread_for_a_new_token_so_a_rotated_secret_is_picked_up(server, clock, tmp_path):
    source = StaticSource(client_id="app", client_secret="app-secret", username="alice", password="alice-password")
    keeper = make_keeper(server, clock, tmp_path, source=source, refresh={"strategy": "reissue"})
    keeper.run_due()
    server.set_client_secret("app", "rotated-secret")
    source.creds = Credentials(client_id="app", client_secret="rotated-secret", username="alice",
                               password="alice-password")
    outcome = keeper.refresh(reason="test")
    assert outcome.ok


def test_invalid_client_is_an_alert_in_status(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path, grant="client_credentials", secret="wrong")
    outcome = keeper.refresh(reason="test")
    assert isinstance(outcome.error, TokenEndpointError) and outcome.error.error == "invalid_client"
    status = keeper.status()
    assert "invalid_client" in status["alert"] and "wrong" not in str(status)
    assert keeper.next_due() - clock() <= keeper.client.refresh.backoff_max


def test_status_names_tokens_only_by_fingerprint(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path)
    keeper.run_due()
    text = str(keeper.status())
    assert keeper.state.access_token not in text and keeper.state.refresh_token not in text
    assert keeper.status()["token"] == keeper.state.token.fingerprint


def test_backoff_is_full_jitter_between_the_floor_and_a_doubling_cap(server, clock, tmp_path):
    """Full jitter: each retry waits uniformly between the 50 ms floor and the cap, which doubles
    per failure up to backoff_max. Neither `delay = cap` (clients retry in lock-step) nor no
    backoff at all (a retry storm against the provider) may pass."""
    keeper = make_keeper(server, clock, tmp_path, refresh={"backoff_initial": 2, "backoff_max": 60})
    error = TokenEndpointError("HTTP 503", client="c1", retryable=True)
    for attempt, cap in [(1, 2), (2, 4), (3, 8), (4, 16), (5, 32), (6, 60), (40, 60)]:
        delays = [keeper.backoff(attempt, error) for _ in range(400)]
        assert all(0.05 <= delay <= cap for delay in delays), attempt
        assert min(delays) < 0.15 * cap and max(delays) > 0.85 * cap, f"attempt {attempt} is not spread to the cap"
        assert 0.4 * cap < sum(delays) / len(delays) < 0.6 * cap, f"attempt {attempt} is not uniform"


def test_retries_through_the_keeper_wait_longer_as_failures_go_on(server, clock, tmp_path):
    """On the fake clock: across clients, later retries wait longer on average and never pile up."""
    waits = {attempt: [] for attempt in range(1, 7)}
    for seed in range(30):
        keeper = make_keeper(server, clock, tmp_path / str(seed), seed=seed,
                             refresh={"backoff_initial": 1, "backoff_max": 16})
        for attempt in range(1, 7):
            server.fail_next(status=503)
            keeper.run_due()
            assert keeper.failures == attempt
            waits[attempt].append(keeper.next_due() - clock())
            clock.advance(waits[attempt][-1])
        server.fail_next(0)
    means = [sum(values) / len(values) for values in waits.values()]
    assert means == sorted(means) and means[-1] > 5, f"no exponential backoff: {means}"
    assert all(len(set(round(w, 3) for w in values)) > 20 for values in waits.values()), "retries in lock-step"


def test_a_non_retryable_failure_waits_up_to_the_longest_backoff(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path, refresh={"backoff_initial": 1, "backoff_max": 100})
    error = TokenEndpointError("invalid_client", client="c1", retryable=False)
    delays = [keeper.backoff(1, error) for _ in range(200)]
    assert max(delays) > 50 and all(delay <= 100 for delay in delays)


def test_retry_after_is_a_lower_bound_not_a_replacement(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path, refresh={"backoff_initial": 1, "backoff_max": 100})
    error = TokenEndpointError("HTTP 429", client="c1", retryable=True, retry_after=3)
    delays = [keeper.backoff(7, error) for _ in range(200)]
    assert min(delays) >= 3 and max(delays) > 50


def test_an_unsaved_refresh_token_is_never_spent_while_state_cannot_be_saved(server, clock, tmp_path):
    """Nothing lost: a refresh token reaches the provider only once it is durable. While the state
    file cannot be replaced (here: a directory stands at its path, which stops root too) the keeper
    uses the primary grant instead of spending the refresh token it could not save."""
    keeper = make_keeper(server, clock, tmp_path)
    keeper.run_due()
    state_file = tmp_path / "state" / "c1.json"
    state_file.unlink()
    state_file.mkdir()
    clock.advance(keeper.next_due() - clock())
    keeper.run_due()  # the exchange spends the durable refresh token; the new one cannot be saved
    assert keeper.state.last_grant == "refresh_token" and keeper.state_unsaved
    unsaved = keeper.state.refresh_token
    exchanges = server.stats["refresh_exchanges"]
    clock.advance(keeper.next_due() - clock())
    keeper.run_due()
    assert keeper.state.last_grant == "password", "an unsaved refresh token was spent"
    assert server.stats["refresh_exchanges"] == exchanges
    assert keeper.state_unsaved and server.is_active(keeper.state.access_token)
    assert keeper.state.refresh_token != unsaved
    state_file.rmdir()
    clock.advance(keeper.next_due() - clock())
    keeper.run_due()
    assert keeper.state.last_grant == "refresh_token" and not keeper.state_unsaved
    assert server.stats["refresh_reuse"] == 0


def test_a_dead_refresh_token_that_cannot_be_forgotten_on_disk_is_not_presented_again(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path)
    keeper.run_due()
    TokenClient(keeper.client, clock=clock).obtain("refresh_token", keeper.source.creds,
                                                   refresh_token=keeper.state.refresh_token)
    state_file = tmp_path / "state" / "c1.json"
    state_file.unlink()
    state_file.mkdir()
    outcome = keeper.refresh(reason="test")
    assert outcome.ok and outcome.fell_back == "invalid_grant" and keeper.state_unsaved
    reuse = server.stats["refresh_reuse"]
    outcome = keeper.refresh(reason="test")
    assert outcome.ok and outcome.grant == "password" and outcome.fell_back is None
    assert server.stats["refresh_reuse"] == reuse


def test_a_refresh_continues_the_chain_another_process_moved_on(server, clock, tmp_path):
    """A CLI rotating without the daemon writes the state file; the daemon's keeper reads it back
    before its next refresh instead of presenting the refresh token that was spent meanwhile."""
    daemon_side = make_keeper(server, clock, tmp_path)
    daemon_side.run_due()
    cli_side = make_keeper(server, clock, tmp_path)
    clock.advance(1)
    assert cli_side.refresh(reason="cli").grant == "refresh_token"
    moved_on = cli_side.state.access_token
    outcome = daemon_side.refresh(reason="scheduled")
    assert outcome.ok and outcome.grant == "refresh_token" and outcome.fell_back is None
    assert outcome.old_token.access_token == moved_on, "the keeper did not reload the newer state"
    assert server.stats["refresh_reuse"] == 0


def test_an_older_state_file_does_not_roll_the_keeper_back(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path)
    keeper.run_due()
    older = keeper.store.load("c1")
    clock.advance(5)
    keeper.refresh(reason="test")
    newer = keeper.state.access_token
    other = StateStore(tmp_path / "state")
    other.save("c1", older)  # e.g. a stale writer puts back what it had
    clock.advance(5)
    outcome = keeper.refresh(reason="test")
    assert outcome.old_token.access_token == newer and outcome.fell_back is None


class RecordingMetrics:
    def __init__(self):
        self.calls = []

    def refresh_attempt(self, client, grant):
        self.calls.append(("attempt", client, grant))

    def refresh_result(self, client, ok, reason, seconds, token):
        assert seconds >= 0
        if not ok:  # the keeper hands over the error itself; the metric keeps only its bounded label
            assert isinstance(reason, BaseException)
            reason = reason_label(reason)
        self.calls.append(("result", client, ok, reason, token.fingerprint if token else None))

    def sink_failure(self, client, sink_type):
        self.calls.append(("sink_failure", client, sink_type))

    def sink_success(self, client, sink, when):
        self.calls.append(("sink_success", client, sink, when))


def test_status_before_any_token_and_after_one(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path)
    assert keeper.status() == {"client": "c1", "token": None, "expires_at": None, "valid": False, "last_refresh": None,
                               "last_grant": None, "next_refresh": None, "refresh_token_held": False, "failures": 0,
                               "last_error": None, "alert": None, "sinks_pending": [], "busy_since": None}
    assert not keeper.ready()
    clock.advance(0.5)
    keeper.run_due()
    state = keeper.state
    assert keeper.status() == {"client": "c1", "token": state.token.fingerprint, "expires_at": int(state.expires_at),
                               "valid": True, "last_refresh": int(clock()), "last_grant": "password",
                               "next_refresh": int(keeper.next_due()), "refresh_token_held": True, "failures": 0,
                               "last_error": None, "alert": None, "sinks_pending": [], "busy_since": None}
    assert keeper.ready()
    clock.advance(state.expires_at - clock())
    assert keeper.status()["valid"] is False and not keeper.ready(), "a token at its expiry instant is not valid"


def test_status_and_metrics_after_failures(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path, sinks=[FailingSink(1)])
    keeper.metrics = metrics = RecordingMetrics()
    server.fail_next(status=503, body='{"error": "server_error"}')
    keeper.run_due()
    status = keeper.status()
    assert status["failures"] == 1 and status["token"] is None and status["next_refresh"] == int(keeper.retry_at)
    assert "503" in status["last_error"] and keeper.state.last_error_at == clock()
    assert keeper.retry_at > clock() and keeper.next_due() == keeper.retry_at
    assert metrics.calls == [("attempt", "c1", "password"), ("result", "c1", False, "server_error", None)]
    clock.advance(keeper.next_due() - clock())
    metrics.calls.clear()
    keeper.run_due()
    assert metrics.calls == [("attempt", "c1", "password"), ("result", "c1", True, "ok", keeper.state.token.fingerprint),
                             ("sink_failure", "c1", "memory")]
    assert keeper.status()["sinks_pending"] == ["memory:failing"] and keeper.failures == 0
    assert not keeper.ready() and keeper.sink_failures == 1
    assert clock() < keeper.next_due() == keeper.sink_retry_at <= clock() + 1


def test_failures_are_logged_with_their_level_and_event(server, clock, tmp_path, caplog):
    keeper = make_keeper(server, clock, tmp_path, grant="client_credentials")
    server.fail_next(status=503, body='{"error": "server_error"}')
    with caplog.at_level("INFO", logger="tokensmith"):
        keeper.run_due()
        server.set_client_secret("app", "changed")
        clock.advance(keeper.next_due() - clock())
        keeper.run_due()
    failed = [r for r in caplog.records if getattr(r, "event", None) == "refresh_failed"]
    assert [(r.levelname, r.reason, r.client) for r in failed] == [("ERROR", "server_error", "c1"),
                                                                   ("CRITICAL", "invalid_client", "c1")]
    assert failed[0].getMessage().startswith("refresh failed (attempt 1, retry in ")
    assert "current token valid for 0s more" in failed[1].getMessage()
    assert keeper.state.alert.startswith("invalid_client: ")


def test_a_refresh_is_logged_with_both_fingerprints(server, clock, tmp_path, caplog):
    keeper = make_keeper(server, clock, tmp_path)
    with caplog.at_level("INFO", logger="tokensmith"):
        keeper.run_due()
        old = keeper.state.token
        keeper.refresh(reason="manual")
    refreshed = [r for r in caplog.records if getattr(r, "event", None) == "refreshed"]
    assert len(refreshed) == 2 and all(r.client == "c1" for r in refreshed)
    assert refreshed[1].getMessage().startswith(f"new token {keeper.state.token.fingerprint} via refresh_token grant "
                                                "(manual)")
    assert refreshed[1].getMessage().endswith(f" replacing {old.fingerprint}")
    assert " replacing " not in refreshed[0].getMessage()


def test_the_refresh_token_fallbacks_are_logged(server, clock, tmp_path, caplog):
    keeper = make_keeper(server, clock, tmp_path, refresh={"refresh_token_lifetime": 100})
    keeper.run_due()
    TokenClient(keeper.client, clock=clock).obtain("refresh_token", keeper.source.creds,
                                                   refresh_token=keeper.state.refresh_token)
    with caplog.at_level("INFO", logger="tokensmith"):
        keeper.refresh(reason="test")
        clock.advance(101)
        keeper.refresh(reason="test")
    events = [(r.event, r.levelname) for r in caplog.records if getattr(r, "event", None) != "refreshed"]
    assert events == [("refresh_token_rejected", "WARNING"), ("refresh_token_aged", "INFO")]


def test_a_sink_that_raises_unexpectedly_does_not_stop_the_others(server, clock, tmp_path):
    class Broken(MemorySink):
        def write(self, token):
            raise RuntimeError("bug")

    good = MemorySink("memory:good")
    keeper = make_keeper(server, clock, tmp_path, sinks=[Broken("memory:broken"), good])
    keeper.metrics = metrics = RecordingMetrics()
    outcome = keeper.refresh(reason="test")
    raised_at = f"test_keeper.py:{Broken.write.__code__.co_firstlineno + 1}"
    assert outcome.ok and outcome.sinks == {"memory:broken": f"sink memory:broken: unexpected RuntimeError at {raised_at}",
                                            "memory:good": None}
    assert not outcome.sinks_ok and good.current.access_token == keeper.state.access_token
    assert ("sink_failure", "c1", "memory") in metrics.calls
    assert keeper.pending_sinks() == [keeper.sinks[0]]


def token_at(obtained, lifetime):
    from tokensmith.tokens import Token

    return Token(access_token="t", token_type="Bearer", obtained_at=obtained, expires_at=obtained + lifetime)


def schedules(server, clock, tmp_path, refresh, lifetime, *, catching_up=False, n=200):
    keeper = make_keeper(server, clock, tmp_path, refresh=refresh)
    return [keeper.schedule_for(token_at(1000.0, lifetime), catching_up=catching_up) - 1000.0 for _ in range(n)]


def test_a_sub_second_token_is_refreshed_before_it_expires(server, clock, tmp_path):
    dues = schedules(server, clock, tmp_path, {"min_lead": 60, "jitter": 0.1}, 0.5)
    assert all(0 < due < 0.5 for due in dues)


def test_min_lead_is_never_overrun_even_when_only_the_jitter_would_cross_it(server, clock, tmp_path):
    # target 480 s, spread 60 s, latest 480 s: target - spread is before the limit, target + spread after it
    dues = schedules(server, clock, tmp_path, {"at_fraction": 0.8, "jitter": 0.1, "min_lead": 120}, 600)
    assert all(due <= 480 for due in dues) and min(dues) < 400


def test_a_wide_jitter_never_schedules_a_refresh_before_five_percent_of_the_lifetime(server, clock, tmp_path):
    dues = schedules(server, clock, tmp_path, {"at_fraction": 0.9, "jitter": 0.45, "min_lead": 600}, 600)
    assert all(due >= 30 for due in dues) and dues.count(30) > 10


@pytest.mark.parametrize("at_fraction, earliest", [(0.5, 0.25), (0.9, 0.4)])
def test_a_first_token_is_spread_from_the_earliest_point(server, clock, tmp_path, at_fraction, earliest):
    """Catching up: uniform from min(0.4, at_fraction / 2) of the lifetime to the usual latest point."""
    dues = schedules(server, clock, tmp_path, {"at_fraction": at_fraction, "jitter": 0, "min_lead": 0}, 1000,
                     catching_up=True)
    assert all(earliest * 1000 <= due <= at_fraction * 1000 for due in dues)
    assert min(dues) < (earliest + 0.02) * 1000 and max(dues) > (at_fraction - 0.02) * 1000


def test_a_manual_exchange_and_a_credential_reload_are_honoured(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path, refresh={"strategy": "reissue"})
    keeper.run_due()
    reads = keeper.source.reads
    outcome = keeper.refresh(reason="compromised", exchange=True)
    assert outcome.grant == "refresh_token" and outcome.exchanged_refresh_token
    assert keeper.source.reads == reads, "an exchange reads the credentials only when asked"
    assert outcome.new_token.access_token == keeper.state.access_token
    keeper.refresh(exchange=True, reload_credentials=True)
    assert keeper.source.reads == reads + 1


def test_the_state_records_the_token_as_the_provider_issued_it(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path, grant="client_credentials")
    server.fail_next(status=200, body='{"access_token": "dpop-bound-token", "token_type": "DPoP", "expires_in": 600}')
    keeper.run_due()
    saved = StateStore(tmp_path / "state").load("c1")
    assert (saved.token_type, saved.client_id, saved.last_grant) == ("DPoP", "app", "client_credentials")
    assert saved.access_token == "dpop-bound-token" and saved.last_refresh == clock()
    assert keeper.sinks[0].current.token_type == "DPoP"


def test_a_non_rotating_refresh_token_is_kept_with_its_own_age(server, clock, tmp_path):
    """A provider that does not rotate refresh tokens returns none on an exchange: the held one is
    kept, and keeps the time it was issued (which is what tells compromise rotation it is unpaired)."""
    keeper = make_keeper(server, clock, tmp_path)
    keeper.run_due()
    held, issued_at = keeper.state.refresh_token, keeper.state.refresh_token_obtained_at
    server.issue_refresh_tokens = False
    clock.advance(10)
    outcome = keeper.refresh(reason="test")
    assert outcome.grant == "refresh_token" and outcome.new_token.refresh_token is None
    assert keeper.state.refresh_token == held and keeper.state.refresh_token_obtained_at == issued_at
    assert keeper.state.obtained_at == issued_at + 10


def test_a_new_token_without_a_refresh_token_from_another_grant_drops_the_old_one(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path, refresh={"strategy": "reissue"})
    keeper.run_due()
    server.issue_refresh_tokens = False
    keeper.refresh(reason="test")
    assert keeper.state.last_grant == "password" and keeper.state.refresh_token is None
    assert keeper.status()["refresh_token_held"] is False


def test_a_failure_while_holding_a_token_says_how_long_it_stays_valid(server, clock, tmp_path, caplog):
    keeper = make_keeper(server, clock, tmp_path)
    keeper.run_due()
    clock.advance(100)
    server.fail_next(status=500, body='{"error": "server_error"}')
    with caplog.at_level("ERROR", logger="tokensmith"):
        keeper.refresh(reason="test")
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "refresh_failed"]
    assert "current token valid for 500s more" in record.getMessage()
    assert keeper.state.alert is None and keeper.status()["valid"]


def test_a_source_failure_is_counted_under_its_error_type(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path)
    keeper.metrics = metrics = RecordingMetrics()
    keeper.source.fail = 1
    keeper.run_due()
    assert metrics.calls == [("result", "c1", False, "SourceError", None)]
    assert keeper.state.alert is None and "injected outage" in keeper.state.last_error


def test_a_retry_reaches_a_pending_sink_behind_one_already_written(server, clock, tmp_path):
    good, flaky = MemorySink("memory:good"), FailingSink(1, "memory:flaky")
    keeper = make_keeper(server, clock, tmp_path, sinks=[good, flaky])
    keeper.run_due()
    clock.advance(keeper.next_due() - clock())
    keeper.run_due()
    assert flaky.current.access_token == keeper.state.access_token and len(good.tokens) == 1


def test_which_sinks_hold_the_token_is_saved_after_them_without_a_directory_fsync(server, clock, tmp_path):
    """The durable save (new refresh token) syncs the directory; the later record of which sinks
    hold the token may be lost in a crash (the sinks are then rewritten), so it skips that fsync."""
    keeper = make_keeper(server, clock, tmp_path, sinks=[MemorySink("memory:a")])
    saves = []
    real_save = keeper.store.save

    def save(client, state, **kwargs):
        saves.append((kwargs.get("sync_dir", True), dict(state.sinks_written)))
        real_save(client, state, **kwargs)

    keeper.store.save = save
    keeper.run_due()
    fp = keeper.state.token.fingerprint
    assert saves == [(True, {}), (False, {"memory:a": fp})]
    assert StateStore(tmp_path / "state").load("c1").sinks_written == {"memory:a": fp}


def test_sink_failures_are_reported_and_logged_by_name(server, clock, tmp_path, caplog):
    class Broken(MemorySink):
        def write(self, token):
            raise RuntimeError("bug")

    keeper = make_keeper(server, clock, tmp_path, sinks=[FailingSink(1), Broken("memory:broken"), MemorySink()])
    with caplog.at_level("INFO", logger="tokensmith"):
        outcome = keeper.refresh()
    assert outcome.reason == "manual"
    # an unexpected exception is named by its type and the line that raised it, never by its text
    unexpected = f"sink memory:broken: unexpected RuntimeError at test_keeper.py:{Broken.write.__code__.co_firstlineno + 1}"
    assert outcome.sinks == {"memory:failing": "memory:failing: injected failure 1",
                             "memory:broken": unexpected, "memory:a": None}
    failed = [r for r in caplog.records if getattr(r, "event", None) == "sink_failed"]
    assert [(r.levelname, r.client, r.getMessage()) for r in failed] == [
        ("ERROR", "c1", "sink memory:failing failed: memory:failing: injected failure 1"),
        ("ERROR", "c1", unexpected)]
    assert failed[1].reason == "InternalError" and unexpected in keeper.state.last_error
    assert any("(manual)" in r.getMessage() for r in caplog.records if getattr(r, "event", None) == "refreshed")


def test_after_a_clean_write_no_sink_retry_is_pending(server, clock, tmp_path):
    flaky = FailingSink(1)
    keeper = make_keeper(server, clock, tmp_path, sinks=[flaky])
    keeper.run_due()
    assert keeper.sink_failures == 1 and keeper.sink_retry_at > clock()
    keeper.refresh(reason="test")  # a new token: the failed write is moot, and this one lands
    assert (keeper.sink_failures, keeper.sink_retry_at) == (0, 0.0)
    assert flaky.current.access_token == keeper.state.access_token


def test_a_state_that_cannot_be_saved_is_logged_and_shown(server, clock, tmp_path, caplog):
    keeper = make_keeper(server, clock, tmp_path)
    keeper.run_due()
    state_file = tmp_path / "state" / "c1.json"
    state_file.unlink()
    state_file.mkdir()
    with caplog.at_level("ERROR", logger="tokensmith"):
        keeper.refresh(reason="test")
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "state_write_failed"][:1]
    message = f"cannot write state file {state_file}: Is a directory"
    assert record.client == "c1" and record.getMessage() == (
        f"{message}; the new token goes to the sinks, its refresh token stays unused until state can be saved")
    assert keeper.status()["last_error"] == f"{message}; the new token was written to the sinks but is not durable"


def test_a_failure_log_line_ends_with_the_error(server, clock, tmp_path, caplog):
    keeper = make_keeper(server, clock, tmp_path)
    server.fail_next(status=503, body='{"error": "server_error"}')
    with caplog.at_level("ERROR", logger="tokensmith"):
        keeper.run_due()
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "refresh_failed"]
    assert record.getMessage().endswith("s more): password grant: HTTP 503 server_error")


def test_a_sink_check_that_can_recover_is_logged_and_one_that_cannot_is_raised(server, clock, tmp_path, caplog):
    from tokensmith.errors import SinkError

    class CheckFails(MemorySink):
        def __init__(self, retryable):
            super().__init__(f"memory:{retryable}")
            self.retryable = retryable

        def check(self):
            raise SinkError(f"{self.name}: store down", retryable=self.retryable)

    keeper = make_keeper(server, clock, tmp_path, sinks=[CheckFails(True)])
    with caplog.at_level("WARNING", logger="tokensmith"):
        keeper.check_sinks()
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "sink_check_failed"]
    assert record.client == "c1" and record.getMessage() == "sink check failed, will retry on write: memory:True: store down"
    keeper.sinks = [CheckFails(False)]
    with pytest.raises(SinkError):
        keeper.check_sinks()


def test_the_credential_fallback_and_the_unsaved_state_are_logged(server, clock, tmp_path, caplog):
    keeper = make_keeper(server, clock, tmp_path, refresh={"strategy": "reissue"})
    keeper.run_due()
    keeper.source.fail = 1
    with caplog.at_level("INFO", logger="tokensmith"):
        keeper.refresh(reason="test")
        keeper.state_unsaved = True
        state_file = tmp_path / "state" / "c1.json"
        state_file.unlink()
        state_file.mkdir()
        keeper.refresh(reason="test", exchange=True)
    events = {r.event: r for r in caplog.records if getattr(r, "event", None) not in (None, "refreshed")}
    assert events["source_fallback"].getMessage() == \
        "credential source failed, using the last good credentials: static source: injected outage"
    assert events["source_fallback"].levelname == "WARNING" and events["source_fallback"].client == "c1"
    unsaved = [r for r in caplog.records if getattr(r, "event", None) == "state_write_failed"][0]
    assert unsaved.getMessage() == ("state still cannot be saved: not spending an unsaved refresh token; using the "
                                    "password grant") and unsaved.levelname == "WARNING"


def test_a_refresh_token_exactly_at_its_lifetime_is_not_presented(server, clock, tmp_path, caplog):
    keeper = make_keeper(server, clock, tmp_path, refresh={"refresh_token_lifetime": 1000})
    keeper.run_due()
    clock.advance(1000)
    with caplog.at_level("INFO", logger="tokensmith"):
        assert keeper.refresh(reason="test").grant == "password"
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "refresh_token_aged"]
    assert record.getMessage() == "refresh token is 1000s old, past refresh_token_lifetime; using the password grant"


def test_a_scheduled_exchange_is_counted_and_logged_as_scheduled(server, clock, tmp_path, caplog):
    keeper = make_keeper(server, clock, tmp_path)
    keeper.run_due()
    keeper.metrics = metrics = RecordingMetrics()
    clock.advance(keeper.next_due() - clock())
    with caplog.at_level("INFO", logger="tokensmith"):
        keeper.run_due()
    assert metrics.calls[0] == ("attempt", "c1", "refresh_token")
    assert any("(scheduled)" in r.getMessage() for r in caplog.records if getattr(r, "event", None) == "refreshed")


@pytest.mark.parametrize("status, body", [(400, '{"error": "invalid_scope"}'), (503, '{"error": "invalid_grant"}')])
def test_a_refresh_token_refused_for_good_is_dropped_and_the_primary_grant_used(server, clock, tmp_path, status, body):
    keeper = make_keeper(server, clock, tmp_path)
    keeper.run_due()
    server.fail_next(status=status, body=body)
    outcome = keeper.refresh(reason="test")
    assert outcome.ok and outcome.grant == "password" and outcome.fell_back == json.loads(body)["error"]


def test_sink_failures_count_up_and_an_unexpected_one_counts_too(server, clock, tmp_path):
    class Broken(MemorySink):
        def write(self, token):
            raise RuntimeError("bug")

    keeper = make_keeper(server, clock, tmp_path, sinks=[FailingSink(5)])
    keeper.run_due()
    clock.advance(keeper.next_due() - clock())
    keeper.run_due()
    assert keeper.sink_failures == 2
    other = make_keeper(server, clock, tmp_path / "other", sinks=[Broken("memory:broken")])
    other.run_due()
    assert other.sink_failures == 1 and other.sink_retry_at > clock()


def test_a_retired_keeper_runs_nothing_and_hands_requests_to_its_successor(server, clock, tmp_path):
    reissue = {"strategy": "reissue"}  # only a requested exchange spends the refresh token
    old = make_keeper(server, clock, tmp_path, refresh=reissue)
    old.run_due()
    successor = make_keeper(server, clock, tmp_path, refresh=reissue)  # loads what the old one saved, as a reload does
    later = make_keeper(server, clock, tmp_path, refresh=reissue)
    old.hand_over(successor)
    successor.hand_over(later)
    assert old.current() is later and successor.current() is later and later.current() is later
    clock.advance(590)
    issued = server.stats["issued"]
    assert old.run_due() == later.next_due() and server.stats["issued"] == issued, "a retired keeper refreshed"
    later.creds = later.source.read()
    reads = later.source.reads
    outcome = old.refresh(reason="compromised", exchange=True, reload_credentials=True)
    assert outcome.ok and outcome.keeper is later and outcome.fell_back is None
    assert outcome.reason == "compromised" and outcome.grant == "refresh_token", "the request's arguments were lost"
    assert later.source.reads == reads + 1, "reload_credentials was not passed on"
    assert later.state.access_token == outcome.new_token.access_token and server.stats["refresh_reuse"] == 0
    assert old.state.access_token != later.state.access_token


def test_a_retired_keeper_passes_its_last_compromise_on(server, clock, tmp_path):
    old, successor = make_keeper(server, clock, tmp_path), make_keeper(server, clock, tmp_path)
    old.last_compromise = {"old_token": "abc", "finished_at": clock()}
    old.hand_over(successor)
    assert successor.last_compromise == old.last_compromise  # a repeated request is still coalesced


def test_a_removed_clients_keeper_refuses_requests_without_a_token_request(server, clock, tmp_path):
    keeper = make_keeper(server, clock, tmp_path)
    keeper.hand_over(None)
    outcome = keeper.refresh(reason="compromised", exchange=True)
    assert (outcome.client, outcome.ok, outcome.reason, outcome.new_token) == ("c1", False, "compromised", None)
    assert isinstance(outcome.error, ConfigError) and outcome.error.retryable is False
    assert str(outcome.error) == "client c1: the client was removed from the config"
    assert server.stats["token_requests"] == 0


def test_keepers_without_their_own_generator_share_one_for_jitter(server, clock, tmp_path):
    """The daemon passes no generator: thousands of keepers share one rather than hold ~2.5 KB each."""
    config = ClientConfig(name="c1", token_url=server.token_url, source={"type": "env"},
                          sinks=[{"type": "file", "path": "/unused"}])
    store = StateStore(tmp_path / "state")
    keepers = [Keeper(config, StaticSource(client_id="svc", client_secret="svc-secret"), [MemorySink()],
                      TokenClient(config, clock=clock), store, clock=clock) for _ in range(2)]
    assert keepers[0].rng is keepers[1].rng and isinstance(keepers[0].rng, random.Random)
    assert 0 <= keepers[0].backoff(3, None) <= config.refresh.backoff_max


def test_a_token_file_gone_since_the_state_recorded_it_is_written_again_at_start_up(server, clock, tmp_path):
    """A reboot empties /run: the state (kept with a sink that cannot tell, such as Vault's) still says
    the file holds the token; the file is asked, and written again before the token is due."""
    path = tmp_path / "run" / "c1.token"
    path.parent.mkdir()

    def sinks():
        return [MemorySink("memory:no-read-back"), FileSink(FileSinkConfig(type="file", path=path), "c1")]

    first = make_keeper(server, clock, tmp_path, sinks=sinks())
    first.run_due()
    fp = first.state.token.fingerprint
    assert StateStore(tmp_path / "state").load("c1").sinks_written == {f"file:{path}": fp, "memory:no-read-back": fp}
    path.unlink()
    keeper = make_keeper(server, clock, tmp_path, sinks=sinks())
    assert [sink.name for sink in keeper.pending_sinks()] == [f"file:{path}"]
    keeper.run_due()
    assert path.read_text() == first.state.access_token and server.stats["issued"] == 1
