"""The validated-config cache (configcache.py) and its pydantic-free views (configview.py): the views
give the daemon exactly what the models give, a changed file, variable, user or version misses, a
corrupt or foreign entry is never trusted, and `tokensmith run` on a hit imports no pydantic."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
import yaml

import tokensmith
from tokensmith import config as config_module, configcache
from tokensmith.config import load_settings
from tokensmith.configcache import as_view
from tokensmith.configview import Secret, View
from tokensmith.errors import ConfigError

from daemon_harness import Project, wait_for

INLINE_SECRET = "s.InlineVaultSecretValue42"
ENV_SECRET = "hvs.SecretOnlyInTheEnvironment"
AUTH_STYLES = ("basic", "post", "json", "query", "client_secret_jwt", "private_key_jwt", "tls_client_auth",
               "jwt_bearer_file")
VAULT_AUTH = {
    "approle": {"method": "approle", "role_id": "rid", "secret_id": INLINE_SECRET, "mount_point": "ar"},
    "token": {"method": "token", "token": INLINE_SECRET},
    "kubernetes": {"method": "kubernetes", "role": "tokensmith", "jwt_file": "/var/run/sa/token"},
    "cert": {"method": "cert", "cert_file": "/etc/tls/c.pem", "key_file": "/etc/tls/k.pem",
             "secret_id_file": "/etc/sid"},
}
STATES = {"file": {"type": "file"}, "vault": {"type": "vault", "mount": "kv", "prefix": "ts/state"},
          "dynamodb": {"type": "dynamodb", "table": "tokensmith-state"}}
SOURCES = [{"type": "vault", "mount": "kv", "path": "oauth/a", "kv_version": 1, "keys": {"client_id": "id"}},
           {"type": "aws", "secret_id": "arn:aws:secretsmanager:eu-west-1:1:secret:x"},
           {"type": "file", "path": "/etc/tokensmith/creds.json", "keys": {"client_secret": "secret"}},
           {"type": "env", "prefix": "APP_"}]


def maximal(tmp: Path, state: str, auth: str) -> dict:
    clients = []
    for index, style in enumerate(AUTH_STYLES):
        client = {"name": f"c{index}-{style}", "token_url": "https://idp.example/token", "auth_style": style,
                  "source": SOURCES[index % len(SOURCES)],
                  "sinks": [{"type": "file", "path": f"/run/ts/{index}.token", "format": "env", "env_key": "TOK",
                             "mode": "0640", "group": "root"},
                            {"type": "vault", "mount": "kv", "path": f"tokens/{index}"},
                            {"type": "aws", "secret_id": f"tok-{index}", "kms_key_id": "alias/k"}],
                  "hooks": [{"type": "signal", "pid_file": "/run/app.pid", "signal": "usr1"},
                            {"type": "command", "argv": ["/bin/true", "x"], "timeout": 2.5, "pass_env": ["PATH"]}],
                  "scope": "read write", "audience": "api", "extra_params": {"resource": "urn:x", "b": "2"},
                  "revocation_url": "https://idp.example/revoke", "introspection_url": "https://idp.example/i",
                  "verify_url": "https://api.example/me", "proxy": "http://proxy.example:3128",
                  "ca_bundle": "/etc/ssl/ca.pem", "timeout": 7}
        if style == "client_secret_jwt":
            client.update(signing_alg="HS384", assertion_audience="https://idp.example")
        if style == "private_key_jwt":
            client.update(signing_alg="ES256", key_id="kid-1")
        if style == "jwt_bearer_file":
            client.update(assertion_file="/var/run/assertion.jwt")
        if index == 1:
            client.update(grant="password", refresh={"strategy": "reissue", "at_fraction": 0.5, "min_lead": 5,
                                                     "jitter": 0.2, "backoff_initial": 0.5, "backoff_max": 9})
        if index == 2:
            del client["token_url"]
            client.update(issuer="https://issuer.example", allow_insecure_http=True)
        clients.append(client)
    return {"state_dir": str(tmp / "state"), "runtime_dir": str(tmp / "run"), "audit_log": str(tmp / "audit.log"),
            "control_socket_group": "adm", "control_operators": ["root", 1234, "77"],
            "state": STATES[state], "log": {"level": "debug", "format": "json"},
            "health": {"enabled": False, "listen": "[::1]:9000"}, "scheduler": {"max_workers": 3, "ready_timeout": 4},
            "leader": {"lease_ttl": 20, "renew_every": 4, "identity": "node-a"},
            "vault": {"address": "https://vault.example:8200/", "namespace": "ns", "ca_bundle": "/etc/v.pem",
                      "timeout": 3, "auth": VAULT_AUTH[auth]},
            "aws": {"region": "eu-west-1", "endpoint_url": "http://127.0.0.1:5000", "timeout": 4},
            "clients": clients}


COMBOS = [("file", "approle"), ("vault", "token"), ("dynamodb", "kubernetes"), ("file", "cert")]


def write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def env(tmp_path):
    return {"CACHE_DIRECTORY": str(tmp_path / "cache"), "PATH": os.environ.get("PATH", "")}


def dump(obj):
    """Every field, recursively, with the type of each value; a model and its view dump alike."""
    if isinstance(obj, (pydantic.BaseModel, View)):
        names = type(obj).model_fields if isinstance(obj, pydantic.BaseModel) else type(obj)._fields
        return {"class": type(obj).__name__, "fields_set": sorted(obj.model_fields_set),
                **{name: dump(getattr(obj, name)) for name in names}}
    if isinstance(obj, (pydantic.SecretStr, Secret)):
        return ["secret", obj.get_secret_value(), repr(obj), str(obj)]
    if isinstance(obj, Path):
        return ["Path", str(obj)]
    if isinstance(obj, (list, tuple)):
        return ["seq", [dump(item) for item in obj]]
    if isinstance(obj, dict):
        return ["dict", {key: dump(value) for key, value in obj.items()}]
    return [type(obj).__name__, obj]


def behaviour(settings) -> dict:
    """What the models offer beyond fields, as the daemon uses it."""
    return {"audit_log_path": settings.audit_log_path, "control_socket": settings.control_socket,
            "leader_name": settings.leader.name, "client": dump(settings.client(settings.clients[3].name)),
            "reissue": [client.strategy_needs_primary_grant for client in settings.clients],
            "backends": [sorted(config_module.backend_types(client)) for client in settings.clients]}


def walk_classes(obj, found: dict) -> dict:
    if isinstance(obj, (pydantic.BaseModel, View)):
        found[type(obj).__name__] = type(obj)
        for name in (type(obj).model_fields if isinstance(obj, pydantic.BaseModel) else type(obj)._fields):
            walk_classes(getattr(obj, name), found)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            walk_classes(item, found)
    return found


# ---- the views give what the models give


@pytest.mark.parametrize("state,auth", COMBOS)
def test_a_cache_hit_gives_every_field_of_a_maximal_config_as_the_models_do(tmp_path, env, state, auth):
    path = write_config(tmp_path, maximal(tmp_path, state, auth))
    model = load_settings(path, environ=env)
    first, outcome = configcache.load(path, env)
    assert "miss" in outcome and "cached" in outcome
    view, outcome = configcache.load(path, env)
    assert "hit" in outcome
    assert isinstance(view, View) and isinstance(first, View)
    assert dump(view) == dump(model) == dump(first)
    assert behaviour(view) == behaviour(model)
    assert view == model and model == view and view == first
    # what runtime code does with a model beyond its fields: dict(), remaking it, model_copy
    assert [dict(part) for part in (view.vault, view.state)] == [dict(as_view(part)) for part in (model.vault,
                                                                                                 model.state)]
    remade = type(view.vault)(**{**dict(view.vault), "timeout": 1.5})
    expected = type(model.vault)(**{**dict(model.vault), "timeout": 1.5})
    assert dump(remade) == dump(expected) and remade.auth is view.vault.auth
    some = view.model_copy(update={"clients": [view.clients[2]]})
    assert dump(some) == dump(model.model_copy(update={"clients": [model.clients[2]]}))
    assert INLINE_SECRET not in repr(view) and INLINE_SECRET not in str(view)
    if auth in ("approle", "token"):
        assert "**********" in repr(view.vault.auth)


def test_every_model_class_and_its_public_behaviour_is_covered_by_the_views(tmp_path, env):
    models: dict = {}
    views: dict = {}
    for state, auth in COMBOS:
        path = write_config(tmp_path, maximal(tmp_path, state, auth))
        walk_classes(load_settings(path, environ=env), models)
        configcache.load(path, env)
        walk_classes(configcache.load(path, env)[0], views)
    declared = {name for name, cls in vars(config_module).items() if isinstance(cls, type)
                and issubclass(cls, pydantic.BaseModel) and cls not in (pydantic.BaseModel, config_module.Model)}
    assert set(models) == declared, "the maximal configs above must use every config model"
    assert set(views) == declared
    for name, cls in models.items():
        public = {attr for klass in cls.__mro__ if klass not in pydantic.BaseModel.__mro__
                  for attr, value in vars(klass).items() if not attr.startswith("_")
                  and (isinstance(value, property) or callable(value))}
        assert public <= set(dir(views[name])), f"{name}: the view lacks {public - set(dir(views[name]))}"


def test_a_view_is_read_only_and_a_changed_model_is_not_equal(tmp_path, env):
    path = write_config(tmp_path, maximal(tmp_path, "file", "approle"))
    configcache.load(path, env)
    view = configcache.load(path, env)[0]
    with pytest.raises(AttributeError):
        view.state_dir = Path("/elsewhere")
    with pytest.raises(AttributeError):
        view.clients[0].source.keys.client_id = "x"
    data = maximal(tmp_path, "file", "approle")
    data["clients"][5]["sinks"][0]["mode"] = "0600"
    (tmp_path / "x").mkdir()
    other = load_settings(write_config(tmp_path / "x", data), environ=env)
    assert view.clients[4] == other.clients[4] and view.clients[5] != other.clients[5]
    assert view.clients[5].sinks[1] == other.clients[5].sinks[1]


# ---- hits, misses, corruption


def entry(path, env) -> Path:
    return configcache.entry_path(path, env)


def simple(tmp_path: Path) -> dict:
    return {"state_dir": str(tmp_path / "state"), "runtime_dir": str(tmp_path / "run"),
            "clients": [{"name": "a", "token_url": "https://idp.example/token", "source": {"type": "env"},
                         "sinks": [{"type": "file", "path": str(tmp_path / "a.token")}]}]}


def test_the_entry_is_private_and_any_change_to_the_file_misses(tmp_path, env):
    path = write_config(tmp_path, simple(tmp_path))
    assert "miss: no cache entry" in configcache.load(path, env)[1]
    info = os.stat(entry(path, env))
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(entry(path, env).parent).st_mode) == 0o700
    assert "hit" in configcache.load(path, env)[1]
    path.write_text(path.read_text() + "\n")  # one byte more, the same config
    assert "miss" in configcache.load(path, env)[1]
    assert "hit" in configcache.load(path, env)[1]
    data = simple(tmp_path)
    data["clients"][0]["timeout"] = 3
    write_config(tmp_path, data)
    settings, outcome = configcache.load(path, env)
    assert "miss" in outcome and settings.clients[0].timeout == 3.0


@pytest.mark.parametrize("variable,value", [("TOKENSMITH_CLIENTS__A__TIMEOUT", "5"), ("STATE_DIRECTORY", "/srv/s"),
                                             ("RUNTIME_DIRECTORY", "/run/x"), ("TOKENSMITH_UNRELATED", "1")])
def test_a_variable_validation_reads_misses(tmp_path, env, variable, value):
    data = simple(tmp_path)
    del data["state_dir"], data["runtime_dir"]
    path = write_config(tmp_path, data)
    configcache.load(path, env)
    assert "hit" in configcache.load(path, env)[1]
    changed = {**env, variable: value}
    settings, outcome = configcache.load(path, changed)
    assert "miss" in outcome
    assert settings == load_settings(path, environ=changed)
    assert "hit" in configcache.load(path, changed)[1]
    assert "miss" in configcache.load(path, env)[1]  # one entry per config path: the old one was replaced


def test_a_variable_validation_does_not_read_still_hits(tmp_path, env):
    path = write_config(tmp_path, simple(tmp_path))
    configcache.load(path, env)
    assert "hit" in configcache.load(path, {**env, "LANG": "C.UTF-8", "POD_NAME": "p"})[1]


def test_another_tokensmith_version_misses(tmp_path, env, monkeypatch):
    path = write_config(tmp_path, simple(tmp_path))
    configcache.load(path, env)
    monkeypatch.setattr(tokensmith, "__version__", tokensmith.__version__ + ".1")
    assert "miss" in configcache.load(path, env)[1]
    assert "hit" in configcache.load(path, env)[1]


CORRUPTIONS = {
    "garbage": lambda data: b"\x00\xff not json",
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "no body": lambda data: data.partition(b"\n")[0],
    "body of another shape": lambda data: data.partition(b"\n")[0] + b"\n[1, 2]",
    "unknown tag": lambda data: data.partition(b"\n")[0] + b'\n{"x": 1}',
    "unknown model": lambda data: data.replace(b'"@":"Settings"', b'"@":"Nope"'),
    "field list of another length": lambda data: data.replace(b'"v":[', b'"v":[1,', 1),
    "a value changed": lambda data: data.replace(b'/a.token"', b'/b.token"'),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_entry_is_never_trusted_nor_fatal_and_is_rewritten(tmp_path, env, corruption):
    path = write_config(tmp_path, simple(tmp_path))
    expected = configcache.load(path, env)[0]
    cached = entry(path, env)
    damaged = CORRUPTIONS[corruption](cached.read_bytes())
    assert damaged != cached.read_bytes()
    cached.write_bytes(damaged)
    settings, outcome = configcache.load(path, env)
    assert "miss" in outcome and settings == expected
    assert "hit" in configcache.load(path, env)[1]


def test_a_cache_entry_written_for_another_config_is_not_trusted(tmp_path, env):
    path = write_config(tmp_path, simple(tmp_path))
    configcache.load(path, env)
    other = tmp_path / "other"
    other.mkdir()
    data = simple(other)
    other_path = write_config(other, data)
    configcache.load(other_path, env)
    entry(path, env).write_bytes(entry(other_path, env).read_bytes())  # a valid entry, the wrong key
    settings, outcome = configcache.load(path, env)
    assert "miss" in outcome and settings.state_dir == tmp_path / "state"


def test_an_entry_others_can_read_or_write_misses_and_is_replaced_private(tmp_path, env):
    path = write_config(tmp_path, simple(tmp_path))
    configcache.load(path, env)
    os.chmod(entry(path, env), 0o644)
    assert "not this user's alone" in configcache.load(path, env)[1]
    assert stat.S_IMODE(os.stat(entry(path, env)).st_mode) == 0o600
    assert "hit" in configcache.load(path, env)[1]


def test_a_directory_others_can_enter_is_neither_read_nor_written(tmp_path, env):
    path = write_config(tmp_path, simple(tmp_path))
    configcache.load(path, env)
    os.chmod(entry(path, env).parent, 0o755)
    before = entry(path, env).read_bytes()
    settings, outcome = configcache.load(path, env)
    assert "not this user's alone" in outcome and "not cached" in outcome
    assert settings.clients[0].name == "a"
    assert "miss" in configcache.load(path, env)[1]
    assert entry(path, env).read_bytes() == before


def test_an_entry_owned_by_another_user_misses(tmp_path, env, monkeypatch):
    path = write_config(tmp_path, simple(tmp_path))
    configcache.load(path, env)
    real = os.geteuid()
    monkeypatch.setattr(configcache.os, "geteuid", lambda: real + 1)  # the files now belong to "someone else"
    assert "not this user's alone" in configcache.load(path, env)[1]


def test_a_symlinked_entry_is_not_followed(tmp_path, env):
    path = write_config(tmp_path, simple(tmp_path))
    configcache.load(path, env)
    cached = entry(path, env)
    target = tmp_path / "elsewhere.json"
    target.write_bytes(cached.read_bytes())
    os.chmod(target, 0o600)
    cached.unlink()
    cached.symlink_to(target)
    assert "miss" in configcache.load(path, env)[1]
    assert not cached.is_symlink()


def test_an_invalid_config_is_refused_as_before_and_not_cached(tmp_path, env):
    data = simple(tmp_path)
    data["clients"][0]["timeout"] = 0
    path = write_config(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        configcache.load(path, env)
    assert "clients[0](a).timeout" in str(info.value)
    assert not entry(path, env).exists()


def test_a_secret_from_the_environment_is_never_written_to_the_cache(tmp_path, env):
    data = simple(tmp_path)
    data["vault"] = {"address": "https://vault.example", "auth": {"method": "approle", "role_id": "r",
                                                                    "secret_id": INLINE_SECRET}}
    path = write_config(tmp_path, data)
    configcache.load(path, env)
    assert INLINE_SECRET.encode() in entry(path, env).read_bytes()  # the file holds it already
    with_env = {**env, "TOKENSMITH_VAULT__AUTH__SECRET_ID": ENV_SECRET}
    settings, outcome = configcache.load(path, with_env)
    assert settings.vault.auth.secret_id.get_secret_value() == ENV_SECRET
    assert "not cached: a secret comes from a TOKENSMITH_* variable" in outcome
    assert not entry(path, env).exists()
    assert "miss" in configcache.load(path, with_env)[1]
    cache = Path(env["CACHE_DIRECTORY"])
    assert all(ENV_SECRET.encode() not in file.read_bytes() for file in cache.rglob("*") if file.is_file())


def test_a_user_name_in_control_operators_is_resolved_again_on_a_hit(tmp_path, env, monkeypatch):
    import pwd

    data = simple(tmp_path)
    data["control_operators"] = ["root", 5]
    path = write_config(tmp_path, data)
    configcache.load(path, env)
    settings, outcome = configcache.load(path, env)
    assert "hit" in outcome and settings.control_operators == (0, 5)
    real = pwd.getpwnam
    monkeypatch.setattr(pwd, "getpwnam", lambda name: real("nobody") if name == "root" else real(name))
    settings, outcome = configcache.load(path, env)
    assert "user root now has another uid" in outcome
    assert settings.control_operators == (pwd.getpwnam("root").pw_uid, 5)


# ---- the daemon


@pytest.mark.parametrize("store", ["file", "aws"])
def test_run_on_a_cache_hit_imports_no_pydantic_and_behaves_as_on_a_miss(tmp_path, oauth, monkeypatch, request,
                                                                         store):
    """With an AWS sink too: boto3 is imported then, pydantic still not."""
    monkeypatch.setenv("CACHE_DIRECTORY", str(tmp_path / "cache"))
    env = dict(os.environ)
    if store == "aws":
        from fixtures_stores import AWS_ENV

        env.update(AWS_ENV, AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
        project = Project(tmp_path, oauth, log={"level": "DEBUG"},
                          aws={"endpoint_url": request.getfixturevalue("moto_server"), "region": "us-east-1"})
        project.add_client("svc")
        project.clients[0]["sinks"].append({"type": "aws", "secret_id": f"cache-hit-{os.getpid()}-{id(project)}"})
    else:
        project = Project(tmp_path, oauth, log={"level": "DEBUG"})
        project.add_client("svc")
    outputs = []
    for run in range(2):
        project.token_path("svc").unlink(missing_ok=True)
        project.write()
        log_path = tmp_path / f"run-{run}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "tokensmith", "run", "--config",
                                        str(project.config)], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for(lambda: project.token("svc") and "event=ready" in log_path.read_text(), 20)
            status = project.cli("status", "--json")
        finally:
            process.terminate()
            assert process.wait(15) == 0
        text = log_path.read_text()
        imported = {line.split("|")[-1].strip() for line in text.splitlines() if line.startswith("import time:")}
        outputs.append((text, imported, json.loads(status.stdout)))
    (miss_log, miss_imports, miss_status), (hit_log, hit_imports, hit_status) = outputs
    assert "config cache miss" in miss_log and "pydantic" in miss_imports  # the check below can fail
    assert "config cache hit" in hit_log
    assert not {name for name in hit_imports if name.split(".")[0] in ("pydantic", "pydantic_core", "yaml")}
    assert "tokensmith.config" not in hit_imports
    assert ("boto3" in hit_imports) == (store == "aws")  # the AWS sink was really built
    for status in (miss_status, hit_status):
        assert [client["client"] for client in status["clients"]] == ["svc"] and status["clients"][0]["valid"]


def test_a_reload_after_a_cached_start_changes_only_the_changed_client(tmp_path, oauth, monkeypatch):
    monkeypatch.setenv("CACHE_DIRECTORY", str(tmp_path / "cache"))
    project = Project(tmp_path, oauth, log={"level": "DEBUG"})
    project.add_client("one")
    project.add_client("two")
    first = project.start()
    try:
        first.wait_ready()
    finally:
        assert first.stop() == 0
    running = project.start()
    try:
        running.wait_ready()
        assert "config cache hit" in running.log
        project.clients[1]["timeout"] = 9
        project.write()
        running.signal()
        wait_for(lambda: "config reloaded" in running.log)
        assert "config reloaded: 0 added, 0 removed, 1 changed (two); 2 clients" in running.log
        running.signal()  # the same config again: a hit, and nothing changes
        wait_for(lambda: running.log.count("config reloaded") == 2)
        assert "config reloaded: 0 added, 0 removed, 0 changed; 2 clients" in running.log
    finally:
        assert running.stop() == 0


# ---- `run` arguments without argparse


@pytest.mark.parametrize("argv", [["run"], ["run", "--config", "/etc/x.yaml"], ["run", "--config=/a=b"],
                                  ["run", "--log-format", "json", "--config", "c"], ["run", "--config="],
                                  ["run", "--config", "a", "--config", "b", "--log-format=plain"]])
def test_run_arguments_read_without_argparse_are_what_argparse_reads(argv):
    from tokensmith import cli

    fast = cli.run_args(argv)
    assert fast is not None
    assert vars(fast) == vars(cli.parser().parse_args(argv))


@pytest.mark.parametrize("argv", [["run", "--help"], ["run", "--conf", "x"], ["run", "--config"],
                                  ["run", "--config", "-x"], ["run", "--log-format", "xml"], ["run", "extra"],
                                  ["status"], []])
def test_anything_else_goes_to_argparse(argv):
    from tokensmith import cli

    assert cli.run_args(argv) is None
