"""The file sink: a token file for a sidecar or host service, replaced atomically.

A symlink at the sink path is replaced by the new file, never written through: following it
would let whoever controls the link's target choose where a token lands."""

from __future__ import annotations

import grp
import json
import os

from tokensmith.errors import SinkError
from tokensmith.fsutil import atomic_write, holds


def _sh_quote(value: str) -> str:
    """Single-quoted for POSIX sh and systemd EnvironmentFile=: nothing inside is expanded or run."""
    return "'" + value.replace("'", "'\\''") + "'"


def render(token, fmt: str, env_key: str) -> bytes:
    if fmt == "json":
        return (json.dumps(token.document()) + "\n").encode()
    if fmt == "env":
        return (f"{env_key}={_sh_quote(token.access_token)}\n"
                f"{env_key}_TYPE={_sh_quote(token.token_type)}\n"
                f"{env_key}_EXPIRES_AT={int(token.expires_at)}\n").encode()
    return token.access_token.encode()


class FileSink:
    type = "file"
    __slots__ = ("config", "client", "path", "name", "gid")

    def __init__(self, config, client_name: str, backends=None):
        self.config = config
        self.client = client_name
        self.path = config.path
        self.name = f"file:{config.path}"
        self.gid: int | None = None

    def _resolve_group(self) -> int | None:
        if self.config.group is None:
            return None
        try:
            return grp.getgrnam(self.config.group).gr_gid
        except KeyError:
            raise SinkError(f"{self.name}: group {self.config.group!r} does not exist", client=self.client,
                            retryable=False) from None

    def check(self) -> None:
        self.gid = self._resolve_group()
        directory = self.path.parent
        if not directory.is_dir():
            raise SinkError(f"{self.name}: directory {directory} does not exist", client=self.client, retryable=False)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise SinkError(f"{self.name}: directory {directory} is not writable", client=self.client,
                            retryable=False)
        if self.path.is_dir() and not self.path.is_symlink():  # a symlink, even to a directory, is replaced
            # retryable: a directory planted here must not stop the daemon (and every other client)
            raise SinkError(f"{self.name}: path is a directory; the token is written once it is removed",
                            client=self.client, retryable=True)

    def holds(self, token) -> bool:
        """The file is its own record of which token it holds: a restart reads it instead of the
        keeper persisting a record after every write."""
        return holds(self.path, render(token, self.config.format, self.config.env_key))

    def write(self, token) -> None:
        data = render(token, self.config.format, self.config.env_key)
        try:
            atomic_write(self.path, data, mode=self.config.mode, gid=self.gid)
        except IsADirectoryError as exc:
            raise SinkError(f"{self.name}: path is a directory; the token is written once it is removed",
                            client=self.client, retryable=True) from exc
        except OSError as exc:
            raise SinkError(f"{self.name}: write failed: {exc.strerror or exc}", client=self.client,
                            retryable=True) from exc
