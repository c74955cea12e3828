"""The real daemon and CLI with the new provider features: `once` through tinyproxy from HTTPS_PROXY in
its environment, and a running daemon that signs with a private key rotated in its file source (the
next refresh uses the new key, no restart)."""

from __future__ import annotations

import json
import os

from daemon_harness import Project, wait_for, write_private
from pki import new_key, private_pem, public_pem
from tokensmith.devserver import OAuthServer


def test_once_goes_through_the_proxy_from_its_environment(tmp_path, tls_oauth, tinyproxy):
    project = Project(tmp_path, tls_oauth)
    project.add_client("e2e-proxy", ca_bundle=str(tls_oauth.ca_bundle))
    project.write()
    before = tinyproxy.requests("CONNECT " + tls_oauth.url.split("://", 1)[1])
    env = {"HTTPS_PROXY": tinyproxy.url, "NO_PROXY": ""}
    result = project.cli("once", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert tls_oauth.is_active(project.token("e2e-proxy"))
    assert tinyproxy.requests("CONNECT " + tls_oauth.url.split("://", 1)[1]) == before + 1


def test_running_daemon_signs_with_a_rotated_key_without_restart(tmp_path):
    with OAuthServer(access_lifetime=2) as server:
        project = Project(tmp_path, server)
        key = new_key("ec")
        client = project.add_client("signer", auth_style="private_key_jwt", refresh={"strategy": "reissue"})
        server.add_client("signer", "", auth="private_key_jwt", key=public_pem(key), access_lifetime=2)
        creds = tmp_path / "creds" / "signer.json"
        write_private(creds, {"client_id": "signer", "private_key": private_pem(key)})
        assert client["source"]["path"] == str(creds)
        project.write()
        daemon = project.start()
        try:
            daemon.wait_ready()
            rotated = new_key("ec")
            server.set_client_key("signer", public_pem(rotated))
            write_private(creds, {"client_id": "signer", "private_key": private_pem(rotated)})
            issued = len(server.issued_tokens("signer"))
            wait_for(lambda: len(server.issued_tokens("signer")) > issued, timeout=10)
            wait_for(lambda: project.token("signer") == server.issued_tokens("signer")[-1], timeout=5)
            assert server.is_active(project.token("signer"))
            assert "BEGIN" not in daemon.log
        finally:
            daemon.stop()
        assert os.stat(creds).st_mode & 0o077 == 0
        assert json.loads(creds.read_text())["client_id"] == "signer"
