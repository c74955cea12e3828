"""The floor loop: the least work a durable refresh needs, as a reference for the daemon's CPU.

Per refresh, paced at --rate refreshes a second over --clients clients (round robin):
one keep-alive POST with http.client, a JSON parse of the reply, and two atomic writes, each a temp
file written, fsynced, renamed and its directory fsynced: the state (token durable first) and the
sink. Nothing else: no scheduler, no logging, no validation, no threads.

--apscheduler: the same refresh, driven the way the daemon drives its keepers (tokensmith/schedule.py:
one APScheduler job per client on its BackgroundScheduler subclass with an 8-thread pool, a trigger
that parks a submitted job, and each run moving its job to its next time), so floor+APScheduler
minus floor is APScheduler's share of a refresh. Its rate is fixed at start.

Run: python bench/floor.py --port P --dir D --clients N --rate R [--apscheduler]
Prints "READY" when connected, then "<refreshes done>" once a second on stdout. A number on stdin
sets a new rate (the bench keeps it at the daemon's measured refresh rate).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import sys
import threading
import time


def atomic_write(directory: str, name: str, data: bytes) -> None:
    temp = os.path.join(directory, f".{name}.{os.urandom(4).hex()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, os.path.join(directory, name))
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


HEADERS = {"Content-Type": "application/x-www-form-urlencoded",
           "Authorization": "Basic " + base64.b64encode(b"bench:bench-secret").decode()}


def refresh(conn: http.client.HTTPConnection, state_dir: str, sink_dir: str, name: str) -> None:
    conn.request("POST", "/token", b"grant_type=client_credentials", HEADERS)
    reply = json.loads(conn.getresponse().read())
    now = time.time()
    token = {"access_token": reply["access_token"], "expires_at": now + reply["expires_in"], "obtained_at": now}
    atomic_write(state_dir, name + ".json", json.dumps(token).encode())
    atomic_write(sink_dir, name, json.dumps({"access_token": token["access_token"],
                                             "expires_at": token["expires_at"]}).encode())


def scheduled(port: int, state_dir: str, sink_dir: str, clients: int, rate: float, interval: bool = False) -> None:
    from concurrent.futures import ThreadPoolExecutor
    from datetime import timezone

    from tokensmith.schedule import PoolExecutor, Scheduler, UntilMoved, utc

    local = threading.local()
    counter = [0]
    lock = threading.Lock()
    period = clients / rate
    scheduler = Scheduler(executors={"default": PoolExecutor(ThreadPoolExecutor(8))},
                          job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
                          timezone=timezone.utc)

    def job(name: str) -> float | None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        refresh(conn, state_dir, sink_dir, name)
        with lock:
            counter[0] += 1
        return None if interval else time.time() + period

    if interval:
        from apscheduler.triggers.interval import IntervalTrigger

        trigger = IntervalTrigger(seconds=period, timezone=timezone.utc)
    else:
        trigger = UntilMoved()
    start = time.time()
    for i in range(clients):
        name = f"c{i:05d}"
        scheduler.add_job(job, trigger, args=[name], id=name, name=name,
                          next_run_time=utc(start + period * i / clients))
    scheduler.start()
    print("READY", flush=True)
    while True:
        time.sleep(1.0)
        print(counter[0], flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--apscheduler", action="store_true")
    parser.add_argument("--interval", action="store_true",
                        help="with --apscheduler: a plain interval trigger, no move after each run")
    args = parser.parse_args(argv)
    state_dir, sink_dir = os.path.join(args.dir, "state"), os.path.join(args.dir, "tokens")
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    os.makedirs(sink_dir, mode=0o700, exist_ok=True)
    if args.apscheduler:
        scheduled(args.port, state_dir, sink_dir, args.clients, args.rate, args.interval)
        return 0
    conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=10)
    print("READY", flush=True)
    rate = [args.rate]

    def follow() -> None:
        for line in sys.stdin:
            rate[0] = max(float(line), 0.1)

    threading.Thread(target=follow, daemon=True).start()
    done = 0
    next_at = report_at = time.monotonic()
    while True:
        next_at += 1.0 / rate[0]
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        refresh(conn, state_dir, sink_dir, f"c{done % args.clients:05d}")
        done += 1
        if next_at >= report_at:
            report_at += 1.0
            print(done, flush=True)


if __name__ == "__main__":
    sys.exit(main())
