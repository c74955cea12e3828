"""What scheduling costs per refresh, without the refresh: CPU per job of a job that only waits
(1 ms, as a refresh waits on its I/O), paced at --rate over --clients jobs, driven three ways:

  loop       one thread, sleeping until each next job (the floor loop's pacing: the reference)
  plain      APScheduler as the daemon used it before: BackgroundScheduler, APScheduler's
             ThreadPoolExecutor wrapper (run_job, its events and log records) around a shared
             8-thread pool, a 520-week IntervalTrigger, modify_job (and its wakeup) after each run
  tokensmith APScheduler as the daemon uses it now (tokensmith/schedule.py): Scheduler (passes
             at most every 0.1 s), PoolExecutor, UntilMoved, a move that wakes the loop only when needed

Each variant runs in its own process; the rounds alternate so load drifts hit all of them.
Run: python bench/schedcost.py [--clients 5000] [--rate 100] [--seconds 15] [--rounds 2] [--variants ...]
[--tick S] [--profile] (--profile: yappi's CPU profile of each child on stderr; pip install yappi)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = 0.001
TICK = None


def run_loop(clients: int, rate: float, counter: list) -> None:
    def loop():
        next_at = time.monotonic()
        while True:
            next_at += 1.0 / rate
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            time.sleep(WORK)
            counter[0] += 1

    threading.Thread(target=loop, daemon=True).start()


def run_plain(clients: int, rate: float, counter: list) -> None:
    from apscheduler.executors.pool import BasePoolExecutor, ThreadPoolExecutor as Wrapper
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.interval import IntervalTrigger

    class SharedPoolExecutor(Wrapper):  # as the daemon had it
        def __init__(self, pool):
            BasePoolExecutor.__init__(self, pool)

    pool = ThreadPoolExecutor(8)
    period = timedelta(seconds=clients / rate)
    scheduler = BackgroundScheduler(executors={"default": SharedPoolExecutor(pool)},
                                    job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
                                    timezone=timezone.utc)
    lock = threading.Lock()

    def job(name):
        time.sleep(WORK)
        with lock:
            counter[0] += 1
        scheduler.modify_job(name, next_run_time=datetime.now(timezone.utc) + period)

    trigger = IntervalTrigger(weeks=520, timezone=timezone.utc)
    start = datetime.now(timezone.utc)
    for i in range(clients):
        scheduler.add_job(job, trigger, args=[f"c{i}"], id=f"c{i}", name=f"c{i}",
                          next_run_time=start + period * (i / clients))
    scheduler.start()


def run_tokensmith(clients: int, rate: float, counter: list) -> None:
    sys.path.insert(0, str(ROOT / "daemon"))
    from tokensmith.schedule import PoolExecutor, Scheduler, UntilMoved, utc

    if TICK is not None:
        Scheduler.tick = TICK

    pool = ThreadPoolExecutor(8)
    period = clients / rate
    scheduler = Scheduler(executors={"default": PoolExecutor(pool)},
                          job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
                          timezone=timezone.utc)
    lock = threading.Lock()

    def job(name):
        time.sleep(WORK)
        with lock:
            counter[0] += 1
        return time.time() + period

    trigger = UntilMoved()
    start = time.time()
    for i in range(clients):
        scheduler.add_job(job, trigger, args=[f"c{i}"], id=f"c{i}", name=f"c{i}",
                          next_run_time=utc(start + period * i / clients))
    scheduler.start()


VARIANTS = {"loop": run_loop, "plain": run_plain, "tokensmith": run_tokensmith}


def child(variant: str, clients: int, rate: float, seconds: float, profile: bool) -> None:
    counter = [0]
    VARIANTS[variant](clients, rate, counter)
    time.sleep(2.0)  # past the start
    if profile:
        import yappi

        yappi.set_clock_type("cpu")
        yappi.start()
    cpu0, done0 = time.process_time(), counter[0]
    time.sleep(seconds)
    cpu, done = time.process_time() - cpu0, counter[0] - done0
    if profile:
        yappi.stop()
        stats = yappi.get_func_stats()
        stats.sort("tsub")
        stats.print_all(out=sys.stderr, columns={0: ("name", 70), 1: ("ncall", 9), 2: ("tsub", 8), 3: ("ttot", 8)})
    print(json.dumps({"variant": variant, "jobs": done, "cpu_ms_per_job": 1000 * cpu / max(done, 1)}), flush=True)
    os._exit(0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="loop,plain,tokensmith")
    parser.add_argument("--child")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--tick", type=float, help="tokensmith: the scheduler's least sleep between passes")
    args = parser.parse_args(argv)
    if args.child:
        global TICK
        TICK = args.tick
        child(args.child, args.clients, args.rate, args.seconds, args.profile)
        return 0
    variants = args.variants.split(",")
    results: dict = {v: [] for v in variants}
    for r in range(args.rounds):
        for variant in (variants if r % 2 == 0 else variants[::-1]):
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--clients", str(args.clients),
                                  "--rate", str(args.rate), "--seconds", str(args.seconds)]
                                 + (["--tick", str(args.tick)] if args.tick is not None else [])
                                 + (["--profile"] if args.profile else []),
                                 stdout=subprocess.PIPE, stderr=None if args.profile else subprocess.PIPE,
                                 text=True, check=True)
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1])["cpu_ms_per_job"])
    with open("/proc/loadavg") as handle:
        load = handle.read().split()[:3]
    summary = {v: round(statistics.median(ms), 4) for v, ms in results.items()}
    base = summary.get("loop")
    report = {"clients": args.clients, "rate": args.rate, "load": load, "cpu_ms_per_job": summary,
              "runs": {v: [round(x, 4) for x in ms] for v, ms in results.items()}}
    if base is not None:
        report["scheduling_ms_per_job_over_loop"] = {v: round(m - base, 4) for v, m in summary.items() if v != "loop"}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
