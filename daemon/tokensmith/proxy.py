"""Forward proxies for the calls tokensmith makes itself (token, revocation, introspection, --verify-url).

The environment is read as curl and requests read it: `https_proxy`/`HTTPS_PROXY` for https URLs,
`http_proxy`/`HTTP_PROXY` for http ones, `all_proxy`/`ALL_PROXY` for both, the lowercase name first;
`no_proxy`/`NO_PROXY` is a comma- or space-separated list of entries, each one of

    *                   every host
    example.com         that host and every name under it (a leading dot means the same)
    host:port           that host on that port only
    10.0.0.0/8, ::1/128 every IP address in the network (urllib's proxy_bypass cannot do this)
    192.0.2.7, [::1]    that address

A client's `proxy` setting overrides the environment: a URL, or `none` to go direct. Only http://
proxies are spoken to (https endpoints are tunnelled with CONNECT, so TLS is still end to end).
"""

from __future__ import annotations

import base64
import ipaddress
import os
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit


class ProxyError(OSError):
    """The proxy, not the endpoint, failed: unreachable, or it refused the request or the tunnel."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)  # a Proxy-Authorization value; never logged

    @property
    def label(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_proxy_url(url: str, username: str | None = None, password: str | None = None) -> Proxy:
    """A Proxy from http://[user:password@]host[:port]; a URL with no scheme is taken as http, as curl does.
    Explicit username/password (from a credential source) win over the URL's."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme.lower() != "http":
        raise ValueError(f"proxy scheme {parts.scheme!r} is not supported; use an http:// proxy")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError("proxy URL has an invalid port") from None
    if not parts.hostname:
        raise ValueError("proxy URL has no host")
    user = username if username is not None else (unquote(parts.username) if parts.username else None)
    secret = password if password is not None else (unquote(parts.password) if parts.password else "")
    authorization = None
    if user:
        authorization = "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()
    return Proxy(parts.hostname, port, authorization)


def _entries(no_proxy: str) -> list[str]:
    return [entry for entry in no_proxy.replace(" ", ",").replace("\t", ",").lower().split(",") if entry]


def _ip(text: str):
    try:
        return ipaddress.ip_address(text.strip("[]").partition("%")[0])
    except ValueError:
        return None


def bypass(host: str, port: int, no_proxy: str) -> bool:
    """True when NO_PROXY says host:port is reached directly."""
    host = host.lower().rstrip(".").strip("[]")
    address = _ip(host)
    for entry in _entries(no_proxy):
        if entry == "*":
            return True
        if "/" in entry:
            try:
                network = ipaddress.ip_network(entry.strip("[]"), strict=False)
            except ValueError:
                continue
            if address is not None and address.version == network.version and address in network:
                return True
            continue
        name, entry_port = entry, None
        if entry.startswith("["):  # [v6] or [v6]:port
            name, _, rest = entry[1:].partition("]")
            entry_port = rest[1:] if rest.startswith(":") else None
        elif entry.count(":") == 1:
            name, _, entry_port = entry.partition(":")
        if entry_port is not None:
            if not entry_port.isdigit() or int(entry_port) != port:
                continue
        entry_ip = _ip(name)
        if entry_ip is not None:
            if address is not None and address == entry_ip:
                return True
            continue
        name = name.lstrip(".").lstrip("*.").rstrip(".") if name.startswith(("*", ".")) else name.rstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def _env(environ, *names: str) -> str | None:
    for name in names:
        for variant in (name.lower(), name.upper()):
            value = environ.get(variant)
            if value:
                return value
    return None


_parsed: dict[tuple, Proxy] = {}


def proxy_for(url: str, override: str | None = None, environ=None, *, username: str | None = None,
              password: str | None = None) -> Proxy | None:
    """The proxy a request to url goes through, or None to go direct. override is a client's `proxy`
    setting (a URL, or "none"); without it the environment decides. NO_PROXY applies to both."""
    environ = os.environ if environ is None else environ
    parts = urlsplit(url)
    https = parts.scheme == "https"
    if override is not None and override.strip().lower() in ("none", "direct", ""):
        return None
    configured = override or _env(environ, "https_proxy" if https else "http_proxy", "all_proxy")
    if not configured:
        return None
    no_proxy = _env(environ, "no_proxy")
    if no_proxy and bypass(parts.hostname or "", parts.port or (443 if https else 80), no_proxy):
        return None
    key = (configured, username, password)
    proxy = _parsed.get(key)
    if proxy is None:
        proxy = _parsed[key] = parse_proxy_url(configured, username, password)
    return proxy
