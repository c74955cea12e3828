"""Takeover load on the vault backend: `python bench/ha_takeover.py [--clients N] [--rounds R]`.

Starts an OpenBao dev server, stores N client records through VaultStateStore, then times a new
leader's load_all() with one read at a time (as before: one by one) and with scheduler.max_workers
reads at once (32, the default on a shared backend), alternated in the same run: wall time and
this process's CPU time. The records are checked to come back exactly as written.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import log, stop  # noqa: E402
from bench.references import OpenBao  # noqa: E402


def loadavg() -> list[str]:
    with open("/proc/loadavg") as handle:
        return handle.read().split()[:3]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=32)
    args = parser.parse_args(argv)

    from tokensmith.config import VaultConfig, VaultStateConfig
    from tokensmith.state import ClientState
    from tokensmith.state.vault import VaultStateStore, keep_connections
    from tokensmith.vault import VaultClient

    openbao = OpenBao()
    results = {"clients": args.clients, "workers": args.workers, "loadavg_at_start": loadavg(), "runs": []}
    try:
        vault_config = VaultConfig(address=openbao.address, allow_insecure_http=True,
                                   auth={"method": "token", "token": openbao.root_token})
        config = VaultStateConfig(type="vault", mount="secret", prefix="bench/takeover")
        workdir = Path(tempfile.mkdtemp(prefix="ha-takeover-"))

        def store(workers: int) -> VaultStateStore:
            vault = VaultClient(vault_config)
            keep_connections(vault, workers)
            made = VaultStateStore(config, vault, workdir)
            made.workers = workers
            return made

        writer = store(args.workers)
        expected = {f"c{n:05d}": ClientState(access_token=f"at-{n}", obtained_at=1.0 * n, expires_at=1e10,
                                             refresh_token=f"rt-{n}", refresh_token_obtained_at=1.0 * n)
                    for n in range(args.clients)}
        started = time.monotonic()
        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(lambda item: writer.save(*item), expected.items()))
        log(f"stored {args.clients} records in {time.monotonic() - started:.1f} s")
        for round_ in range(args.rounds):
            for workers in (1, args.workers):
                leader = store(workers)
                cpu0, wall0 = time.process_time(), time.monotonic()
                loaded = leader.load_all()
                wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
                if loaded != expected:
                    raise RuntimeError("load_all did not return the records written")
                run = {"round": round_, "workers": workers, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                       "loadavg": loadavg()}
                log(json.dumps(run))
                results["runs"].append(run)
    finally:
        stop(openbao.process)
    for workers in (1, args.workers):
        walls = [run["wall_s"] for run in results["runs"] if run["workers"] == workers]
        results[f"median_wall_s_{workers}"] = round(statistics.median(walls), 2)
    results["speedup"] = round(results["median_wall_s_1"] / results[f"median_wall_s_{args.workers}"], 2)
    results["loadavg_at_end"] = loadavg()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
