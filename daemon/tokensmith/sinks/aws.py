"""Publish the token document as the JSON SecretString of an AWS Secrets Manager secret,
creating the secret on the first write.

A value equal to the last one written is not put again, and every put carries a ClientRequestToken
derived from the value, so a retried write (after a timeout whose request did land) makes no second
version. AWS advises at most one PutSecretValue every ten minutes per secret: a client that would
refresh more often is warned about at start-up."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from typing import TYPE_CHECKING

from tokensmith.aws import error_code, map_client_error
from tokensmith.errors import SinkError

if TYPE_CHECKING:
    from tokensmith.backends import Backends
    from tokensmith.config import AwsSinkConfig
    from tokensmith.tokens import Token


log = logging.getLogger("tokensmith.sinks.aws")
ADVISED_PUT_INTERVAL = 600.0


def request_token(body: str) -> str:
    """The ClientRequestToken for a value: the same value always gets the same (idempotent) token."""
    return str(uuid.UUID(bytes=hashlib.sha256(body.encode()).digest()[:16]))


class AwsSink:
    type = "aws"

    def __init__(self, config: "AwsSinkConfig", client_name: str, backends: "Backends"):
        self.config = config
        self.client_name = client_name
        self.backends = backends
        self.name = f"aws:{config.secret_id}"
        self._last: str | None = None

    def warn_if_too_frequent(self) -> None:
        try:
            client = self.backends.settings.client(self.client_name)
        except (KeyError, AttributeError):
            return
        every = client.refresh.default_lifetime * client.refresh.at_fraction
        if every < ADVISED_PUT_INTERVAL:
            log.warning("%s: a refresh about every %.0fs writes this secret more often than AWS advises for "
                        "PutSecretValue (about once every %.0fs)", self.name, every, ADVISED_PUT_INTERVAL,
                        extra={"client": self.client_name, "event": "aws_put_rate"})

    def check(self) -> None:
        self.warn_if_too_frequent()
        secrets = self.backends.aws("secretsmanager")
        try:
            secrets.describe_secret(SecretId=self.config.secret_id)
        except Exception as exc:
            if error_code(exc) == "ResourceNotFoundException":
                return  # created on the first write
            raise map_client_error(exc, self.client_name, f"aws secret {self.config.secret_id}", SinkError) from exc

    def write(self, token: "Token") -> None:
        body = json.dumps(token.document())
        digest = hashlib.sha256(body.encode()).hexdigest()
        if digest == self._last:
            return
        secrets = self.backends.aws("secretsmanager")
        where = f"aws secret {self.config.secret_id}"
        version = request_token(body)
        try:
            try:
                secrets.put_secret_value(SecretId=self.config.secret_id, SecretString=body,
                                         ClientRequestToken=version)
                self._last = digest
                return
            except Exception as exc:
                if error_code(exc) != "ResourceNotFoundException":
                    raise
            extra = {"KmsKeyId": self.config.kms_key_id} if self.config.kms_key_id else {}
            secrets.create_secret(Name=self.config.secret_id, SecretString=body, ClientRequestToken=version, **extra)
            self._last = digest
        except Exception as exc:
            error = map_client_error(exc, self.client_name, where, SinkError)
            if error_code(exc) == "ResourceExistsException":
                error.retryable = True  # another writer created it first; the next attempt puts a value
            raise error from exc

    def purge(self, access_token: str) -> str:
        """After a compromise: move every staging label but AWSCURRENT off the versions that hold the leaked
        token (AWSPREVIOUS would otherwise hand it out). Secrets Manager cannot delete one version; an
        unlabelled version is deprecated and removed by AWS in time. Answers what was done, for the audit."""
        secrets = self.backends.aws("secretsmanager")
        where = f"aws secret {self.config.secret_id}"
        moved, kept = [], []
        try:
            listing = secrets.list_secret_version_ids(SecretId=self.config.secret_id, IncludeDeprecated=True)
            for version in listing.get("Versions", []):
                version_id = version["VersionId"]
                value = secrets.get_secret_value(SecretId=self.config.secret_id, VersionId=version_id)
                try:
                    holds = json.loads(value.get("SecretString") or "{}").get("access_token") == access_token
                except (ValueError, AttributeError):
                    holds = False
                if not holds:
                    continue
                for stage in version.get("VersionStages", []):
                    if stage == "AWSCURRENT":
                        kept.append(version_id)
                        continue
                    secrets.update_secret_version_stage(SecretId=self.config.secret_id, VersionStage=stage,
                                                        RemoveFromVersionId=version_id)
                    moved.append(f"{stage} off {version_id}")
                if not version.get("VersionStages"):
                    kept.append(version_id)
        except Exception as exc:
            raise map_client_error(exc, self.client_name, where, SinkError) from exc
        if not moved and not kept:
            return "no version holds the old token"
        text = f"moved {', '.join(moved)}" if moved else "no label to move"
        if kept:
            text += ("; not removed: version(s) " + ", ".join(kept) + " (Secrets Manager cannot delete a single "
                     "version; unlabelled versions are dropped by AWS)")
        return text

