"""The scenarios, each measured side by side with its reference (bench/references.py) in one run."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path

from bench.common import (HEAVY, PYTHON, TOKENSMITH, Project, Sampler, TokenServer, cpu_seconds, cpu_split, log,
                          pct, peak_per_second, rss_kib, stop)
from bench.references import Floor, OpenBao, agent_first_token_ms

PROBE = """
import sys
from tokensmith.config import load_settings
from tokensmith.daemon import Daemon
daemon = Daemon(load_settings(sys.argv[1]), serve=False)
daemon.build()
print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))
"""


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "n": len(values)}


def tokensmith_first_token_ms(workdir: Path, server: TokenServer) -> tuple[float, Project]:
    project = Project(workdir / "s1", server, 1, fmt="raw")
    token = project.token_path(project.names[0])
    started = time.perf_counter()
    daemon = project.start()
    try:
        while not token.exists():
            if daemon.poll() is not None:
                raise RuntimeError(f"daemon exited {daemon.returncode}; see {project.root}")
            time.sleep(0.001)
        return (time.perf_counter() - started) * 1000, project
    finally:
        stop(daemon)


IMPORT_FLOOR = "import yaml; from pydantic import BaseModel, ConfigDict, Field, SecretStr"


def import_floor_ms() -> float:
    """What the config layer's imports alone take: an interpreter that imports yaml and pydantic and exits."""
    started = time.perf_counter()
    subprocess.run([PYTHON, "-c", IMPORT_FLOOR], check=True)
    return (time.perf_counter() - started) * 1000


def scenario_cold_start(workdir: Path, server: TokenServer, openbao: OpenBao, pairs: int) -> dict:
    """Start → first token in a file sink, tokensmith and the OpenBao agent alternating (ABBA order);
    beside them, for the diagnosis, the bare interpreter with tokensmith's config imports."""
    ours, agent, ratios, floor = [], [], [], []
    for i in range(pairs):
        if i % 2 == 0:
            a, project = tokensmith_first_token_ms(workdir, server)
            b = agent_first_token_ms(openbao, workdir / "s1-agent")
        else:
            b = agent_first_token_ms(openbao, workdir / "s1-agent")
            a, project = tokensmith_first_token_ms(workdir, server)
        floor.append(import_floor_ms())
        ours.append(a)
        agent.append(b)
        ratios.append(a / b)
    result = {"tokensmith_runs_ms": [round(t, 1) for t in ours], "agent_runs_ms": [round(t, 1) for t in agent],
              "tokensmith_median_ms": round(statistics.median(ours), 1),
              "agent_median_ms": round(statistics.median(agent), 1),
              "ratio": round(statistics.median(ours) / statistics.median(agent), 2),
              "pair_ratios": spread(ratios), "target_ratio": 1.5,
              "python_yaml_pydantic_import_median_ms": round(statistics.median(floor), 1),
              "import_floor_ratio_to_agent": round(statistics.median(floor) / statistics.median(agent), 2)}
    result["pass"] = result["ratio"] <= 1.5
    probe = subprocess.run([PYTHON, "-c", PROBE, str(project.config)], capture_output=True, text=True)
    result["imports_boto3_or_hvac"] = sorted(set(probe.stdout.split()) & {"boto3", "botocore", "hvac"})
    log(f"s1 cold start: tokensmith {result['tokensmith_median_ms']} ms, agent {result['agent_median_ms']} ms, "
        f"ratio {result['ratio']} (pairs {result['pair_ratios']}); python + yaml + pydantic import alone "
        f"{result['python_yaml_pydantic_import_median_ms']} ms ({result['import_floor_ratio_to_agent']}x the agent)")
    return result


def scenario_compromise(workdir: Path, server: TokenServer, repeats: int) -> dict:
    project = Project(workdir / "s2", server, 1, fmt="raw", revocation=True)
    name = project.names[0]
    token = project.token_path(name)
    daemon = project.start()
    try:
        project.wait_socket()
        while not token.exists():
            time.sleep(0.01)
        times, failures, still_active = [], [], 0
        for i in range(repeats):
            old = token.read_text()
            started = time.perf_counter()
            done = subprocess.run([*TOKENSMITH, "rotate", name, "--compromised", "--config", str(project.config)],
                                  capture_output=True, text=True)
            elapsed = (time.perf_counter() - started) * 1000
            new = token.read_text()
            if done.returncode != 0 or new == old:
                failures.append({"exit": done.returncode, "stderr": done.stderr[-500:], "stdout": done.stdout[-500:]})
                continue
            if server.active(old):
                still_active += 1
            times.append(elapsed)
        # which heavy modules the control-client path loads (issue 3: none)
        probe = subprocess.run([PYTHON, "-X", "importtime", "-m", "tokensmith", "rotate", name, "--compromised",
                                "--config", str(project.config)], capture_output=True, text=True)
        modules = {line.split("|")[-1].strip().split(".")[0] for line in probe.stderr.splitlines()
                   if line.startswith("import time:")}
        heavy = sorted(modules & set(HEAVY))
    finally:
        stop(daemon)
    result = {"runs_ms": [round(t, 1) for t in times], "median_ms": round(statistics.median(times), 1) if times else None,
              "p95_ms": round(pct(times, 0.95), 1) if times else None, "target_ms": 300,
              "failures": failures, "old_token_still_active": still_active, "cli_heavy_imports": heavy}
    result["pass"] = bool(times) and not failures and not still_active and result["median_ms"] <= 300 and not heavy
    log(f"s2 compromise: median {result['median_ms']} ms p95 {result['p95_ms']} ms, failures {len(failures)}, "
        f"old still active {still_active}, heavy imports {heavy}")
    return result




def scenario_scale(workdir: Path, clients: int, steady: float, lifetime: float = 60.0, warmup: float = 60.0,
                   chunk: float = 10.0, floor: bool = True, startup_cap: float = 600.0,
                   tag: str = "s3") -> tuple[dict, Sampler, float]:
    """N clients on the daemon; in the steady window the floor loop runs beside it at the daemon's
    expected refresh rate. CPU per refresh of both is read per chunk, so each chunk is one ratio."""
    server = TokenServer(lifetime)
    # min_lead 10: with the default 60 s and 60 s tokens every refresh would be clamped to half the
    # lifetime, with no jitter at all
    project = Project(workdir / tag, server, clients, fmt="json", refresh={"min_lead": 10})
    sampler = Sampler(project)
    reference = scheduled = None
    try:
        started = time.time()
        daemon = project.start()
        all_tokens_at = None
        window_start = window_end = None
        marks = []  # (time, daemon cpu, floor cpu, floor refreshes, floor+APScheduler cpu, its refreshes)

        def mark(now: float) -> tuple:
            return (now, cpu_seconds(daemon.pid), cpu_seconds(reference.pid) if reference else 0.0,
                    reference.done if reference else 0, cpu_seconds(scheduled.pid) if scheduled else 0.0,
                    scheduled.done if scheduled else 0)

        stale_client_seconds = stale_max = 0
        next_tick = time.time()
        while True:
            next_tick += 1.0
            now = time.time()
            point = sampler.sample()
            if daemon.poll() is not None:
                raise RuntimeError(f"daemon exited {daemon.returncode}; see {project.root}")
            if all_tokens_at is None and point["missing"] == 0:
                all_tokens_at = max(sampler.first)
                window_start = max(started + warmup, all_tokens_at + 0.85 * lifetime)
                window_end = window_start + steady
                log(f"{tag}: all {clients} first tokens after {all_tokens_at - started:.1f} s")
            if all_tokens_at is None and now - started > startup_cap:
                log(f"{tag}: start-up capped at {startup_cap:.0f} s with {point['missing']} tokens missing")
                break
            if window_start and now >= window_start and not marks:
                if floor:
                    # the floor follows the daemon's refresh rate: its last 10 s now, each chunk's later
                    recent = sum(1 for t in sampler.refreshes if now - 10 <= t < now) / 10
                    reference = Floor(server.port, project.root / "floor", clients, recent or clients / lifetime)
                    # the floor under APScheduler, driven as the daemon drives its keepers (rate fixed here)
                    scheduled = Floor(server.port, project.root / "floor-aps", clients, recent or clients / lifetime,
                                      apscheduler=True)
                    time.sleep(1.0)  # both have imported and started
                split_start = cpu_split(daemon.pid)
                server_window0 = server.stats()
                bench_cpu_start = resource.getrusage(resource.RUSAGE_SELF)
                sampler_cpu_start = sampler.cpu
                now = time.time()
                marks.append(mark(now))
                log(f"{tag}: steady-state window starts")
            if marks:
                stale = point["missing"] + point["expired"]
                stale_client_seconds += stale
                stale_max = max(stale_max, stale)
                if now - marks[-1][0] >= chunk:
                    if reference:
                        reference.set_rate(sum(1 for t in sampler.refreshes if marks[-1][0] <= t < now)
                                           / (now - marks[-1][0]))
                    marks.append(mark(now))
            if window_end and now >= window_end:
                if marks and now - marks[-1][0] >= chunk / 2:
                    marks.append(mark(now))
                break
            if int(now - started) % 30 == 0:
                log(f"{tag}: t={now - started:.0f}s fresh={point['fresh']} missing={point['missing']} "
                    f"expired={point['expired']} refreshes={len(sampler.refreshes)}")
            time.sleep(max(0.0, next_tick - time.time()))
        rss = rss_kib(daemon.pid)
        threads = len(os.listdir(f"/proc/{daemon.pid}/task"))
        if len(marks) >= 2:
            split_end = cpu_split(daemon.pid)
            server_window1 = server.stats()
            bench_cpu_end = resource.getrusage(resource.RUSAGE_SELF)
        stop(daemon)
    finally:
        for process in (reference, scheduled):
            if process:
                process.close()
        server.close()
    result = {"clients": clients, "lifetime_s": lifetime, "warmup_s": warmup, "steady_s": steady,
              "startup_all_first_tokens_s": round(all_tokens_at - started, 2) if all_tokens_at else None,
              "daemon_rss_kib_steady": rss, "daemon_threads": threads}
    if len(marks) < 2:
        result["incomplete"] = True
        return result, sampler, started
    w0, w1 = marks[0][0], marks[-1][0]
    refreshes = sum(1 for t in sampler.refreshes if w0 <= t < w1)
    daemon_cpu = marks[-1][1] - marks[0][1]
    chunks = []
    for (t0, d0, f0, n0, _, _), (t1, d1, f1, n1, _, _) in zip(marks, marks[1:]):
        ours = sum(1 for t in sampler.refreshes if t0 <= t < t1)
        if ours and (not floor or n1 > n0):
            chunk_ms = 1000 * (d1 - d0) / ours
            floor_ms = 1000 * (f1 - f0) / (n1 - n0) if floor else None
            chunks.append({"daemon_ms": round(chunk_ms, 3), "floor_ms": round(floor_ms, 3) if floor else None,
                           "ratio": round(chunk_ms / floor_ms, 3) if floor and floor_ms else None})
    peak, mean = peak_per_second(sampler.refreshes, w0, w1)
    result.update({
        "window_s": round(w1 - w0, 1), "window_start_s": round(w0 - started, 1),
        "stale_client_seconds_after_first_minute": stale_client_seconds, "max_stale_in_one_sample": stale_max,
        "refreshes_in_window": refreshes, "token_requests_in_window": server_window1["issued"] - server_window0["issued"],
        "daemon_cpu_s_window": round(daemon_cpu, 2),
        "daemon_cpu_ms_per_refresh": round(1000 * daemon_cpu / max(refreshes, 1), 3),
        "daemon_user_ms_per_refresh": round(1000 * (split_end[0] - split_start[0]) / max(refreshes, 1), 3),
        "daemon_sys_ms_per_refresh": round(1000 * (split_end[1] - split_start[1]) / max(refreshes, 1), 3),
        "daemon_cpu_share_of_one_core": round(daemon_cpu / (w1 - w0), 3),
        "peak_refreshes_per_s": peak, "mean_refreshes_per_s": round(mean, 1),
        "peak_over_mean": round(peak / mean, 2) if mean else None,
        "token_server_cpu_s_window": round(server_window1["cpu_user"] + server_window1["cpu_sys"]
                                           - server_window0["cpu_user"] - server_window0["cpu_sys"], 2),
        "sampler_cpu_s_window": round(sampler.cpu - sampler_cpu_start, 2),
        "bench_process_cpu_s_window": round(bench_cpu_end.ru_utime + bench_cpu_end.ru_stime
                                            - bench_cpu_start.ru_utime - bench_cpu_start.ru_stime, 2),
        "chunks": chunks,
    })
    if floor:
        floor_refreshes = marks[-1][3] - marks[0][3]
        floor_cpu = marks[-1][2] - marks[0][2]
        result.update({
            "floor_refreshes_in_window": floor_refreshes,
            "floor_refreshes_per_s": round(floor_refreshes / (w1 - w0), 1),
            "floor_cpu_ms_per_refresh": round(1000 * floor_cpu / max(floor_refreshes, 1), 3),
            "chunk_ratios": spread([c["ratio"] for c in chunks if c["ratio"]]) if chunks else None,
            "floor_apscheduler_refreshes_in_window": marks[-1][5] - marks[0][5],
            "floor_apscheduler_cpu_ms_per_refresh": round(1000 * (marks[-1][4] - marks[0][4])
                                                          / max(marks[-1][5] - marks[0][5], 1), 3),
            "target_ratio": 1.3,
        })
        result["ratio"] = round(result["daemon_cpu_ms_per_refresh"] / result["floor_cpu_ms_per_refresh"], 2) \
            if floor_refreshes else None
        result["pass_cpu"] = result["ratio"] is not None and result["ratio"] <= 1.3
        result["apscheduler_ms_per_refresh"] = round(result["floor_apscheduler_cpu_ms_per_refresh"]
                                                     - result["floor_cpu_ms_per_refresh"], 3)
    result["pass_fresh"] = stale_client_seconds == 0
    result["pass_spread"] = bool(mean) and peak <= 3 * mean
    log(f"{tag} scale: " + json.dumps({k: v for k, v in result.items() if k != "chunks"}))
    return result, sampler, started


def steady_rss(project: Project, settle: float) -> int:
    daemon = project.start()
    try:
        project.wait_socket()
        token = project.token_path(project.names[0])
        deadline = time.monotonic() + 60
        while not token.exists():
            if daemon.poll() is not None:
                raise RuntimeError(f"daemon exited; see {project.root}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no token within 60 s; see {project.root}")
            time.sleep(0.01)
        time.sleep(settle)
        return rss_kib(daemon.pid)
    finally:
        stop(daemon)


def agent_rss(openbao: OpenBao, root: Path, settle: float) -> int:
    root = openbao.agent_dir(root)
    agent = openbao.start_agent(root)
    try:
        deadline = time.monotonic() + 60
        while not (root / "sink").exists():
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bao agent wrote no token; see {root / 'agent.log'}")
            time.sleep(0.01)
        time.sleep(settle)
        return rss_kib(agent.pid)
    finally:
        stop(agent)


def scenario_memory(workdir: Path, server: TokenServer, openbao: OpenBao, rss_many: int, many: int,
                    pairs: int, settle: float) -> dict:
    """RSS with one client (file sink + Vault source) against the agent's, alternating; per-client growth."""
    vault = {"address": openbao.address, "allow_insecure_http": True,
             "auth": {"method": "token", "token": openbao.root_token}}
    ours, agent = [], []
    for i in range(pairs):
        order = [0, 1] if i % 2 == 0 else [1, 0]
        for side in order:
            if side == 0:
                ours.append(steady_rss(Project(workdir / "s4-vault", server, 1, fmt="json", vault=vault,
                                               source={"type": "vault", "mount": "secret", "path": "bench/client"}),
                                       settle))
            else:
                agent.append(agent_rss(openbao, workdir / "s4-agent", settle))
    file_only = steady_rss(Project(workdir / "s4-file", server, 1, fmt="json"), settle)
    probe = subprocess.run([PYTHON, "-c", IMPORT_FLOOR + "\nprint(open('/proc/self/status').read()"
                            ".split('VmRSS:')[1].split()[0])"], capture_output=True, text=True, check=True)
    per_client = (rss_many - file_only) / (many - 1) if many > 1 else None
    result = {"tokensmith_rss_mib_runs": [round(r / 1024, 1) for r in ours],
              "agent_rss_mib_runs": [round(r / 1024, 1) for r in agent],
              "rss_1_client_file_and_vault_mib": round(statistics.median(ours) / 1024, 1),
              "agent_rss_mib": round(statistics.median(agent) / 1024, 1),
              "ratio": round(statistics.median(ours) / statistics.median(agent), 2), "target_ratio": 0.6,
              "rss_1_client_file_only_mib": round(file_only / 1024, 1),
              "python_yaml_pydantic_import_rss_mib": round(int(probe.stdout) / 1024, 1),
              f"rss_{many}_clients_mib": round(rss_many / 1024, 1), "clients": many,
              "kib_per_additional_client": round(per_client, 2) if per_client is not None else None,
              "bytes_per_additional_client": round(per_client * 1024) if per_client is not None else None}
    result["pass_one"] = result["ratio"] <= 0.6
    result["pass_per_client"] = per_client is not None and per_client * 1024 <= 12_000  # decimal KB
    log(f"s4 memory: {json.dumps(result)}")
    return result


def wait_answering(project: Project, daemon: subprocess.Popen, timeout: float) -> float:
    """perf_counter time when the daemon first answers a ping on its control socket."""
    from tokensmith.control import Unreachable, request

    deadline = time.monotonic() + timeout
    path = str(project.root / "run" / "control.sock")
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"daemon exited {daemon.returncode}; see {project.root}")
        try:
            if request(path, {"op": "ping"}, timeout=2) is not None:
                return time.perf_counter()
        except Unreachable:
            pass
        time.sleep(0.02)
    raise RuntimeError("restarted daemon never answered")


def fsync_cost(workdir: Path, n: int = 300) -> dict:
    """CPU and wall time of one atomic token/state write, with and without the fsyncs (for reference:
    a refresh does three such writes, two with a directory fsync)."""
    from tokensmith.fsutil import atomic_write

    directory = workdir / "fsync"
    directory.mkdir(parents=True, exist_ok=True)
    data = b"x" * 300
    out = {}
    for label, durable in (("atomic_write_with_fsync", True), ("same_without_any_fsync", False)):
        before, wall = os.times(), time.perf_counter()
        for i in range(n):
            if durable:
                atomic_write(directory / f"f{i}", data)
            else:
                temp = directory / f".t{i}"
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                os.fchmod(fd, 0o600)
                os.write(fd, data)
                os.close(fd)
                os.replace(temp, directory / f"f{i}")
        after = os.times()
        out[label] = {"cpu_ms": round((after.user + after.system - before.user - before.system) / n * 1000, 3),
                      "sys_ms": round((after.system - before.system) / n * 1000, 3),
                      "wall_ms": round((time.perf_counter() - wall) / n * 1000, 3)}
    shutil.rmtree(directory, ignore_errors=True)
    log(f"fsync cost: {out}")
    return out


def scenario_restart(workdir: Path, clients: int) -> dict:
    server = TokenServer(3600)
    project = Project(workdir / "s5", server, clients, fmt="json")
    sampler = Sampler(project)
    try:
        daemon = project.start()
        started = time.time()
        while sampler.sample()["missing"]:
            if daemon.poll() is not None:
                raise RuntimeError(f"daemon exited; see {project.root}")
            time.sleep(0.5)
        startup = max(sampler.first) - started
        time.sleep(2)
        before = server.stats()["issued"]
        stop(daemon, signal.SIGKILL)  # leaves a stale control socket behind, as a crash would
        restarted = time.perf_counter()
        daemon = project.start("daemon-restarted")
        socket_after = wait_answering(project, daemon, 120) - restarted
        time.sleep(max(0.0, 10 - (time.perf_counter() - restarted)))
        issued = server.stats()["issued"] - before
        point = sampler.sample()
        stop(daemon)
    finally:
        server.close()
    result = {"clients": clients, "lifetime_s": 3600, "first_start_all_tokens_s": round(startup, 2),
              "refreshed_in_first_10s_after_kill9_restart": issued,
              "fraction": round(issued / clients, 4), "control_socket_up_after_restart_s": round(socket_after, 2),
              "missing_or_expired_after_restart": point["missing"] + point["expired"]}
    result["pass"] = issued < 0.01 * clients
    log(f"s5 restart: {json.dumps(result)}")
    return result


