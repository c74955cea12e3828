"""A provider's access_token and token_type cannot inject shell into a `format: env` sink: both are
validated where the response is parsed (RFC 6750 b64token, a known token_type), and the env file
single-quotes what it writes, so even a value that got through is never run when the file is sourced."""

import json
import os
import subprocess

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from tokensmith.config import ClientConfig, FileSinkConfig
from tokensmith.errors import TokenEndpointError
from tokensmith.sinks.file import render
from tokensmith.sources import Credentials
from tokensmith.tokenclient import TokenClient, parse_token_response
from tokensmith.tokens import Token

THREAT = "hostile or slow provider"
SENT_AT = 1_800_000_000.0
B64TOKEN = r"[A-Za-z0-9\-._~+/]+=*"


def parse(data: dict) -> Token:
    return parse_token_response(json.dumps(data).encode(), client="billing-api", sent_at=SENT_AT,
                                default_lifetime=3600)


def sourced(tmp_path, token: Token, env_key="ACCESS_TOKEN") -> tuple[bytes, bytes, list]:
    """What bash reads back from the env file, and what else appeared in its working directory."""
    env_file = tmp_path / "api.env"
    env_file.write_bytes(render(token, "env", env_key))
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    script = f'set -e; . "$1"; printf %s "${env_key}"; printf "\\0"; printf %s "${env_key}_TYPE"'
    result = subprocess.run(["bash", "-c", script, "bash", str(env_file)], cwd=work, capture_output=True,
                            env={"PATH": os.environ["PATH"], "LC_ALL": "C"}, timeout=10)
    assert result.returncode == 0, result.stderr
    value, _, token_type = result.stdout.partition(b"\0")
    return value, token_type, sorted(os.listdir(work))


HOSTILE_TOKENS = ["abc$(touch pwned)", "abc`touch pwned`", "abc;touch pwned", "abc && touch pwned", "a b",
                  "abc'$(touch pwned)'", "abc\"x", "abc\\x", "abc|x", "abc>x", "abc=def", "=abc", "abc#x",
                  "abc\u00e9", "abc%41"]


@pytest.mark.security(threat=THREAT, claim="An access_token holding shell syntax or any character outside RFC 6750 "
                      "b64token is refused as a malformed response before any sink sees it.")
@pytest.mark.parametrize("access_token", HOSTILE_TOKENS)
def test_injection_in_access_token_is_refused(access_token):
    with pytest.raises(TokenEndpointError) as info:
        parse({"access_token": access_token, "token_type": "Bearer", "expires_in": 600})
    assert info.value.error == "malformed_response" and "access_token" in str(info.value)
    assert access_token not in str(info.value)


@pytest.mark.security(threat=THREAT, claim="A token_type other than Bearer, DPoP, N_A or MAC (in any case) is refused "
                      "as a malformed response, so `;` or `$(...)` in it never reaches an env file.")
@pytest.mark.parametrize("token_type", ["Bearer;touch pwned", "Bearer $(touch pwned)", "bearer`id`", "Bearer ",
                                        "Basic", "x", "", "Bearer\nX=1"])
def test_injection_in_token_type_is_refused(token_type):
    with pytest.raises(TokenEndpointError) as info:
        parse({"access_token": "abc", "token_type": token_type, "expires_in": 600})
    assert info.value.error == "malformed_response" and "token_type" in str(info.value)


@pytest.mark.parametrize("given_type, canonical", [("bearer", "Bearer"), ("BEARER", "Bearer"), ("dpop", "DPoP"),
                                                   ("DPOP", "DPoP"), ("n_a", "N_A"), ("mac", "MAC"), ("Mac", "MAC")])
def test_known_token_types_get_their_canonical_spelling(given_type, canonical):
    assert parse({"access_token": "abc", "token_type": given_type, "expires_in": 600}).token_type == canonical


@pytest.mark.security(threat=THREAT, claim="A token endpoint answering 200 with a shell-injection access_token gets a "
                      "typed malformed_response error from the token client, not a token.")
def test_token_client_refuses_an_injected_token_from_the_endpoint(oauth):
    oauth.add_client("inj", "inj-secret", dialect="post")
    config = ClientConfig(name="inj", token_url=oauth.token_url, source={"type": "env"},
                          sinks=[{"type": "file", "path": "/unused", "format": "env"}])
    oauth.fail_next(status=200, body=json.dumps({"access_token": "x$(touch${IFS}pwned)", "token_type": "Bearer",
                                                 "expires_in": 600}))
    with pytest.raises(TokenEndpointError) as info:
        TokenClient(config).obtain("client_credentials", Credentials(client_id="inj", client_secret="inj-secret"))
    assert info.value.error == "malformed_response"
    assert TokenClient(config).obtain("client_credentials",
                                      Credentials(client_id="inj", client_secret="inj-secret")).access_token


# ---- property: whatever the validation accepts, sourcing the env file yields exactly the token and runs nothing

shell_text = st.text(alphabet=st.sampled_from(list("aZ09-._~+/=$`'\"\\;&|<>()#*?[] \t\n!{}%")), min_size=1,
                     max_size=24)
candidate_tokens = st.one_of(st.from_regex(B64TOKEN, fullmatch=True), shell_text)
candidate_types = st.one_of(st.sampled_from(["bearer", "Bearer", "BEARER", "DPoP", "dpop", "N_A", "n_a", "MAC"]),
                            shell_text)


@pytest.mark.security(threat=THREAT, claim="For every access_token and token_type the response validation accepts, "
                      "sourcing the env sink in bash yields exactly those values and runs nothing; json round-trips; "
                      "raw is the token's bytes.")
def test_every_accepted_token_renders_safely(tmp_path):
    accepted = []

    @hsettings(max_examples=150, deadline=None)
    @given(access_token=candidate_tokens, token_type=candidate_types)
    def check(access_token, token_type):
        try:
            token = parse({"access_token": access_token, "token_type": token_type, "expires_in": 600})
        except TokenEndpointError as error:
            assert error.error == "malformed_response"
            return
        accepted.append(token)
        value, sourced_type, created = sourced(tmp_path, token)
        assert value == access_token.encode()
        assert sourced_type == token.token_type.encode()
        assert created == []
        assert json.loads(render(token, "json", "ACCESS_TOKEN")) == token.document()
        assert render(token, "raw", "ACCESS_TOKEN") == access_token.encode()

    check()
    assert len(accepted) > 20  # the property was exercised, not vacuously true


@pytest.mark.security(threat=THREAT, claim="The env sink single-quotes values, so even a token that got past "
                      "validation (quotes, $(...), newlines) reads back verbatim and runs nothing when sourced.")
def test_env_quoting_holds_for_any_text(tmp_path):
    @hsettings(max_examples=120, deadline=None)
    @given(value=st.one_of(shell_text, st.text(alphabet=st.characters(blacklist_characters="\x00",
                                                                      blacklist_categories=("Cs",)), min_size=1)))
    def check(value):
        token = Token(access_token=value, token_type=value, obtained_at=SENT_AT, expires_at=SENT_AT + 600)
        read_value, read_type, created = sourced(tmp_path, token)
        assert read_value == value.encode() and read_type == value.encode()
        assert created == []

    check()
    for value in ("~/x", "~+/x", "x'$(touch pwned)'", "x$(touch pwned)", "x`touch pwned`", "x;touch pwned", "'",
                  "''\\'"):
        token = Token(access_token=value, token_type="Bearer", obtained_at=SENT_AT, expires_at=SENT_AT + 600)
        assert sourced(tmp_path, token) == (value.encode(), b"Bearer", [])


@pytest.mark.security(threat=THREAT, claim="env_key must be a shell identifier, so the variable name itself cannot "
                      "carry shell syntax into the env file.")
@pytest.mark.parametrize("env_key", ["A;touch pwned;B", "A B", "1ABC", "A-B", "$(x)", ""])
def test_env_key_must_be_a_shell_identifier(env_key):
    with pytest.raises(ValueError) as info:
        FileSinkConfig(type="file", path="/run/t", format="env", env_key=env_key)
    assert "shell variable name" in str(info.value)
    assert FileSinkConfig(type="file", path="/run/t", format="env", env_key="_PARTNER_TOKEN2").env_key
