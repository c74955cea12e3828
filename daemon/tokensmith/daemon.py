"""The daemon: one keeper per client, driven by APScheduler with a bounded worker pool, plus the
control socket, the health/metrics server and the systemd notify protocol around them."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from tokensmith.backends import Backends
from tokensmith.errors import ConfigError, SinkError, TokensmithError
from tokensmith.fsutil import remove_stale_temps
from tokensmith.hooks import Hooks
from tokensmith.keeper import Keeper
from tokensmith.sinks import build_sinks
from tokensmith.sources import build_source
from tokensmith.state import build_state_backend
from tokensmith.tokenclient import TokenClient
from tokensmith.transport import make_session

if TYPE_CHECKING:
    from tokensmith.config import Settings

log = logging.getLogger("tokensmith.daemon")

OVERDUE_GRACE = 30.0
STUCK_GRACE = 30.0
FIRST_RUNS_HEAD_START = 0.5


class InUse(TokensmithError):
    """Another daemon holds the state directory or the control socket, or the health port is taken
    (`run` exits 9: a restart a few seconds later would meet the same holder)."""


def release_freed_memory() -> None:
    """Parsing and validating a large config leaves freed heap behind; hand it back to the OS
    (glibc only), so resident memory reflects what the clients really keep."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reload_summary(added: list[str], removed: list[str], changed: list[str], total: int) -> str:
    def part(what: str, names: list[str]) -> str:
        shown = ", ".join(names[:10]) + (f", ... ({len(names) - 10} more)" if len(names) > 10 else "")
        return f"{len(names)} {what}" + (f" ({shown})" if names else "")

    return f"{part('added', added)}, {part('removed', removed)}, {part('changed', changed)}; {total} clients"


def utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, timezone.utc)


class Daemon:
    def __init__(self, settings: Settings, config_path=None, *, clock=time.time, metrics=None, serve=True):
        self.settings = settings
        self.config_path = config_path
        self.clock = clock
        self.serve = serve
        self.backends = Backends(settings)
        self.store = build_state_backend(settings, self.backends)
        self.session = make_session(settings.scheduler.max_workers)
        self.hooks = Hooks()
        self.keepers: dict[str, Keeper] = {}
        self.scheduler = None
        self.control = None
        self.health = None
        self.notifier = None
        self.metrics = metrics
        self.stop_event = threading.Event()
        self.reload_requested = threading.Event()
        self.wake = threading.Event()
        self._daemon_lock_fd = None
        self._reload_lock = threading.Lock()
        self._idle = threading.Condition()
        self._running_jobs = 0
        self._keepalive_trigger = None
        self.pool = None
        self._jobs_lock = threading.Lock()
        self._first_runs: set[str] = set()  # clients whose first run is in the pool before their job exists
        self._scheduler_ready = False
        self._stuck_reported: dict[str, float] = {}  # client -> busy_since of the run already logged as stuck
        self._stuck_lock = threading.Lock()
        self.leadership = None  # with a shared state backend: the leader lease (leadership.py)
        self.load_config = None  # how reload reads the config: config.load_settings unless set

    # ---- construction

    def make_keeper(self, client, *, load: bool = True) -> Keeper:
        source = build_source(client, self.backends)
        sinks = build_sinks(client, self.backends)
        keeper = Keeper(client, source, sinks, TokenClient(client, self.session, self.clock), self.store,
                        clock=self.clock, metrics=self.metrics, hooks=self.hooks)
        keeper.leader = self.leadership
        try:
            keeper.check_sinks()
        except SinkError as exc:  # a sink that can never work is a config error (exit 78)
            raise ConfigError(str(exc), client=None) from exc
        if load:
            keeper.load()
        return keeper

    def build(self) -> None:
        from tokensmith.backends import check_extras

        check_extras(self.settings)  # a backend library not installed: one line naming the extra
        self.store.prepare()
        if self.serve:
            self._daemon_lock_fd = self.store.try_daemon_lock()
            if self._daemon_lock_fd is None:
                raise InUse(f"another tokensmith daemon already uses state directory {self.settings.state_dir}")
        if self.metrics is None and self.serve:
            from tokensmith.metrics import Metrics

            # a standby's keepers hold what it read at start-up: its per-client gauges would go stale
            self.metrics = Metrics(keepers=lambda: self.keepers if self.leadership is None or self.leadership.active
                                   else {})
        if self.metrics is not None and hasattr(self.metrics, "reloaded"):
            self.metrics.reloaded(True, self.clock())  # the config in force, and since when
        if getattr(self.store, "shared", False):
            self._build_leadership()
        for client in self.settings.clients:
            # with a lease, every record is read (in parallel) when it is won: reading them one by
            # one here first would only delay the first refresh (5,000 reads)
            self.keepers[client.name] = self.make_keeper(client, load=self.leadership is None)
        if self.serve:
            # Temp files a crash left behind. Only here, before any worker runs: the same cleanup
            # during a reload would delete a temp file another thread is about to rename.
            self.store.remove_stale_temps()
            token_files: dict = {}
            for keeper in self.keepers.values():
                for sink in keeper.sinks:
                    if sink.type == "file":
                        token_files.setdefault(sink.path.parent, set()).add(sink.path.name)
            for directory, names in token_files.items():
                remove_stale_temps(directory, names)
        else:
            release_freed_memory()  # a served daemon does it once its first runs are under way (cli.cmd_run)

    def _build_leadership(self) -> None:
        from tokensmith.leadership import for_daemon

        self.leadership = for_daemon(self)
        if self.leadership.active:  # a CLI that took the free lease
            self._fence_store(self.leadership.elector.identity, self.leadership.epoch)

    def _fence_store(self, identity: str, epoch: int) -> None:
        """Where the store can check the lease inside each write (DynamoDB transactions), make it."""
        condition = getattr(self.leadership.elector.lease, "fence_condition", None)
        if condition is not None and hasattr(self.store, "lease_condition"):
            self.store.lease_condition = condition(identity, epoch)

    def _take_over(self, epoch: int) -> None:
        """Won the lease: every client's state as the store holds it now, then schedule from it
        (fresh tokens are kept; only what is due refreshes)."""
        self.store.epoch = epoch
        self._fence_store(self.leadership.elector.identity, epoch)
        states = self.store.load_all()
        with self._jobs_lock:
            for name, keeper in list(self.keepers.items()):
                with keeper.lock:
                    keeper.adopt(states.get(name))
            if self.scheduler is not None and not self.stop_event.is_set():
                for name, keeper in list(self.keepers.items()):
                    self._add_job(name, keeper)
        log.info("took over %d clients (epoch %d)", len(states), epoch, extra={"event": "takeover"})

    def _step_down(self) -> None:
        """Lost the lease: no job runs again; a refresh in flight is refused by the fence."""
        with self._jobs_lock:
            if self.scheduler is not None:
                try:
                    self.scheduler.remove_all_jobs()
                except Exception:
                    log.exception("removing jobs on step-down failed", extra={"event": "step_down"})

    # ---- scheduling

    def start(self) -> None:
        from concurrent.futures import ThreadPoolExecutor, wait

        if self.serve:
            self._start_control()  # before any worker thread: the control socket is bound under a umask
        self.pool = ThreadPoolExecutor(self.settings.scheduler.max_workers, thread_name_prefix="keeper")
        if self.leadership is not None:
            self._start_scheduler()
            self.leadership.start()  # jobs come with the lease (_take_over)
            return
        # Clients with no usable token start now, in the pool the scheduler will use: their first
        # tokens need not wait for APScheduler's import or the health server. Each gets its job
        # when its first run is over (_run), so a first run is never queued twice.
        now = self.clock()
        first = []
        with self._jobs_lock:
            for name, keeper in self.keepers.items():
                if keeper.next_due() <= now:
                    self._first_runs.add(name)
                    first.append(self.pool.submit(self._run, name, True))
        # A head start: importing APScheduler would hold the GIL the first runs need after each I/O
        wait(first, timeout=FIRST_RUNS_HEAD_START)
        self._start_scheduler()
        with self._jobs_lock:
            self._scheduler_ready = True
            for name, keeper in self.keepers.items():
                if name not in self._first_runs:
                    self._add_job(name, keeper)

    def _start_scheduler(self) -> None:
        from tokensmith.schedule import PoolExecutor, Scheduler

        self.scheduler = Scheduler(
            executors={"default": PoolExecutor(self.pool)},  # our pool: APScheduler's own would be a second one
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=timezone.utc)
        if self.serve:
            self._start_health()
        self.scheduler.start()

    def _add_job(self, name: str, keeper: Keeper) -> None:
        from tokensmith.schedule import UntilMoved

        if self._keepalive_trigger is None:  # one shared, stateless trigger: 5,000 jobs need not own one each
            self._keepalive_trigger = UntilMoved()
        # The keeper decides every next run itself (see _run); the trigger only parks a submitted job.
        self.scheduler.add_job(self._run, self._keepalive_trigger, args=[name], id=name,
                               name=name, next_run_time=utc(max(keeper.next_due(), self.clock())),
                               replace_existing=True)

    def _run(self, name: str, first: bool = False) -> float | None:
        """One keeper's run. A scheduled run returns when its job runs next (the executor moves the
        job there once the run is over: schedule.PoolExecutor); a first run adds the client's job."""
        keeper = self.keepers.get(name)
        if keeper is None or self.stop_event.is_set():
            return None
        with self._idle:
            self._running_jobs += 1
        try:
            try:
                due = keeper.run_due()
            except Exception:  # a keeper bug must not kill the job
                log.exception("keeper crashed; retrying in 60s", extra={"client": name, "event": "keeper_crashed"})
                due = self.clock() + 60
            if first:
                with self._jobs_lock:
                    self._first_runs.discard(name)
                    keeper = self.keepers.get(name)
                    if self._scheduler_ready and keeper is not None and not self.stop_event.is_set():
                        self._add_job(name, keeper)
                return None
            return None if self.stop_event.is_set() else max(due, self.clock())
        finally:
            with self._idle:
                self._running_jobs -= 1
                self._idle.notify_all()

    def _reschedule(self, name: str, due: float) -> None:
        # The scheduler's pass holds the jobstore lock from submitting a job until it has parked it,
        # so a move always lands after the park.
        if self.stop_event.is_set():
            return
        self.scheduler.move(name, max(due, self.clock()))

    # ---- requests from the control socket and the CLI

    def refresh_now(self, name: str, keeper: Keeper | None = None, **kwargs):
        keeper = keeper or self.keepers[name]
        outcome = keeper.refresh(**kwargs)
        if self.scheduler is not None:
            self._reschedule(name, keeper.current().next_due())
        return outcome

    def _read_shared_states(self) -> None:
        """A standby shows the clients as the store holds them now (the leader writes them)."""
        for name, keeper in list(self.keepers.items()):
            try:
                state = self.store.load(name)
            except TokensmithError:
                continue
            if state is not None:
                keeper.state = state

    def leadership_status(self) -> dict:
        if self.leadership is None or not hasattr(self.leadership, "status"):
            return {}
        return {"leadership": self.leadership.status()}

    def standby_refusal(self) -> str | None:
        """Why this replica must not rotate (a standby), naming the leader; None on the leader."""
        if self.leadership is None or self.leadership.active:
            return None
        return self.leadership.refusal()

    def statuses(self) -> list[dict]:
        if self.leadership is not None and not self.leadership.active:
            self._read_shared_states()
        keepers = list(self.keepers.values())
        statuses = [keeper.status() for keeper in keepers]
        now = self.clock()
        for keeper, status in zip(keepers, statuses):
            busy_since = status["busy_since"]
            if busy_since is not None and now - busy_since > self.stuck_after(keeper.client):
                status["stuck_for"] = int(now - busy_since)
        return statuses

    def stuck_after(self, client) -> float:
        """Seconds after which a keeper's run is stuck: the most its calls can take when each ends at its
        deadline, plus a grace."""
        seconds = 2 * client.timeout  # a refresh-token exchange, then the fallback grant
        vault = self.settings.vault.timeout if self.settings.vault else 10.0
        aws = self.settings.aws.timeout if self.settings.aws else 10.0
        for store in [client.source] + list(client.sinks):
            if store.type == "vault":
                seconds += 8 * vault  # a read and a write, each maybe a login, a denial, a login again
            elif store.type == "aws":
                seconds += 2 * aws
        state = self.settings.state.type  # the state saves of the refresh
        seconds += 4 * vault if state == "vault" else 2 * aws if state == "dynamodb" else 0.0
        seconds += sum(getattr(hook, "timeout", 0.0) for hook in client.hooks)
        return seconds + STUCK_GRACE

    def healthy(self) -> bool:
        if self.scheduler is None or not self.scheduler.running:
            return False
        thread = getattr(self.scheduler, "_thread", None)
        if thread is not None and not thread.is_alive():
            return False
        if self.control is not None and not self.control.alive:  # nobody could reach the daemon
            return False
        if self.leadership is not None and not self.leadership.active:
            return True  # a standby refreshes nothing, so nothing of it is overdue
        now = self.clock()
        healthy = True
        for keeper in list(self.keepers.values()):
            busy_since = keeper.busy_since
            if busy_since is not None:
                if now - busy_since > self.stuck_after(keeper.client):
                    healthy = False
                    self._report_stuck(keeper.name, busy_since, now - busy_since)
            elif not keeper.lock.locked() and keeper.next_due() < now - OVERDUE_GRACE - keeper.client.timeout:
                healthy = False
        return healthy

    def _report_stuck(self, name: str, busy_since: float, seconds: float) -> None:
        with self._stuck_lock:
            if self._stuck_reported.get(name) == busy_since:
                return
            self._stuck_reported[name] = busy_since
        log.error("keeper stuck: its run started %.0fs ago, past every deadline of its calls", seconds,
                  extra={"client": name, "event": "keeper_stuck", "seconds": round(seconds)})

    def not_ready(self) -> list[str]:
        if self.leadership is not None and not self.leadership.active:
            # a standby is ready when it can reach the store it would take over from
            return [] if self.leadership.store_reachable else ["standby (the state store is unreachable)"]
        return [name for name, keeper in list(self.keepers.items()) if not keeper.ready()]

    def serving(self) -> bool:
        """Readiness (/readyz): the daemon runs and its scheduler is alive. Whether each client has a
        token is for metrics, status and alerts (and /readyz?strict=1)."""
        return self.not_serving() is None

    def not_serving(self) -> str | None:
        if self.stop_event.is_set() or self.scheduler is None or not self.scheduler.running:
            return "not serving"
        thread = getattr(self.scheduler, "_thread", None)
        if thread is not None and not thread.is_alive():
            return "not serving"
        if self.leadership is not None and not self.leadership.active and not self.leadership.store_reachable:
            return "standby (the state store is unreachable)"  # a standby serves by being able to take over
        return None

    def wait_first_tokens(self, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        missing = list(self.keepers)
        while time.monotonic() < deadline and not self.stop_event.is_set():
            if self.reload_requested.is_set():  # a SIGHUP during start-up is applied now, not after ready_timeout
                self.reload_requested.clear()
                self.reload()
                missing = list(self.keepers)
            # only the clients still missing are looked at again (a full pass costs ~20 ms at 5,000 clients)
            keepers = self.keepers
            missing = [name for name in missing if name in keepers and not keepers[name].ready()]
            if not missing:
                break
            time.sleep(0.05)
        return self.not_ready()

    # ---- reload

    def reload(self) -> bool:
        """Apply a changed config: add, remove and replace changed clients; leave the others alone."""
        with self._reload_lock:
            try:
                if self.load_config is None:
                    from tokensmith.config import load_settings as load_config
                else:
                    load_config = self.load_config
                settings = load_config(self.config_path)
            except ConfigError as exc:
                log.error("reload refused, keeping the running config: %s", exc, extra={"event": "reload_failed"})
                if self.metrics is not None and hasattr(self.metrics, "reloaded"):
                    self.metrics.reloaded(False, self.clock())
                return False
            new = {client.name: client for client in settings.clients}
            changed_globals = (settings.vault != self.settings.vault or settings.aws != self.settings.aws)
            if changed_globals:
                self.backends = Backends(settings)
            fresh: dict[str, Keeper] = {}
            try:
                for name, client in new.items():
                    current = self.keepers.get(name)
                    if current is None or current.client != client or changed_globals:
                        # a replaced client's state is loaded once, below, under the old keeper's lock
                        fresh[name] = self.make_keeper(client, load=current is None)
            except TokensmithError as exc:
                log.error("reload refused, keeping the running config: %s", exc, extra={"event": "reload_failed"})
                if self.metrics is not None and hasattr(self.metrics, "reloaded"):
                    self.metrics.reloaded(False, self.clock())
                return False
            self.settings = settings
            removed = [name for name in self.keepers if name not in new]
            for name in removed:
                keeper = self.keepers.pop(name)
                with keeper.lock:  # a refresh in flight finishes; none starts on it afterwards
                    keeper.hand_over(None)
                if self.scheduler is not None:
                    try:
                        self.scheduler.remove_job(name)
                    except Exception:
                        pass
                if self.metrics is not None and hasattr(self.metrics, "forget"):
                    self.metrics.forget(name)
                log.debug("client removed", extra={"client": name, "event": "client_removed"})
            added, changed = [], []
            for name, keeper in fresh.items():
                old = self.keepers.get(name)
                if old is None:
                    self.keepers[name] = keeper
                else:
                    with old.lock:  # let a refresh in flight finish, then take over its state
                        keeper.load()
                        keeper.creds = None
                        # a sink whose settings changed (mode, group, format) is written again now
                        before = {sink.name: getattr(sink, "config", None) for sink in old.sinks}
                        for sink in keeper.sinks:
                            if sink.name in before and before[sink.name] != getattr(sink, "config", None):
                                keeper.state.sinks_written.pop(sink.name, None)
                        self.keepers[name] = keeper
                        old.hand_over(keeper)  # before the lock is free: the old one never refreshes again
                if self.scheduler is not None and (self.leadership is None or self.leadership.active):
                    self._add_job(name, keeper)
                (changed if old else added).append(name)
                log.debug("client %s", "changed" if old else "added",
                          extra={"client": name, "event": "client_changed" if old else "client_added"})
            log.info("config reloaded: %s", reload_summary(added, removed, changed, len(self.keepers)),
                     extra={"event": "reloaded"})
            if self.metrics is not None and hasattr(self.metrics, "reloaded"):
                self.metrics.reloaded(True, self.clock())
            return True

    # ---- servers and the main loop

    def _start_control(self) -> None:
        from tokensmith.control import ControlServer
        from tokensmith.sdnotify import Notifier

        self.notifier = Notifier()
        control = ControlServer(self.settings, self)
        try:
            control.start()
        except RuntimeError as exc:  # another daemon answers on the socket
            raise InUse(str(exc)) from exc
        self.control = control

    def _start_health(self) -> None:
        import errno

        if self.settings.health.enabled:
            from tokensmith.health import HealthServer

            listen = self.settings.health.listen
            health = HealthServer(listen, self)
            try:
                health.start()
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
            except OSError as exc:
                reason = exc.strerror or type(exc).__name__
                if exc.errno == errno.EADDRINUSE:
                    raise InUse(f"health.listen {listen}: address already in use (another process listens "
                                f"there; change health.listen or stop it)") from exc
                raise ConfigError(f"health.listen {listen}: {reason}") from exc
            self.health = health

    def handle_signals(self) -> None:
        """Before start(): a first token can be in its sink before run_forever begins."""
        def on_stop(*_):
            self.stop_event.set()
            self.wake.set()

        def on_reload(*_):
            self.reload_requested.set()
            self.wake.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_reload)

    def run_forever(self) -> int:
        # a standby has no tokens of its own to wait for, and a leader is elected only after a ttl
        missing = [] if self.leadership else self.wait_first_tokens(self.settings.scheduler.ready_timeout)
        total = len(self.keepers)  # after the wait: a SIGHUP during start-up may have added or removed clients
        if self.leadership:
            status = f"{total} clients; leader election under way"
        elif missing:
            status = f"{total - len(missing)}/{total} clients have tokens; missing: {', '.join(missing[:20])}"
        else:
            status = f"{total} clients have fresh tokens"
        log.info("ready: %s", status, extra={"event": "ready"})
        self.notifier.ready(status)
        interval = self.notifier.watchdog_interval() or 5.0
        while not self.stop_event.is_set():
            self.wake.wait(min(interval, 5.0))
            self.wake.clear()
            if self.stop_event.is_set():
                break
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.notifier.reloading()
                self.reload()
                self.notifier.ready(f"reloaded; {len(self.keepers)} clients")
            # both walk every keeper (a few ms at 5,000 clients): only for a systemd that listens
            if self.notifier.enabled and self.healthy():
                self.notifier.watchdog()
                missing = self.not_ready()
                self.notifier.status(f"{len(self.keepers) - len(missing)}/{len(self.keepers)} clients ready")
        self.notifier.stopping()
        log.info("stopping", extra={"event": "stopping"})
        self.stop()
        return 0

    def stop(self) -> None:
        self.stop_event.set()
        if self.leadership is not None and hasattr(self.leadership, "pause"):
            self.leadership.pause()  # no new lease: stopping leaders do not take over again
        if self.control is not None:
            self.control.stop()
        if self.health is not None:
            self.health.stop()
        if self.scheduler is not None and self.scheduler.running:
            # APScheduler's shutdown(wait=True) holds the jobstore lock while it waits for running
            # jobs, and a finishing job needs that lock to reschedule itself: wait for them ourselves.
            self.scheduler.shutdown(wait=False)
        elif self.pool is not None:
            self.pool.shutdown(wait=False)
        with self._idle:
            self._idle.wait_for(lambda: self._running_jobs == 0, timeout=60)
        if self.leadership is not None and hasattr(self.leadership, "stop"):
            self.leadership.stop(release=True)  # after the last write: a standby takes over at once
        if self._daemon_lock_fd is not None:
            os.close(self._daemon_lock_fd)
            self._daemon_lock_fd = None
