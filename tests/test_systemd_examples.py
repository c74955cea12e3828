"""The shipped host example (config/systemd-vault.yaml) runs under the shipped unit.

The unit's own command lines (ExecStartPre=, ExecStart=) are started with the environment and the
directories systemd would give them (STATE_DIRECTORY, CONFIGURATION_DIRECTORY, CREDENTIALS_DIRECTORY
holding what the shipped LoadCredential= drop-in loads, /run/tokensmith from tmpfiles.d, the
unit's UMask=), each fixed path moved under a temporary root, against a real OpenBao (AppRole) and
the fake token endpoint. A statically checked part proves the example names only paths the
sandbox lets the service reach."""

from __future__ import annotations

import os
import shlex
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from daemon_harness import wait_for
from fixtures_stores import VaultKV
from tokensmith.devserver import OAuthServer

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "tokensmith.service"
DROP_IN = REPO / "systemd" / "vault-approle.conf"
EXAMPLE = REPO / "config" / "systemd-vault.yaml"
ENTRY_POINT = "/usr/local/bin/tokensmith"
CREDENTIALS = "/run/credentials/tokensmith.service"


def directives(path: Path) -> list[tuple[str, str]]:
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and line[0] not in "#;[" and "=" in line:
            key, _, value = line.partition("=")
            out.append((key.strip(), value.strip()))
    return out


def values(path: Path, key: str) -> list[str]:
    return [value for k, value in directives(path) if k == key]


def writable_by_unit() -> list[str]:
    dirs = [f"/var/lib/{name}" for name in values(UNIT, "StateDirectory")]
    dirs += [path.lstrip("-") for value in values(UNIT, "ReadWritePaths") for path in value.split()]
    return dirs


def inside(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def test_the_example_names_only_paths_the_sandbox_allows():
    config = yaml.safe_load(EXAMPLE.read_text())
    writable = writable_by_unit()
    assert inside(config["state_dir"], writable) and inside(config["runtime_dir"], writable)
    assert inside(config["audit_log"], writable)
    for client in config["clients"]:
        for sink in client["sinks"]:
            if sink["type"] == "file":
                assert inside(sink["path"], writable), sink["path"]
        # a signal hook cannot reach another service's process from this sandbox
        assert not [hook for hook in client.get("hooks", []) if hook["type"] == "signal"], client["name"]
    # a root-only secret file is not readable by the service user: it must come in by LoadCredential=
    secret_file = config["vault"]["auth"]["secret_id_file"]
    assert secret_file.startswith(CREDENTIALS + "/"), secret_file
    loaded = [value.split(":", 1)[0] for value in values(DROP_IN, "LoadCredential")]
    assert Path(secret_file).name in loaded
    assert "vault-approle.conf" in EXAMPLE.read_text()  # the example says it needs the drop-in


class UnitEnvironment:
    """The unit's fixed paths moved under `root`, and what systemd sets for the service."""

    def __init__(self, root: Path):
        self.root = root
        self.moves = {"/etc/tokensmith": root / "etc" / "tokensmith",
                      "/var/lib/tokensmith": root / "var" / "lib" / "tokensmith",
                      "/run/tokensmith": root / "run" / "tokensmith",
                      CREDENTIALS: root / "run" / "credentials"}
        modes = {"/etc/tokensmith": 0o755, "/var/lib/tokensmith": 0o700, "/run/tokensmith": 0o750, CREDENTIALS: 0o500}
        for fixed, path in self.moves.items():
            path.mkdir(parents=True)
            os.chmod(path, modes[fixed])
        env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
        for value in values(UNIT, "Environment"):
            for item in shlex.split(value):
                key, _, val = item.partition("=")
                env[key] = val
        env.update(STATE_DIRECTORY=str(self.moves["/var/lib/tokensmith"]),
                   CONFIGURATION_DIRECTORY=str(self.moves["/etc/tokensmith"]),
                   CREDENTIALS_DIRECTORY=str(self.moves[CREDENTIALS]))
        if values(UNIT, "RuntimeDirectory"):
            env["RUNTIME_DIRECTORY"] = str(self.moves["/run/tokensmith"])
        self.env = env
        self.umask = int(values(UNIT, "UMask")[0], 8)

    def move(self, text: str) -> str:
        for fixed, path in sorted(self.moves.items(), key=lambda item: -len(item[0])):
            text = text.replace(fixed, str(path))
        return text

    def command(self, key: str) -> list[str]:
        (line,) = values(UNIT, key)
        argv = shlex.split(self.move(line.lstrip("-")))
        assert argv[0] == ENTRY_POINT
        return [sys.executable, "-m", "tokensmith", *argv[1:]]

    def run(self, key: str, **kwargs):
        return subprocess.run(self.command(key), env=self.env, preexec_fn=lambda: os.umask(self.umask),
                              capture_output=True, text=True, timeout=60, **kwargs)

    def start(self, key: str, log: Path):
        handle = open(log, "w")
        return subprocess.Popen(self.command(key), env=self.env, preexec_fn=lambda: os.umask(self.umask),
                                stdout=handle, stderr=subprocess.STDOUT)


@pytest.fixture
def oauth():
    with OAuthServer(access_lifetime=300) as server:
        yield server


def test_systemd_vault_example_runs_under_the_unit(tmp_path, openbao, oauth):
    openbao.ensure_up()
    vault = VaultKV(openbao, prefix="tokensmith")  # the example's paths: secret/tokensmith/<client>
    unit = UnitEnvironment(tmp_path)
    approle = vault.approle()
    # the secret_id arrives as systemd's LoadCredential= would hand it over
    credential = unit.moves[CREDENTIALS] / "approle-secret-id"
    credential.write_text(approle["secret_id"] + "\n")
    os.chmod(credential, 0o400)

    config = yaml.safe_load(unit.move(EXAMPLE.read_text()))
    config["vault"].update(address=openbao.address)
    config["vault"].pop("ca_bundle")  # the dev server speaks plain http on loopback
    config["vault"]["auth"].update(role_id=approle["role_id"], mount_point=approle["mount_point"])
    config["health"] = {"listen": "127.0.0.1:0"}
    inventory, partner = config["clients"]
    oauth.add_client("inventory-id", "inventory-secret", dialect="post", users={"svc-inventory": "pw-1"})
    oauth.add_client("partner-id", "partner-secret", dialect="basic")
    inventory["token_url"] = partner["token_url"] = oauth.token_url
    vault.put("inventory-api", {"client_id": "inventory-id", "client_secret": "inventory-secret",
                                "username": "svc-inventory", "password": "pw-1"})
    vault.put("partner-feed", {"id": "partner-id", "secret": "partner-secret"})
    config_path = unit.moves["/etc/tokensmith"] / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))

    check = unit.run("ExecStartPre")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "config ok: 2 client(s)" in check.stdout

    log = tmp_path / "journal"
    process = unit.start("ExecStart", log)
    try:
        tokens = {name: Path(sink["path"]) for name, sink in
                  (("inventory-api", inventory["sinks"][0]), ("partner-feed", partner["sinks"][0]))}
        wait_for(lambda: all(path.exists() for path in tokens.values()) or process.poll() is not None, timeout=20)
        assert process.poll() is None, log.read_text()
        assert stat.S_IMODE(tokens["inventory-api"].stat().st_mode) == 0o640  # for the tokensmith group
        assert tokens["partner-feed"].read_text().startswith("PARTNER_TOKEN=")
        wait_for(lambda: "ready: 2 clients have fresh tokens" in log.read_text())
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0, log.read_text()
    # a stop leaves the tokens in place (the unit no longer has a RuntimeDirectory= to remove)
    assert all(path.exists() for path in tokens.values())
    assert not (unit.moves["/run/tokensmith"] / "control.sock").exists()


CENTRAL = REPO / "config" / "central-aws.yaml"


def test_central_aws_example_names_only_paths_the_sandbox_allows():
    config = yaml.safe_load(CENTRAL.read_text())
    writable = writable_by_unit()
    assert inside(config["state_dir"], writable) and inside(config["runtime_dir"], writable)
    for client in config["clients"]:
        assert all(sink["type"] != "file" or inside(sink["path"], writable) for sink in client["sinks"])
        assert not [hook for hook in client.get("hooks", []) if hook["type"] == "signal"]


def test_central_aws_example_runs_once_under_the_unit(tmp_path, moto_server, oauth):
    import boto3

    from fixtures_stores import AWS_ENV

    unit = UnitEnvironment(tmp_path)
    # AWS credentials reach the service the way a drop-in's Environment= (or instance metadata) would
    unit.env.update(AWS_ENV, AWS_CONFIG_FILE=str(tmp_path / "aws-config"),
                    AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "aws-credentials"))
    config = yaml.safe_load(unit.move(CENTRAL.read_text()))
    config["aws"] = {"region": AWS_ENV["AWS_REGION"], "endpoint_url": moto_server}
    config["health"] = {"listen": "127.0.0.1:0"}  # only loopback in tests
    prefix = tmp_path.name  # moto's state is shared by the session: names of our own
    secrets = boto3.session.Session().client("secretsmanager", region_name=AWS_ENV["AWS_REGION"],
                                             endpoint_url=moto_server, aws_access_key_id="testing",
                                             aws_secret_access_key="testing")
    dialects = {"payments-gateway": "json", "shipping-partner": "basic"}
    for client in config["clients"]:
        name = client["name"]
        oauth.add_client(f"{name}-id", f"{name}-secret", dialect=dialects[name])
        client["token_url"] = oauth.token_url
        for field in ("revocation_url", "introspection_url"):
            if client.get(field):
                client[field] = getattr(oauth, field)
        client["source"]["secret_id"] = f"{prefix}/{client['source']['secret_id']}"
        secrets.create_secret(Name=client["source"]["secret_id"],
                              SecretString=f'{{"client_id": "{name}-id", "client_secret": "{name}-secret"}}')
        for sink in client["sinks"]:
            sink["secret_id"] = f"{prefix}/{sink['secret_id']}"
            sink.pop("kms_key_id", None)  # moto has no such key
    (unit.moves["/etc/tokensmith"] / "config.yaml").write_text(yaml.safe_dump(config))

    check = unit.run("ExecStartPre")
    assert check.returncode == 0, check.stdout + check.stderr
    argv = unit.command("ExecStart")
    assert argv[3] == "run"
    once = subprocess.run(argv[:3] + ["once"] + argv[4:], env=unit.env, preexec_fn=lambda: os.umask(unit.umask),
                          capture_output=True, text=True, timeout=60)
    assert once.returncode == 0, once.stdout + once.stderr
    for client in config["clients"]:
        stored = secrets.get_secret_value(SecretId=client["sinks"][0]["secret_id"])["SecretString"]
        assert '"access_token"' in stored
