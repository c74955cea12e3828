"""A large config keeps only what its validated settings need: the YAML parser's temporaries must
not pin resident memory per client (they did: about 9-11 KB a client, against the daemon's 12 KB budget)."""

from __future__ import annotations

import gc
import json

from tokensmith.config import load_settings
from tokensmith.daemon import release_freed_memory

CLIENTS = 1500


def rss_kib() -> int:
    gc.collect()
    release_freed_memory()
    with open("/proc/self/status") as handle:
        return int(handle.read().split("VmRSS:")[1].split()[0])


def write_config(path, n):
    lines = [f"state_dir: {path.parent / 'state'}", f"runtime_dir: {path.parent / 'run'}", "clients:"]
    for i in range(n):
        name = f"client-{i:05d}"
        lines += [f"  - name: {name}", f"    token_url: https://idp.example.com/oauth2/{name}/token",
                  "    auth_style: basic", f"    scope: read:{name} write:{name}",
                  f"    source: {{type: file, path: /etc/tokensmith/creds/{name}.json}}",
                  "    sinks:", f"      - {{type: file, path: /run/tokens/{name}.json, format: json}}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_large_yaml_config_costs_little_resident_memory_per_client(tmp_path):
    small = write_config(tmp_path / "small.yaml", 400)  # large enough to take the same path
    large = write_config(tmp_path / "large.yaml", CLIENTS)
    load_settings(small)  # every lazily built validator and cache exists before the baseline
    before = rss_kib()
    settings = load_settings(large)
    per_client = (rss_kib() - before) * 1024 / CLIENTS
    assert len(settings.clients) == CLIENTS
    assert json.dumps(settings.clients[-1].scope) == '"read:client-01499 write:client-01499"'
    assert per_client < 8000, f"{per_client:.0f} bytes of RSS per client after loading the config"
