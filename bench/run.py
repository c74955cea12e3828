"""tokensmith benchmarks: `python bench/run.py [--quick]` (from the repository root, in the venv).

Every target is a ratio against a reference measured on the same machine in the same run, because
absolute times on a shared VM move by 15-30% between runs:

  1. start → first token in a file sink   vs the OpenBao agent (`bao agent`, AppRole auto-auth,
                                             file sink), alternating runs: ratio of medians <= 1.5
  2. daemon CPU per refresh                vs the floor loop (bench/floor.py: one keep-alive POST,
                                             a JSON parse, two fsynced atomic writes), run beside the
                                             daemon in the same window: <= 1.3 (5,000 clients, 60 s tokens)
  3. RSS with one client (file + Vault)    vs the agent's RSS: <= 0.6; and <= 12 KB per added client
  4. growth at 100 / 1,000 / 5,000 / 20,000 clients: start-up, CPU per refresh, RSS (plotted)
  5. kept: compromise rotation <= 300 ms, zero stale client-seconds, peak/mean <= 3x,
     < 1% refreshed in the first 10 s after a kill -9 restart

It starts its own loopback token endpoint (bench/tokenserver.py), an OpenBao dev server (for the
agent's AppRole and tokensmith's Vault source) and the floor loop, and writes
bench/results/<stamp>.json, .md, <stamp>-freshness.png and <stamp>-growth.png.

--quick: 500 clients with 20 s tokens, growth at 100 and 500, fewer repetitions (under 3 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, TokenServer, log  # noqa: E402
from bench.references import OpenBao  # noqa: E402
from bench.report import plot_freshness, plot_growth, table  # noqa: E402
from bench.scenarios import (fsync_cost, scenario_cold_start, scenario_compromise, scenario_memory,  # noqa: E402
                             scenario_restart, scenario_scale)


def growth_point(scale: dict, rss_one_kib: float | None) -> dict:
    point = {k: scale.get(k) for k in ("clients", "startup_all_first_tokens_s", "daemon_cpu_ms_per_refresh",
                                        "mean_refreshes_per_s", "incomplete")}
    point["rss_mib"] = round(scale["daemon_rss_kib_steady"] / 1024, 1)
    if rss_one_kib and scale["clients"] > 1:
        point["bytes_per_additional_client"] = round((scale["daemon_rss_kib_steady"] - rss_one_kib) * 1024
                                                     / (scale["clients"] - 1))
    return point


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="500 clients, 20 s tokens, fewer repetitions")
    parser.add_argument("--clients", type=int)
    parser.add_argument("--steady", type=float, help="seconds of steady state in scenario 2's window")
    parser.add_argument("--growth", help="comma-separated client counts for the growth curve")
    parser.add_argument("--growth-cap", type=float, default=240.0,
                        help="seconds a growth point may take to deliver all first tokens (default 240)")
    parser.add_argument("--only", help="comma-separated scenarios: cold,compromise,scale,memory,restart,growth")
    args = parser.parse_args(argv)
    quick = args.quick
    clients = args.clients or (500 if quick else 5000)
    lifetime, warmup = (20.0, 25.0) if quick else (60.0, 60.0)
    steady = args.steady or (20.0 if quick else 120.0)
    chunk = 5.0 if quick else 10.0
    pairs = 7 if quick else 11
    growth = [int(n) for n in (args.growth or ("100,500" if quick else "100,1000,5000,20000")).split(",")]
    only = set((args.only or "cold,compromise,scale,memory,restart,growth").split(","))
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = RESULTS / f"work-{stamp}"
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cores": os.cpu_count(),
                     "machine": platform.platform(), "python": platform.python_version(),
                     "mode": "quick" if quick else "full", "clients": clients, "lifetime_s": lifetime,
                     "steady_s": steady}
    with open("/proc/loadavg") as handle:
        results["loadavg_at_start"] = handle.read().split()[:3]
    # As `pip install` does: without .pyc files every start would compile tokensmith's modules
    # (about 50 ms of the cold start), and an editable install under PYTHONDONTWRITEBYTECODE never caches them.
    import compileall
    import tokensmith

    compileall.compile_dir(str(Path(tokensmith.__file__).parent), quiet=1)
    began = time.monotonic()

    def save() -> None:  # after every scenario, so a late failure keeps what was measured
        (RESULTS / f"{stamp}.json").write_text(json.dumps(results, indent=2))

    openbao = OpenBao()
    try:
        server = TokenServer(60)
        try:
            if "cold" in only:
                results["cold_start"] = scenario_cold_start(workdir, server, openbao, pairs)
            if "compromise" in only:
                results["compromise"] = scenario_compromise(workdir, server, 8 if quick else 22)
            save()
        finally:
            server.close()
        results["fsync_cost"] = fsync_cost(workdir)
        sampler = None
        if "scale" in only:
            scale, sampler, started = scenario_scale(workdir, clients, steady, lifetime, warmup, chunk)
            results["scale"] = scale
            results["scale_timeline"] = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in p.items()}
                                         for p in sampler.timeline]
            save()
            plot_freshness(sampler, started, scale, RESULTS / f"{stamp}-freshness.png")
        if "memory" in only:
            server = TokenServer(60)
            try:
                many = results.get("scale", {}).get("daemon_rss_kib_steady")
                results["memory"] = scenario_memory(workdir, server, openbao, many or 0, clients if many else 1,
                                                    2 if quick else 3, 2.0 if quick else 5.0)
                save()
            finally:
                server.close()
    finally:
        openbao.close()
    if "restart" in only:
        results["restart"] = scenario_restart(workdir, clients)
        save()
    if "growth" in only:
        rss_one = (results.get("memory") or {}).get("rss_1_client_file_only_mib")
        rss_one = rss_one * 1024 if rss_one else None
        points = []
        for n in growth:
            if n == clients and "scale" in results:
                scale = results["scale"]
            else:
                scale, _, _ = scenario_scale(workdir, n, 10.0 if quick else 30.0, lifetime, warmup, chunk,
                                             floor=False, startup_cap=args.growth_cap, tag=f"g{n}")
            points.append(growth_point(scale, rss_one))
            log(f"growth {n}: {points[-1]}")
            results["growth"] = points
            save()
        plot_growth(results, RESULTS / f"{stamp}-growth.png")
    results["wall_s"] = round(time.monotonic() - began, 1)
    with open("/proc/loadavg") as handle:
        results["loadavg_at_end"] = handle.read().split()[:3]
    text = table(results)
    save()
    (RESULTS / f"{stamp}.md").write_text(
        f"{results['date']}, {results['cores']} cores, load {' '.join(results['loadavg_at_start'])} at start, "
        f"{results['machine']}, Python {results['python']}, mode {results['mode']}, wall {results['wall_s']} s\n\n"
        f"{text}\n")
    print(text)
    print(f"\nwall time {results['wall_s']} s; results in {RESULTS / (stamp + '.json')} and the PNGs beside it")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
