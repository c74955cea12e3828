"""A cache of the validated config, so `tokensmith run` need not import pydantic or build its models
before the first token when the config has not changed.

After a full validation the validated config is written as JSON (configview.py reads it back as
read-only views). It is used only when its key matches: the config file's path and bytes, every
variable validation reads (TOKENSMITH_*, STATE_DIRECTORY, RUNTIME_DIRECTORY), the user names
control_operators resolved, and the tokensmith version and sources. Anything else - a miss, a corrupt
or foreign file, a wrong mode - means a full validation, as without the cache, and a new entry.

The cache lives in config/ under $CACHE_DIRECTORY (systemd's CacheDirectory=), else
$XDG_CACHE_HOME/tokensmith, else ~/.cache/tokensmith: a directory of this user's, 0700, with one 0600
file per config path. It
holds what the config holds, so inline secrets too; a secret given in a TOKENSMITH_* variable is never
written there (no cache is kept for such a config).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from pathlib import Path, PurePath

import tokensmith
from tokensmith.configview import decoder

FORMAT = 1
ENV_NAMES = ("STATE_DIRECTORY", "RUNTIME_DIRECTORY")
SOURCES = ("config.py", "configview.py", "configcache.py", "proxy.py", "control.py")  # what validation runs
SCALARS = (str, int, float, bool, type(None))


class Unusable(Exception):
    """The cache entry cannot be used; the message says why (for one DEBUG line)."""


def cache_dir(environ=os.environ) -> Path | None:
    if environ.get("CACHE_DIRECTORY"):
        base = Path(environ["CACHE_DIRECTORY"].split(":")[0])
    elif environ.get("XDG_CACHE_HOME"):
        base = Path(environ["XDG_CACHE_HOME"]) / "tokensmith"
    elif environ.get("HOME"):
        base = Path(environ["HOME"]) / ".cache" / "tokensmith"
    else:
        return None
    return base / "config"  # 0700 of its own: systemd makes CacheDirectory= 0755


def entry_path(config_path, environ=os.environ) -> Path | None:
    directory = cache_dir(environ)
    if directory is None:
        return None
    where = os.path.abspath(config_path) if config_path else "<environment>"
    return directory / f"config-{hashlib.sha256(where.encode('utf-8', 'surrogateescape')).hexdigest()[:24]}.json"


def relevant_env(environ) -> list[list[str]]:
    return sorted([name, value] for name, value in environ.items()
                  if name.startswith("TOKENSMITH_") or name in ENV_NAMES)


def cache_key(config_path, content: bytes, environ) -> str:
    digest = hashlib.sha256()
    package = Path(tokensmith.__file__).parent
    parts = [FORMAT, tokensmith.__version__, sys.version, os.geteuid(),
             os.path.abspath(config_path) if config_path else None, relevant_env(environ)]
    digest.update(json.dumps(parts).encode("utf-8", "surrogateescape"))
    for name in SOURCES:  # an edited install (or a development tree) must not reuse an old result
        try:
            digest.update((package / name).read_bytes())
        except OSError:
            digest.update(b"-")
    digest.update(b"\0config\0")
    digest.update(content)
    return digest.hexdigest()


# ---- writing (after a full validation, with pydantic loaded)

def encode(value, schema: dict):
    from pydantic import BaseModel, SecretStr

    def walk(value):
        if type(value) in SCALARS:
            return value
        if isinstance(value, BaseModel):
            name = type(value).__name__
            fields = tuple(type(value).model_fields)
            if schema.setdefault(name, fields) != fields:
                raise TypeError(f"two config models are named {name}")
            bits = sum(1 << index for index, field in enumerate(fields) if field in value.model_fields_set)
            return {"@": name, "v": [walk(getattr(value, field)) for field in fields], "f": bits}
        if isinstance(value, SecretStr):
            return {"s": value.get_secret_value()}
        if isinstance(value, PurePath):
            return {"p": str(value)}
        if isinstance(value, (list, tuple)):
            return [walk(item) for item in value]
        if isinstance(value, dict) and all(type(key) is str for key in value):
            return {"d": [[key, walk(item)] for key, item in value.items()]}
        raise TypeError(f"a config value of type {type(value).__name__} is not cached")

    return walk(value)


def secrets_of(value, found: list) -> list:
    if hasattr(value, "get_secret_value"):
        found.append(value.get_secret_value())
    elif hasattr(type(value), "model_fields"):
        for field in type(value).model_fields:
            secrets_of(getattr(value, field), found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            secrets_of(item, found)
    return found


def as_view(settings):
    """The view of a validated model (what a cache hit would give)."""
    schema: dict = {}
    body = json.dumps(encode(settings, schema))
    return json.loads(body, object_hook=decoder(schema))


def operator_names(config_path, environ) -> dict[str, int]:
    """The user names control_operators gave, with the uids they resolved to."""
    from tokensmith.config import read_config_data

    data = read_config_data(Path(config_path) if config_path else None, environ)
    entries = data.get("control_operators") if isinstance(data, dict) else None
    names = [entry for entry in entries or () if isinstance(entry, str) and not (entry.isascii() and entry.isdigit())]
    if not names:
        return {}
    import pwd

    return {name: pwd.getpwnam(name).pw_uid for name in names}


def write(entry: Path, key: str, settings, operators: dict[str, int], environ) -> str:
    from tokensmith.fsutil import atomic_write, make_dirs

    secrets = [secret for secret in secrets_of(settings, []) if secret]
    overrides = [value for name, value in relevant_env(environ) if name.startswith("TOKENSMITH_")]
    if any(secret in value for secret in secrets for value in overrides):
        try:
            entry.unlink()
        except OSError:
            pass
        return "not cached: a secret comes from a TOKENSMITH_* variable"
    schema: dict = {}
    body = json.dumps(encode(settings, schema), separators=(",", ":"))
    header = json.dumps({"format": FORMAT, "key": key, "schema": schema, "operators": operators,
                         "body": hashlib.sha256(body.encode("ascii")).hexdigest()}, separators=(",", ":"))
    make_dirs(entry.parent, 0o700)
    check_directory(entry.parent)
    atomic_write(entry, (header + "\n" + body).encode("ascii"), mode=0o600, sync_dir=False)
    return "cached"


# ---- reading (no pydantic)

def check_directory(directory: Path) -> None:
    info = os.stat(directory, follow_symlinks=False)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise Unusable(f"cache directory {directory} is not this user's alone (owner and mode 0700)")


def read(entry: Path, key: str):
    try:
        check_directory(entry.parent)
        fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Unusable("no cache entry") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise Unusable(f"cache entry {entry} is not this user's alone (owner and mode 0600)")
        data = handle.read()
    header, _, body = data.partition(b"\n")
    meta = json.loads(header)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("key") != key:
        raise Unusable("the config, its environment or tokensmith changed")
    if meta.get("body") != hashlib.sha256(body).hexdigest():
        raise Unusable("the cache entry is damaged")
    operators = meta["operators"]
    if operators:
        import pwd

        for name, uid in operators.items():
            try:
                if pwd.getpwnam(name).pw_uid != uid:
                    raise Unusable(f"user {name} now has another uid")
            except KeyError:
                raise Unusable(f"user {name} no longer exists") from None
    settings = json.loads(body, object_hook=decoder(meta["schema"]))
    if type(settings).__name__ != "Settings" or not settings.clients:
        raise Unusable("the cache entry holds no config")
    return settings


def load(config_path=None, environ=None):
    """The validated config as views: from the cache when its key matches, else validated in full
    (pydantic) and cached. Returns (settings, what happened) for a DEBUG line once logging is set up.
    A config that does not validate raises ConfigError, as load_settings does."""
    environ = dict(os.environ if environ is None else environ)
    if config_path is None and environ.get("TOKENSMITH_CONFIG"):
        config_path = environ["TOKENSMITH_CONFIG"]
    content = _read_bytes(config_path)
    entry = entry_path(config_path, environ)
    key = cache_key(config_path, content, environ) if content is not None else None
    why = "no cache directory (no $CACHE_DIRECTORY, $XDG_CACHE_HOME or $HOME)"
    if entry is not None and key is not None:
        try:
            return read(entry, key), f"config cache hit ({entry})"
        except Unusable as exc:
            why = str(exc)
        except Exception as exc:  # a corrupt entry is never trusted and never fatal
            why = f"cache entry unreadable ({type(exc).__name__})"
    from tokensmith.config import load_settings

    settings = load_settings(config_path, environ)
    outcome = f"config cache miss: {why}"
    try:
        view = as_view(settings)  # what a hit gives: a daemon behaves the same on a hit and a miss
    except TypeError as exc:
        return settings, outcome + f"; not cached: {exc}"
    if entry is None or key is None:
        return view, outcome
    try:
        if _read_bytes(config_path) != content:
            return view, outcome + "; not cached: the file changed while it was read"
        operators = operator_names(config_path, environ) if settings.control_operators else {}
        return view, outcome + "; " + write(entry, key, settings, operators, environ)
    except Exception as exc:  # the cache is an optimisation: failing to keep it changes nothing else
        reason = str(exc) if isinstance(exc, Unusable) else getattr(exc, "strerror", None) or type(exc).__name__
        return view, outcome + f"; not cached ({reason})"


def _read_bytes(config_path) -> bytes | None:
    if config_path is None:
        return b""
    try:
        with open(config_path, "rb") as handle:
            return handle.read()
    except OSError:
        return None  # load_settings reports it
