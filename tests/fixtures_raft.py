"""A real 3-node OpenBao cluster with integrated (Raft) storage on loopback, for one session.

`raft_cluster` starts three `bao server` processes (each its own data dir, API and cluster port),
initialises node 1 (one key share), unseals it, makes autopilot promote new nodes to voters after
one second, and lets nodes 2 and 3 join through retry_join. Every node is a voter, so the cluster
survives the loss of any one node. Helpers: active(), nodes, kill(node), restart(node),
wait_healthy(). A KV v2 engine is mounted at `secret`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fixtures_stores import _death_signal, find_bao, free_port

__all__ = ["raft_cluster"]

HEALTH_ACTIVE = 200
STANDBY = (429, 473)


class Node:
    def __init__(self, cluster: "RaftCluster", index: int):
        self.cluster = cluster
        self.index = index
        self.name = f"node{index}"
        self.port = free_port()
        self.cluster_port = free_port()
        self.address = f"http://127.0.0.1:{self.port}"
        self.dir = cluster.workdir / self.name
        self.process: subprocess.Popen | None = None
        self._starts = 0

    def config(self) -> str:
        join = "" if self.index == 1 else f"""
  retry_join {{
    leader_api_addr = "{self.cluster.nodes[0].address}"
  }}"""
        return f"""
storage "raft" {{
  path = "{self.dir / 'data'}"
  node_id = "{self.name}"
  performance_multiplier = 1
  autopilot_reconcile_interval = "300ms"
  autopilot_update_interval = "200ms"{join}
}}
listener "tcp" {{
  address = "127.0.0.1:{self.port}"
  cluster_address = "127.0.0.1:{self.cluster_port}"
  tls_disable = true
}}
api_addr = "{self.address}"
cluster_addr = "https://127.0.0.1:{self.cluster_port}"
disable_mlock = true
log_level = "warn"
"""

    def start(self) -> None:
        if self.running:
            return
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        (self.dir / "config.hcl").write_text(self.config())
        self._starts += 1
        env = {key: value for key, value in os.environ.items() if not key.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(self.dir)
        with open(self.dir / f"server-{self._starts}.log", "wb") as log:
            self.process = subprocess.Popen([self.cluster.binary, "server", f"-config={self.dir / 'config.hcl'}"],
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            cwd=self.dir, start_new_session=True, preexec_fn=_death_signal())
        self.cluster.wait(lambda: self.health() is not None, f"{self.name} listening")

    def kill(self) -> None:
        """SIGKILL: the node dies at once, as when its pod or host is lost."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(5)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def health(self) -> int | None:
        try:
            with urllib.request.urlopen(f"{self.address}/v1/sys/health", timeout=1) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def api(self, method: str, path: str, body: dict | None = None, token: str | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.address}/v1/{path}", data=data, method=method)
        if token or self.cluster.root_token:
            request.add_header("X-Vault-Token", token or self.cluster.root_token)
        # sys/init writes through Raft: it took over 5 s at load average 37
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read()
        return json.loads(text) if text else {}

    def unseal(self) -> None:
        self.api("PUT", "sys/unseal", {"key": self.cluster.unseal_key})

    def __repr__(self) -> str:
        return f"<{self.name} {self.address}>"


class RaftCluster:
    def __init__(self, binary: str, workdir: Path, size: int = 3):
        self.binary = binary
        self.workdir = workdir
        self.root_token: str | None = None
        self.unseal_key: str | None = None
        self.nodes: list[Node] = []
        for index in range(1, size + 1):
            self.nodes.append(Node(self, index))

    @staticmethod
    def wait(predicate, what: str, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = predicate()
            except (OSError, urllib.error.URLError, ValueError):
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise RuntimeError(f"raft cluster: {what} not reached within {timeout}s")
            time.sleep(0.05)

    def start(self) -> None:
        first = self.nodes[0]
        first.start()
        self.timings = {"node1 listening": time.monotonic()}
        answer = first.api("PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1})
        self.unseal_key, self.root_token = answer["keys"][0], answer["root_token"]
        first.unseal()
        self.wait(lambda: first.health() == HEALTH_ACTIVE, "node1 active")
        first.api("POST", "sys/storage/raft/autopilot/configuration",
                  {"server_stabilization_time": "1s", "cleanup_dead_servers": False})
        first.api("POST", "sys/mounts/secret", {"type": "kv", "options": {"version": "2"}})
        self.timings["node1 active"] = time.monotonic()
        for node in self.nodes[1:]:
            node.start()
        for node in self.nodes[1:]:
            self.wait(lambda node=node: self._unsealed(node), f"{node.name} joined and unsealed")
        self.timings["joined"] = time.monotonic()
        self.wait_healthy()
        self.timings["voters"] = time.monotonic()

    def _unsealed(self, node: Node) -> bool:
        if node.health() in STANDBY + (HEALTH_ACTIVE,):
            return True
        try:
            node.unseal()  # retry_join needs the key; until the join is done the node says so and we retry
        except (urllib.error.HTTPError, OSError):
            pass
        return False

    def voters(self) -> set[str]:
        config = self.active().api("GET", "sys/storage/raft/configuration")["data"]["config"]["servers"]
        return {server["node_id"] for server in config if server.get("voter")}

    def healthy_voters(self) -> int:
        state = self.active().api("GET", "sys/storage/raft/autopilot/state")["data"]
        return sum(1 for server in state["servers"].values()
                   if server.get("status") in ("voter", "leader") and server.get("healthy"))

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Every running node unsealed, one active, and every running node a healthy voter."""
        running = [node for node in self.nodes if node.running]
        for node in running:
            self.wait(lambda node=node: self._unsealed(node), f"{node.name} unsealed", timeout)
        self.wait(lambda: sum(node.health() == HEALTH_ACTIVE for node in running) == 1, "one active node", timeout)
        self.wait(lambda: self.healthy_voters() >= len(running), "every node a healthy voter", timeout)

    def active(self) -> Node:
        for node in self.nodes:
            if node.running and node.health() == HEALTH_ACTIVE:
                return node
        raise RuntimeError("no active node")

    def wait_active(self, timeout: float = 20.0) -> Node:
        return self.wait(lambda: next((n for n in self.nodes if n.running and n.health() == HEALTH_ACTIVE), None),
                         "an active node", timeout)

    def standbys(self) -> list[Node]:
        return [node for node in self.nodes if node.running and node.health() in STANDBY]

    def kill(self, node: Node) -> None:
        node.kill()

    def restart(self, node: Node) -> None:
        """Start a stopped node on its old data and unseal it; it rejoins as a standby."""
        node.start()
        self.wait(lambda: self._unsealed(node), f"{node.name} unsealed again")

    def ensure_up(self) -> None:
        """Undo what a previous test did: every node running, unsealed and a healthy voter."""
        for node in self.nodes:
            if not node.running:
                self.restart(node)
        self.wait_healthy()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def raft_cluster():
    binary = find_bao()
    workdir = Path(tempfile.mkdtemp(prefix="tokensmith-raft-"))
    cluster = RaftCluster(binary, workdir)
    try:
        started = time.monotonic()
        cluster.start()
        cluster.startup_seconds = time.monotonic() - started
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
