"""The errors tokensmith raises, converted where a library's exception enters.

    TokensmithError            client, retryable; str() is one line and never holds a secret
    ├── ConfigError            a config that cannot work (`run` exits 78, EX_CONFIG)
    ├── SourceError            credentials could not be read (Vault, AWS, file, env)
    ├── TokenEndpointError     the token endpoint refused or failed; .error is the OAuth code
    │                          (invalid_client, invalid_grant, ...), .status the HTTP status,
    │                          .retry_after seconds when the server said so
    ├── SinkError              a token could not be written to a sink
    ├── StateError             the state directory could not be read or written
    └── InternalError          an exception no backend converted (a bug): the keeper records it as a
                               failure naming only its type, since its text may hold anything

Each backend maps its library's exceptions into this tree with ``raise ... from exc``;
the keeper is the only layer that retries, and it asks ``retryable``.
"""

from __future__ import annotations


class TokensmithError(Exception):
    retryable = False

    def __init__(self, message: str, *, client: str | None = None, retryable: bool | None = None):
        self.message = " ".join(str(message).split())
        self.client = client
        if retryable is not None:
            self.retryable = retryable
        super().__init__(self.message)

    def __str__(self) -> str:
        prefix = f"client {self.client}: " if self.client else ""
        return prefix + self.message


class ConfigError(TokensmithError):
    pass


class SourceError(TokensmithError):
    retryable = True


class TokenEndpointError(TokensmithError):
    retryable = True

    def __init__(self, message: str, *, client: str | None = None, retryable: bool | None = None,
                 error: str | None = None, status: int | None = None, retry_after: float | None = None):
        super().__init__(message, client=client, retryable=retryable)
        self.error = error
        self.status = status
        self.retry_after = retry_after

    @property
    def reason(self) -> str:
        """A short label for metrics and status: the OAuth code, else the HTTP status class."""
        if self.error:
            return self.error
        if self.status:
            return f"http_{self.status}"
        return "transport"


class SinkError(TokensmithError):
    retryable = True


class StateError(TokensmithError):
    pass


class InternalError(TokensmithError):
    retryable = True
