"""Credential sources: where client_id, client_secret and, per grant, username/password or a
bootstrap refresh token come from. One small module per store, registered in SOURCES by the
config's `type`; modules are imported only when a config uses them (boto3 is heavy)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from tokensmith.errors import SourceError

if TYPE_CHECKING:
    from tokensmith.backends import Backends
    from tokensmith.config import ClientConfig


@dataclass(frozen=True)
class Credentials:
    client_id: str
    client_secret: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    refresh_token: str | None = field(default=None, repr=False)
    private_key: str | None = field(default=None, repr=False)
    certificate: str | None = field(default=None, repr=False)
    proxy_username: str | None = field(default=None, repr=False)
    proxy_password: str | None = field(default=None, repr=False)

    def secrets(self) -> list[str]:
        return [value for value in (self.client_secret, self.password, self.refresh_token, self.private_key,
                                    self.proxy_password) if value]


class Source(Protocol):
    def read(self) -> Credentials: ...


SOURCES = {
    "file": "tokensmith.sources.file:FileSource",
    "env": "tokensmith.sources.env:EnvSource",
    "vault": "tokensmith.sources.vault:VaultSource",
    "aws": "tokensmith.sources.aws:AwsSource",
}


def build_source(client: "ClientConfig", backends: "Backends") -> Source:
    module, _, name = SOURCES[client.source.type].partition(":")
    return getattr(importlib.import_module(module), name)(client, backends)


def credentials_from_mapping(data: dict, client: "ClientConfig", where: str) -> Credentials:
    """Pick the mapped keys out of a secret's key/value data and check the grant has what it needs."""
    keys = client.source.keys

    def get(field_name: str) -> str | None:
        value = data.get(getattr(keys, field_name))
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise SourceError(f"{where}: key {getattr(keys, field_name)!r} must be a string", client=client.name,
                              retryable=False)
        return value

    creds = Credentials(client_id=get("client_id") or "", client_secret=get("client_secret"),
                        username=get("username"), password=get("password"), refresh_token=get("refresh_token"),
                        private_key=get("private_key"), certificate=get("certificate"),
                        proxy_username=get("proxy_username"), proxy_password=get("proxy_password"))
    needed = ["client_id"]
    needed += {"client_secret_jwt": ["client_secret"], "private_key_jwt": ["private_key"],
               "tls_client_auth": ["certificate", "private_key"]}.get(client.auth_style, [])
    if client.grant == "password":
        needed += ["username", "password"]
    if client.grant == "refresh_token":
        needed += ["refresh_token"]
    missing = [getattr(keys, name) for name in needed if not getattr(creds, name)]
    if missing:
        raise SourceError(f"{where}: missing key(s) {', '.join(missing)}", client=client.name, retryable=False)
    return creds
