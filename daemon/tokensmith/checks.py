"""check-config's look at the machine, after the config itself validated: the files and directories
the config names exist with safe modes and are writable by the user running the check (under the
unit, the service's user), and with `online` the secret stores and token endpoints answer.

Every problem is collected; nothing here prints, and no secret read during an online check leaves
this module."""

from __future__ import annotations

import os
import shutil
import socket
import stat
from pathlib import Path
from urllib.parse import urlsplit

from tokensmith.errors import TokensmithError


class Problems(list):
    def add(self, where: str | None, message: str) -> None:
        self.append({"where": where, "message": message})


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable_dir(problems: Problems, where: str, path: Path, what: str) -> None:
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            problems.add(where, f"{what} {path} is not writable by uid {os.geteuid()}")
    elif path.exists():
        problems.add(where, f"{what} {path} is not a directory")
    else:
        parent = _nearest_existing(path)
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            problems.add(where, f"{what} {path} does not exist and cannot be created in {parent}")


def looks_like_yaml(text: str) -> bool:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return bool(lines) and not any("=" in line for line in lines) and any(": " in line or line.endswith(":")
                                                                          for line in lines)


def _secret_file(problems: Problems, where: str | None, path: Path, what: str, *, private: bool = True,
                 yaml_hint: bool = False) -> None:
    try:
        st = os.stat(path)
        with open(path, "rb") as handle:
            head = handle.read(1 << 16)
    except FileNotFoundError:
        problems.add(where, f"{what} {path} does not exist")
        return
    except OSError as exc:
        problems.add(where, f"{what} {path} cannot be read by uid {os.geteuid()}: {exc.strerror}")
        return
    if not stat.S_ISREG(st.st_mode):
        problems.add(where, f"{what} {path} is not a regular file")
    elif private and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        problems.add(where, f"{what} {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                            f"chmod 600 it")
    if yaml_hint and not head.lstrip().startswith(b"{"):
        try:
            text = head.decode()
        except UnicodeDecodeError:
            return
        if looks_like_yaml(text):
            problems.add(where, f"{what} {path} looks like YAML (key: value), which is not read: write a JSON "
                                f"object or KEY=value lines")


def _client_where(index: int, name: str) -> str:
    return f"clients[{index}]({name})"


def host_problems(settings, *, online: bool = False) -> Problems:
    from tokensmith.backends import check_extras

    problems = Problems()
    try:
        check_extras(settings)
    except TokensmithError as exc:
        problems.add(None, str(exc))
        online = False  # the backends cannot even be imported
    _writable_dir(problems, "state_dir", settings.state_dir, "state directory")
    _writable_dir(problems, "runtime_dir", settings.runtime_dir, "runtime directory")
    if settings.audit_log is not None:
        _writable_dir(problems, "audit_log", settings.audit_log.parent, "audit log directory")
    if settings.vault is not None:
        auth = settings.vault.auth
        for field in ("token_file", "secret_id_file", "key_file"):
            if getattr(auth, field) is not None:
                _secret_file(problems, f"vault.auth.{field}", getattr(auth, field), "vault credential file")
        if auth.method == "kubernetes":
            _secret_file(problems, "vault.auth.jwt_file", auth.jwt_file, "service-account token", private=False)
        if auth.cert_file is not None:
            _secret_file(problems, "vault.auth.cert_file", auth.cert_file, "client certificate", private=False)
        if settings.vault.ca_bundle is not None:
            _secret_file(problems, "vault.ca_bundle", settings.vault.ca_bundle, "CA bundle", private=False)
    for index, client in enumerate(settings.clients):
        where = _client_where(index, client.name)
        if client.source.type == "file":
            _secret_file(problems, f"{where}.source.path", client.source.path, "credentials file", yaml_hint=True)
        if client.ca_bundle is not None:
            _secret_file(problems, f"{where}.ca_bundle", client.ca_bundle, "CA bundle", private=False)
        for number, sink in enumerate(client.sinks):
            if sink.type == "file":
                from tokensmith.sinks.file import FileSink

                try:
                    FileSink(sink, client.name).check()
                except TokensmithError as exc:
                    problems.add(f"{where}.sinks[{number}]", exc.message)
        for number, hook in enumerate(client.hooks):
            if hook.type == "command":
                program = hook.argv[0]
                found = shutil.which(program) if "/" not in program else (program if os.access(program, os.X_OK)
                                                                          else None)
                if found is None:
                    problems.add(f"{where}.hooks[{number}]", f"command {program} is not an executable program")
    if online:
        _online(problems, settings)
    return problems


def _online(problems: Problems, settings) -> None:
    from tokensmith.backends import Backends
    from tokensmith.sinks import build_sinks
    from tokensmith.sources import build_source

    backends = Backends(settings)
    endpoints: dict[tuple, str] = {}
    for index, client in enumerate(settings.clients):
        where = _client_where(index, client.name)
        try:
            build_source(client, backends).read()  # proves the store answers and the secret is readable
        except TokensmithError as exc:
            problems.add(f"{where}.source", exc.message)
        for number, sink in enumerate(build_sinks(client, backends)):
            if sink.type != "file":
                try:
                    sink.check()
                except TokensmithError as exc:
                    problems.add(f"{where}.sinks[{number}]", exc.message)
        parts = urlsplit(client.token_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        key = (parts.hostname, port)
        if key in endpoints:
            if endpoints[key]:
                problems.add(f"{where}.token_url", endpoints[key])
            continue
        endpoint = f"{parts.scheme}://{parts.netloc}{parts.path}"
        try:
            socket.create_connection(key, timeout=min(client.timeout, 10)).close()
            endpoints[key] = ""
        except OSError as exc:
            endpoints[key] = f"cannot reach token endpoint {endpoint} ({exc.strerror or type(exc).__name__})"
            problems.add(f"{where}.token_url", endpoints[key])
