"""Authorization server metadata (RFC 8414, OpenID Connect Discovery 1.0) for clients configured by `issuer`.

The document is fetched from <issuer>/.well-known/oauth-authorization-server, else
<issuer>/.well-known/openid-configuration (for an issuer with a path, RFC 8414 inserts the well-known
segment before it). Its `issuer` must equal the configured one exactly. It fills token_url,
revocation_url and introspection_url the config leaves out, and picks the client authentication
method when none is configured. It is kept for REFRESH_EVERY seconds and fetched again sooner after an
invalid_client answer (the provider may have changed what it supports).
"""

from __future__ import annotations

import json
import threading
from urllib.parse import urlsplit

from tokensmith.configview import check_endpoint_url
from tokensmith.errors import TokenEndpointError
from tokensmith.proxy import ProxyError, proxy_for

REFRESH_EVERY = 24 * 3600.0
RETRY_AFTER_FAILURE = 60.0
MAX_DOCUMENT = 256 * 1024
# preferred first when the config names no method: the ones that keep no shared secret on the wire
PREFERENCE = ("tls_client_auth", "private_key_jwt", "client_secret_jwt", "client_secret_basic", "client_secret_post")
PROVIDER_NAMES = {"client_secret_basic": "basic", "client_secret_post": "post"}
ENDPOINTS = {"token_url": "token_endpoint", "revocation_url": "revocation_endpoint",
             "introspection_url": "introspection_endpoint"}


def well_known_urls(issuer: str) -> list[str]:
    parts = urlsplit(issuer)
    base = f"{parts.scheme}://{parts.netloc}"
    path = parts.path.rstrip("/")
    urls = [f"{base}/.well-known/oauth-authorization-server{path}"]
    urls.append(f"{base}{path}/.well-known/openid-configuration")
    return urls


class Discovery:
    def __init__(self, client, session, clock):
        self.client = client
        self.session = session
        self.clock = clock
        self.document: dict | None = None
        self.fetched_at = 0.0
        self.source_url: str | None = None
        self._lock = threading.Lock()
        self._next_fetch = 0.0

    def error(self, problem: str, retryable: bool = True) -> TokenEndpointError:
        return TokenEndpointError(f"discovery of {self.client.issuer}: {problem}", client=self.client.name,
                                  retryable=retryable, error="discovery")

    def stale(self) -> None:
        with self._lock:
            self._next_fetch = min(self._next_fetch, self.fetched_at + RETRY_AFTER_FAILURE)

    def metadata(self) -> dict:
        with self._lock:
            document, due = self.document, self._next_fetch
        if document is not None and self.clock() < due:
            return document
        try:
            document = self.fetch()
        except TokenEndpointError:
            if self.document is not None:  # a provider's hiccup: keep using what it said before
                with self._lock:
                    self._next_fetch = self.clock() + RETRY_AFTER_FAILURE
                return self.document
            raise
        return document

    def fetch(self) -> dict:
        issuer = self.client.issuer
        ca = str(self.client.ca_bundle) if self.client.ca_bundle else None
        last: TokenEndpointError | None = None
        for url in well_known_urls(issuer):
            try:
                reply, body = self.session.get(url, {"Accept": "application/json", "Accept-Encoding": "identity",
                                                     "User-Agent": "tokensmith"}, timeout=self.client.timeout,
                                               ca_bundle=ca, max_body=MAX_DOCUMENT,
                                               proxy=proxy_for(url, self.client.proxy))
            except ProxyError as exc:
                raise self.error(str(exc)) from exc
            except (OSError, ValueError, Exception) as exc:  # transport errors of every kind; typed below
                last = self.error(f"cannot fetch {url} ({type(exc).__name__})")
                continue
            if reply.status_code == 404:
                last = self.error(f"{url} answered HTTP 404")
                continue
            if reply.status_code != 200:
                last = self.error(f"{url} answered HTTP {reply.status_code}")
                continue
            try:
                document = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                raise self.error(f"{url} is not JSON") from None
            if not isinstance(document, dict):
                raise self.error(f"{url} is not a JSON object")
            self.check(document)
            with self._lock:
                self.document = document
                self.source_url = url
                self.fetched_at = self.clock()
                self._next_fetch = self.fetched_at + REFRESH_EVERY
            return document
        raise last or self.error("no metadata document")

    def check(self, document: dict) -> None:
        if document.get("issuer") != self.client.issuer:
            raise self.error("the document's issuer differs from the configured one (RFC 8414 §3.3 needs an "
                             "exact match)", retryable=False)
        for field, name in ENDPOINTS.items():
            url = document.get(name)
            if url is None and field != "token_url":
                continue
            if not isinstance(url, str):
                raise self.error(f"the document has no {name}", retryable=False)
            try:
                check_endpoint_url(url, self.client.allow_insecure_http)
            except ValueError as exc:
                raise self.error(f"{name} {exc}", retryable=False) from None

    def endpoint(self, field: str) -> str | None:
        return self.metadata().get(ENDPOINTS[field])

    def auth_method(self) -> str:
        supported = self.metadata().get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        if not isinstance(supported, list):
            supported = ["client_secret_basic"]
        usable = [name for name in PREFERENCE if name in supported]
        # with a secret in the source, a secret-based method; the config names others explicitly
        for name in ("client_secret_basic", "client_secret_post", "client_secret_jwt"):
            if name in usable:
                return PROVIDER_NAMES.get(name, name)
        raise self.error(f"the provider supports none of the secret-based methods ({', '.join(map(str, supported))}); "
                         "set auth_style", retryable=False)


def check_online(settings, out) -> int:
    """check-config --online: per client, the discovery (when configured by issuer) and one dry token request
    with the client's grant, writing no sink and no state. Prints a line per client; answers the number of
    clients that failed. A refresh_token grant is not tried: it would spend the bootstrap refresh token."""
    from tokensmith.backends import Backends
    from tokensmith.errors import TokensmithError
    from tokensmith.sources import build_source
    from tokensmith.tokenclient import TokenClient
    from tokensmith.transport import make_session

    backends = Backends(settings)
    session = make_session(2)
    failed = 0
    try:
        for client in settings.clients:
            token_client = TokenClient(client, session)
            found = []
            try:
                if token_client.discovery is not None:
                    discovery = token_client.discovery
                    discovery.metadata()
                    found.append(f"discovered {discovery.source_url}")
                    for field in ENDPOINTS:
                        url = token_client.endpoint(field)
                        if url and not getattr(client, field):
                            found.append(f"{field}={url}")
                creds = build_source(client, backends).read()
                if client.grant == "refresh_token":
                    found.append("token request skipped (it would spend the refresh token)")
                else:
                    token = token_client.obtain(client.grant, creds)
                    found.append(f"{client.grant} ok with {token_client.method}, token lives "
                                 f"{token.expires_at - token.obtained_at:.0f}s")
            except TokensmithError as exc:
                failed += 1
                print(f"error: client {client.name}: " + "; ".join(found + [exc.message]), file=out)
                continue
            print(f"online ok: client {client.name}: " + "; ".join(found), file=out)
    finally:
        session.close()
    return failed
