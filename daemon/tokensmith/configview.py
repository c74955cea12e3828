"""The validated config without pydantic: read-only views built from a cached, already validated
config (configcache.py), and the behaviour the models and the views share.

A view has the models' attributes and values (Paths, secrets with get_secret_value(), tuples for
lists) and the properties below; config.py's models inherit the same mixins, so both behave alike.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from urllib.parse import urlsplit

AWS_TIMEOUT = 10.0  # aws.timeout's default: also what an AWS client uses when the config has no `aws:`


class SettingsBehaviour:
    __slots__ = ()

    @property
    def audit_log_path(self) -> Path:
        return self.audit_log or self.state_dir / "audit.log"

    @property
    def control_socket(self) -> Path:
        return self.runtime_dir / "control.sock"

    def client(self, name: str):
        for client in self.clients:
            if client.name == name:
                return client
        raise KeyError(name)


class ClientBehaviour:
    __slots__ = ()

    @property
    def strategy_needs_primary_grant(self) -> bool:
        return self.refresh.strategy == "reissue"


class LeaderBehaviour:
    __slots__ = ()

    @property
    def name(self) -> str:
        """This replica's name in the lease: the identity set, else $POD_NAME, else hostname:pid."""
        import socket

        return self.identity or os.environ.get("POD_NAME") or f"{socket.gethostname()}:{os.getpid()}"


BEHAVIOUR = {"Settings": SettingsBehaviour, "ClientConfig": ClientBehaviour, "LeaderConfig": LeaderBehaviour}


def backend_types(client) -> set[str]:
    return {client.source.type} | {sink.type for sink in client.sinks}


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port(url: str):
    """The URL split, once it is known to be UTF-8 text whose port (if any) is 1-65535."""
    if not _utf8(url):
        raise ValueError("must be UTF-8 text (it holds a lone surrogate or undecodable byte)")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("has a port that is not a number from 1 to 65535")
    return parts


def check_endpoint_url(url: str, allow_insecure_http: bool) -> str:
    parts = _check_port(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("must be an absolute http(s) URL")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials in the URL")
    if parts.scheme == "http" and not allow_insecure_http and not is_loopback_host(parts.hostname):
        raise ValueError("plain http is refused for a non-loopback host; use https or set allow_insecure_http: true")
    return url


class Secret:
    """pydantic's SecretStr as far as the daemon uses it: the value only through get_secret_value()."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        object.__setattr__(self, "_value", value)

    def get_secret_value(self) -> str:
        return self._value

    def __setattr__(self, name, value):
        raise AttributeError("a config secret is read-only")

    def __eq__(self, other):
        if hasattr(other, "get_secret_value"):
            return self._value == other.get_secret_value()
        return NotImplemented

    def __hash__(self):
        return hash(self._value)

    def __len__(self):
        return len(self._value)

    def __str__(self):
        return "**********" if self._value else ""

    def __repr__(self):
        return f"SecretStr({str(self)!r})"


class View:
    """One validated model, read-only. Subclasses (one per model) are made by view_class."""

    __slots__ = ("_fields_set",)
    _fields: tuple = ()
    _model: str = ""

    def __init__(self, **values):
        """As a model is made from all its fields (e.g. type(config)(**{**dict(config), "timeout": 1}))."""
        if values.keys() != set(self._fields):
            raise TypeError(f"{self._model} takes exactly its fields")
        _fill(self, [values[name] for name in self._fields], self._bits(values))

    def _bits(self, names) -> int:
        return sum(1 << index for index, name in enumerate(self._fields) if name in names)

    def __iter__(self):
        """(field, value) pairs, as a model gives them (dict(config))."""
        return ((name, getattr(self, name)) for name in self._fields)

    def model_copy(self, *, update: dict | None = None, deep: bool = False):
        values = dict(self)
        values.update(update or {})
        return make_view(type(self), [values[name] for name in self._fields],
                         self._fields_set | self._bits(update or {}))

    def __setattr__(self, name, value):
        raise AttributeError(f"{self._model} is read-only")

    def __delattr__(self, name):
        raise AttributeError(f"{self._model} is read-only")

    @property
    def model_fields_set(self) -> frozenset:
        bits = self._fields_set
        return frozenset(name for index, name in enumerate(self._fields) if bits >> index & 1)

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other):
        if isinstance(other, View):
            return self._model == other._model and self._values() == other._values()
        if hasattr(type(other), "model_fields") and type(other).__name__ == self._model:
            from tokensmith.configcache import as_view  # a model (after a reload): compare as views

            return self == as_view(other)
        return NotImplemented

    def __hash__(self):
        return hash((self._model, self._values()))

    def __repr__(self):
        return f"{self._model}(" + ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields) + ")"

    def __reduce__(self):
        raise TypeError("a config view is not pickled")


_CLASSES: dict[tuple, type] = {}


def view_class(model: str, fields: tuple) -> type:
    key = (model, fields)
    cls = _CLASSES.get(key)
    if cls is None:
        bases = (BEHAVIOUR[model], View) if model in BEHAVIOUR else (View,)
        cls = _CLASSES[key] = type(model, bases, {"__slots__": fields, "_fields": fields, "_model": model})
    return cls


def make_view(cls: type, values: list, fields_set: int) -> View:
    view = cls.__new__(cls)
    _fill(view, values, fields_set)
    return view


def _fill(view: View, values: list, fields_set: int) -> None:
    if len(values) != len(view._fields):
        raise ValueError(f"{view._model} has {len(view._fields)} fields, not {len(values)}")
    setter = object.__setattr__
    for name, value in zip(view._fields, values):
        setter(view, name, tuple(value) if isinstance(value, list) else value)
    setter(view, "_fields_set", fields_set)


def decoder(schema: dict):
    """A json object_hook turning the cache's tagged objects into views, Paths, secrets and dicts.
    Equal sub-views are kept once (as config.shared() does for the models)."""
    classes = {name: view_class(name, tuple(fields)) for name, fields in schema.items()}
    seen: dict = {}

    def hook(obj: dict):
        if "@" in obj:
            view = make_view(classes[obj["@"]], obj["v"], obj["f"])
            if obj["@"] in ("ClientConfig", "Settings"):
                return view
            try:
                return seen.setdefault(view, view)
            except TypeError:  # holds a dict: not hashable, kept as it is
                return view
        if "p" in obj:
            return Path(obj["p"])
        if "s" in obj:
            return Secret(obj["s"])
        if "d" in obj:
            return dict(obj["d"])
        raise ValueError("unknown object in the config cache")

    return hook
