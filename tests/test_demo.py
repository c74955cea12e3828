"""`tokensmith demo`: the self-contained path a new user sees first."""

import json
import os
import stat
import subprocess
import sys


def test_demo_refreshes_tokens_and_shows_them_live(tmp_path):
    directory = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "tokensmith", "demo", "--dir", str(directory), "--lifetime", "2",
                             "--duration", "5"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    frames = result.stdout.split("-- ")[1:]
    assert len(frames) >= 4, "the live view should redraw every second"
    for name in ("inventory-password", "reports-basic", "billing-json"):
        assert name in frames[-1]
        document = json.loads((directory / "tokens" / f"{name}.json").read_text())
        assert document["token_type"] == "Bearer" and document["access_token"]
        assert stat.S_IMODE(os.stat(directory / "credentials" / f"{name}.json").st_mode) == 0o600
        assert document["access_token"] not in result.stdout + result.stderr
    refreshed = int(result.stdout.rsplit("refreshed ", 1)[1].split()[0])
    assert refreshed >= 6, "three clients with 2 s lifetimes over 5 s must refresh more than once each"
    again = subprocess.run([sys.executable, "-m", "tokensmith", "demo", "--dir", str(directory), "--lifetime", "2",
                            "--duration", "2"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0
    assert "rejected" not in again.stderr and "error" not in again.stdout, \
        "a second demo must not present the first demo's tokens to its new token endpoint"
    check = subprocess.run([sys.executable, "-m", "tokensmith", "check-config", "--config",
                            str(directory / "config.yaml")], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0
