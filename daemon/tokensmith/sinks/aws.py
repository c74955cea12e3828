"""Publish the token document as the JSON SecretString of an AWS Secrets Manager secret,
creating the secret on the first write."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from tokensmith.aws import error_code, map_client_error
from tokensmith.errors import SinkError

if TYPE_CHECKING:
    from tokensmith.backends import Backends
    from tokensmith.config import AwsSinkConfig
    from tokensmith.tokens import Token


class AwsSink:
    type = "aws"

    def __init__(self, config: "AwsSinkConfig", client_name: str, backends: "Backends"):
        self.config = config
        self.client_name = client_name
        self.backends = backends
        self.name = f"aws:{config.secret_id}"

    def check(self) -> None:
        secrets = self.backends.aws("secretsmanager")
        try:
            secrets.describe_secret(SecretId=self.config.secret_id)
        except Exception as exc:
            if error_code(exc) == "ResourceNotFoundException":
                return  # created on the first write
            raise map_client_error(exc, self.client_name, f"aws secret {self.config.secret_id}", SinkError) from exc

    def write(self, token: "Token") -> None:
        secrets = self.backends.aws("secretsmanager")
        body = json.dumps(token.document())
        where = f"aws secret {self.config.secret_id}"
        try:
            try:
                secrets.put_secret_value(SecretId=self.config.secret_id, SecretString=body)
                return
            except Exception as exc:
                if error_code(exc) != "ResourceNotFoundException":
                    raise
            extra = {"KmsKeyId": self.config.kms_key_id} if self.config.kms_key_id else {}
            secrets.create_secret(Name=self.config.secret_id, SecretString=body, **extra)
        except Exception as exc:
            error = map_client_error(exc, self.client_name, where, SinkError)
            if error_code(exc) == "ResourceExistsException":
                error.retryable = True  # another writer created it first; the next attempt puts a value
            raise error from exc
