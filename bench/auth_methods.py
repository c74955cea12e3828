"""CPU per token request for each client authentication method, side by side.

    python bench/auth_methods.py [N]      (from the repository root, in the venv; default N=300)

The dev token server runs in a child process (its assertion and certificate checks are not counted);
this process makes N client_credentials requests per method through one TokenClient each and reports
its own CPU time per request (time.process_time) and the ratio to `post`. Keys and TLS contexts are cached
by the material's fingerprint, so after the first request a method pays only for signing (JWT methods)
or the TLS handshake of a new connection (none: connections are kept alive).
"""

from __future__ import annotations

import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "provider"))

SECRET = "bench-client-secret-long-enough-for-hs256-signing"


def serve(conn, material):
    from pki import CA  # noqa: F401  (the material was made by the parent)
    import ssl

    from tokensmith.devserver import OAuthServer

    directory = Path(material["dir"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "server.pem")
    context.load_verify_locations(directory / "ca.pem")
    context.verify_mode = ssl.CERT_OPTIONAL
    plain = OAuthServer(access_lifetime=3600).start()
    tls = OAuthServer(access_lifetime=3600, tls_context=context).start()
    for server in (plain, tls):
        server.add_client("post", SECRET)
        server.add_client("basic", SECRET, dialect="basic")
        server.add_client("csjwt", SECRET, auth="client_secret_jwt")
        for kind in ("rsa", "ec", "ed"):
            server.add_client(f"pk-{kind}", "", auth="private_key_jwt", key=material[f"pub-{kind}"])
    tls.add_client("mtls", "", auth="tls_client_auth", key=material["digest"])
    conn.send((plain.token_url, tls.token_url))
    conn.recv()


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    from pki import CA, new_key, private_pem, public_pem

    from tokensmith.config import ClientConfig
    from tokensmith.sources import Credentials
    from tokensmith.tokenclient import TokenClient

    directory = Path(tempfile.mkdtemp(prefix="tokensmith-bench-auth-"))
    ca = CA()
    ca.server_context(directory)
    cert, key, digest = ca.issue("bench-mtls")
    keys = {kind: new_key(kind) for kind in ("rsa", "ec", "ed")}
    material = {"dir": str(directory), "digest": digest, **{f"pub-{k}": public_pem(v) for k, v in keys.items()}}
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.Process(target=serve, args=(child, material), daemon=True)
    process.start()
    plain_url, tls_url = parent.recv()
    cases = [("post", plain_url, "post", Credentials(client_id="post", client_secret=SECRET)),
             ("basic", plain_url, "basic", Credentials(client_id="basic", client_secret=SECRET)),
             ("client_secret_jwt", plain_url, "client_secret_jwt", Credentials(client_id="csjwt", client_secret=SECRET)),
             ("private_key_jwt RS256", plain_url, "private_key_jwt",
              Credentials(client_id="pk-rsa", private_key=private_pem(keys["rsa"]))),
             ("private_key_jwt ES256", plain_url, "private_key_jwt",
              Credentials(client_id="pk-ec", private_key=private_pem(keys["ec"]))),
             ("private_key_jwt EdDSA", plain_url, "private_key_jwt",
              Credentials(client_id="pk-ed", private_key=private_pem(keys["ed"]))),
             ("post over TLS", tls_url, "post", Credentials(client_id="post", client_secret=SECRET)),
             ("tls_client_auth", tls_url, "tls_client_auth",
              Credentials(client_id="mtls", certificate=cert, private_key=key))]
    results = []
    for label, url, method, creds in cases:
        config = ClientConfig(name="bench", token_url=url, auth_style=method, ca_bundle=directory / "ca.pem",
                              source={"type": "env"}, sinks=[{"type": "file", "path": "/run/t/bench"}])
        client = TokenClient(config)
        client.obtain("client_credentials", creds)  # warm: imports, key parse, connection
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(n):
            client.obtain("client_credentials", creds)
        results.append((label, (time.process_time() - cpu) / n * 1e6, (time.perf_counter() - wall) / n * 1e3))
    parent.send("stop")
    process.join(5)
    base = results[0][1]
    print(f"{'method':24} {'CPU us/request':>15} {'vs post':>8} {'wall ms':>8}   (N={n})")
    for label, cpu_us, wall_ms in results:
        print(f"{label:24} {cpu_us:15.0f} {cpu_us / base:8.2f} {wall_ms:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
