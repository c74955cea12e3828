"""Credentials from environment variables: <prefix><KEY> with the mapped key names upper-cased."""

from __future__ import annotations

import os

from tokensmith.sources import Credentials, credentials_from_mapping


class EnvSource:
    def __init__(self, client, backends, environ=None):
        self.client = client
        self.environ = os.environ if environ is None else environ

    def read(self) -> Credentials:
        prefix = self.client.source.prefix
        keys = self.client.source.keys
        data = {}
        for field in ("client_id", "client_secret", "username", "password", "refresh_token", "private_key", "certificate",
                      "proxy_username", "proxy_password"):
            key = getattr(keys, field)
            value = self.environ.get(prefix + key.upper())
            if value is not None:
                data[key] = value
        return credentials_from_mapping(data, self.client, f"environment (prefix {prefix or 'none'})")
