"""Helpers to run the real `tokensmith` command against the fake token endpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def write_private(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle)
    return path


class Project:
    """A config directory with file-sourced clients registered on an OAuthServer."""

    def __init__(self, root: Path, server, **settings):
        self.root = root
        self.server = server
        self.clients: list[dict] = []
        self.settings = {"state_dir": str(root / "state"), "runtime_dir": str(root / "run"),
                         "health": {"listen": "127.0.0.1:0"}, **settings}
        (root / "tokens").mkdir(parents=True, exist_ok=True)
        self.config = root / "config.yaml"

    def add_client(self, name, *, dialect="post", grant="client_credentials", secret=None, users=None,
                   lifetime=None, fmt="raw", refresh=None, **extra):
        secret = secret or f"{name}-secret-value"
        self.server.add_client(name, secret, dialect=dialect, users=users, access_lifetime=lifetime)
        creds = {"client_id": name, "client_secret": secret}
        if users:
            username, password = next(iter(users.items()))
            creds.update(username=username, password=password)
        write_private(self.root / "creds" / f"{name}.json", creds)
        client = {"name": name, "token_url": self.server.token_url, "grant": grant, "auth_style": dialect,
                  "source": {"type": "file", "path": str(self.root / "creds" / f"{name}.json")},
                  "refresh": {"min_lead": 0, "backoff_initial": 0.05, "backoff_max": 0.5, **(refresh or {})},
                  "sinks": [{"type": "file", "path": str(self.token_path(name)), "format": fmt}], **extra}
        self.clients.append(client)
        return client

    def token_path(self, name) -> Path:
        return self.root / "tokens" / name

    def token(self, name) -> str | None:
        try:
            return self.token_path(name).read_text() or None
        except FileNotFoundError:
            return None

    def write(self) -> Path:
        self.config.write_text(yaml.safe_dump({**self.settings, "clients": self.clients}))
        return self.config

    def cli(self, *args, env=None, timeout=60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tokensmith", *args, "--config", str(self.config)],
                              capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})

    def start(self, *extra, env=None) -> "Running":
        self.write()
        log = open(self.root / f"daemon-{time.monotonic_ns()}.log", "w")
        process = subprocess.Popen([sys.executable, "-m", "tokensmith", "run", "--config", str(self.config), *extra],
                                   stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        return Running(process, Path(log.name), self)


class Running:
    def __init__(self, process, log_path: Path, project: Project):
        self.process = process
        self.log_path = log_path
        self.project = project

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, names=None, timeout=15.0):
        names = names or [client["name"] for client in self.project.clients]
        wait_for(lambda: all(self.project.token(name) for name in names) and self.socket_up(), timeout)

    def health_port(self, timeout=10.0) -> int:
        """The health server starts after the first tokens are on their way, so wait for it."""
        pattern = re.compile(r"health endpoint listening on 127\.0\.0\.1:(\d+)")
        wait_for(lambda: pattern.search(self.log), timeout)
        return int(pattern.search(self.log).group(1))

    def socket_up(self) -> bool:
        return (self.project.root / "run" / "control.sock").exists()

    def signal(self, sig=signal.SIGHUP):
        self.process.send_signal(sig)

    def stop(self, timeout=15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError("daemon did not stop on SIGTERM\n" + self.log)
        return self.process.returncode
