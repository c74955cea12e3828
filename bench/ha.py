"""HA benchmark (issue 11): `python bench/ha.py [--quick] [--clients N] [--window S] [--rounds R] [--docs]`.

Starts a loopback token endpoint (bench/hautil.py: bench/tokenserver.py counting refresh-token
reuse; 60 s tokens, rotating refresh tokens) and an OpenBao dev server, then:

  1. CPU per refresh, `state: file` vs `state: vault` (one replica), alternated file, vault,
     file, vault... in the same run: each phase starts a fresh `tokensmith run` with N clients
     (file credentials, file sinks), waits for all first tokens, then measures a steady-state
     window: daemon CPU (utime+stime from /proc) per token issued by the endpoint, and stale
     client-seconds (sink token missing or expired, sampled every second).
  2. Failover at N clients: two replicas on the vault backend (lease_ttl 15, renew_every 5)
     writing the same sinks; SIGKILL the leader; time until the standby logs event=leader_elected
     and event=takeover (every client loaded), stale client-seconds, refresh-token reuse, and
     refreshes in the first 10 s after takeover next to the steady rate before the kill.

Writes bench/results/ha-<stamp>.json and .md; with --docs also the "Benchmark at N clients"
section of docs/ha.md.  --quick: 1,000 clients, 60 s windows, 2 rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (BENCH, PYTHON, RESULTS, ROOT, TOKENSMITH, Project, Sampler, TokenServer,  # noqa: E402
                          cpu_seconds, log, stop)
from bench.references import OpenBao  # noqa: E402
from hautil import LogWatch  # noqa: E402

LEASE_TTL, RENEW_EVERY = 15, 5
REFRESH = {"min_lead": 10}
EXTRA: dict = {}  # more top-level settings (--max-workers)


class CountingServer(TokenServer):
    def __init__(self, lifetime: float):  # noqa: super().__init__ would start tokenserver.py
        import http.client

        self.process = subprocess.Popen([PYTHON, str(BENCH / "hautil.py"), "--lifetime", str(lifetime),
                                         "--refresh-tokens"], stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError("token server did not start")
        self.port = int(line.split()[1])
        self.base = f"http://127.0.0.1:{self.port}"
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)


def loadavg() -> list[str]:
    with open("/proc/loadavg") as handle:
        return handle.read().split()[:3]


def ensure_kv2(address: str, token: str) -> None:
    request = urllib.request.Request(f"{address}/v1/sys/mounts", headers={"X-Vault-Token": token})
    mounts = json.loads(urllib.request.urlopen(request, timeout=5).read())
    mounts = mounts.get("data", mounts)
    if mounts.get("secret/", {}).get("options", {}).get("version") == "2":
        return
    body = json.dumps({"type": "kv", "options": {"version": "2"}}).encode()
    request = urllib.request.Request(f"{address}/v1/sys/mounts/secret", data=body, method="POST",
                                     headers={"X-Vault-Token": token, "Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=5).read()


def settings_for(backend: str, prefix: str, identity: str = "r0") -> dict:
    if backend == "file":
        return {**EXTRA, "state": {"type": "file"}}
    return {**EXTRA, "state": {"type": "vault", "mount": "secret", "prefix": prefix},
            "leader": {"lease_ttl": LEASE_TTL, "renew_every": RENEW_EVERY, "identity": identity}}


def wait_first_tokens(sampler: Sampler, daemon: subprocess.Popen, root: Path, timeout: float) -> float:
    started = time.time()
    while sampler.sample()["missing"]:
        if daemon.poll() is not None:
            raise RuntimeError(f"daemon exited {daemon.returncode}; see {root}")
        if time.time() - started > timeout:
            raise RuntimeError(f"not every first token within {timeout:.0f} s; see {root}")
        time.sleep(1.0)
    return max(sampler.first) - started


def cpu_phase(workdir: Path, server: CountingServer, vault: dict, backend: str, label: str, clients: int,
              window: float) -> dict:
    project = Project(workdir / label, server, clients, fmt="json", refresh=REFRESH,
                      vault=vault if backend == "vault" else None,
                      settings=settings_for(backend, f"bench/{label}"))
    sampler = Sampler(project)
    started = time.time()
    daemon = project.start()
    try:
        startup = wait_first_tokens(sampler, daemon, project.root, 600)
        cpu0, stats0, t0 = cpu_seconds(daemon.pid), server.stats(), time.time()
        stale = stale_max = 0
        tick = t0
        while time.time() < t0 + window:
            tick += 1.0
            time.sleep(max(0.0, tick - time.time()))
            point = sampler.sample()
            if daemon.poll() is not None:
                raise RuntimeError(f"daemon exited {daemon.returncode}; see {project.root}")
            stale += point["missing"] + point["expired"]
            stale_max = max(stale_max, point["missing"] + point["expired"])
        cpu1, stats1, t1 = cpu_seconds(daemon.pid), server.stats(), time.time()
    finally:
        stop(daemon)
    issued = stats1["issued"] - stats0["issued"]
    cpu = cpu1 - cpu0
    result = {"backend": backend, "label": label, "clients": clients,
              "startup_all_first_tokens_s": round(startup, 1), "window_s": round(t1 - t0, 1),
              "refreshes": issued, "sink_replacements_seen": sum(1 for r in sampler.refreshes if t0 <= r < t1),
              "daemon_cpu_s": round(cpu, 2), "daemon_cores_used": round(cpu / (t1 - t0), 3),
              "cpu_ms_per_refresh": round(cpu / issued * 1000, 3) if issued else None,
              "stale_client_seconds": stale, "stale_max": stale_max,
              "refresh_token_reuse": stats1["reused"] - stats0["reused"], "loadavg": loadavg(),
              "wall_s": round(time.time() - started, 1)}
    log(f"{label}: {json.dumps(result)}")
    return result


def failover(workdir: Path, server: CountingServer, vault: dict, clients: int, after: float) -> dict:
    prefix = "bench/failover"
    project = Project(workdir / "failover", server, clients, fmt="json", refresh=REFRESH, vault=vault,
                      settings=settings_for("vault", prefix, "replica-a"))
    config_b = json.loads(project.config.read_text())
    config_b.update(state_dir=str(project.root / "state-b"), runtime_dir=str(project.root / "run-b"),
                    leader={"lease_ttl": LEASE_TTL, "renew_every": RENEW_EVERY, "identity": "replica-b"})
    (project.root / "config-b.yaml").write_text(json.dumps(config_b))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sampler = Sampler(project)
    events = ("lease_acquired", "leader_elected", "takeover", "ready", "leader_deposed", "step_down")
    watch_a = LogWatch(project.root / "a.log", events)
    watch_b = LogWatch(project.root / "b.log", events)
    a = project.start("a")
    b = None
    try:
        watch_a.wait("leader_elected", 120, lambda: a.poll() is None)
        startup = wait_first_tokens(sampler, a, project.root, 600)
        with open(project.root / "b.log", "ab") as out:
            b = subprocess.Popen([*TOKENSMITH, "run", "--config", str(project.root / "config-b.yaml")],
                                 stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            watch_b.wait("ready", 120, lambda: b.poll() is None)
        except RuntimeError as exc:
            log(f"failover: {exc}; going on")
        if "leader_elected" in watch_b.seen:
            raise RuntimeError("replica b became leader while a was alive")
        # kill in the first wave of refreshes (60 s tokens, refreshed 10-30 s before expiry), after
        # measuring its rate for 20 s
        first_done = max(sampler.first)
        while time.time() < first_done + 40:
            time.sleep(1.0)
            sampler.sample()
        before0, t_before0 = server.stats(), time.time()
        for _ in range(20):
            time.sleep(1.0)
            sampler.sample()
        before1, t_kill = server.stats(), time.time()
        rate_before = (before1["issued"] - before0["issued"]) / (t_kill - t_before0)
        stale_before = sum(p["missing"] + p["expired"] for p in sampler.timeline if p["t"] >= t_before0)
        cpu_b0 = cpu_seconds(b.pid)
        a.send_signal(signal.SIGKILL)
        a.wait()
        killed = time.time()
        stats_kill = server.stats()
        points = []
        tick = killed
        elected = took = None
        stats_take = stats_10 = None
        while True:
            tick += 1.0
            time.sleep(max(0.0, tick - time.time()))
            points.append(sampler.sample())
            if b.poll() is not None:
                raise RuntimeError(f"replica b exited {b.returncode}; see {project.root}")
            elected = watch_b.seen.get("leader_elected")
            took = watch_b.seen.get("takeover")
            if took and stats_take is None:
                stats_take, cpu_b1 = server.stats(), cpu_seconds(b.pid)
            if took and stats_10 is None and time.time() >= took + 10:
                stats_10 = server.stats()
            if took and time.time() >= took + after:
                break
            if not took and time.time() > killed + LEASE_TTL + 240:
                raise RuntimeError(f"no takeover within {LEASE_TTL + 240} s of the kill; see {project.root}")
        stats_end = server.stats()
    finally:
        watch_a.close()
        watch_b.close()
        stop(a)
        if b is not None:
            stop(b)
    stale_points = [p["missing"] + p["expired"] for p in points]
    gap = [p["missing"] + p["expired"] for p in points if p["t"] <= took]
    result = {
        "clients": clients, "lease_ttl_s": LEASE_TTL, "renew_every_s": RENEW_EVERY,
        "startup_all_first_tokens_s": round(startup, 1),
        "leader_elected_after_kill_s": round(elected - killed, 2),
        "takeover_done_after_kill_s": round(took - killed, 2),
        "lease_acquired_after_kill_s": round(watch_b.seen["lease_acquired"] - killed, 2)
        if "lease_acquired" in watch_b.seen else None,
        "takeover_load_s": round(took - watch_b.seen.get("lease_acquired", took), 2),
        "standby_cpu_s_kill_to_takeover": round(cpu_b1 - cpu_b0, 2),
        "takeover_line": watch_b.lines.get("takeover"),
        "refreshes_per_s_before_kill": round(rate_before, 1),
        "refreshes_kill_to_takeover": stats_take["issued"] - stats_kill["issued"],
        "refreshes_first_10s_after_takeover": stats_10["issued"] - stats_take["issued"],
        "refreshes_first_10s_after_takeover_fraction": round((stats_10["issued"] - stats_take["issued"]) / clients, 4),
        "steady_refreshes_in_10s_before_kill": round(rate_before * 10),
        "refresh_token_reuse": stats_end["reused"] - before0["reused"],
        "refresh_token_reuse_whole_run": stats_end["reused"],
        "stale_client_seconds_20s_before_kill": stale_before,
        "stale_client_seconds_kill_to_takeover": sum(gap),
        "stale_client_seconds_kill_to_end": sum(stale_points),
        "stale_max": max(stale_points) if stale_points else 0,
        "observed_after_takeover_s": after, "loadavg": loadavg(),
    }
    log(f"failover: {json.dumps(result)}")
    return result


def summarise(phases: list[dict]) -> dict:
    out = {}
    for backend in ("file", "vault"):
        values = [p["cpu_ms_per_refresh"] for p in phases if p["backend"] == backend and p["cpu_ms_per_refresh"]]
        cores = [p["daemon_cores_used"] for p in phases if p["backend"] == backend]
        out[backend] = {"cpu_ms_per_refresh": values, "median": round(statistics.median(values), 3) if values else None,
                        "min": min(values, default=None), "max": max(values, default=None),
                        "cores_used": cores,
                        "stale_client_seconds": sum(p["stale_client_seconds"] for p in phases if p["backend"] == backend),
                        "startup_s": [p["startup_all_first_tokens_s"] for p in phases if p["backend"] == backend]}
    ratios = [v["cpu_ms_per_refresh"] / f["cpu_ms_per_refresh"]
              for f, v in zip([p for p in phases if p["backend"] == "file"], [p for p in phases if p["backend"] == "vault"])
              if f["cpu_ms_per_refresh"] and v["cpu_ms_per_refresh"]]
    out["ratio_vault_over_file_per_round"] = [round(r, 2) for r in ratios]
    if out["file"]["median"] and out["vault"]["median"]:
        out["ratio_of_medians"] = round(out["vault"]["median"] / out["file"]["median"], 2)
    return out


def workers_text(workers) -> str:
    if isinstance(workers, dict):
        return ", ".join(f"{count} on {backend}" for backend, count in workers.items()) + " (the defaults)"
    return f"{workers} on every backend"


def markdown(results: dict) -> str:
    s, f = results.get("summary"), results.get("failover") or {}
    n = results["clients"]
    if not s or not s["file"]["median"] or not s["vault"]["median"]:
        s = None
    lines = [f"## Benchmark at {n:,} clients", "",
             f"`python bench/ha.py {results['argv']}` on {results['date']}: {results['cores']} cores "
             f"({results['machine']}), shared with other jobs — load average {' '.join(results['loadavg_at_start'])} "
             f"at the start, {' '.join(results['loadavg_at_end'])} at the end; wall {results['wall_s']:.0f} s. "
             f"{n:,} clients, 60 s tokens with rotating refresh tokens (bench/hautil.py, the bench token "
             f"server counting reuse), file credentials, one file sink each, `refresh.min_lead: {results['min_lead_s']:g}`; OpenBao dev "
             f"server (single node, in-memory) for `state: vault`; `scheduler.max_workers`: "
             f"{workers_text(results['max_workers'])}. {results['rounds']} rounds of file then vault, each "
             f"phase a fresh daemon, measured over a {results['window_s']:.0f} s window that starts when every "
             f"client's first token is in its sink. CPU is the daemon's utime+stime over the window divided by the "
             f"tokens the endpoint issued in it; stale client-seconds count, every second, sinks whose token was "
             f"missing or expired.", ""]
    if s:
        lines += [
             "| | file | vault | vault / file |", "|---|---|---|---|",
             f"| daemon CPU per refresh, ms (median; each phase) | {s['file']['median']} ({', '.join(map(str, s['file']['cpu_ms_per_refresh']))}) "
             f"| {s['vault']['median']} ({', '.join(map(str, s['vault']['cpu_ms_per_refresh']))}) "
             f"| {s.get('ratio_of_medians')} (per round: {', '.join(map(str, s['ratio_vault_over_file_per_round']))}) |",
             f"| daemon cores used in the window | {', '.join(map(str, s['file']['cores_used']))} "
             f"| {', '.join(map(str, s['vault']['cores_used']))} | |",
             f"| stale client-seconds in the windows | {s['file']['stale_client_seconds']} | {s['vault']['stale_client_seconds']} | |",
             f"| start-up to every first token, s | {', '.join(map(str, s['file']['startup_s']))} "
             f"| {', '.join(map(str, s['vault']['startup_s']))} | |", ""]
    if f:
        lines += [f"Failover at {n:,} clients: two replicas on the vault backend (`lease_ttl: {f['lease_ttl_s']}`, "
                  f"`renew_every: {f['renew_every_s']}`) writing the same sinks; the leader SIGKILLed 60 s after the "
                  f"last first token, while refreshing ({f['refreshes_per_s_before_kill']} refreshes/s before the kill).", "",
                  "| failover | result |", "|---|---|",
                  f"| standby leader (`event=leader_elected`) after the kill | {f['leader_elected_after_kill_s']} s |",
                  f"| every client loaded (`event=takeover`) after the kill | {f['takeover_done_after_kill_s']} s "
                  f"({f['takeover_load_s']} s from `event=lease_acquired` to load {n:,} records) |",
                  f"| refresh-token reuse (endpoint's count) | {f['refresh_token_reuse']} |",
                  f"| refreshes in the first 10 s after takeover | {f['refreshes_first_10s_after_takeover']} "
                  f"({100 * f['refreshes_first_10s_after_takeover_fraction']:.1f} % of clients; steady state before "
                  f"the kill: {f['steady_refreshes_in_10s_before_kill']} per 10 s) |",
                  f"| stale client-seconds: 20 s before the kill / kill to takeover / kill to takeover + "
                  f"{f['observed_after_takeover_s']:.0f} s | {f['stale_client_seconds_20s_before_kill']} / "
                  f"{f['stale_client_seconds_kill_to_takeover']} / {f['stale_client_seconds_kill_to_end']} |", ""]
    return "\n".join(lines)


def update_docs(section: str) -> None:
    path = ROOT / "docs" / "ha.md"
    text = path.read_text()
    start = text.find("\n## Benchmark at ")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + "\n" + section + (text[end:] if end >= 0 else "\n")
    else:
        marker = text.find("\n## Tests")
        text = text[:marker] + "\n" + section + text[marker:] if marker >= 0 else text + "\n" + section + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 clients, 60 s windows")
    parser.add_argument("--clients", type=int)
    parser.add_argument("--window", type=float, help="steady-state seconds per phase (default 60, 90 full)")
    parser.add_argument("--rounds", type=int, default=2, help="file+vault pairs")
    parser.add_argument("--after", type=float, default=40, help="seconds observed after the takeover")
    parser.add_argument("--no-failover", action="store_true")
    parser.add_argument("--failover-only", action="store_true")
    parser.add_argument("--backends", default="file,vault", help="which CPU phases each round runs")
    parser.add_argument("--max-workers", type=int,
                        help="scheduler.max_workers (default: tokensmith's, 8 on file and 32 on vault)")
    parser.add_argument("--min-lead", type=float, default=10, help="refresh.min_lead of every client (s)")
    parser.add_argument("--docs", action="store_true", help="write the section in docs/ha.md")
    parser.add_argument("--keep", action="store_true", help="keep the daemons' directories and logs")
    args = parser.parse_args(argv)
    REFRESH["min_lead"] = args.min_lead
    if args.max_workers:
        EXTRA["scheduler"] = {"max_workers": args.max_workers}
    clients = args.clients or (1000 if args.quick else 5000)
    window = args.window or (60.0 if args.quick else 90.0)
    import compileall

    import tokensmith

    compileall.compile_dir(str(Path(tokensmith.__file__).parent), quiet=1)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = RESULTS / f"work-ha-{stamp}"
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cores": os.cpu_count(),
                     "machine": platform.platform(), "python": platform.python_version(),
                     "argv": " ".join(sys.argv[1:] if argv is None else argv), "clients": clients,
                     "window_s": window, "rounds": args.rounds, "min_lead_s": args.min_lead,
                     "max_workers": args.max_workers or {"file": 8, "vault": 32}, "loadavg_at_start": loadavg()}
    began = time.monotonic()
    server = CountingServer(60)
    openbao = OpenBao()
    bao, address, root_token = openbao.process, openbao.address, openbao.root_token
    try:
        ensure_kv2(address, root_token)
        vault = {"address": address, "allow_insecure_http": True, "auth": {"method": "token", "token": root_token}}
        phases = []
        for round_ in range(0 if args.failover_only else args.rounds):
            for backend in args.backends.split(","):
                phases.append(cpu_phase(workdir, server, vault, backend, f"{backend}-{round_}", clients, window))
        results["phases"] = phases
        results["summary"] = summarise(phases)
        log(f"summary: {json.dumps(results['summary'])}")
        if not args.no_failover:
            results["failover"] = failover(workdir, server, vault, clients, args.after)
    finally:
        stats = server.stats()
        results["token_server"] = {k: stats[k] for k in ("issued", "requests", "reused", "refresh_grants")}
        server.close()
        stop(bao)
    results["loadavg_at_end"] = loadavg()
    results["wall_s"] = round(time.monotonic() - began, 1)
    section = markdown(results)
    (RESULTS / f"ha-{stamp}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"ha-{stamp}.md").write_text(section + "\n")
    print(section)
    if args.docs:
        update_docs(section)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
