"""FileSource: JSON or KEY=value credential files, mapped keys, per-grant checks, permissions, rotation."""

import json
import os

import pytest

from tokensmith.config import ClientConfig
from tokensmith.errors import SourceError
from tokensmith.sources import build_source
from tokensmith.sources.file import FileSource, parse_key_values

SECRET = "file-Client-Secret-8Kp3"
PASSWORD = "file-User-Password-2Rv"


def config(path, grant="client_credentials", keys=None, name="billing-api"):
    source = {"type": "file", "path": str(path)}
    if keys:
        source["keys"] = keys
    return ClientConfig(name=name, token_url="https://auth.example/oauth2/token", grant=grant, source=source,
                        sinks=[{"type": "file", "path": f"/run/tokensmith/{name}.token"}])


def credentials_file(tmp_path, text, mode=0o600, name="creds"):
    path = tmp_path / name
    path.write_text(text)
    os.chmod(path, mode)
    return path


def read(path, **kwargs):
    return FileSource(config(path, **kwargs), backends=None).read()


def read_error(path, **kwargs) -> SourceError:
    with pytest.raises(SourceError) as info:
        read(path, **kwargs)
    assert "billing-api" in str(info.value)
    assert SECRET not in str(info.value) and PASSWORD not in str(info.value)
    return info.value


def test_json_file(tmp_path):
    path = credentials_file(tmp_path, json.dumps({"client_id": "billing", "client_secret": SECRET}))
    creds = read(path)
    assert (creds.client_id, creds.client_secret) == ("billing", SECRET)
    assert creds.username is None and creds.password is None and creds.refresh_token is None
    assert SECRET not in repr(creds)


def test_key_value_file(tmp_path):
    path = credentials_file(tmp_path, "# billing client\n\n"
                                      "client_id=billing\n"
                                      f"export client_secret='{SECRET}'\n"
                                      " username = svc-user \n"
                                      f'password="{PASSWORD}"\n'
                                      "not a pair\n")
    creds = read(path, grant="password")
    assert (creds.client_id, creds.client_secret, creds.username, creds.password) == \
        ("billing", SECRET, "svc-user", PASSWORD)


def test_key_value_value_may_contain_equals_signs():
    assert parse_key_values("client_secret=a=b==\n") == {"client_secret": "a=b=="}


def test_mapped_key_names(tmp_path):
    path = credentials_file(tmp_path, json.dumps({"id": "billing", "secret": SECRET, "client_id": "not-this"}))
    creds = read(path, keys={"client_id": "id", "client_secret": "secret"})
    assert (creds.client_id, creds.client_secret) == ("billing", SECRET)


def test_mapped_key_names_in_key_value_file(tmp_path):
    path = credentials_file(tmp_path, f"ID=billing\nSECRET={SECRET}\nUSER=svc\nPASS={PASSWORD}\n")
    creds = read(path, grant="password", keys={"client_id": "ID", "client_secret": "SECRET", "username": "USER",
                                               "password": "PASS"})
    assert (creds.client_id, creds.client_secret, creds.username, creds.password) == \
        ("billing", SECRET, "svc", PASSWORD)


def test_build_source_makes_a_file_source(tmp_path):
    path = credentials_file(tmp_path, json.dumps({"client_id": "billing", "client_secret": SECRET}))
    assert build_source(config(path), backends=None).read().client_id == "billing"


def test_missing_client_id_is_refused(tmp_path):
    error = read_error(credentials_file(tmp_path, json.dumps({"client_secret": SECRET})))
    assert "client_id" in str(error)
    assert error.retryable is False


def test_password_grant_needs_username_and_password(tmp_path):
    path = credentials_file(tmp_path, json.dumps({"client_id": "billing", "client_secret": SECRET}))
    error = read_error(path, grant="password")
    assert "username" in str(error) and "password" in str(error)
    path.write_text(json.dumps({"client_id": "billing", "client_secret": SECRET, "username": "svc"}))
    error = read_error(path, grant="password")
    assert "missing key(s) password" in str(error)


def test_password_grant_names_the_mapped_key_that_is_missing(tmp_path):
    path = credentials_file(tmp_path, json.dumps({"client_id": "billing", "client_secret": SECRET, "user": "svc"}))
    error = read_error(path, grant="password", keys={"username": "user", "password": "user_password"})
    assert "user_password" in str(error)


def test_refresh_token_grant_needs_refresh_token(tmp_path):
    path = credentials_file(tmp_path, json.dumps({"client_id": "billing", "client_secret": SECRET,
                                                  "refresh_token": ""}))
    error = read_error(path, grant="refresh_token")
    assert "refresh_token" in str(error)
    path.write_text(json.dumps({"client_id": "billing", "client_secret": SECRET, "refresh_token": "rt-1"}))
    assert read(path, grant="refresh_token").refresh_token == "rt-1"


def test_client_credentials_grant_does_not_need_user_fields(tmp_path):
    path = credentials_file(tmp_path, json.dumps({"client_id": "billing", "client_secret": SECRET}))
    assert read(path, grant="client_credentials").client_secret == SECRET


def test_non_string_value_is_refused_naming_the_key(tmp_path):
    path = credentials_file(tmp_path, json.dumps({"client_id": "billing", "client_secret": 12345}))
    error = read_error(path)
    assert "client_secret" in str(error) and "12345" not in str(error)


@pytest.mark.security(threat="local user", claim="A credentials file readable by its group or by others is refused, "
                                                 "naming the path and never the content.")
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o610])
def test_file_readable_by_others_is_refused_naming_the_path_not_the_content(tmp_path, mode):
    path = credentials_file(tmp_path, json.dumps({"client_id": "billing", "client_secret": SECRET}), mode=mode)
    error = read_error(path)
    assert str(path) in str(error)
    assert error.retryable is False


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_file_is_accepted(tmp_path, mode):
    path = credentials_file(tmp_path, json.dumps({"client_id": "billing", "client_secret": SECRET}), mode=mode)
    assert read(path).client_id == "billing"


def test_missing_file_names_the_path(tmp_path):
    error = read_error(tmp_path / "absent.json")
    assert str(tmp_path / "absent.json") in str(error)


@pytest.mark.security(threat="hostile secret store", claim="A credentials file that is not valid JSON is refused "
                                                           "without echoing its content.")
def test_invalid_json_does_not_echo_the_content(tmp_path):
    path = credentials_file(tmp_path, '{"client_id": "billing", "client_secret": "' + SECRET + '",')
    error = read_error(path)
    assert str(path) in str(error) and "JSON" in str(error)


def test_not_utf8_is_refused(tmp_path):
    path = tmp_path / "creds"
    path.write_bytes(b"client_id=billing\nclient_secret=\xff\xfe\n")
    os.chmod(path, 0o600)
    assert str(path) in str(read_error(path))


def test_rotated_file_is_read_again(tmp_path):
    path = credentials_file(tmp_path, json.dumps({"client_id": "billing", "client_secret": "old-secret"}))
    source = FileSource(config(path), backends=None)
    assert source.read().client_secret == "old-secret"
    # Rotated the way secret operators do it: a new file renamed over the old one.
    new = credentials_file(tmp_path, json.dumps({"client_id": "billing", "client_secret": "new-secret"}),
                           name="creds.new")
    os.replace(new, path)
    assert source.read().client_secret == "new-secret"
    # ... and rewritten in place.
    path.write_text("client_id=billing\nclient_secret=newest-secret\n")
    assert source.read().client_secret == "newest-secret"


def test_an_unchanged_file_is_not_read_again_and_a_rotated_one_is(tmp_path):
    path = credentials_file(tmp_path, json.dumps({"client_id": "billing", "client_secret": SECRET}))
    source = FileSource(config(path), backends=None)
    first = source.read()
    assert source.read() is first, "an unchanged file was parsed again"
    rotated = SECRET + "-rotated"
    replacement = credentials_file(tmp_path, json.dumps({"client_id": "billing", "client_secret": rotated}),
                                   name="creds.new")
    os.replace(replacement, path)  # how secret operators and editors replace a file
    assert source.read().client_secret == rotated
    path.write_text(json.dumps({"client_id": "billing", "client_secret": SECRET}))  # rewritten in place
    assert source.read().client_secret == SECRET


def test_a_cached_file_opened_to_others_later_is_refused(tmp_path):
    path = credentials_file(tmp_path, json.dumps({"client_id": "billing", "client_secret": SECRET}))
    source = FileSource(config(path), backends=None)
    source.read()
    os.chmod(path, 0o644)
    with pytest.raises(SourceError, match="accessible by group or others"):
        source.read()
