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


IDP_DIR = Path(__file__).parent.parent / "idp"


class Idp:
    """panva's oidc-provider (tests/idp/server.mjs) with the given clients, on a free loopback port."""

    def __init__(self, directory: Path, clients: list[dict], tls: dict | None = None, **settings):
        import json

        if not (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
            raise RuntimeError("tests/idp/node_modules is missing; scripts/test runs npm ci there")
        config = directory / "idp.json"
        config.write_text(json.dumps({"clients": clients, **({"tls": tls} if tls else {}), **settings}))
        self.stderr = directory / "idp.stderr"
        self.process = subprocess.Popen(["node", str(IDP_DIR / "server.mjs"), str(config)], stdout=subprocess.PIPE,
                                        stderr=self.stderr.open("wb"), text=True)
        line = self.process.stdout.readline()
        if not line:
            self.stop()
            raise RuntimeError(f"oidc-provider did not start: {self.stderr.read_text()[-500:]}")
        self.issuer = json.loads(line)["issuer"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


IDP_SECRET = "an-oidc-provider-client-secret-long-enough-for-HS256"


@pytest.fixture(scope="session")
def idp(tmp_path_factory):
    """oidc-provider with clients pkjwt (private_key_jwt, RS256 key idp.keys["pkjwt"]), csjwt
    (client_secret_jwt) and basic (client_secret_basic), all for the client_credentials grant."""
    from jwt.algorithms import RSAAlgorithm

    from pki import new_key

    key = new_key("rsa")
    from tokensmith.clientauth import jwk_thumbprint

    jwk = {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": jwk_thumbprint(key.public_key())}
    common = {"grant_types": ["client_credentials"], "redirect_uris": [], "response_types": []}
    clients = [{"client_id": "pkjwt", "token_endpoint_auth_method": "private_key_jwt", "jwks": {"keys": [jwk]},
                **common},
               {"client_id": "csjwt", "client_secret": IDP_SECRET, "token_endpoint_auth_method": "client_secret_jwt",
                **common},
               {"client_id": "basic", "client_secret": IDP_SECRET, "token_endpoint_auth_method": "client_secret_basic",
                **common}]
    server = Idp(tmp_path_factory.mktemp("idp"), clients)
    server.keys = {"pkjwt": key}
    yield server
    server.stop()


@pytest.fixture(scope="session")
def idp_mtls(tmp_path_factory, test_ca):
    """oidc-provider over https (test CA) with client mtls (tls_client_auth, subject CN=mtls-client)."""
    directory = tmp_path_factory.mktemp("idp-mtls")
    cert, key, _ = test_ca.issue("127.0.0.1", server=True)
    (directory / "ca.pem").write_text(test_ca.pem)
    clients = [{"client_id": "mtls", "token_endpoint_auth_method": "tls_client_auth",
                "tls_client_auth_subject_dn": "CN=mtls-client", "grant_types": ["client_credentials"],
                "redirect_uris": [], "response_types": []}]
    server = Idp(directory, clients, tls={"cert": cert, "key": key, "ca": test_ca.pem})
    server.ca_bundle = directory / "ca.pem"
    yield server
    server.stop()
