"""A name lookup is part of the exchange's deadline. getaddrinfo has no timeout of its own: with a
nameserver that never answers, glibc waits `timeout x attempts` (here 30 s) before connecting even
starts. Each case runs in a private mount namespace whose /etc/resolv.conf names a silent
nameserver on loopback (a UDP socket of this test that reads queries and never answers)."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from fixtures_stores import AWS_ENV
from tokensmith.devserver import OAuthServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                reason="a private mount namespace needs root and unshare (CI has both)")

TIMEOUT = 1.0
MARGIN = 0.6
SLOW = "hostile or slow provider"

PROBE = textwrap.dedent("""
    import json, sys, time
    from tokensmith.config import ClientConfig, Settings
    from tokensmith.backends import Backends
    from tokensmith.errors import TokensmithError
    from tokensmith.sources import Credentials, build_source
    from tokensmith.tokenclient import TokenClient

    case, url, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
    sink = [{"type": "file", "path": "/run/tokensmith/probe.token"}]
    if case == "vault":
        settings = Settings(vault={"address": url, "timeout": timeout, "auth": {"method": "token", "token": "t"}},
                            clients=[{"name": "slow-api", "token_url": "http://127.0.0.1:1/t", "sinks": sink,
                                      "source": {"type": "vault", "mount": "secret", "path": "p"}}])
        backends = Backends(settings)
        backends.vault()  # the client exists already: the time measured is the read's
        call = build_source(settings.clients[0], backends).read
    elif case == "aws":
        settings = Settings(aws={"region": "us-east-1", "endpoint_url": url, "timeout": timeout},
                            clients=[{"name": "slow-api", "token_url": "http://127.0.0.1:1/t", "sinks": sink,
                                      "source": {"type": "aws", "secret_id": sys.argv[4]}}])
        backends = Backends(settings)
        backends.aws("secretsmanager")
        call = build_source(settings.clients[0], backends).read
    else:
        fields = {"proxy": sys.argv[4]} if case == "proxy" else {}
        config = ClientConfig(name="slow-api", token_url=url, source={"type": "env"}, timeout=timeout, sinks=sink,
                              **fields)
        creds = Credentials(client_id="cid", client_secret="s3cr3t-Client-7Hq2")
        client = TokenClient(config)
        call = lambda: client.obtain("client_credentials", creds)
    started = time.monotonic()
    try:
        result = {"ok": bool(call())}
    except TokensmithError as exc:
        result = {"ok": False, "type": type(exc).__name__, "message": str(exc), "retryable": exc.retryable}
    result["elapsed"] = time.monotonic() - started
    print(json.dumps(result))
""")


@pytest.fixture
def silent_nameserver(tmp_path):
    """A nameserver that reads every query and answers none, and a resolv.conf naming only it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(20):  # port 53 is fixed by resolv.conf: a loopback address of its own per test (xdist)
        address = f"127.{random.randrange(64, 250)}.{random.randrange(256)}.{random.randrange(1, 255)}"
        try:
            sock.bind((address, 53))
            break
        except OSError:
            continue
    else:
        sock.close()
        pytest.fail("cannot bind a silent nameserver on port 53 of a loopback address")
    queries = []
    stop = threading.Event()

    def swallow():
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                queries.append(sock.recvfrom(4096)[0])
            except (TimeoutError, OSError):
                continue

    thread = threading.Thread(target=swallow, daemon=True)
    thread.start()
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {address}\noptions timeout:30 attempts:1\n")
    try:
        yield resolv, queries
    finally:
        stop.set()
        thread.join()
        sock.close()


def probe(resolv, *args) -> dict:
    """One exchange in a process whose /etc/resolv.conf is the given one (mount namespace of its own)."""
    script = 'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"'
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env.update(AWS_ENV, AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    done = subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", str(resolv), sys.executable, "-c", PROBE,
                           *args], capture_output=True, text=True, timeout=25, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_lookup_timeout(result: dict, queries: list) -> None:
    assert result["ok"] is False and result["retryable"] is True, result
    assert "timed out" in result["message"] and "slow-api" in result["message"], result
    assert TIMEOUT - 0.05 <= result["elapsed"] < TIMEOUT + MARGIN, result
    assert queries, "the lookup never reached the silent nameserver: nothing was tested"


@pytest.mark.security(threat=SLOW, claim="A token endpoint whose name never resolves (a nameserver that does not "
                      "answer) fails as a retryable timeout at the exchange's deadline, not after the resolver's own "
                      "timeouts.")
def test_token_endpoint_lookup_ends_at_the_deadline(silent_nameserver):
    resolv, queries = silent_nameserver
    result = probe(resolv, "token", "https://token.tokensmith-dns.test:8443/token", str(TIMEOUT))
    assert result["type"] == "TokenEndpointError"
    assert_lookup_timeout(result, queries)


@pytest.mark.security(threat=SLOW, claim="A proxy whose name never resolves fails the token request as a "
                      "retryable timeout at its deadline.")
def test_proxy_lookup_ends_at_the_deadline(silent_nameserver):
    resolv, queries = silent_nameserver
    result = probe(resolv, "proxy", "http://127.0.0.1:9/token", str(TIMEOUT), "http://proxy.tokensmith-dns.test:3128")
    assert result["type"] == "TokenEndpointError"
    assert_lookup_timeout(result, queries)


@pytest.mark.security(threat="hostile secret store", claim="A Vault address whose name never resolves fails the "
                      "source read as a retryable timeout at its deadline.")
def test_vault_lookup_ends_at_the_deadline(silent_nameserver):
    resolv, queries = silent_nameserver
    result = probe(resolv, "vault", "https://vault.tokensmith-dns.test:8200", str(TIMEOUT))
    assert result["type"] == "SourceError"
    assert_lookup_timeout(result, queries)


def test_names_from_the_hosts_file_still_resolve_and_connect(silent_nameserver):
    """The lookup thread hands back its result: `localhost` (from /etc/hosts) reaches a real token server."""
    resolv, _ = silent_nameserver
    with OAuthServer() as server:
        server.add_client("cid", "s3cr3t-Client-7Hq2")
        url = server.token_url.replace("127.0.0.1", "localhost")
        result = probe(resolv, "token", url, "5")
    assert result["ok"] is True, result


@pytest.mark.security(threat="hostile secret store", claim="An AWS endpoint whose name never resolves fails the "
                      "source read as a retryable timeout at its deadline (botocore's lookup, bounded by "
                      "tokensmith's connection class).")
def test_aws_lookup_ends_at_the_deadline(silent_nameserver):
    resolv, queries = silent_nameserver
    result = probe(resolv, "aws", "https://secretsmanager.tokensmith-dns.test:4566", str(TIMEOUT), "any")
    assert result["type"] == "SourceError"
    assert_lookup_timeout(result, queries)


def test_aws_names_from_the_hosts_file_still_resolve_and_connect(silent_nameserver, moto_server):
    """Through the bounded lookup, botocore still reaches moto by name (`localhost`)."""
    import boto3

    resolv, _ = silent_nameserver
    boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=moto_server, aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_secret(
        Name="dns-probe", SecretString='{"client_id": "cid", "client_secret": "s3cr3t-Client-7Hq2"}')
    result = probe(resolv, "aws", moto_server.replace("127.0.0.1", "localhost"), "5", "dns-probe")
    assert result["ok"] is True, result
