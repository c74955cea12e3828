"""`tokensmith demo`: the whole path on one machine, no accounts needed. A built-in token endpoint
(tokensmith.devserver) speaks three of the seed dialects; credentials come from 0600 files; tokens
go to file sinks; a live view shows them being refreshed with short lifetimes."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

CLIENTS = [
    # name, dialect, grant, extra credentials
    ("inventory-password", "post", "password", {"username": "demo-user", "password": "demo-password"}),
    ("reports-basic", "basic", "client_credentials", {}),
    ("billing-json", "json", "client_credentials", {}),
]


def write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def prepare(directory: Path, token_url: str, server) -> Path:
    # every demo starts its own token endpoint: tokens and state from an earlier run mean nothing to it
    for sub in ("credentials", "tokens", "state", "run"):
        shutil.rmtree(directory / sub, ignore_errors=True)
        (directory / sub).mkdir(mode=0o700, parents=True)
    clients = []
    for name, dialect, grant, extra in CLIENTS:
        secret = os.urandom(12).hex()
        server.add_client(name, secret, dialect=dialect,
                          users={extra["username"]: extra["password"]} if extra else None)
        write_private(directory / "credentials" / f"{name}.json",
                      json.dumps({"client_id": name, "client_secret": secret, **extra}, indent=2) + "\n")
        clients.append({
            "name": name, "token_url": token_url, "grant": grant, "auth_style": dialect,
            "source": {"type": "file", "path": str((directory / "credentials" / f"{name}.json").resolve())},
            "refresh": {"min_lead": 2, "backoff_max": 5},
            "sinks": [{"type": "file", "path": str((directory / "tokens" / f"{name}.{fmt}").resolve()),
                       "format": fmt} for fmt in ("json",)],
        })
    config = {"state_dir": str((directory / "state").resolve()), "runtime_dir": str((directory / "run").resolve()),
              "health": {"listen": "127.0.0.1:0"}, "log": {"level": "WARNING"}, "clients": clients}
    path = directory / "config.yaml"
    import yaml

    path.write_text("# written by `tokensmith demo`; try: tokensmith status --config " + str(path) + "\n"
                    + yaml.safe_dump(config, sort_keys=False))
    return path


def run_demo(directory: str, *, lifetime: int = 12, duration: float | None = None) -> int:
    from tokensmith import logs
    from tokensmith.config import load_settings
    from tokensmith.daemon import Daemon
    from tokensmith.devserver import OAuthServer

    root = Path(directory)
    server = OAuthServer(access_lifetime=lifetime).start()
    config = prepare(root, server.token_url, server)
    settings = load_settings(config)
    logs.setup("WARNING", "plain")
    daemon = Daemon(settings, config)
    daemon.build()
    daemon.start()
    tty = sys.stdout.isatty()
    print(f"tokensmith demo: token endpoint {server.token_url}, files under {root.resolve()}")
    print(f"  config {config}; in another shell: tokensmith status --config {config}")
    print("  Ctrl-C stops.\n")
    started = time.time()
    try:
        while duration is None or time.time() - started < duration:
            rows = [f"{'client':20} {'token':12} {'left':>6} {'grant':18} {'refreshes':>9}  sink"]
            for status in daemon.statuses():
                left = (status["expires_at"] - time.time()) if status.get("expires_at") else 0
                issued = len(server.issued_tokens(status["client"]))
                rows.append(f"{status['client']:20} {status['token'] or '-':12} {left:5.0f}s "
                            f"{status['last_grant'] or '-':18} {issued:9d}  "
                            f"{'ok' if not status['sinks_pending'] else 'pending'}"
                            + (f"  error: {status['last_error']}" if status.get("last_error") else ""))
            stamp = time.strftime("%H:%M:%S")
            if tty:
                sys.stdout.write("\x1b[2J\x1b[H" + f"tokensmith demo  {stamp}  (Ctrl-C stops)\n\n" + "\n".join(rows) + "\n")
            else:
                sys.stdout.write(f"-- {stamp}\n" + "\n".join(rows) + "\n")
            sys.stdout.flush()
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        daemon.stop()
        server.stop()
    print(f"\ndemo stopped; tokens were refreshed {server.stats['issued']} times. Files are in {root.resolve()}")
    return 0
