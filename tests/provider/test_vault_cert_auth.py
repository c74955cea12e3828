"""Vault/OpenBao TLS certificate auth (vault.auth.method: cert) against a real `bao server -dev -dev-tls`
that trusts a test client CA through a cert auth role."""

from __future__ import annotations

import os
import secrets
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from fixtures_stores import _death_signal, find_bao, free_port, store_settings
from pki import CA
from tokensmith.backends import Backends
from tokensmith.checks import host_problems
from tokensmith.config import VaultAuthConfig
from tokensmith.errors import SourceError
from tokensmith.sources import build_source

SECRET = "cert-auth-client-secret-value"
PATH = "tokensmith/cert-auth"


class TlsBao:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        port = free_port(pairs=True)
        self.address = f"https://127.0.0.1:{port}"
        self.root_token = secrets.token_hex(16)
        self.ca_bundle = workdir / "vault-ca.pem"
        env = {key: value for key, value in os.environ.items() if not key.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(workdir)
        self.log = workdir / "bao.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [find_bao(), "server", "-dev", "-dev-tls", f"-dev-tls-cert-dir={workdir}",
                 f"-dev-root-token-id={self.root_token}", f"-dev-listen-address=127.0.0.1:{port}",
                 "-dev-no-store-token"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir,
                start_new_session=True, preexec_fn=_death_signal())
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"bao -dev-tls exited: {self.log.read_text(errors='replace')[-2000:]}")
            try:
                if self.ca_bundle.exists() and self.root().sys.read_health_status(method="GET").get("initialized"):
                    return
            except Exception:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"bao -dev-tls not healthy at {self.address}; log {self.log}")
            time.sleep(0.05)

    def root(self):
        import hvac

        return hvac.Client(url=self.address, token=self.root_token, verify=str(self.ca_bundle), timeout=5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@pytest.fixture(scope="module")
def cert_bao():
    """OpenBao over TLS with auth/cert role `tokensmith` trusting `client_ca`, allowed to read secret/PATH."""
    with tempfile.TemporaryDirectory(prefix="tokensmith-bao-tls-") as workdir:
        server = TlsBao(Path(workdir))
        try:
            root = server.root()
            server.client_ca = CA("tokensmith vault client CA")
            root.sys.enable_auth_method("cert")
            root.sys.create_or_update_policy("cert-read", f'path "secret/data/{PATH}" {{ capabilities = ["read"] }}')
            root.auth.cert.create_ca_certificate_role("tokensmith", certificate=server.client_ca.pem,
                                                      token_policies=["cert-read"], token_ttl="5m")
            root.secrets.kv.v2.create_or_update_secret(PATH, secret={"client_id": "cert-client",
                                                                      "client_secret": SECRET})
            yield server
        finally:
            server.stop()


def write_pair(directory: Path, ca: CA, common_name: str) -> tuple[Path, Path]:
    cert, key, _ = ca.issue(common_name)
    cert_path, key_path = directory / "vault-client.crt", directory / "vault-client.key"
    cert_path.write_text(cert)
    key_path.write_text(key)
    key_path.chmod(0o600)
    return cert_path, key_path


def source_for(tmp_path, server, cert_path, key_path):
    vault = {"address": server.address, "ca_bundle": str(server.ca_bundle), "timeout": 5,
             "auth": {"method": "cert", "role": "tokensmith", "cert_file": str(cert_path), "key_file": str(key_path)}}
    settings = store_settings(tmp_path, vault=vault, source={"type": "vault", "path": PATH})
    backends = Backends(settings)
    return build_source(settings.clients[0], backends), backends


def lookup_self(vault) -> dict:
    """What Vault knows about the client's current token (through its own session and certificate)."""
    return vault._call(vault._lookup_self, "lookup-self", None, SourceError)


def test_cert_login_reads_the_secret(tmp_path, cert_bao):
    cert_path, key_path = write_pair(tmp_path, cert_bao.client_ca, "tokensmith-client")
    source, backends = source_for(tmp_path, cert_bao, cert_path, key_path)
    creds = source.read()
    assert (creds.client_id, creds.client_secret) == ("cert-client", SECRET)
    meta = lookup_self(backends.vault())["meta"]
    assert meta["cert_name"] == "tokensmith" and meta["common_name"] == "tokensmith-client"


def test_certificate_from_an_untrusted_ca_is_a_clear_non_retryable_error(tmp_path, cert_bao):
    cert_path, key_path = write_pair(tmp_path, CA("some other CA"), "tokensmith-client")
    source, _ = source_for(tmp_path, cert_bao, cert_path, key_path)
    with pytest.raises(SourceError) as caught:
        source.read()
    message = str(caught.value)
    assert not caught.value.retryable
    assert message.startswith("client billing-api: vault cert login at auth/cert as role tokensmith")
    assert str(cert_path) in message and "invalid certificate or no client certificate supplied (HTTP 400)" in message
    assert key_path.read_text().splitlines()[1] not in message


def test_group_readable_key_file_is_refused_naming_the_field(tmp_path, cert_bao):
    cert_path, key_path = write_pair(tmp_path, cert_bao.client_ca, "tokensmith-client")
    key_path.chmod(0o640)
    source, _ = source_for(tmp_path, cert_bao, cert_path, key_path)
    with pytest.raises(SourceError, match=r"vault\.auth\.key_file .* accessible by group or others \(mode 0640\)") \
            as caught:
        source.read()
    assert not caught.value.retryable


def test_mismatched_certificate_and_key_name_the_cert_file(tmp_path, cert_bao):
    cert_path, key_path = write_pair(tmp_path, cert_bao.client_ca, "tokensmith-client")
    _, other_key, _ = cert_bao.client_ca.issue("someone-else")
    key_path.write_text(other_key)
    source, _ = source_for(tmp_path, cert_bao, cert_path, key_path)
    with pytest.raises(SourceError) as caught:
        source.read()
    message = str(caught.value)
    assert not caught.value.retryable and f"vault.auth.cert_file {cert_path}" in message
    assert other_key.splitlines()[1] not in message


def test_rotated_certificate_is_used_at_the_next_login(tmp_path, cert_bao):
    cert_path, key_path = write_pair(tmp_path, cert_bao.client_ca, "before-rotation")
    source, backends = source_for(tmp_path, cert_bao, cert_path, key_path)
    assert source.read().client_id == "cert-client"
    vault = backends.vault()
    assert lookup_self(vault)["meta"]["common_name"] == "before-rotation"
    write_pair(tmp_path, cert_bao.client_ca, "after-rotation")
    cert_bao.root().auth.token.revoke(vault._token)  # the next read gets 403 and logs in again
    assert source.read().client_secret == SECRET
    assert lookup_self(vault)["meta"]["common_name"] == "after-rotation"


def test_method_cert_needs_cert_file_and_key_file():
    with pytest.raises(ValueError, match="method cert needs cert_file and key_file"):
        VaultAuthConfig(method="cert", cert_file="/run/credentials/tokensmith.service/vault.crt")
    auth = VaultAuthConfig(method="cert", cert_file="/c.pem", key_file="/k.pem")
    assert (auth.role, auth.mount_point) == (None, None)  # any matching role, at auth/cert


def test_check_config_reports_a_group_readable_key_file(tmp_path):
    cert_path, key_path = write_pair(tmp_path, CA(), "tokensmith-client")
    key_path.chmod(0o644)
    vault = {"address": "https://vault.example:8200",
             "auth": {"method": "cert", "cert_file": str(cert_path), "key_file": str(key_path)}}
    found = host_problems(store_settings(tmp_path, vault=vault, source={"type": "vault", "path": PATH}))
    assert [problem["where"] for problem in found] == ["vault.auth.key_file"]
    assert "accessible by group or others (mode 0644)" in found[0]["message"]
