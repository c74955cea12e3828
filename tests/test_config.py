"""Config loading: the shipped examples, YAML + TOKENSMITH_* overrides, one clear line per problem,
`tokensmith check-config`, and a fuzz that only ever yields Settings or ConfigError."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from tokensmith.config import CONFIG_ENV, Settings, load_settings
from tokensmith.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "config").glob("*.yaml"))
VAULT_TOKEN = "hvs.CAESIK7zq9TopSecretVaultTokenValue"


def client(name="billing-api", **fields):
    data = {"name": name, "token_url": "https://auth.example/oauth2/token",
            "source": {"type": "env", "prefix": "BILLING_"},
            "sinks": [{"type": "file", "path": f"/run/tokensmith/{name}.token"}]}
    data.update(fields)
    return data


def write(tmp_path, data, name="config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load(tmp_path, data, environ=None) -> Settings:
    return load_settings(write(tmp_path, data), environ=environ or {})


def problems(tmp_path, data, environ=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, data, environ)
    return getattr(info.value, "problems", [info.value.message])


def only_problem(tmp_path, data) -> str:
    lines = problems(tmp_path, data)
    assert len(lines) == 1, lines
    assert "\n" not in lines[0]
    return lines[0]


# ---- the shipped examples


def test_three_examples_are_shipped():
    assert {p.name for p in EXAMPLES} == {"central-aws.yaml", "k8s-sidecar.yaml", "systemd-vault.yaml",
                                          "enterprise-auth.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_loads(path):
    settings = load_settings(path, environ={})
    raw = yaml.safe_load(path.read_text())
    assert [c.name for c in settings.clients] == [c["name"] for c in raw["clients"]]
    for loaded, written in zip(settings.clients, raw["clients"]):
        assert loaded.token_url == written.get("token_url") and loaded.issuer == written.get("issuer")
        assert loaded.source.type == written["source"]["type"]


def test_systemd_example_values_are_typed():
    settings = load_settings(REPO / "config" / "systemd-vault.yaml", environ={})
    inventory = settings.client("inventory-api")
    assert inventory.grant == "password" and inventory.auth_style == "post"
    assert inventory.sinks[0].mode == 0o640 and inventory.sinks[0].group is None
    feed = settings.client("partner-feed")
    assert feed.source.keys.client_id == "id" and feed.source.keys.client_secret == "secret"
    assert feed.sinks[0].format == "env" and feed.sinks[0].env_key == "PARTNER_TOKEN"
    assert settings.vault.auth.method == "approle"


# ---- environment overrides


def two_clients(tmp_path):
    return write(tmp_path, {"log": {"level": "INFO"},
                            "clients": [client("partner-feed", timeout=10), client("billing-api", timeout=10)]})


def test_env_overrides_log_level(tmp_path):
    settings = load_settings(two_clients(tmp_path), environ={"TOKENSMITH_LOG__LEVEL": "debug"})
    assert settings.log.level == "DEBUG"


def test_env_overrides_client_field_by_index(tmp_path):
    settings = load_settings(two_clients(tmp_path), environ={"TOKENSMITH_CLIENTS__0__SCOPE": "read write"})
    assert settings.clients[0].scope == "read write"
    assert settings.clients[1].scope is None


def test_env_overrides_client_field_by_name_with_dashes_as_underscores(tmp_path):
    settings = load_settings(two_clients(tmp_path), environ={"TOKENSMITH_CLIENTS__BILLING_API__TIMEOUT": "5"})
    assert settings.client("billing-api").timeout == 5.0
    assert settings.client("partner-feed").timeout == 10.0


def test_env_override_client_name_is_case_insensitive(tmp_path):
    settings = load_settings(two_clients(tmp_path), environ={"TOKENSMITH_CLIENTS__billing_Api__SCOPE": "x"})
    assert settings.client("billing-api").scope == "x"


def test_env_override_of_nested_client_field(tmp_path):
    settings = load_settings(two_clients(tmp_path),
                             environ={"TOKENSMITH_CLIENTS__PARTNER_FEED__REFRESH__MIN_LEAD": "120"})
    assert settings.client("partner-feed").refresh.min_lead == 120.0
    assert settings.client("billing-api").refresh.min_lead == 60.0


def test_env_override_unknown_client_name_is_a_config_error_naming_the_variable(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_settings(two_clients(tmp_path), environ={"TOKENSMITH_CLIENTS__NO_SUCH_API__TIMEOUT": "5"})
    assert "TOKENSMITH_CLIENTS__NO_SUCH_API__TIMEOUT" in str(info.value)


def test_env_override_client_index_out_of_range_names_the_variable(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_settings(two_clients(tmp_path), environ={"TOKENSMITH_CLIENTS__7__SCOPE": "x"})
    assert "TOKENSMITH_CLIENTS__7__SCOPE" in str(info.value)


def test_env_override_with_a_bad_value_names_the_field_path(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_settings(two_clients(tmp_path), environ={"TOKENSMITH_CLIENTS__BILLING_API__TIMEOUT": "soon"})
    assert any(line.startswith("clients[1](billing-api).timeout") for line in info.value.problems)


def test_unrelated_environment_variables_are_ignored(tmp_path):
    settings = load_settings(two_clients(tmp_path), environ={"BILLING_CLIENT_SECRET": "x", "PATH": "/bin"})
    assert len(settings.clients) == 2


def test_tokensmith_config_variable_is_used_when_no_path_is_given(tmp_path):
    path = write(tmp_path, {"clients": [client("from-env-file")]})
    settings = load_settings(None, environ={CONFIG_ENV: str(path)})
    assert [c.name for c in settings.clients] == ["from-env-file"]


def test_explicit_path_wins_over_tokensmith_config(tmp_path):
    other = write(tmp_path, {"clients": [client("from-variable")]}, name="other.yaml")
    path = write(tmp_path, {"clients": [client("from-argument")]})
    settings = load_settings(path, environ={CONFIG_ENV: str(other)})
    assert [c.name for c in settings.clients] == ["from-argument"]


def test_missing_config_file_is_a_config_error_naming_it(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "absent.yaml", environ={})
    assert "absent.yaml" in str(info.value)


# ---- one clear line per problem, naming the field path with the client's name


BAD = {
    "unknown client field": (
        lambda: {"clients": [client(scop="read")]},
        "clients[0](billing-api).scop", ["unknown field"]),
    "unknown sink field": (
        lambda: {"clients": [client(sinks=[{"type": "file", "path": "/run/t/a", "colour": "red"}])]},
        "clients[0](billing-api).sinks[0].colour", ["unknown field"]),
    "unknown top-level field": (
        lambda: {"clients": [client()], "loging": {"level": "INFO"}},
        "loging", ["unknown field"]),
    "bad type": (
        lambda: {"clients": [client(timeout="soon")]},
        "clients[0](billing-api).timeout", ["number"]),
    "bad source tag": (
        lambda: {"clients": [client(source={"type": "s3", "path": "x"})]},
        "clients[0](billing-api).source", ["vault", "aws", "file", "env"]),
    "missing source tag": (
        lambda: {"clients": [client(source={"path": "/etc/x.json"})]},
        "clients[0](billing-api).source", ["type"]),
    "bad literal": (
        lambda: {"clients": [client(auth_style="digest")]},
        "clients[0](billing-api).auth_style", ["basic", "post", "json", "query"]),
    "missing field": (
        lambda: {"clients": [{k: v for k, v in client().items() if k != "token_url"}]},
        "clients[0](billing-api).token_url", ["required"]),
    "missing field in vault source": (
        lambda: {"vault": {"address": "https://vault.example", "auth": {"token": VAULT_TOKEN}},
                 "clients": [client(source={"type": "vault", "mount": "secret"})]},
        "clients[0](billing-api).source.path", ["required"]),
    "second client named": (
        lambda: {"clients": [client("partner-feed"), client("billing-api", grant="implicit")]},
        "clients[1](billing-api).grant", ["client_credentials"]),
    "http token_url to a remote host": (
        lambda: {"clients": [client(token_url="http://auth.example/oauth2/token")]},
        "clients[0](billing-api)", ["token_url", "http", "allow_insecure_http"]),
    "http revocation_url to a remote host": (
        lambda: {"clients": [client(revocation_url="http://auth.example/revoke")]},
        "clients[0](billing-api)", ["revocation_url", "http"]),
    "reissue with refresh_token grant": (
        lambda: {"clients": [client(grant="refresh_token", refresh={"strategy": "reissue"})]},
        "clients[0](billing-api)", ["reissue", "refresh_token"]),
    "world-readable sink mode": (
        lambda: {"clients": [client(sinks=[{"type": "file", "path": "/run/t/a", "mode": "0644"}])]},
        "clients[0](billing-api).sinks[0].mode", ["others"]),
    "not an octal mode": (
        lambda: {"clients": [client(sinks=[{"type": "file", "path": "/run/t/a", "mode": "rw-------"}])]},
        "clients[0](billing-api).sinks[0].mode", ["octal"]),
    "relative sink path": (
        lambda: {"clients": [client(sinks=[{"type": "file", "path": "tokens/a.token"}])]},
        "clients[0](billing-api).sinks[0].path", ["absolute"]),
    "extra_params overriding client_secret": (
        lambda: {"clients": [client(extra_params={"client_secret": "other", "resource": "api"})]},
        "clients[0](billing-api)", ["extra_params", "client_secret"]),
    "approle without secret_id": (
        lambda: {"vault": {"address": "https://vault.example", "auth": {"method": "approle", "role_id": "r"}},
                 "clients": [client(source={"type": "vault", "path": "clients/billing"})]},
        "vault.auth", ["approle", "secret_id"]),
    "bad log level": (
        lambda: {"log": {"level": "LOUD"}, "clients": [client()]},
        "log.level", ["DEBUG"]),
    "no clients": (
        lambda: {"clients": []},
        "clients", ["at least"]),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_config_gives_one_line_naming_the_field(tmp_path, case, report):
    build, where, words = BAD[case]
    line = only_problem(tmp_path, build())
    assert line.startswith(where + ":"), line
    for word in words:
        assert word in line, (word, line)
    report.record(f"bad config: {case}", f"refused with one line naming `{where}`")


def test_duplicate_client_names_are_refused_naming_the_client(tmp_path):
    line = only_problem(tmp_path, {"clients": [client("billing-api"),
                                               client("billing-api", sinks=[{"type": "file", "path": "/run/t/b"}])]})
    assert "billing-api" in line and ("unique" in line or "twice" in line)


def test_two_clients_writing_one_file_sink_path_are_refused(tmp_path):
    sink = [{"type": "file", "path": "/run/tokensmith/shared.token"}]
    line = only_problem(tmp_path, {"clients": [client("billing-api", sinks=sink), client("partner-feed", sinks=sink)]})
    assert "/run/tokensmith/shared.token" in line
    assert "billing-api" in line and "partner-feed" in line


def test_vault_source_without_vault_section_names_the_section_and_the_client(tmp_path):
    line = only_problem(tmp_path, {"clients": [client("partner-feed"),
                                               client(source={"type": "vault", "path": "clients/billing"})]})
    assert "vault" in line and "missing" in line
    assert "billing-api" in line


def test_vault_sink_without_vault_section_is_refused(tmp_path):
    line = only_problem(tmp_path, {"clients": [client(sinks=[{"type": "vault", "path": "tokens/billing"}])]})
    assert "vault" in line and "missing" in line


def test_every_problem_is_listed(tmp_path):
    lines = problems(tmp_path, {"log": {"level": "LOUD"},
                                "clients": [client(scop="x", timeout="soon"), client("partner-feed", grant="magic")]})
    assert len(lines) == 4
    assert any(line.startswith("log.level:") for line in lines)
    assert any(line.startswith("clients[0](billing-api).scop:") for line in lines)
    assert any(line.startswith("clients[0](billing-api).timeout:") for line in lines)
    assert any(line.startswith("clients[1](partner-feed).grant:") for line in lines)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/oauth2/token", "http://localhost:8080/t",
                                 "http://[::1]:8080/t", "http://127.3.4.5/t"])
def test_http_token_url_on_loopback_is_allowed(tmp_path, url, report):
    settings = load(tmp_path, {"clients": [client(token_url=url)]})
    assert settings.clients[0].token_url == url
    report.record('plain http token endpoint on loopback', 'allowed')

def test_http_token_url_to_a_remote_host_is_allowed_with_allow_insecure_http(tmp_path):
    settings = load(tmp_path, {"clients": [client(token_url="http://auth.internal/t", allow_insecure_http=True)]})
    assert settings.clients[0].token_url == "http://auth.internal/t"


def test_credentials_in_token_url_are_refused(tmp_path):
    line = only_problem(tmp_path, {"clients": [client(token_url="https://id:pw@auth.example/t")]})
    assert "credentials" in line


@pytest.mark.parametrize("mode, expected", [("0600", 0o600), ("0640", 0o640), ("600", 0o600), (0o640, 0o640)])
def test_acceptable_sink_modes(tmp_path, mode, expected):
    settings = load(tmp_path, {"clients": [client(sinks=[{"type": "file", "path": "/run/t/a", "mode": mode}])]})
    assert settings.clients[0].sinks[0].mode == expected


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("state_dir: /tmp/x\n"
                    "clients:\n"
                    "  - name: billing-api\n"
                    "    token_url: \"https://auth.example/t\" trailing\n"
                    "    grant: password\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert str(path) in str(info.value)
    assert "line 4" in str(info.value)


def test_top_level_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert "mapping" in str(info.value)


def test_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("log: {level: INFO}\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert str(path) in str(info.value)


def test_non_string_top_level_key_is_a_config_error(tmp_path):
    path = tmp_path / "intkey.yaml"
    path.write_text("clients: []\n1: x\n")
    with pytest.raises(ConfigError):
        load_settings(path, environ={})


def test_pathologically_nested_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("log: " + "[" * 1000 + "]" * 1000 + "\n")
    with pytest.raises(ConfigError):
        load_settings(path, environ={})


# ---- tokensmith check-config


def run_check_config(path=None, extra_env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSMITH_")}
    env.update(extra_env or {})
    # --config-only: these tests are about the config file; tests/test_cli_operator.py checks the machine
    argv = [sys.executable, "-m", "tokensmith", "check-config", "--config-only"] + (["--config", str(path)] if path else [])
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def test_check_config_accepts_a_good_config(tmp_path):
    result = run_check_config(write(tmp_path, {"clients": [client("billing-api"), client("partner-feed")]}))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "billing-api" in result.stdout and "partner-feed" in result.stdout


def test_prefixed_variables_that_name_no_config_field_are_ignored_and_listed(tmp_path):
    path = write(tmp_path, {"clients": [client("billing-api")]})
    settings = load_settings(path, environ={"TOKENSMITH_HELM": "/opt/helm", "TOKENSMITH_LOG__LEVEL": "ERROR"})
    assert settings.log.level == "ERROR"
    result = run_check_config(path, extra_env={"TOKENSMITH_HELM": "/opt/helm"})
    assert result.returncode == 0
    assert "note: TOKENSMITH_HELM names no config field and is ignored" in result.stdout


def test_check_config_exits_7_and_prints_every_problem(tmp_path):
    path = write(tmp_path, {"log": {"level": "LOUD"},
                            "clients": [client(scop="x", sinks=[{"type": "file", "path": "/run/t/a", "mode": "0644"}]),
                                        client("partner-feed", token_url="http://auth.example/t")]})
    result = run_check_config(path)
    assert result.returncode == 7  # EXIT_CHECK_CONFIG
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 4, result.stdout
    for where in ("log.level", "clients[0](billing-api).scop", "clients[0](billing-api).sinks[0].mode",
                  "clients[1](partner-feed)"):
        assert any(where in line for line in errors), (where, errors)


def test_check_config_reports_invalid_yaml_with_exit_7(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("clients:\n  - name: [unclosed\n")
    result = run_check_config(path)
    assert result.returncode == 7  # EXIT_CHECK_CONFIG
    assert "line" in result.stdout and str(path) in result.stdout


def test_check_config_uses_tokensmith_config_without_config_flag(tmp_path):
    path = write(tmp_path, {"clients": [client("via-variable")]})
    result = run_check_config(extra_env={CONFIG_ENV: str(path)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "via-variable" in result.stdout


def test_check_config_never_echoes_the_vault_token(tmp_path):
    path = write(tmp_path, {"vault": {"address": "https://vault.example:8200",
                                      "auth": {"method": "token", "token": VAULT_TOKEN}},
                            "clients": [client(source={"type": "vault", "path": "clients/billing"}, timeout="soon",
                                               extra_params={"client_secret": VAULT_TOKEN})]})
    result = run_check_config(path)
    assert result.returncode == 7  # EXIT_CHECK_CONFIG
    assert "clients[0](billing-api).timeout" in result.stdout
    assert VAULT_TOKEN not in result.stdout + result.stderr


def test_check_config_never_echoes_the_vault_token_when_the_vault_section_is_invalid(tmp_path):
    path = write(tmp_path, {"vault": {"address": "http://vault.example:8200", "colour": "red",
                                      "auth": {"method": "token", "token": VAULT_TOKEN, "tokne": VAULT_TOKEN}},
                            "clients": [client(source={"type": "vault", "path": "clients/billing"})]})
    result = run_check_config(path)
    assert result.returncode == 7  # EXIT_CHECK_CONFIG
    assert "vault.colour" in result.stdout and "vault.auth.tokne" in result.stdout
    assert VAULT_TOKEN not in result.stdout + result.stderr


def test_check_config_never_echoes_a_vault_token_given_in_the_environment(tmp_path):
    path = write(tmp_path, {"vault": {"address": "https://vault.example:8200", "auth": {"method": "approle"}},
                            "clients": [client(source={"type": "vault", "path": "clients/billing"})]})
    result = run_check_config(path, extra_env={"TOKENSMITH_VAULT__AUTH__TOKEN": VAULT_TOKEN})
    assert result.returncode == 7  # EXIT_CHECK_CONFIG
    assert "vault.auth" in result.stdout
    assert VAULT_TOKEN not in result.stdout + result.stderr


# ---- fuzz: Settings or ConfigError, never anything else

FIELD_NAMES = ["state_dir", "runtime_dir", "audit_log", "control_socket_group", "log", "level", "format", "health",
               "enabled", "listen", "scheduler", "max_workers", "vault", "address", "auth", "method", "token",
               "token_file", "role_id", "secret_id", "aws", "region", "clients", "name", "token_url", "grant",
               "auth_style", "scope", "extra_params", "allow_insecure_http", "timeout", "source", "type", "path",
               "prefix", "keys", "client_id", "refresh", "strategy", "at_fraction", "backoff_max", "sinks", "mode",
               "group", "hooks", "argv", "signal", "pid_file", "mount", "kv_version"]
WORDS = ["file", "env", "vault", "aws", "basic", "post", "json", "query", "0600", "0644", "0640", "reissue",
         "refresh_token", "password", "client_credentials", "approle", "kubernetes", "token", "HUP",
         "http://127.0.0.1/t", "https://a.example/t", "http://a.example/t", "/tmp/x", "/run/t/a", "a-b", "127.0.0.1:1"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12), st.sampled_from(WORDS))
keys = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=6), st.integers(-3, 3), st.none(), st.booleans())
trees = st.recursive(scalars, lambda children: st.one_of(st.lists(children, max_size=4),
                                                         st.dictionaries(keys, children, max_size=5)),
                     max_leaves=25)


def base_config():
    return {"clients": [client("billing-api"), client("partner-feed", source={"type": "file", "path": "/etc/c.json"})]}


def mutate(path, value):
    data = base_config()
    node = data
    for step in path[:-1]:
        child = node[step] if isinstance(node, list) and isinstance(step, int) and step < len(node) else \
            node.get(step) if isinstance(node, dict) else None
        if not isinstance(child, (dict, list)):
            if not isinstance(node, dict):
                break
            child = node[step] = {}
        node = child
    last = path[-1]
    if isinstance(node, dict):
        node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = value
    return data


def dump(data) -> bytes:
    return yaml.safe_dump(data, sort_keys=False).encode()


documents = st.one_of(
    st.dictionaries(keys, trees, max_size=6).map(dump),
    st.builds(mutate, st.lists(st.one_of(st.sampled_from(FIELD_NAMES), st.integers(0, 2)), min_size=1, max_size=4),
              trees).map(dump),
    st.text(alphabet=st.sampled_from(list(":-[]{}#&*!|>'\"\n \t%@`,?aZ01.\\")), max_size=80).map(str.encode),
    st.binary(max_size=60),
)
env_names = st.lists(st.sampled_from(["LOG", "LEVEL", "CLIENTS", "0", "1", "5", "BILLING_API", "PARTNER_FEED",
                                      "NOPE", "TIMEOUT", "SOURCE", "SINKS", "TYPE", "VAULT", "AUTH", "MODE"]),
                     min_size=1, max_size=4).map(lambda parts: "TOKENSMITH_" + "__".join(parts))
environs = st.dictionaries(env_names, st.one_of(st.text(max_size=10), st.sampled_from(WORDS)), max_size=3)


def test_fuzzed_config_yields_settings_or_config_error(report):
    cases = []

    @hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(document=documents, environ=environs)
    def check(document, environ):
        cases.append(1)
        fd, name = tempfile.mkstemp(suffix=".yaml")
        try:
            os.write(fd, document)
            os.close(fd)
            try:
                result = load_settings(name, environ=environ)
            except ConfigError as exc:
                assert str(exc) and "\n" not in str(exc)
            else:
                assert isinstance(result, Settings)
        finally:
            os.unlink(name)

    check()
    report.record('hypothesis: arbitrary config documents and TOKENSMITH_* environments', 'always Settings or a ConfigError; never a crash', cases=len(cases))


