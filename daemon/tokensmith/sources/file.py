"""Credentials from a local file (development, or a file a secrets operator mounts).

JSON object or KEY=value lines. A file readable by group or others is refused: a credential
store that leaks is worse than one that fails."""

from __future__ import annotations

import json
import os
import stat

from tokensmith.errors import SourceError
from tokensmith.sources import Credentials, credentials_from_mapping


def parse_key_values(text: str) -> dict[str, str]:
    data = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if sep:
            data[key.strip()] = value.strip().strip("'\"")
    return data


class FileSource:
    __slots__ = ("client", "path", "_last")

    def __init__(self, client, backends):
        self.client = client
        self.path = client.source.path
        self._last: tuple[tuple, Credentials] | None = None

    def read(self) -> Credentials:
        # one stat instead of an open, a read and a parse when the file has not changed since
        try:
            st = os.stat(self.path)
            signature = (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except OSError:
            signature = None
        if signature is not None and self._last is not None and self._last[0] == signature:
            return self._last[1]
        creds = self._read()
        self._last = (signature, creds) if signature is not None else None
        return creds

    def _read(self) -> Credentials:
        where = f"credentials file {self.path}"
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"cannot open {where}: {exc.strerror}", client=self.client.name,
                              retryable=False) from exc
        with os.fdopen(fd, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise SourceError(f"{where} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
                                  f"chmod 600 it", client=self.client.name, retryable=False)
            raw = handle.read(1 << 20)
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise SourceError(f"{where} is not UTF-8 text", client=self.client.name, retryable=False) from None
        if text.lstrip().startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                raise SourceError(f"{where} is not valid JSON", client=self.client.name, retryable=False) from None
        else:
            data = parse_key_values(text)
            if not data and any(": " in line for line in text.splitlines()):
                where += " (it looks like YAML, which is not read: write a JSON object or KEY=value lines)"
        return credentials_from_mapping(data, self.client, where)
