"""Command hooks run with a minimal environment: never the daemon's Vault token, AWS keys or
env-source credentials, only PATH, the locale, TZ, the TOKENSMITH_* hook variables and pass_env."""

import json
import sys

import pytest

from daemon_harness import Project, wait_for
from tokensmith.config import load_settings
from tokensmith.errors import ConfigError

THREAT = "local user"
DUMP = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"
DAEMON_SECRETS = {
    "VAULT_TOKEN": "hvs.daemon-vault-token-Q7",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-access-key-Z3",
    "AWS_SESSION_TOKEN": "aws-session-token-M2",
}


@pytest.mark.security(threat=THREAT, claim="A command hook's environment holds neither the daemon's Vault token "
                      "and AWS keys nor any client's env-source credentials, only the documented variables and "
                      "what its pass_env names.")
def test_hook_environment_holds_no_daemon_secret(tmp_path, oauth):
    oauth.add_client("envapp", "envapp-secret-VALUE-9", dialect="post")
    project = Project(tmp_path, oauth)
    dump = tmp_path / "hook-env.json"
    project.clients.append({
        "name": "envapp", "token_url": oauth.token_url, "auth_style": "post",
        "source": {"type": "env", "prefix": "ENVAPP_"},
        "refresh": {"min_lead": 0, "backoff_initial": 0.05, "backoff_max": 0.5},
        "sinks": [{"type": "file", "path": str(project.token_path("envapp"))}],
        "hooks": [{"type": "command", "argv": [sys.executable, "-c", DUMP, str(dump)],
                   "pass_env": ["HOOK_WANTS_THIS"]}],
    })
    env = {**DAEMON_SECRETS, "ENVAPP_CLIENT_ID": "envapp", "ENVAPP_CLIENT_SECRET": "envapp-secret-VALUE-9",
           "HOOK_WANTS_THIS": "passed-on", "UNRELATED_DAEMON_VAR": "not-for-hooks", "LC_ALL": "C.UTF-8", "TZ": "UTC"}
    daemon = project.start(env=env)
    try:
        wait_for(lambda: dump.exists() and dump.stat().st_size > 0, timeout=15)
        seen = json.loads(dump.read_text())
    finally:
        assert daemon.stop() == 0, daemon.log

    for name, value in {**DAEMON_SECRETS, "ENVAPP_CLIENT_SECRET": "envapp-secret-VALUE-9"}.items():
        assert name not in seen
        assert value not in json.dumps(seen)
    assert "ENVAPP_CLIENT_ID" not in seen and "UNRELATED_DAEMON_VAR" not in seen
    assert seen["TOKENSMITH_CLIENT"] == "envapp"
    assert len(seen["TOKENSMITH_TOKEN_FINGERPRINT"]) == 12 and seen["TOKENSMITH_EXPIRES_AT"].isdigit()
    assert seen["HOOK_WANTS_THIS"] == "passed-on"
    assert seen["LC_ALL"] == "C.UTF-8" and seen["TZ"] == "UTC" and "PATH" in seen
    token = project.token("envapp")
    assert token and token not in json.dumps(seen)


def config_with_hook(tmp_path, pass_env, source=None):
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({
        "state_dir": str(tmp_path / "state"), "runtime_dir": str(tmp_path / "run"),
        "clients": [{"name": "envapp", "token_url": "https://idp.example/token",
                     "source": source or {"type": "env", "prefix": "ENVAPP_"},
                     "sinks": [{"type": "file", "path": str(tmp_path / "t")}],
                     "hooks": [{"type": "command", "argv": ["/bin/true"], "pass_env": pass_env}]}],
    }))
    return config


@pytest.mark.security(threat=THREAT, claim="pass_env cannot hand a hook the daemon's secrets (VAULT_TOKEN, AWS "
                      "keys, TOKENSMITH_* overrides) or a variable an env credential source reads.")
@pytest.mark.parametrize("name, why", [("VAULT_TOKEN", "never passed to a hook"),
                                       ("AWS_SECRET_ACCESS_KEY", "never passed to a hook"),
                                       ("AWS_SESSION_TOKEN", "never passed to a hook"),
                                       ("TOKENSMITH_VAULT__AUTH__TOKEN", "never passed to a hook"),
                                       ("ENVAPP_CLIENT_SECRET", "env credential source reads"),
                                       ("ENVAPP_PASSWORD", "env credential source reads"),
                                       ("BAD NAME", "not an environment variable name")])
def test_pass_env_refuses_secret_names(tmp_path, name, why):
    with pytest.raises(ConfigError) as info:
        load_settings(config_with_hook(tmp_path, [name]), environ={})
    assert "pass_env" in str(info.value) and why in str(info.value)


def test_pass_env_accepts_an_ordinary_name(tmp_path):
    settings = load_settings(config_with_hook(tmp_path, ["APP_RELOAD_URL"]), environ={})
    assert settings.clients[0].hooks[0].pass_env == ["APP_RELOAD_URL"]
