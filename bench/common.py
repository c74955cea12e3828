"""Shared pieces of the benchmarks: process probes, the token server, config projects, the sampler."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
PYTHON = sys.executable
TOKENSMITH = [str(Path(PYTHON).with_name("tokensmith"))] if Path(PYTHON).with_name("tokensmith").exists() \
    else [PYTHON, "-m", "tokensmith"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
HEAVY = ("boto3", "botocore", "hvac", "pydantic", "apscheduler")


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
