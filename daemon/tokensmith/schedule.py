"""APScheduler as the daemon uses it, in its cheapest correct form (imported when the scheduler starts).

Each client is one job whose next run is the keeper's own next due time. Per refresh that is:
the scheduler's pass submits the job (its trigger only parks the job far in the future until the
run is over), the pool runs it, and the finished run moves its job to the keeper's next due time,
waking the scheduler only when it would otherwise sleep past that time (almost never: at 5,000
clients the scheduler wakes for another client long before), and the scheduler's loop sleeps at
least TICK between passes, so each pass submits a batch. Against plain APScheduler usage (an
interval trigger, run_job's events and log records, modify_job and a wakeup per run, one pass per
refresh) this cuts the scheduling CPU per refresh about sevenfold; bench/schedcost.py measures both.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import datetime, timezone

from apscheduler.executors.base import BaseExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_RUNNING
from apscheduler.triggers.base import BaseTrigger

log = logging.getLogger("tokensmith.daemon")

# The loop sleeps at least this long between passes, so one pass submits every job that fell due
# meanwhile: a refresh starts at most this late, and at 5,000 clients the scheduler wakes 10 times
# a second instead of once per refresh (each wakeup costs more CPU than the pass's work).
TICK = 0.1
RETRY_AFTER_FAILURE = 60.0
PARKED = datetime(9999, 1, 1, tzinfo=timezone.utc)


def utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, timezone.utc)


class UntilMoved(BaseTrigger):
    """A job's next fire time after it is submitted: none in practice, until its run moves it."""

    def get_next_fire_time(self, previous_fire_time, now):
        return PARKED

    def __str__(self):
        return "until moved"


class PoolExecutor(BaseExecutor):
    """Runs a job's function straight in the daemon's pool (no second pool, none of run_job's events
    and log records, which nobody listens to). The function returns the Unix time of its next run or
    None; the job is moved there after its instance is released, so a run due at once is never
    refused as a second instance (max_instances=1) and parked for good."""

    def __init__(self, pool):
        super().__init__()
        self._pool = pool

    def _do_submit_job(self, job, run_times):
        self._pool.submit(self._call, job)

    def _call(self, job) -> None:
        due = None
        try:
            due = job.func(*job.args, **job.kwargs)
        except Exception:  # a bug must not park the job for good
            log.exception("scheduled run failed; retrying in 60s", extra={"client": job.id, "event": "job_failed"})
            due = time.time() + RETRY_AFTER_FAILURE
        finally:
            with self._lock:
                left = self._instances[job.id] - 1
                if left > 0:
                    self._instances[job.id] = left
                else:
                    self._instances.pop(job.id, None)
        if due is not None:
            self._scheduler.move(job.id, due)

    def shutdown(self, wait=True):
        self._pool.shutdown(wait)


class Scheduler(BackgroundScheduler):
    """A BackgroundScheduler that knows when its loop will wake next, so moving a job later than
    that needs no wakeup, and that wakes at most every `tick` seconds by itself."""

    tick = TICK
    _planned = math.inf  # Unix time the loop wakes by itself; inf while a pass runs (any move wakes it)

    def _process_jobs(self):
        self._planned = math.inf
        wait = super()._process_jobs()
        if wait is not None:
            wait = max(wait, self.tick)
        self._planned = math.inf if wait is None else time.time() + wait
        return wait

    def move(self, job_id: str, when: float) -> bool:
        """Next run of the job at `when` (Unix time); False when there is no such job."""
        run_time = utc(when)
        with self._jobstores_lock:
            try:
                job, alias = self._lookup_job(job_id, None)
            except JobLookupError:
                return False
            job.next_run_time = run_time
            if alias is not None:
                self._lookup_jobstore(alias).update_job(job)
        if when < self._planned and self.state == STATE_RUNNING:
            self.wakeup()
        return True
