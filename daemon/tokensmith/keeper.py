"""The per-client keeper: when to refresh, which grant to use, retries, the single-flight lock,
and fan-out to sinks. It is the one layer that retries; sources, the token client and sinks
raise typed errors and never retry by themselves.

Order of a refresh, chosen so a crash at any instant loses nothing:
  1. obtain the token (a refresh-token exchange spends the old refresh token at the provider);
  2. persist state with the new token and new refresh token, before anything else uses them;
  3. write every sink (failures are retried later with backoff, without a new token);
  4. persist which sinks hold the token (only for sinks that cannot tell by themselves: a file
     sink is read back at start-up instead), then run the consumer hooks.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field

from tokensmith.errors import (ConfigError, InternalError, SinkError, SourceError, StateError, TokenEndpointError,
                               TokensmithError)
from tokensmith.redact import Redactor
from tokensmith.state import ClientState, FencedError, StaleStateError, StateStore
from tokensmith.tokens import Token, fingerprint

log = logging.getLogger("tokensmith.keeper")

RETRY_FLOOR = 0.05
# One generator for all keepers: a random.Random holds ~2.5 KB of Mersenne Twister state, which
# was 12 MB at 5,000 clients. Its methods are single C calls under the GIL, so sharing is safe.
_SHARED_RNG = random.Random()


class NullMetrics:
    def refresh_attempt(self, client, grant): pass
    def refresh_result(self, client, ok, reason, seconds, token): pass
    def sink_failure(self, client, sink_type): pass
    def sink_success(self, client, sink, when): pass


@dataclass
class Outcome:
    client: str
    ok: bool
    reason: str
    grant: str | None = None
    old_token: Token | None = None
    new_token: Token | None = None
    exchanged_refresh_token: bool = False
    fell_back: str | None = None
    old_paired: bool = False  # the held refresh token came in the same response as the old access token
    sinks: dict[str, str | None] = field(default_factory=dict)
    hooks: list[dict] = field(default_factory=list)
    error: TokensmithError | None = None
    keeper: Keeper | None = field(default=None, repr=False, compare=False)  # the one that did it (see hand_over)

    @property
    def sinks_ok(self) -> bool:
        return all(error is None for error in self.sinks.values())


class Keeper:
    # slots: one keeper per client, thousands per daemon
    __slots__ = ("client", "name", "source", "sinks", "token_client", "store", "clock", "rng", "metrics", "hooks",
                 "lock", "creds", "failures", "sink_failures", "retry_at", "sink_retry_at", "refresh_at", "state",
                 "state_unsaved", "last_compromise", "busy_since", "leader", "retired", "successor")

    def __init__(self, client, source, sinks, token_client, store: StateStore, *, clock=time.time,
                 rng: random.Random | None = None, metrics=None, hooks=None):
        self.client = client
        self.name = client.name
        self.source = source
        self.sinks = sinks
        self.token_client = token_client
        self.store = store
        self.clock = clock
        self.rng = rng or _SHARED_RNG
        self.metrics = metrics or NullMetrics()
        self.hooks = hooks
        self.lock = threading.Lock()
        self.creds = None
        self.failures = 0
        self.sink_failures = 0
        self.retry_at = 0.0
        self.sink_retry_at = 0.0
        self.refresh_at = 0.0
        self.state = ClientState()
        self.state_unsaved = False
        self.last_compromise = None
        self.busy_since: float | None = None  # when the run holding the lock began; the daemon spots a stuck one
        self.leader = None  # with a shared state backend: the leadership (before_request, fence, fenced)
        self.retired = False
        self.successor: Keeper | None = None

    # ---- start-up

    def load(self) -> None:
        try:
            state = self.store.load(self.name)
        except StateError as exc:
            log.warning("%s", exc, extra={"client": self.name, "event": "state_unreadable"})
            state = None
        self.adopt(state)

    def adopt(self, state: ClientState | None) -> None:
        """Take this state as current and schedule from it (start-up, and a standby's takeover)."""
        self.state = state or ClientState()
        self.failures = 0
        self.state_unsaved = False
        token = self.state.token
        if token and token.expires_at > self.clock():
            self._recognise_sinks(token)
            self.refresh_at = self.schedule_for(token)
            log.info("kept token %s from state, expires_at=%d next_refresh=%d", token.fingerprint, token.expires_at,
                     self.refresh_at, extra={"client": self.name, "event": "token_kept"})
        else:
            self.refresh_at = 0.0

    def _recognise_sinks(self, token: Token) -> None:
        """A sink that can tell (a file) is asked, whatever the state recorded: a token file on a tmpfs
        (/run) is gone after a reboot, while the record of it, saved with a Vault or AWS sink's, is not."""
        written = self.state.sinks_written
        current = token.fingerprint
        for sink in self.sinks:
            if not hasattr(sink, "holds"):
                continue
            if sink.holds(token):
                written[sink.name] = current
            elif written.get(sink.name) == current:
                del written[sink.name]

    def check_sinks(self) -> None:
        """Raise for a sink that can never work; a store that is merely down now is retried on write."""
        for sink in self.sinks:
            try:
                sink.check()
            except SinkError as exc:
                if not exc.retryable:
                    raise
                log.warning("sink check failed, will retry on write: %s", exc.message,
                            extra={"client": self.name, "event": "sink_check_failed"})

    # ---- timing

    def schedule_for(self, token: Token, *, catching_up: bool = False) -> float:
        """When to refresh: at at_fraction of the lifetime, +- jitter, never later than min_lead
        before expiry (but a lifetime shorter than min_lead must not cause a refresh loop).

        The jitter is applied after the min_lead clamp, so clients whose refresh min_lead pulls
        earlier still spread out. A token obtained while catching up (first start, or after the
        old token had expired) is spread over a wider window, so that thousands of clients
        started together do not keep refreshing in one wave."""
        policy = self.client.refresh
        lifetime = max(token.lifetime, 0.0)
        spread = policy.jitter * lifetime
        target = token.obtained_at + policy.at_fraction * lifetime
        latest = max(token.expires_at - policy.min_lead, token.obtained_at + lifetime * min(policy.at_fraction, 0.5))
        if catching_up:
            earliest = token.obtained_at + lifetime * min(0.4, policy.at_fraction / 2)
            return self.rng.uniform(earliest, min(target + spread, latest))
        if target + spread <= latest:
            return target + self.rng.uniform(-spread, spread)
        return max(latest - self.rng.uniform(0, 2 * spread), token.obtained_at + lifetime * 0.05)

    def next_due(self) -> float:
        if self.failures:
            due = self.retry_at
        else:
            due = self.refresh_at
        if self.pending_sinks():
            due = min(due, self.sink_retry_at)
        return due

    def pending_sinks(self) -> list:
        if not self.state.access_token:
            return []
        current = fingerprint(self.state.access_token)
        return [sink for sink in self.sinks if self.state.sinks_written.get(sink.name) != current]

    def backoff(self, attempt: int, error: TokensmithError | None) -> float:
        policy = self.client.refresh
        cap = min(policy.backoff_max, policy.backoff_initial * 2 ** min(attempt - 1, 30))
        if error is not None and not error.retryable:
            cap = policy.backoff_max
        delay = self.rng.uniform(RETRY_FLOOR, max(cap, RETRY_FLOOR))
        retry_after = getattr(error, "retry_after", None)
        if retry_after:
            delay = max(delay, retry_after)
        return delay

    # ---- replacement by a config reload

    def hand_over(self, successor: Keeper | None) -> None:
        """Under self.lock, by a reload: this keeper refreshes nothing any more. The successor has
        loaded the state this one last saved; a caller that looked this keeper up before the reload
        is sent there, since two keepers holding one refresh token would spend it twice.
        None: the client was removed."""
        self.retired = True
        self.successor = successor
        if successor is not None:
            successor.last_compromise = self.last_compromise

    def current(self) -> Keeper:
        keeper = self
        while keeper.successor is not None:
            keeper = keeper.successor
        return keeper

    # ---- work

    def run_due(self) -> float:
        """Called by the scheduler: do whatever is due, return when to be called next."""
        with self.lock:
            if self.retired:  # looked up just before a reload replaced it; the successor has its own job
                return self.current().next_due()
            now = self.busy_since = self.clock()
            try:
                if now >= self.next_due() and (self.failures or now >= self.refresh_at or not self.state.access_token):
                    self._refresh(reason="scheduled")
                elif self.pending_sinks() and now >= self.sink_retry_at:
                    self._write_sinks(self.state.token, Outcome(self.name, True, "sink_retry"))
            finally:
                self.busy_since = None
            return self.next_due()

    def refresh(self, *, reason: str = "manual", exchange: bool = False, reload_credentials: bool = False) -> Outcome:
        """A refresh on request (CLI, control socket, compromise). Waits for one already running."""
        with self.lock:
            if not self.retired:
                self.busy_since = self.clock()
                try:
                    return self._refresh(reason=reason, exchange=exchange, reload_credentials=reload_credentials)
                finally:
                    self.busy_since = None
        if self.successor is None:
            return Outcome(self.name, False, reason, error=ConfigError("the client was removed from the config",
                                                                       client=self.name))
        return self.successor.refresh(reason=reason, exchange=exchange, reload_credentials=reload_credentials)

    def _credentials(self, fresh: bool):
        if self.creds is not None and not fresh:
            return self.creds
        try:
            self.creds = self.source.read()
        except SourceError as exc:
            if self.creds is None:
                raise
            log.warning("credential source failed, using the last good credentials: %s", exc.message,
                        extra={"client": self.name, "event": "source_fallback"})
        return self.creds

    def _usable_refresh_token(self) -> str | None:
        state = self.state
        if not state.refresh_token:
            return None
        if self.state_unsaved:
            try:
                self.store.save(self.name, state)
                self.state_unsaved = False
            except StateError:
                log.warning("state still cannot be saved: not spending an unsaved refresh token; using the %s "
                            "grant", self.client.grant, extra={"client": self.name, "event": "state_write_failed"})
                return None
        age = self.clock() - state.refresh_token_obtained_at
        if age >= self.client.refresh.refresh_token_lifetime:
            if self.client.grant == "refresh_token" and state.spent_seed:
                # the only fallback is the seed, already spent: presenting that would be a replay, so
                # the provider decides whether the held one is still good
                return state.refresh_token
            log.info("refresh token is %.0fs old, past refresh_token_lifetime; using the %s grant", age,
                     self.client.grant, extra={"client": self.name, "event": "refresh_token_aged"})
            return None
        return state.refresh_token

    def _obtain(self, outcome: Outcome, exchange: bool, reload_credentials: bool) -> Token:
        held = self._usable_refresh_token()
        use_exchange = held is not None and (exchange or self.client.refresh.strategy == "refresh_token")
        if use_exchange:
            creds = self._credentials(fresh=reload_credentials)
            outcome.grant = "refresh_token"
            self._before_request()
            self.metrics.refresh_attempt(self.name, "refresh_token")
            try:
                token = self.token_client.obtain("refresh_token", creds, refresh_token=held)
                outcome.exchanged_refresh_token = True
                return token
            except TokenEndpointError as exc:
                if exc.error not in ("invalid_grant", "invalid_client") and exc.retryable:
                    raise
                # the refresh token is dead (spent, expired, revoked): never present it again
                self.state.refresh_token = None
                try:
                    self.store.save(self.name, self.state)
                except StateError:
                    self.state_unsaved = True
                outcome.fell_back = exc.error or exc.reason
                log.warning("refresh token rejected (%s); falling back to the %s grant", exc.reason,
                            self.client.grant, extra={"client": self.name, "event": "refresh_token_rejected"})
        creds = self._credentials(fresh=True)
        grant = self.client.grant
        outcome.grant = grant
        self._before_request()
        self.metrics.refresh_attempt(self.name, grant)
        bootstrap = creds.refresh_token if grant == "refresh_token" else None
        if bootstrap and fingerprint(bootstrap) == self.state.spent_seed:
            # a second use is a replay: providers that detect reuse (oidc-provider) revoke the whole family,
            # the live refresh token included
            refused = f"the held refresh token was refused ({outcome.fell_back}) and " if outcome.fell_back else ""
            raise TokenEndpointError(f"{refused}the refresh token in the source was already spent; not presenting "
                                     "it again", client=self.name, retryable=self.state_unsaved,
                                     error="spent_refresh_token")
        try:
            token = self.token_client.obtain(grant, creds, refresh_token=bootstrap)
        except TokenEndpointError as exc:
            if bootstrap and exc.error == "invalid_grant":
                self.state.spent_seed = fingerprint(bootstrap)
            raise
        if grant == "refresh_token":
            outcome.exchanged_refresh_token = True
            if bootstrap:
                self.state.spent_seed = fingerprint(bootstrap)  # saved with the new token by _commit
        return token

    def _before_request(self) -> None:
        # never spend a refresh token on a lease that could lapse before the answer is stored
        if self.leader is not None:
            self.leader.before_request(self.client.timeout)

    def _fenced(self, exc: FencedError, outcome: Outcome) -> Outcome:
        outcome.error = exc
        log.warning("refresh stopped: %s", exc.message, extra={"client": self.name, "event": "fenced"})
        if self.leader is not None:
            self.leader.fenced(exc.message)
        return outcome

    def _refresh(self, *, reason: str, exchange: bool = False, reload_credentials: bool = False) -> Outcome:
        started = time.monotonic()
        old = self.state.token
        outcome = Outcome(self.name, False, reason, old_token=old, keeper=self)
        try:
            with self.store.client_lock(self.name):
                self._reload_state_if_changed()
                old = outcome.old_token = self.state.token
                outcome.old_paired = bool(self.state.refresh_token) and \
                    self.state.refresh_token_obtained_at == self.state.obtained_at
                token = self._obtain(outcome, exchange, reload_credentials)
                self._commit(token, outcome)
        except FencedError as exc:  # no longer the leader: no failure to retry, no sink write
            return self._fenced(exc, outcome)
        except TokensmithError as exc:
            self._failed(exc, outcome, time.monotonic() - started)
            return outcome
        except Exception as exc:  # a bug in a backend: still a failure, retried with backoff and reported
            self._failed(_internal(exc, self.name, "refresh"), outcome, time.monotonic() - started)
            return outcome
        outcome.ok = True
        self.failures = 0
        self.metrics.refresh_result(self.name, True, "ok", time.monotonic() - started, token)
        log.info("new token %s via %s grant (%s), expires_at=%d next_refresh=%d%s", token.fingerprint,
                 outcome.grant, reason, token.expires_at, self.refresh_at,
                 f" replacing {old.fingerprint}" if old else "",
                 extra={"client": self.name, "event": "refreshed"})
        self._write_sinks(token, outcome)
        if self.hooks is not None:
            outcome.hooks = self.hooks.run(self.client, token)
        return outcome

    def _reload_state_if_changed(self) -> None:
        """Another process (a CLI rotating without the daemon) may have moved the chain on."""
        try:
            on_disk = self.store.load_if_changed(self.name)
        except StateError:
            return
        if on_disk and on_disk.access_token != self.state.access_token and on_disk.obtained_at >= self.state.obtained_at:
            self.state = on_disk

    def _commit(self, token: Token, outcome: Outcome) -> None:
        state = self.state
        new = ClientState(
            access_token=token.access_token, token_type=token.token_type, obtained_at=token.obtained_at,
            expires_at=token.expires_at,
            refresh_token=token.refresh_token or (state.refresh_token if outcome.grant == "refresh_token" else None),
            refresh_token_obtained_at=token.obtained_at if token.refresh_token else state.refresh_token_obtained_at,
            client_id=self.creds.client_id if self.creds else state.client_id,
            sinks_written={}, last_refresh=self.clock(), last_grant=outcome.grant, spent_seed=state.spent_seed)
        try:
            self.store.save(self.name, new)  # the new refresh token is durable before anything uses it
            self.state_unsaved = False
        except FencedError:
            raise  # a deposed leader's token goes nowhere: the new leader owns the chain
        except StaleStateError as exc:
            # another replica moved the chain on: its state wins; read it and try again soon
            raise StateError(exc.message, client=self.name, retryable=True) from exc
        except StateError as exc:
            # The token is already issued (and an exchange has revoked the old one): consumers get
            # it, but its refresh token is not spent until the state directory holds it.
            self.state_unsaved = True
            new.last_error = f"{exc.message}; the new token was written to the sinks but is not durable"
            log.error("%s; the new token goes to the sinks, its refresh token stays unused until state "
                      "can be saved", exc.message, extra={"client": self.name, "event": "state_write_failed"})
        self.state = new
        outcome.new_token = token
        old = outcome.old_token
        self.refresh_at = self.schedule_for(token, catching_up=old is None or old.expires_at <= token.obtained_at)
        self.sink_failures = 0
        self.sink_retry_at = 0.0

    def _redactor(self, outcome: Outcome | None = None) -> Redactor:
        """Every secret and token this keeper holds: error text is cut against all of them before it is kept."""
        creds = self.creds
        secrets = [*(creds.secrets() if creds else ()), self.state.access_token, self.state.refresh_token]
        pairs = [(creds.client_id, creds.client_secret)] if creds and creds.client_secret else []
        if outcome is not None:
            for token in (outcome.old_token, outcome.new_token):
                if token is not None:
                    secrets += [token.access_token, token.refresh_token]
        return Redactor(secrets, pairs)

    def _failed(self, exc: TokensmithError, outcome: Outcome, seconds: float) -> None:
        outcome.error = exc
        self.failures += 1
        delay = self.backoff(self.failures, exc)
        self.retry_at = self.clock() + delay
        reason = getattr(exc, "reason", type(exc).__name__)
        redact = self._redactor(outcome)
        exc.message = redact(exc.message)  # the error also goes back to a CLI or control-socket caller
        exc.args = (exc.message,)
        self.state.last_error = str(exc)
        self.state.last_error_at = self.clock()
        level = logging.ERROR
        if isinstance(exc, TokenEndpointError) and exc.error == "invalid_client":
            level = logging.CRITICAL
            method = getattr(self.client, "auth_style", "post")
            if method in ("basic", "post", "json", "query"):
                self.state.alert = "invalid_client: the provider rejected the client secret; rotate it in the source"
            else:
                self.state.alert = (f"invalid_client: the provider rejected the client's {method} authentication "
                                    f"({exc.message[:160]}); check the key, certificate or assertion in the source")
        elif isinstance(exc, TokenEndpointError) and exc.error == "invalid_grant" and self.client.grant == "refresh_token":
            # the seed is dead too (spent, expired, or its family revoked after a reuse): only an operator can help
            level = logging.CRITICAL
            self.state.alert = ("invalid_grant: the provider refused the refresh token (spent, expired or revoked; a "
                                "reused one makes some providers revoke its whole family); put a new refresh token "
                                "in the source")
        elif isinstance(exc, TokenEndpointError) and exc.error == "spent_refresh_token" and not exc.retryable:
            level = logging.CRITICAL
            self.state.alert = f"spent_refresh_token: {exc.message}; put a new refresh token in the source"
        elif isinstance(exc, TokenEndpointError) and exc.error == "invalid_client_material":
            level = logging.CRITICAL
            self.state.alert = f"invalid_client_material: {exc.message[:200]}"
        self.metrics.refresh_result(self.name, False, exc, seconds, None)  # the error: its HTTP status too
        remaining = self.state.expires_at - self.clock() if self.state.access_token else 0
        log.log(level, "refresh failed (attempt %d, retry in %.1fs, current token valid for %.0fs more): %s",
                self.failures, delay, max(remaining, 0), exc.message,
                extra={"client": self.name, "event": "refresh_failed", "reason": reason})

    def _write_sinks(self, token: Token | None, outcome: Outcome) -> None:
        if token is None:
            return
        if self.leader is not None:
            try:
                self.leader.fence()
            except FencedError as exc:  # a deposed leader must not overwrite the new leader's token
                self._fenced(exc, outcome)
                return
        written = self.state.sinks_written
        failed = False
        unrecorded = False  # a sink written now that cannot later tell which token it holds
        current = token.fingerprint
        for sink in self.sinks:
            if written.get(sink.name) == current:
                continue
            try:
                sink.write(token)
            except SinkError as exc:
                failed = True
                outcome.sinks[sink.name] = exc.message
                self.metrics.sink_failure(self.name, sink.type)
                log.error("sink %s failed: %s", sink.name, exc.message,
                          extra={"client": self.name, "event": "sink_failed"})
                continue
            except Exception as exc:  # a sink bug must not stop the other sinks
                failed = True
                error = _internal(exc, self.name, f"sink {sink.name}")
                outcome.sinks[sink.name] = error.message
                self.state.last_error = str(error)
                self.state.last_error_at = self.clock()
                self.metrics.sink_failure(self.name, sink.type)
                log.error("%s", error.message, extra={"client": self.name, "event": "sink_failed",
                                                      "reason": "InternalError"})
                continue
            outcome.sinks[sink.name] = None
            written[sink.name] = current
            self.metrics.sink_success(self.name, sink.name, self.clock())
            unrecorded = unrecorded or not hasattr(sink, "holds")
        if failed:
            self.sink_failures += 1
            self.sink_retry_at = self.clock() + self.backoff(self.sink_failures, None)
        else:
            self.sink_failures = 0
        if not (unrecorded or self.state_unsaved):
            return
        try:
            # Which sinks hold the token: if a crash loses this write, the previous (durable) state
            # is read back and the same token is written to the sinks again. Skipping the directory
            # fsync here saves one of the refresh's synchronous disk flushes.
            self.store.save(self.name, self.state, sync_dir=self.state_unsaved)
            self.state_unsaved = False
        except StateError as exc:
            log.error("%s", exc.message, extra={"client": self.name, "event": "state_write_failed"})

    # ---- reporting

    def status(self) -> dict:
        state = self.state
        token = state.token
        pending = [sink.name for sink in self.pending_sinks()]
        return {
            "client": self.name,
            "token": token.fingerprint if token else None,
            "expires_at": int(state.expires_at) if token else None,
            "valid": bool(token and token.expires_at > self.clock()),
            "last_refresh": int(state.last_refresh) or None,
            "last_grant": state.last_grant,
            "next_refresh": int(self.next_due()) if token or self.failures else None,
            "refresh_token_held": bool(state.refresh_token),
            "failures": self.failures,
            "last_error": state.last_error,
            "alert": state.alert,
            "sinks_pending": pending,
            "busy_since": int(self.busy_since) if self.busy_since is not None else None,
        }

    def ready(self) -> bool:
        token = self.state.token
        return bool(token and token.expires_at > self.clock() and not self.pending_sinks())


def _internal(exc: Exception, client: str, where: str) -> InternalError:
    """An exception no backend converted, named by its type and the line that raised it: its text may hold
    a secret or token, so it is left out."""
    frame = exc.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    at = f" at {frame.tb_frame.f_code.co_filename.rpartition('/')[2]}:{frame.tb_lineno}" if frame else ""
    error = InternalError(f"{where}: unexpected {type(exc).__name__}{at}", client=client, retryable=True)
    error.__cause__ = exc
    return error
