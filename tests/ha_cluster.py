"""Several real `tokensmith run` processes sharing one state backend (the HA tests): configs,
start/kill/pause, the lease record, and a consumer sampling every client's sink.

Vault: state, lease and sinks in KV v2 (`vault_kv`). DynamoDB (`dynamo=DynamoStore(...)`): state
and lease in a DynamoDB table, sinks in Secrets Manager, both on moto's server over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from daemon_harness import wait_for, write_private


@dataclass
class Replica:
    name: str
    root: Path
    process: subprocess.Popen | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log(self) -> str:
        return "".join(path.read_text(errors="replace") for path in self.logs)


@dataclass
class DynamoStore:
    endpoint_url: str
    region: str
    table: str
    secret_prefix: str

    def client(self, service: str):
        import boto3

        return boto3.session.Session().client(service, region_name=self.region, endpoint_url=self.endpoint_url)

    def create_table(self) -> None:
        self.client("dynamodb").create_table(
            TableName=self.table, KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}], BillingMode="PAY_PER_REQUEST")


class Cluster:
    def __init__(self, root: Path, vault_kv, server, *, clients: int, replicas: int, lifetime: int,
                 lease_ttl: float = 3.0, renew_every: float = 1.0, addresses: list[str] | None = None,
                 dynamo: DynamoStore | None = None):
        self.root = root
        self.kv = vault_kv
        self.dynamo = dynamo
        self.server = server
        self.prefix = f"{vault_kv.prefix}/ts" if vault_kv else None
        self.names = [f"c{i:03d}" for i in range(clients)]
        self.replicas = [Replica(f"r{i}", root / f"r{i}") for i in range(replicas)]
        clients_config = []
        for name in self.names:
            server.add_client(name, f"{name}-secret", dialect="json", access_lifetime=lifetime)
            creds = write_private(root / "creds" / f"{name}.json",
                                  {"client_id": name, "client_secret": f"{name}-secret"})
            clients_config.append({
                "name": name, "token_url": server.token_url, "auth_style": "json", "timeout": 1,
                "source": {"type": "file", "path": str(creds)},
                "refresh": {"at_fraction": 0.5, "jitter": 0.1, "min_lead": 0, "backoff_initial": 0.1,
                            "backoff_max": 1.0},
                "sinks": [{"type": "aws", "secret_id": self.sink_path(name)} if dynamo else
                          {"type": "vault", "mount": "secret", "path": self.sink_path(name)}]})
        self.clients_config = clients_config
        self.lease_config = {"lease_ttl": lease_ttl, "renew_every": renew_every}
        for index, replica in enumerate(self.replicas):
            replica.root.mkdir(parents=True, exist_ok=True)
            if dynamo:
                store = {"aws": {"region": dynamo.region, "endpoint_url": dynamo.endpoint_url, "timeout": 2},
                         "state": {"type": "dynamodb", "table": dynamo.table}}
            else:
                vault = vault_kv.vault_config()
                if addresses:  # each replica through its own node of a cluster
                    vault["address"] = addresses[index % len(addresses)]
                store = {"vault": vault, "state": {"type": "vault", "mount": "secret", "prefix": self.prefix}}
            config = {"state_dir": str(replica.root / "state"), "runtime_dir": str(replica.root / "run"),
                      "health": {"listen": "127.0.0.1:0"}, **store,
                      "leader": {**self.lease_config, "identity": replica.name},
                      "scheduler": {"max_workers": 8}, "clients": clients_config}
            (replica.root / "config.yaml").write_text(yaml.safe_dump(config))

    def sink_path(self, name: str) -> str:
        if self.dynamo:
            return f"{self.dynamo.secret_prefix}/{name}"
        return f"{self.kv.prefix}/sinks/{name}"

    # ---- processes

    def start(self, replica: Replica) -> None:
        log = replica.root / f"daemon-{len(replica.logs)}.log"
        replica.logs.append(log)
        with open(log, "w") as handle:
            replica.process = subprocess.Popen(
                [sys.executable, "-m", "tokensmith", "run", "--config", str(replica.root / "config.yaml")],
                stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "TOKENSMITH_LOG__LEVEL": "INFO"})

    def start_all(self) -> None:
        for replica in self.replicas:
            self.start(replica)

    def wait_started(self, timeout: float = 30.0) -> None:
        """Every running replica is past start-up (leader or standby campaigning)."""
        wait_for(lambda: all("event=ready" in replica.logs[-1].read_text() for replica in self.replicas
                             if replica.alive), timeout, interval=0.1)

    def kill(self, replica: Replica, sig=signal.SIGKILL) -> None:
        replica.process.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            replica.process.wait(20)

    def stop_all(self) -> None:
        for replica in self.replicas:
            if replica.alive:
                replica.process.send_signal(signal.SIGCONT)
                replica.process.send_signal(signal.SIGTERM)
        for replica in self.replicas:
            if replica.process is not None:
                try:
                    replica.process.wait(20)
                except subprocess.TimeoutExpired:
                    replica.process.kill()
                    replica.process.wait(5)

    # ---- the store, as the consumer and the operator see it

    def lease(self) -> dict | None:
        try:
            if self.dynamo:
                item = self.dynamo.client("dynamodb").get_item(TableName=self.dynamo.table, Key={"pk": {"S": "lease"}},
                                                               ConsistentRead=True).get("Item")
                return json.loads(item["lease"]["S"]) if item else None
            data, _ = self._read(f"{self.prefix}/leader")
        except Exception:
            return None
        return data

    def leader(self) -> Replica | None:
        lease = self.lease()
        holder = lease and lease.get("holder")
        return next((replica for replica in self.replicas if replica.name == holder), None)

    def _read(self, path: str):
        from hvac.exceptions import InvalidPath

        try:
            response = self.kv.root.secrets.kv.v2.read_secret_version(path, mount_point="secret",
                                                                      raise_on_deleted_version=True)
        except InvalidPath:
            return None, 0
        return response["data"]["data"], response["data"]["metadata"]["version"]

    def sink_reader(self):
        """A function reading one client's sink document (None when absent), with a client of its own."""
        if self.dynamo:
            secrets = self.dynamo.client("secretsmanager")

            def read(name: str) -> dict | None:
                try:
                    return json.loads(secrets.get_secret_value(SecretId=self.sink_path(name))["SecretString"])
                except secrets.exceptions.ResourceNotFoundException:
                    return None
            return read
        import hvac

        root = hvac.Client(url=self.kv.server.address, token=self.kv.server.root_token, timeout=5)

        def read(name: str) -> dict | None:
            from hvac.exceptions import InvalidPath

            try:
                return root.secrets.kv.v2.read_secret_version(self.sink_path(name), mount_point="secret",
                                                              raise_on_deleted_version=True)["data"]["data"]
            except InvalidPath:
                return None
        return read

    def sink(self, name: str) -> dict | None:
        return self.sink_reader()(name)

    def all_sinks_fresh(self) -> bool:
        now = time.time()
        read = self.sink_reader()
        for name in self.names:
            document = read(name)
            if not document or float(document["expires_at"]) <= now \
                    or not self.server.is_active(document["access_token"]):
                return False
        return True

    def wait_all_sinks(self, timeout: float = 30.0) -> None:
        wait_for(self.all_sinks_fresh, timeout, interval=0.2)


class Consumer:
    """Reads every client's Vault sink continuously, as an application would, and records every
    moment a sink held an expired token, or a token the provider no longer accepts (revoked)."""

    def __init__(self, cluster: Cluster, interval: float = 0.05):
        self.cluster = cluster
        self.interval = interval
        self.samples = 0
        self.expired: list[tuple[str, float]] = []  # (client, seconds past expiry) per expired sample
        self.bad_since: dict[str, tuple[str, float]] = {}  # client -> (token, first seen inactive)
        self.revoked_spans: list[tuple[str, float, float]] = []  # (client, start, seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)
        now = time.monotonic()
        for name, (_, since) in self.bad_since.items():
            self.revoked_spans.append((name, since, now - since))

    def _run(self) -> None:
        read = self.cluster.sink_reader()
        while not self._stop.is_set():
            for name in self.cluster.names:
                try:
                    document = read(name)
                except Exception:
                    continue
                if not document:
                    continue
                token, wall, now = document["access_token"], time.time(), time.monotonic()
                self.samples += 1
                if wall >= float(document["expires_at"]):
                    self.expired.append((name, wall - float(document["expires_at"])))
                if self.cluster.server.is_active(token):
                    previous = self.bad_since.pop(name, None)
                    if previous:
                        self.revoked_spans.append((name, previous[1], now - previous[1]))
                elif name not in self.bad_since or self.bad_since[name][0] != token:
                    previous = self.bad_since.get(name)
                    if previous:
                        self.revoked_spans.append((name, previous[1], now - previous[1]))
                    self.bad_since[name] = (token, now)
            self._stop.wait(self.interval)

    def longest_revoked(self, excluding: list[float] = (), grace: float = 0.0) -> float:
        """The longest time one sink held a token the provider no longer accepts; spans that began
        within `grace` seconds before one of the `excluding` instants are left out."""
        spans = [seconds for _, start, seconds in self.revoked_spans
                 if not any(at - grace <= start <= at + grace for at in excluding)]
        return max(spans, default=0.0)
