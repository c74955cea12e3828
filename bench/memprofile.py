"""Where each additional client's memory goes: the daemon in-process with N and then 2N clients
(each in its own process, every client holding a token and scheduled), tracemalloc's snapshot of
each grouped by file and line, and the difference per client, largest first.

Run: python bench/memprofile.py [--clients 2000] [--top 40]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def child(clients: int, root: Path, frames: int) -> None:
    tracemalloc.start(frames)
    from bench.common import Project, TokenServer
    from tokensmith.config import load_settings
    from tokensmith.daemon import Daemon
    from tokensmith.metrics import Metrics

    server = TokenServer(3600)
    try:
        project = Project(root, server, clients, fmt="json", refresh={"min_lead": 10})
        daemon = Daemon(load_settings(project.config), serve=False)
        daemon.metrics = Metrics(keepers=lambda: daemon.keepers)
        daemon.build()
        daemon.start()
        deadline = time.monotonic() + 300
        while not all(keeper.ready() for keeper in daemon.keepers.values()):
            if time.monotonic() > deadline:
                raise RuntimeError("not every client got a token")
            time.sleep(0.2)
        while len(daemon.scheduler.get_jobs()) < clients:
            time.sleep(0.1)
        time.sleep(0.5)
        import gc

        gc.collect()
        snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        stats = {}
        for stat in snapshot.statistics("traceback" if frames > 1 else "lineno"):
            key = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in stat.traceback)
            stats[key] = stats.get(key, 0) + stat.size
        with open("/proc/self/status") as handle:
            rss = int(handle.read().split("VmRSS:")[1].split()[0])
        print(json.dumps({"stats": stats, "rss_kib": rss, "traced": tracemalloc.get_traced_memory()[0]}))
        daemon.stop()
    finally:
        server.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--child", type=int)
    parser.add_argument("--root", default="/tmp/tokensmith-memprofile")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, Path(args.root) / str(args.child), args.frames)
        return 0
    runs = {}
    for n in (args.clients, 2 * args.clients):
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--root", args.root,
                              "--frames", str(args.frames)], stdout=subprocess.PIPE, text=True, check=True)
        runs[n] = json.loads(out.stdout.strip().splitlines()[-1])
    small, large = runs[args.clients], runs[2 * args.clients]
    keys = set(small["stats"]) | set(large["stats"])
    diff = sorted(((large["stats"].get(k, 0) - small["stats"].get(k, 0)) / args.clients, k) for k in keys)
    diff.reverse()
    print(f"per additional client: traced {(large['traced'] - small['traced']) / args.clients:.0f} B, "
          f"RSS {(large['rss_kib'] - small['rss_kib']) * 1024 / args.clients:.0f} B (under tracemalloc)")
    for size, key in diff[:args.top]:
        print(f"{size:9.1f} B  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
