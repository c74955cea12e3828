"""After rotate --compromised, the leaked token is taken out of the sinks' version history where the store
allows it (OpenBao KV v2: destroy the versions; Secrets Manager via moto: move AWSPREVIOUS off it), and
what was not removed is said."""

from __future__ import annotations

from fixtures_stores import store_settings
from tokensmith.backends import Backends
from tokensmith.compromise import purge_history
from tokensmith.sinks import build_sinks
from tokensmith.tokens import Token


def token(value: str, expires_at: float) -> Token:
    return Token(access_token=value, token_type="Bearer", obtained_at=expires_at - 3600, expires_at=expires_at)


def vault_sink(tmp_path, vault_kv, path, auth=None):
    settings = store_settings(tmp_path, vault=vault_kv.vault_config(auth), source={"type": "env", "prefix": "X_"},
                              sinks=[{"type": "vault", "path": path}])
    return build_sinks(settings.clients[0], Backends(settings))[0]


def test_vault_versions_holding_the_leaked_token_are_destroyed(tmp_path, vault_kv):
    path = vault_kv.path("tokens/leak")
    sink = vault_sink(tmp_path, vault_kv, path)
    sink.write(token("tok-old", 2_000_000_000))
    sink.write(token("tok-leaked", 2_000_000_100))
    sink.write(token("tok-new", 2_000_000_200))
    assert sink.purge("tok-leaked") == "destroyed version(s) 2"
    root = vault_kv.root
    versions = root.secrets.kv.v2.read_secret_metadata(path)["data"]["versions"]
    assert versions["2"]["destroyed"] and not versions["1"]["destroyed"] and not versions["3"]["destroyed"]
    assert root.secrets.kv.v2.read_secret_version(path, version=3, raise_on_deleted_version=True)["data"]["data"]["access_token"] == "tok-new"
    assert sink.purge("tok-leaked") == "no version holds the old token"


def test_vault_without_destroy_permission_is_reported_not_raised(tmp_path, vault_kv):
    path = vault_kv.path("tokens/no-destroy")
    vault_sink(tmp_path, vault_kv, path).write(token("tok-leaked", 2_000_000_000))
    limited = vault_sink(tmp_path / "b", vault_kv, path, auth={"method": "token", "token": vault_kv.token()})

    class Keeper:
        sinks = [limited]

    purged = purge_history(Keeper, "tok-leaked")
    assert purged[limited.name].startswith("not removed:") and "tok-leaked" not in purged[limited.name]


def test_aws_staging_labels_move_off_the_leaked_token(tmp_path, aws_env):
    from tokensmith.config import Settings

    settings = Settings(aws={}, state_dir=tmp_path, runtime_dir=tmp_path, clients=[{
        "name": "c", "token_url": "http://127.0.0.1:1/t", "source": {"type": "env", "prefix": "X_"},
        "sinks": [{"type": "aws", "secret_id": "tokens/leak"}, {"type": "file", "path": str(tmp_path / "c.token")}]}])
    sinks = build_sinks(settings.clients[0], Backends(settings))
    aws = sinks[0]
    aws.write(token("tok-leaked", 2_000_000_000))
    aws.write(token("tok-new", 2_000_000_100))
    secrets = aws_env.secretsmanager()

    def stages():
        return {v["VersionId"]: v.get("VersionStages", []) for v in
                secrets.list_secret_version_ids(SecretId="tokens/leak", IncludeDeprecated=True)["Versions"]}

    assert sorted(map(tuple, stages().values())) == [("AWSCURRENT",), ("AWSPREVIOUS",)]

    class Keeper:
        pass

    Keeper.sinks = sinks
    purged = purge_history(Keeper, "tok-leaked")
    assert purged[aws.name].startswith("moved AWSPREVIOUS off ")
    assert purged[sinks[1].name] == "nothing to remove: no version history"
    assert sorted(map(tuple, stages().values())) == [(), ("AWSCURRENT",)]
    assert "tok-leaked" not in str(purged)


def test_the_audit_line_says_what_was_removed(tmp_path):
    import json

    from daemon_harness import Project
    from tokensmith.devserver import OAuthServer

    with OAuthServer(access_lifetime=300) as server:
        project = Project(tmp_path, server, audit_log=str(tmp_path / "audit" / "audit.log"))
        project.add_client("purge", grant="password", users={"alice": "pw-alice"})
        daemon = project.start()
        try:
            daemon.wait_ready()
            result = project.cli("rotate", "purge", "--compromised", "--json")
            assert result.returncode == 0, result.stdout + result.stderr
            [line] = [json.loads(text) for text in (tmp_path / "audit" / "audit.log").read_text().splitlines()]
            assert set(line["purged"].values()) == {"nothing to remove: no version history"}
        finally:
            daemon.stop()
