"""Client credentials from an AWS Secrets Manager secret whose SecretString is a JSON object.

Read fresh on every call so a rotation is picked up; the keeper caches last-good."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from tokensmith.aws import map_client_error
from tokensmith.errors import SourceError
from tokensmith.sources import Credentials, credentials_from_mapping

if TYPE_CHECKING:
    from tokensmith.backends import Backends
    from tokensmith.config import ClientConfig


class AwsSource:
    def __init__(self, client: "ClientConfig", backends: "Backends"):
        self.client = client
        self.secret_id = client.source.secret_id
        self.backends = backends

    def read(self) -> Credentials:
        where = f"aws secret {self.secret_id}"
        secrets = self.backends.aws("secretsmanager")
        try:
            response = secrets.get_secret_value(SecretId=self.secret_id)
        except Exception as exc:
            raise map_client_error(exc, self.client.name, where, SourceError) from exc
        text = response.get("SecretString")
        if text is None:
            raise SourceError(f"{where}: has no SecretString (binary secrets are not supported)",
                              client=self.client.name, retryable=False)
        try:
            data = json.loads(text)
        except ValueError:
            data = None  # JSONDecodeError keeps the whole document: it must not travel as __cause__
        if not isinstance(data, dict):
            raise SourceError(f"{where}: SecretString is not a JSON object", client=self.client.name,
                              retryable=False)
        return credentials_from_mapping(data, self.client, where=where)
