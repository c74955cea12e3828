"""Hostile input becomes a typed error naming the client and field, never a bare Python exception:
undecodable credentials and config text, a non-ASCII Retry-After, an impossible port, a deeply
nested JWT; and an exception no backend converted is still recorded as a failure in status and
metrics (and never with its text, which may hold a secret)."""

import json
import logging
import random
import re
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

from fakes import FakeClock, MemorySink, StaticSource
from tokensmith.config import ClientConfig, load_settings
from tokensmith.devserver import OAuthServer
from tokensmith.errors import ConfigError, InternalError, SourceError, TokenEndpointError
from tokensmith.hooks import Hooks
from tokensmith.keeper import Keeper
from tokensmith.metrics import Metrics
from tokensmith.sources import Credentials
from tokensmith.sources.env import EnvSource
from tokensmith.state import StateStore
from tokensmith.tokenclient import TokenClient, jwt_expiry, parse_retry_after, parse_token_response

ROOT = Path(__file__).resolve().parents[2]
SECRET = "typed-Errors-Secret-4kP"
BAD = "bad\udc80text"  # what os.environ holds for a non-UTF-8 byte (surrogateescape), or JSON's "\udc80"


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def server(clock):
    with OAuthServer(access_lifetime=600, clock=clock) as server:
        server.add_client("app", SECRET, dialect="post", users={"alice": "alice-pw"})
        yield server


def client_config(url, **fields):
    return ClientConfig(name="typed", token_url=url, source={"type": "env", "prefix": "TYPED_"},
                        sinks=[{"type": "file", "path": "/unused"}], **fields)


def make_keeper(config, source, sinks, tmp_path, clock, metrics=None, hooks=None):
    store = StateStore(tmp_path / "state")
    store.prepare()
    keeper = Keeper(config, source, sinks, TokenClient(config, clock=clock), store, clock=clock,
                    rng=random.Random(1), metrics=metrics, hooks=hooks)
    keeper.load()
    return keeper


# ---- credentials that cannot be encoded

@pytest.mark.security(threat="hostile secret store", claim="A credential holding a lone surrogate or undecodable byte "
                      "is a SourceError naming the client and the field, in every dialect, never UnicodeEncodeError.")
@pytest.mark.parametrize("auth_style", ["post", "basic", "json", "query"])
@pytest.mark.parametrize("field, grant", [("client_id", "client_credentials"), ("client_secret", "client_credentials"),
                                          ("username", "password"), ("password", "password"),
                                          ("refresh_token", "refresh_token")])
def test_undecodable_credential_is_a_source_error(server, auth_style, field, grant):
    values = {"client_id": "app", "client_secret": SECRET, "username": "alice", "password": "alice-pw",
              "refresh_token": "rt-1", field: BAD}
    with pytest.raises(SourceError) as info:
        TokenClient(client_config(server.token_url, auth_style=auth_style, grant=grant)).obtain(
            grant, Credentials(**values), refresh_token=values["refresh_token"] if grant == "refresh_token" else None)
    assert str(info.value).startswith("client typed: ") and field in str(info.value)
    assert info.value.retryable is False
    assert server.stats["token_requests"] == 0  # refused before anything was sent


@pytest.mark.security(threat="hostile secret store", claim="A held refresh token or a token to revoke that is not "
                      "UTF-8 is a TokenEndpointError naming the client and parameter, not UnicodeEncodeError.")
def test_undecodable_token_parameter_is_a_token_endpoint_error(server):
    client = TokenClient(client_config(server.token_url, revocation_url=server.token_url,
                                       introspection_url=server.token_url))
    creds = Credentials(client_id="app", client_secret=SECRET)
    for call in (lambda: client.obtain("refresh_token", creds, refresh_token=BAD),
                 lambda: client.revoke(BAD, "access_token", creds), lambda: client.introspect(BAD, creds)):
        with pytest.raises(TokenEndpointError) as info:
            call()
        assert str(info.value).startswith("client typed: ") and ("'refresh_token'" in str(info.value)
                                                                  or "'token'" in str(info.value))
        assert info.value.error == "invalid_request"


@pytest.mark.security(threat="hostile secret store", claim="An env-source credential with a non-UTF-8 byte makes the "
                      "keeper record a failure (status, metrics) naming the field, not crash.")
def test_env_source_with_a_non_utf8_secret_is_a_recorded_failure(server, clock, tmp_path):
    config = client_config(server.token_url)
    metrics = Metrics(process=False)
    source = EnvSource(config, None, environ={"TYPED_CLIENT_ID": "app", "TYPED_CLIENT_SECRET": BAD})
    keeper = make_keeper(config, source, [MemorySink()], tmp_path, clock, metrics=metrics)
    outcome = keeper.refresh()
    assert not outcome.ok and isinstance(outcome.error, SourceError)
    status = keeper.status()
    assert status["failures"] == 1 and "client_secret" in status["last_error"]
    assert metrics.sample("tokensmith_refresh_failures_total", {"client": "typed", "reason": "SourceError"}) == 1


# ---- config values that cannot work are refused at load, with the field path

def write_config(tmp_path, **client):
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"state_dir": str(tmp_path / "state"), "runtime_dir": str(tmp_path / "run"),
                                "clients": [{"name": "typed", "token_url": "https://idp.example/token",
                                             "source": {"type": "env"},
                                             "sinks": [{"type": "file", "path": str(tmp_path / "t")}], **client}]}))
    return path


@pytest.mark.security(threat="local user", claim="A token_url, revocation_url or introspection_url whose port is not "
                      "1-65535 is a ConfigError at load naming the field, so check-config catches it.")
@pytest.mark.parametrize("field", ["token_url", "revocation_url", "introspection_url"])
@pytest.mark.parametrize("url", ["https://idp.example:99999/token", "https://idp.example:0/token",
                                 "https://idp.example:x1/token", "https://[::1]:70000/token"])
def test_impossible_port_is_a_config_error(tmp_path, field, url):
    with pytest.raises(ConfigError) as info:
        load_settings(write_config(tmp_path, **{field: url}), environ={})
    assert f"clients[0](typed): {field} has a port that is not a number from 1 to 65535" in str(info.value)


@pytest.mark.parametrize("section, message", [
    ({"health": {"listen": "127.0.0.1:99999"}}, "health.listen: port must be 0-65535"),
    ({"aws": {"endpoint_url": "http://127.0.0.1:99999"}},
     "aws.endpoint_url: has a port that is not a number from 1 to 65535"),
    ({"vault": {"address": "https://vault.example:99999", "auth": {"token": "t"}}},
     "vault: has a port that is not a number from 1 to 65535")])
def test_impossible_port_elsewhere_is_a_config_error(tmp_path, section, message):
    path = write_config(tmp_path)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **section}))
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert message in str(info.value)


def test_check_config_refuses_an_impossible_port(tmp_path):
    import subprocess

    result = subprocess.run([sys.executable, "-m", "tokensmith", "check-config", "--config",
                             str(write_config(tmp_path, token_url="https://idp.example:99999/token"))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "token_url has a port" in result.stdout + result.stderr


@pytest.mark.security(threat="local user", claim="scope, audience or an extra param holding an undecodable byte (from "
                      "a TOKENSMITH_* override) is a ConfigError at load naming the field.")
@pytest.mark.parametrize("var, field", [("TOKENSMITH_CLIENTS__0__SCOPE", "scope"),
                                        ("TOKENSMITH_CLIENTS__0__AUDIENCE", "audience"),
                                        ("TOKENSMITH_CLIENTS__0__EXTRA_PARAMS__RESOURCE", "extra_params.resource"),
                                        ("TOKENSMITH_CLIENTS__0__TOKEN_URL", "token_url")])
def test_undecodable_config_text_is_a_config_error(tmp_path, var, field):
    value = "https://idp.example/t\udcff" if field == "token_url" else "read\udcff"
    with pytest.raises(ConfigError) as info:
        load_settings(write_config(tmp_path), environ={var: value})
    assert f"clients[0](typed): {field} must be UTF-8 text" in str(info.value)


# ---- Retry-After and JWTs

@pytest.mark.security(threat="hostile or slow provider", claim="A Retry-After of non-ASCII digits ('²', Arabic-Indic) "
                      "is ignored, not a ValueError; ASCII seconds and HTTP dates still work.")
def test_retry_after_takes_ascii_digits_only(server):
    for value in ("²", "١٢", "7²", "３"):
        assert parse_retry_after(value, 1_700_000_000.0) is None
    assert parse_retry_after(" 7 ", 1_700_000_000.0) == 7.0
    server.fail_next(status=429, headers={"Retry-After": "²"})
    with pytest.raises(TokenEndpointError) as info:
        TokenClient(client_config(server.token_url)).obtain("client_credentials", Credentials("app", SECRET))
    assert info.value.status == 429 and info.value.retry_after is None and info.value.retryable


def deep_jwt(depth: int, where: str) -> str:
    import base64

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    nested = b"[" * depth + b"]" * depth
    header = b'{"alg":"HS256","typ":"JWT"' + (b',"x":' + nested if where == "header" else b"") + b"}"
    payload = b'{"exp":1900000000' + (b',"x":' + nested if where == "payload" else b"") + b"}"
    return f"{b64(header)}.{b64(payload)}.c2ln"


@pytest.mark.security(threat="hostile or slow provider", claim="A JWT access token nested 3000 deep in its header or "
                      "payload gives a token (lifetime from expires_in), never RecursionError.")
@pytest.mark.parametrize("where", ["header", "payload"])
def test_deeply_nested_jwt_is_not_a_recursion_error(where):
    token_value = deep_jwt(3000, where)
    # a DecodeError (no exp) where the JSON decoder's recursion limit is reached (3.11); 3.13 decodes it
    assert jwt_expiry(token_value) in (None, 1_900_000_000.0)
    body = json.dumps({"access_token": token_value, "expires_in": 600}).encode()
    assert parse_token_response(body, client="typed", sent_at=1.8e9, default_lifetime=60).lifetime == 600


@pytest.mark.security(threat="hostile or slow provider", claim="pyproject requires a PyJWT that turns a deeply nested "
                      "header and payload into DecodeError (2.15 or later), and that is what is installed.")
def test_pyjwt_floor_handles_deep_nesting():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = next(re.search(r">=\s*([0-9.]+)", dep).group(1) for dep in dependencies if dep.lower().startswith("pyjwt"))
    assert tuple(map(int, floor.split("."))) >= (2, 15)
    assert tuple(map(int, version("pyjwt").split(".")[:2])) >= (2, 15)


# ---- an exception no backend converted is still a recorded failure

class BrokenSource:
    def read(self):
        raise KeyError(f"client_secret {SECRET}")  # a bug whose text holds a secret


class BrokenSink(MemorySink):
    type = "broken"

    def write(self, token):
        raise AttributeError(f"token {token.access_token} has no attribute")


@pytest.mark.security(threat="hostile secret store", claim="An unexpected exception from a credential source is "
                      "recorded as a failure (status failures and last_error, metrics, a log line naming its type), "
                      "retried with backoff, and its text (which may hold a secret) is kept out.")
def test_unexpected_source_exception_is_a_recorded_failure(server, clock, tmp_path, caplog):
    config = client_config(server.token_url)
    metrics = Metrics(process=False)
    keeper = make_keeper(config, BrokenSource(), [MemorySink()], tmp_path, clock, metrics=metrics)
    with caplog.at_level(logging.INFO, logger="tokensmith"):
        outcome = keeper.refresh()
    assert not outcome.ok and isinstance(outcome.error, InternalError)
    assert isinstance(outcome.error.__cause__, KeyError)
    status = keeper.status()
    assert status["failures"] == 1 and "unexpected KeyError" in status["last_error"]
    assert status["last_error"].startswith("client typed: refresh: unexpected KeyError")
    assert keeper.retry_at > clock()
    assert metrics.sample("tokensmith_refresh_failures_total", {"client": "typed", "reason": "InternalError"}) == 1
    assert "unexpected KeyError" in caplog.text
    assert SECRET not in caplog.text and SECRET not in status["last_error"]


@pytest.mark.security(threat="hostile secret store", claim="An unexpected exception from a sink is recorded in status "
                      "(last_error, sinks_pending) and metrics, the other sinks still get the token, and its text "
                      "(which may hold the token) is kept out.")
def test_unexpected_sink_exception_is_a_recorded_failure(server, clock, tmp_path, caplog):
    config = client_config(server.token_url)
    metrics = Metrics(process=False)
    good = MemorySink("memory:good")
    keeper = make_keeper(config, StaticSource(client_id="app", client_secret=SECRET),
                         [BrokenSink("memory:broken"), good], tmp_path, clock, metrics=metrics)
    with caplog.at_level(logging.INFO, logger="tokensmith"):
        outcome = keeper.refresh()
    token = outcome.new_token.access_token
    assert good.current.access_token == token
    assert "unexpected AttributeError" in outcome.sinks["memory:broken"]
    status = keeper.status()
    assert status["sinks_pending"] == ["memory:broken"]
    assert "unexpected AttributeError" in status["last_error"]
    assert metrics.sample("tokensmith_sink_write_failures_total", {"client": "typed", "sink_type": "broken"}) == 1
    assert "unexpected AttributeError" in caplog.text
    assert token not in caplog.text and token not in status["last_error"]


@pytest.mark.security(threat="local user", claim="A hook that fails in an unexpected way (argv with a NUL byte) is "
                      "reported as a failed hook; the refresh it follows still succeeds.")
def test_unexpected_hook_exception_is_a_failed_hook(server, clock, tmp_path):
    config = ClientConfig(name="typed", token_url=server.token_url, source={"type": "env"},
                          sinks=[{"type": "file", "path": "/unused"}],
                          hooks=[{"type": "command", "argv": ["/bin/true\0x"]}])
    keeper = make_keeper(config, StaticSource(client_id="app", client_secret=SECRET), [MemorySink()], tmp_path,
                         clock, hooks=Hooks())
    outcome = keeper.refresh()
    assert outcome.ok
    assert outcome.hooks == [{"hook": "command:/bin/true\0x", "ok": False, "error": "unexpected ValueError"}]


@pytest.mark.security(threat="planted file", claim="A pid file holding non-ASCII digits ('²') is a failed hook with a "
                      "clear error, not a ValueError from int().")
def test_pid_file_with_non_ascii_digits_is_a_failed_hook(server, clock, tmp_path):
    pid_file = tmp_path / "app.pid"
    pid_file.write_text("²\n")
    config = ClientConfig(name="typed", token_url=server.token_url, source={"type": "env"},
                          sinks=[{"type": "file", "path": "/unused"}],
                          hooks=[{"type": "signal", "pid_file": str(pid_file), "signal": "HUP"}])
    keeper = make_keeper(config, StaticSource(client_id="app", client_secret=SECRET), [MemorySink()], tmp_path,
                         clock, hooks=Hooks())
    outcome = keeper.refresh()
    assert outcome.ok
    assert outcome.hooks == [{"hook": f"signal:{pid_file}", "ok": False,
                              "error": f"pid file {pid_file} does not hold a process id"}]
