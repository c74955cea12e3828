"""scheduler.max_workers defaults to 32 on a shared state backend (each refresh waits on the
store's round trips), stays 8 on the file backend, and a value the config sets is kept; the HTTP
connection pools follow it."""

from __future__ import annotations

import pytest

from tokensmith.config import SHARED_STATE_WORKERS, load_settings

def settings(tmp_path, text: str, environ: dict | None = None):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return load_settings(path, environ=environ or {})


def config(state: str, scheduler: str = "") -> str:
    return f"""
state_dir: /tmp/x
state: {state}
vault: {{address: "http://127.0.0.1:8200", auth: {{method: token, token: t}}}}
aws: {{region: us-east-1}}
{scheduler}
clients:
  - name: billing
    token_url: https://idp.example/token
    source: {{type: env}}
    sinks: [{{type: vault, mount: secret, path: billing}}]
"""


@pytest.mark.parametrize("state", ["{type: vault, mount: secret, prefix: tokensmith/prod}",
                                   "{type: dynamodb, table: tokensmith-state}"])
def test_a_shared_state_backend_gets_more_workers_by_default(tmp_path, state):
    assert settings(tmp_path, config(state)).scheduler.max_workers == SHARED_STATE_WORKERS == 32
    kept = settings(tmp_path, config(state, "scheduler: {ready_timeout: 5}")).scheduler
    assert (kept.max_workers, kept.ready_timeout) == (32, 5)


@pytest.mark.parametrize("state", ["{type: vault, mount: secret, prefix: tokensmith/prod}",
                                   "{type: dynamodb, table: tokensmith-state}"])
def test_a_max_workers_the_config_sets_is_kept(tmp_path, state):
    assert settings(tmp_path, config(state, "scheduler: {max_workers: 8}")).scheduler.max_workers == 8
    from_env = settings(tmp_path, config(state), {"TOKENSMITH_SCHEDULER__MAX_WORKERS": "4"})
    assert from_env.scheduler.max_workers == 4


def test_the_file_backend_keeps_eight(tmp_path):
    assert settings(tmp_path, config("{type: file}")).scheduler.max_workers == 8


def test_the_connection_pools_follow_the_workers(tmp_path, monkeypatch):
    from fixtures_stores import fake_aws_env
    from tokensmith.backends import Backends
    from tokensmith.state import build_state_backend

    fake_aws_env(monkeypatch, tmp_path)
    shared = settings(tmp_path, config("{type: dynamodb, table: tokensmith-state}"))
    backends = Backends(shared)
    assert backends.aws("dynamodb").meta.config.max_pool_connections == 32
    vault = settings(tmp_path, config("{type: vault, mount: secret, prefix: tokensmith/prod}"))
    store = build_state_backend(vault, Backends(vault))
    assert store.workers == 32
    assert store.vault._pool.pool_size == 32  # one idle keep-alive connection per worker
