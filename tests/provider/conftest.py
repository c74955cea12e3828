"""Real peers for the provider tests: Debian's tinyproxy (a forward proxy with CONNECT) on loopback,
and the dev token server over TLS with a test CA that asks for client certificates."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from pki import CA  # noqa: E402
from tokensmith.devserver import OAuthServer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Tinyproxy:
    def __init__(self, directory: Path, connect_ports: list[int], extra: str = ""):
        if shutil.which("tinyproxy") is None:
            raise RuntimeError("tinyproxy is not installed; scripts/test installs Debian's tinyproxy")
        self.port = free_port()
        self.log = directory / f"tinyproxy-{self.port}.log"
        self.url = f"http://127.0.0.1:{self.port}"
        config = directory / f"tinyproxy-{self.port}.conf"
        lines = [f"Port {self.port}", "Listen 127.0.0.1", "Timeout 30", f'LogFile "{self.log}"', "LogLevel Info",
                 "MaxClients 50", "Allow 127.0.0.1", *[f"ConnectPort {port}" for port in connect_ports], extra]
        config.write_text("\n".join(lines) + "\n")
        self.process = subprocess.Popen(["tinyproxy", "-d", "-c", str(config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"tinyproxy did not start; see {self.log}")
                time.sleep(0.05)

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines() if self.log.exists() else []

    def requests(self, needle: str) -> int:
        """How many requests for needle (a CONNECT authority or an absolute URL) the proxy logged."""
        return sum(1 for line in self.lines() if "Request (file descriptor" in line and needle in line)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def test_ca():
    return CA()


@pytest.fixture(scope="session")
def tls_oauth(test_ca, tmp_path_factory):
    """The dev token server on https://127.0.0.1:<port>; ca_bundle is the path of the test CA."""
    directory = tmp_path_factory.mktemp("tls-oauth")
    context = test_ca.server_context(directory)
    with OAuthServer(access_lifetime=3600, tls_context=context) as server:
        server.ca_bundle = directory / "ca.pem"
        yield server


@pytest.fixture(scope="session")
def proxy_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tinyproxy")


@pytest.fixture(scope="session")
def tinyproxy(proxy_dir, tls_oauth):
    proxy = Tinyproxy(proxy_dir, [int(tls_oauth.url.rsplit(":", 1)[1])])
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def tinyproxy_auth(proxy_dir, tls_oauth):
    """A proxy that wants Basic credentials proxyuser / proxy-pass-W7q."""
    proxy = Tinyproxy(proxy_dir, [int(tls_oauth.url.rsplit(":", 1)[1])], "BasicAuth proxyuser proxy-pass-W7q")
    yield proxy
    proxy.stop()
