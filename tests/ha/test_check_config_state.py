"""check-config validates the `state:` section and warns about file sinks with a shared backend."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tokensmith.config import load_settings
from tokensmith.errors import ConfigError

CLIENT = {"name": "billing", "token_url": "https://idp.example/token", "source": {"type": "env"},
          "sinks": [{"type": "file", "path": "/run/tokens/billing"}]}
VAULT = {"address": "https://vault.example:8200", "auth": {"method": "token", "token": "s.not-a-real-token"}}


def check(tmp_path, config: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "tokensmith", "check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_the_default_is_the_file_backend(tmp_path):
    settings = load_settings(None, {"TOKENSMITH_STATE_DIR": str(tmp_path),
                                    "TOKENSMITH_CLIENTS": yaml.safe_dump([CLIENT])})
    assert settings.state.type == "file"


def test_vault_state_needs_the_vault_section(tmp_path):
    result = check(tmp_path, {"state": {"type": "vault"}, "clients": [CLIENT]})
    assert result.returncode == 2
    assert "state type vault needs the top-level vault section" in result.stdout


def test_dynamodb_state_needs_a_table(tmp_path):
    result = check(tmp_path, {"state": {"type": "dynamodb"}, "clients": [CLIENT]})
    assert result.returncode == 2
    assert "error: state.table: Field required" in result.stdout


def test_unknown_state_type_and_fields_are_refused():
    with pytest.raises(ConfigError, match="state: Input tag 'etcd'"):
        load_settings(None, {"TOKENSMITH_STATE": "{type: etcd}", "TOKENSMITH_CLIENTS": yaml.safe_dump([CLIENT])})
    with pytest.raises(ConfigError, match="state.tabel: Extra inputs"):
        load_settings(None, {"TOKENSMITH_STATE": "{type: dynamodb, table: t1, tabel: x}",
                             "TOKENSMITH_CLIENTS": yaml.safe_dump([CLIENT])})


def test_a_file_sink_with_a_shared_backend_gets_a_warning(tmp_path):
    result = check(tmp_path, {"state": {"type": "vault", "prefix": "tokensmith/prod"}, "vault": VAULT,
                              "clients": [CLIENT]})
    assert result.returncode == 0, result.stdout
    assert "warning: client billing: file sink /run/tokens/billing with state type vault" in result.stdout
    plain = check(tmp_path, {"clients": [CLIENT]})
    assert plain.returncode == 0 and "warning" not in plain.stdout
    dynamo = check(tmp_path, {"state": {"type": "dynamodb", "table": "tokensmith-state"}, "clients": [CLIENT]})
    assert dynamo.returncode == 0 and "state type dynamodb" in dynamo.stdout
