"""EnvSource: <prefix><KEY> variables with the mapped key names upper-cased, per-grant checks."""

import pytest

from tokensmith.config import ClientConfig
from tokensmith.errors import SourceError
from tokensmith.sources.env import EnvSource

SECRET = "env-Client-Secret-4Tm9"
PASSWORD = "env-User-Password-6Yb"


def config(prefix="BILLING_", grant="client_credentials", keys=None):
    source = {"type": "env", "prefix": prefix}
    if keys:
        source["keys"] = keys
    return ClientConfig(name="billing-api", token_url="https://auth.example/oauth2/token", grant=grant, source=source,
                        sinks=[{"type": "file", "path": "/run/tokensmith/billing-api.token"}])


def read(environ, **kwargs):
    return EnvSource(config(**kwargs), backends=None, environ=environ).read()


def read_error(environ, **kwargs) -> SourceError:
    with pytest.raises(SourceError) as info:
        read(environ, **kwargs)
    assert "billing-api" in str(info.value)
    assert SECRET not in str(info.value) and PASSWORD not in str(info.value)
    assert info.value.retryable is False
    return info.value


def test_prefix_maps_to_upper_cased_key_names():
    creds = read({"BILLING_CLIENT_ID": "billing", "BILLING_CLIENT_SECRET": SECRET,
                  "CLIENT_ID": "unprefixed", "OTHER_CLIENT_SECRET": "other"})
    assert (creds.client_id, creds.client_secret) == ("billing", SECRET)


def test_empty_prefix_reads_plain_names():
    creds = read({"CLIENT_ID": "plain", "CLIENT_SECRET": SECRET}, prefix="")
    assert (creds.client_id, creds.client_secret) == ("plain", SECRET)


def test_mapped_key_names_are_upper_cased():
    creds = read({"BILLING_ID": "billing", "BILLING_SECRET": SECRET, "BILLING_CLIENT_ID": "not-this"},
                 keys={"client_id": "id", "client_secret": "secret"})
    assert (creds.client_id, creds.client_secret) == ("billing", SECRET)


def test_password_grant_reads_user_fields():
    creds = read({"BILLING_CLIENT_ID": "billing", "BILLING_CLIENT_SECRET": SECRET, "BILLING_USERNAME": "svc",
                  "BILLING_PASSWORD": PASSWORD}, grant="password")
    assert (creds.username, creds.password) == ("svc", PASSWORD)


def test_password_grant_needs_username_and_password():
    error = read_error({"BILLING_CLIENT_ID": "billing", "BILLING_CLIENT_SECRET": SECRET}, grant="password")
    assert "username" in str(error) and "password" in str(error)
    assert "BILLING_" in str(error)


def test_refresh_token_grant_needs_refresh_token():
    error = read_error({"BILLING_CLIENT_ID": "billing", "BILLING_CLIENT_SECRET": SECRET}, grant="refresh_token")
    assert "refresh_token" in str(error)
    creds = read({"BILLING_CLIENT_ID": "billing", "BILLING_REFRESH_TOKEN": "rt-1"}, grant="refresh_token")
    assert creds.refresh_token == "rt-1"


def test_missing_client_id_is_refused():
    assert "client_id" in str(read_error({"BILLING_CLIENT_SECRET": SECRET}))


def test_empty_variable_counts_as_missing():
    error = read_error({"BILLING_CLIENT_ID": "billing", "BILLING_CLIENT_SECRET": SECRET, "BILLING_USERNAME": "",
                        "BILLING_PASSWORD": PASSWORD}, grant="password")
    assert "username" in str(error)


def test_changed_environment_is_read_again():
    environ = {"BILLING_CLIENT_ID": "billing", "BILLING_CLIENT_SECRET": "old-secret"}
    source = EnvSource(config(), backends=None, environ=environ)
    assert source.read().client_secret == "old-secret"
    environ["BILLING_CLIENT_SECRET"] = "new-secret"
    assert source.read().client_secret == "new-secret"


def test_process_environment_is_the_default(monkeypatch):
    monkeypatch.setenv("TSTEST_BILLING_CLIENT_ID", "from-process-env")
    source = EnvSource(config(prefix="TSTEST_BILLING_"), backends=None)
    assert source.read().client_id == "from-process-env"
