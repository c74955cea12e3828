"""APScheduler as the daemon drives it (tokensmith/schedule.py): each run moves its own job, the
loop wakes only when a move needs it, and one pass submits every job due within a tick."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timezone

import pytest

from daemon_harness import wait_for
from tokensmith.schedule import PARKED, PoolExecutor, Scheduler, UntilMoved, utc


@pytest.fixture
def scheduler():
    pool = ThreadPoolExecutor(4)
    scheduler = Scheduler(executors={"default": PoolExecutor(pool)},
                          job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
                          timezone=timezone.utc)
    passes = []
    original = scheduler._process_jobs

    def counting():
        passes.append(time.time())
        return original()

    scheduler._process_jobs = counting
    scheduler.passes = passes
    scheduler.start()
    yield scheduler
    scheduler.shutdown(wait=False)
    pool.shutdown(wait=True)


def test_a_run_due_again_at_once_runs_again_not_parked(scheduler):
    runs = []

    def job():
        runs.append(time.time())
        return time.time() if len(runs) < 4 else time.time() + 3600

    scheduler.add_job(job, UntilMoved(), id="a", next_run_time=utc(time.time()))
    wait_for(lambda: len(runs) == 4, timeout=5)
    wait_for(lambda: scheduler.get_job("a").next_run_time.timestamp() > time.time() + 3000)


def test_a_submitted_job_is_parked_until_its_run_moves_it(scheduler):
    release, started = threading.Event(), threading.Event()
    runs = []

    def job():
        runs.append(1)
        started.set()
        release.wait(5)
        return time.time() + 3600

    scheduler.add_job(job, UntilMoved(), id="a", next_run_time=utc(time.time()))
    assert started.wait(5)
    assert scheduler.get_job("a").next_run_time == PARKED
    release.set()
    wait_for(lambda: scheduler.get_job("a").next_run_time != PARKED)
    assert abs(scheduler.get_job("a").next_run_time.timestamp() - (time.time() + 3600)) < 5
    assert runs == [1]


def test_a_move_earlier_than_the_planned_wakeup_wakes_the_loop(scheduler):
    ran = threading.Event()
    scheduler.add_job(lambda: ran.set(), UntilMoved(), id="a", next_run_time=utc(time.time() + 3600))
    wait_for(lambda: scheduler._planned > time.time() + 3000)  # the loop now sleeps until the job's time
    assert not ran.is_set()
    assert scheduler.move("a", time.time())
    assert ran.wait(5.0)  # without the wake-up it would sleep for an hour
    assert not scheduler.move("missing", time.time())


def test_a_move_later_than_the_planned_wakeup_leaves_the_loop_asleep(scheduler):
    soon = time.time() + 10
    scheduler.add_job(lambda: None, UntilMoved(), id="soon", next_run_time=utc(soon))
    scheduler.add_job(lambda: None, UntilMoved(), id="late", next_run_time=utc(time.time() + 3600))
    wait_for(lambda: abs(scheduler._planned - soon) < 1)  # asleep until "soon"
    before = len(scheduler.passes)
    for _ in range(20):
        assert scheduler.move("late", time.time() + 1800)
    time.sleep(0.3)
    assert len(scheduler.passes) == before


def test_jobs_due_within_a_tick_share_a_pass_and_run_at_most_a_tick_late(scheduler):
    runs = {}
    start = time.time() + 0.3
    due = {f"c{i}": start + i * 0.01 for i in range(30)}  # 30 jobs over 0.3 s

    def job(name):
        runs[name] = time.time()

    for name, when in due.items():
        scheduler.add_job(job, UntilMoved(), args=[name], id=name, next_run_time=utc(when))
    time.sleep(0.2)
    before = len(scheduler.passes)
    wait_for(lambda: len(runs) == len(due), timeout=5)
    assert len(scheduler.passes) - before <= 6  # one pass per job would be 30
    for name, when in due.items():
        assert runs[name] >= when
    late = sorted(runs[name] - due[name] for name in due)
    assert late[len(late) // 2] <= scheduler.tick + 0.1  # median lateness: a tick and thread hand-offs


def test_a_run_that_raises_is_retried_later_not_parked(scheduler, caplog):
    def job():
        raise RuntimeError("a bug")

    scheduler.add_job(job, UntilMoved(), id="a", next_run_time=utc(time.time()))
    wait_for(lambda: scheduler.get_job("a").next_run_time != PARKED
             and scheduler.get_job("a").next_run_time.timestamp() > time.time() + 30)
    assert "retrying in 60s" in caplog.text
