"""The token endpoint client: grants x client-authentication dialects, and response parsing.

Dialects (from the seed providers): `basic` (HTTP Basic, RFC 6749 §2.3.1, form body),
`post` (client_id/client_secret in the form body), `json` (everything in a JSON body) and
`query` (everything in the query string of a POST). Every failure becomes a TokenEndpointError
whose message names the client and never holds a secret.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import re
import socket
import time
from email.utils import parsedate_to_datetime
from urllib.parse import quote_plus, urlencode, urlsplit

from tokensmith.clientauth import SECRET_METHODS, ClientAuth
from tokensmith.errors import SourceError, TokenEndpointError
from tokensmith.proxy import ProxyError, proxy_for
from tokensmith.redact import Redactor
from tokensmith.sources import Credentials
from tokensmith.tokens import Token
from tokensmith.transport import BodyError, HttpPool, Reply, TLSSetupError, make_session

MAX_BODY = 64 * 1024
MAX_LIFETIME = 366 * 24 * 3600.0
NON_RETRYABLE_OAUTH = {"invalid_client", "invalid_grant", "unsupported_grant_type", "unauthorized_client",
                       "invalid_scope", "invalid_request", "access_denied"}
TOKEN_CHARS = re.compile(r"^[\x21-\x7e]+$")
B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # RFC 6750 §2.1: nothing a shell or a header would act on
TOKEN_TYPES = {"bearer": "Bearer", "dpop": "DPoP", "n_a": "N_A", "mac": "MAC"}
ERROR_CODE = re.compile(r"[a-z_]{1,64}")
CLIENT_CERT_REFUSED = {"TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_BAD_CERTIFICATE", "TLSV1_ALERT_UNKNOWN_CA",
                       "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "TLSV1_ALERT_ACCESS_DENIED"}


def basic_auth_header(client_id: str, client_secret: str) -> str:
    pair = f"{quote_plus(client_id)}:{quote_plus(client_secret)}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


def parse_retry_after(value: str | None, now: float) -> float | None:
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]+", value):  # not str.isdigit(), which takes "²"
        return min(float(value), 3600.0)
    try:
        return max(0.0, min(parsedate_to_datetime(value).timestamp() - now, 3600.0))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value) if isinstance(value, float) or abs(value) < 2 ** 1023 else math.inf  # no OverflowError
    elif isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+(\.\d+)?\s*", value, re.ASCII):  # what float() takes
        number = float(value)
    else:
        return None
    return number if math.isfinite(number) else None


def jwt_expiry(access_token: str) -> float | None:
    """The `exp` claim of a JWT access token, read without verifying it (we are not its audience).
    None for an opaque token or a JWT whose exp is missing or not a number."""
    if access_token.count(".") != 2 or not access_token.startswith("eyJ"):
        return None
    import jwt

    try:
        claims = jwt.decode(access_token, options={"verify_signature": False, "verify_exp": False,
                                                   "verify_nbf": False, "verify_iat": False, "verify_aud": False})
    except (jwt.PyJWTError, ValueError, TypeError, RecursionError):  # a deeply nested header or payload
        return None
    if not isinstance(claims, dict):
        return None
    return _number(claims.get("exp"))


def parse_token_response(body: bytes, *, client: str, sent_at: float, default_lifetime: float) -> Token:
    def bad(field: str, problem: str) -> TokenEndpointError:
        return TokenEndpointError(f"malformed token response: {field} {problem}", client=client,
                                  retryable=True, error="malformed_response")

    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise bad("body", "is not JSON") from None
    if not isinstance(data, dict):
        raise bad("body", "is not a JSON object")
    access_token = data.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise bad("access_token", "is missing")
    if not B64TOKEN.fullmatch(access_token) or len(access_token) > 16384:
        raise bad("access_token", "holds characters a token cannot have")
    token_type = data.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() not in TOKEN_TYPES:
        raise bad("token_type", f"is not one of {', '.join(TOKEN_TYPES.values())}")
    token_type = TOKEN_TYPES[token_type.lower()]
    refresh_token = data.get("refresh_token")
    if refresh_token is not None and (not isinstance(refresh_token, str) or not TOKEN_CHARS.fullmatch(refresh_token)):
        raise bad("refresh_token", "is not a token string")
    scope = data.get("scope")
    scope = scope if isinstance(scope, str) else None

    lifetimes = []
    if "expires_in" in data and data["expires_in"] is not None:
        expires_in = _number(data["expires_in"])
        if expires_in is None:
            raise bad("expires_in", "is not a number")
        if expires_in < 1:  # 0, negative, or so small that sent_at + expires_in == sent_at
            raise bad("expires_in", "is under one second")
        lifetimes.append(min(expires_in, MAX_LIFETIME))
    exp = jwt_expiry(access_token)
    if exp is not None:
        if exp <= sent_at:
            raise bad("access_token", "is a JWT that has already expired (check the clocks)")
        lifetimes.append(min(exp - sent_at, MAX_LIFETIME))
    lifetime = min(lifetimes) if lifetimes else default_lifetime
    return Token(access_token=access_token, token_type=token_type, obtained_at=sent_at,
                 expires_at=sent_at + lifetime, refresh_token=refresh_token or None, scope=scope)


def _utf8(value) -> bool:
    if not isinstance(value, str):
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


LONG_WORD = re.compile(r"[A-Za-z0-9._~+/=-]{16,}")


def _describe(text: str, redactor: Redactor) -> str:
    """A server's error text, safe to log: our own secrets (in any encoding) and anything token-like
    are cut out, since a provider may echo what it was sent."""
    text = redactor(text)
    text = LONG_WORD.sub("[redacted]", text)
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return text[:200]


class TokenClient:
    def __init__(self, client, session: HttpPool | None = None, clock=time.time, discovery=None):
        self.client = client
        self.session = session or make_session()
        self.clock = clock
        self.auth = ClientAuth(client, clock)
        self.discovery = discovery
        if discovery is None and client.issuer:
            from tokensmith.discovery import Discovery

            self.discovery = Discovery(client, self.session, clock)

    @property
    def method(self) -> str:
        """The client authentication method: configured, else picked from what the provider supports."""
        if self.discovery is not None and "auth_style" not in self.client.model_fields_set:
            self.auth.method = self.discovery.auth_method()
        return self.auth.method

    def endpoint(self, field: str) -> str | None:
        """token_url, revocation_url or introspection_url: configured, else from the issuer's metadata."""
        configured = getattr(self.client, field)
        if configured or self.discovery is None:
            return configured
        return self.discovery.endpoint(field)

    def _auth(self, creds: Credentials, params: dict, headers: dict, dialect: str):
        token_url = self.endpoint("token_url")
        return self.auth.apply(creds, params, headers, token_url=token_url, dialect=dialect)

    def _post(self, url: str, params: dict, creds: Credentials, *, dialect: str, what: str) -> tuple[Reply, bytes]:
        headers = {"Accept": "application/json", "Accept-Encoding": "identity", "User-Agent": "tokensmith"}
        endpoint = urlsplit(url)._replace(query="", fragment="").geturl()  # the configured URL, never a parameter
        ssl_context = self._auth(creds, params, headers, dialect)
        if self.method not in SECRET_METHODS:
            what = f"{what} ({self.method})"
        body = None
        if dialect == "json":
            body = json.dumps(params, allow_nan=False).encode()
            headers["Content-Type"] = "application/json"
        elif dialect == "query":
            url = url + ("&" if urlsplit(url).query else "?") + urlencode(params)
        else:
            body = urlencode(params).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        name = self.client.name
        try:
            proxy = proxy_for(url, self.client.proxy, username=creds.proxy_username, password=creds.proxy_password)
        except ValueError as exc:
            raise TokenEndpointError(f"{what}: proxy from the environment: {exc}", client=name,
                                     retryable=False, error="proxy") from None
        try:
            response, body = self.session.post(url, body, headers, timeout=self.client.timeout,
                                               ca_bundle=str(self.client.ca_bundle) if self.client.ca_bundle else None,
                                               max_body=MAX_BODY, proxy=proxy, ssl_context=ssl_context)
        except ProxyError as exc:
            raise TokenEndpointError(f"{what}: {exc}", client=name, retryable=exc.status not in (401, 407),
                                     error="proxy", status=exc.status) from exc
        except TLSSetupError as exc:
            raise TokenEndpointError(f"{what}: TLS setup failed: {exc}", client=name, retryable=True) from exc
        except BodyError as exc:
            if proxy is not None and (exc.status or 0) >= 500 and not url.startswith("https:"):
                raise TokenEndpointError(f"{what}: proxy {proxy.label} answered HTTP {exc.status} (it could not "
                                         "reach or relay the endpoint)", client=name, retryable=True, error="proxy",
                                         status=exc.status) from exc
            raise TokenEndpointError(f"{what}: connection lost while reading the response", client=name,
                                     retryable=True, error="unreachable") from exc
        except (socket.timeout, TimeoutError) as exc:
            raise TokenEndpointError(f"{what}: timed out, no complete response from {endpoint} within "
                                     f"{self.client.timeout:g}s",
                                     client=name, retryable=True, error="timeout") from exc
        except (OSError, http.client.HTTPException) as exc:
            import ssl

            if isinstance(exc, ssl.SSLError):
                if ssl_context is not None and getattr(exc, "reason", None) in CLIENT_CERT_REFUSED:
                    raise TokenEndpointError(f"{what}: the endpoint refused the client certificate "
                                             f"({exc.reason})", client=name, retryable=False,
                                             error="invalid_client") from exc
                raise TokenEndpointError(f"{what}: TLS verification failed", client=name, retryable=True) from exc
            reason = f"{type(exc).__name__}: {exc.strerror}" if getattr(exc, "strerror", None) else type(exc).__name__
            raise TokenEndpointError(f"{what}: cannot reach {endpoint} ({reason})", client=name,
                                     retryable=True, error="unreachable") from exc
        if proxy is not None and response.status_code >= 500 and not url.startswith("https:") \
                and not body.lstrip().startswith(b"{"):
            # an absolute-form request: a gateway error that is no OAuth JSON comes from the proxy itself
            raise TokenEndpointError(f"{what}: proxy {proxy.label} answered HTTP {response.status_code} (it could "
                                     "not reach or relay the endpoint)", client=name, retryable=True, error="proxy",
                                     status=response.status_code)
        if proxy is not None and response.status_code == 407:
            raise TokenEndpointError(f"{what}: proxy {proxy.label} refused the request with status 407 "
                                     "(proxy authentication)", client=name, retryable=False, error="proxy",
                                     status=407)
        if len(body) > MAX_BODY:
            raise TokenEndpointError(f"{what}: response larger than {MAX_BODY // 1024} KiB refused", client=name,
                                     retryable=True, status=response.status_code, error="oversized_response")
        return response, body

    def _check_text(self, creds: Credentials, params: dict, what: str) -> None:
        """Everything sent must be UTF-8 text: a lone surrogate (an undecodable byte in an environment
        variable, or a \\udcxx escape in a secret's JSON) would otherwise fail deep in the encoder."""
        fields = ["client_id", "client_secret"]
        if params.get("grant_type") == "password":
            fields += ["username", "password"]
        elif params.get("grant_type") == "refresh_token" and params.get("refresh_token") == creds.refresh_token:
            fields.append("refresh_token")
        for field in fields:
            if not _utf8(getattr(creds, field)):
                raise SourceError(f"credential {field} is not UTF-8 text (a lone surrogate or undecodable byte)",
                                  client=self.client.name, retryable=False)
        for key, value in params.items():
            if not (_utf8(key) and _utf8(value)):
                raise TokenEndpointError(f"{what}: {ascii(key)} is not UTF-8 text (a lone surrogate or undecodable "
                                         "byte)", client=self.client.name, retryable=False, error="invalid_request")

    def _redactor(self, creds: Credentials, sent: tuple) -> Redactor:
        pairs = [(creds.client_id, creds.client_secret)] if self.client.auth_style == "basic" else []
        return Redactor([*creds.secrets(), *sent], pairs)

    def _error(self, response: Reply, body: bytes, creds: Credentials, what: str,
               sent: tuple = ()) -> TokenEndpointError:
        """sent: the tokens the request carried (a refresh token, a token to revoke), cut out as the secrets are."""
        status = response.status_code
        name = self.client.name
        retry_after = parse_retry_after(response.headers.get("Retry-After"), self.clock())
        if 300 <= status < 400:
            return TokenEndpointError(f"{what}: HTTP {status} redirect refused (credentials are never sent on)",
                                      client=name, retryable=False, status=status)
        code = description = None
        try:
            data = json.loads(body)
            if isinstance(data, dict) and isinstance(data.get("error"), str):
                # an RFC 6749 §5.2 code is kept verbatim; anything else might be an echo, so it is no code
                code = data["error"] if ERROR_CODE.fullmatch(data["error"]) else None
                if isinstance(data.get("error_description"), str):
                    description = _describe(data["error_description"], self._redactor(creds, sent))
        except (ValueError, UnicodeDecodeError, RecursionError):
            pass
        if code is None and status == 401:
            code = "invalid_client"
        retryable = status == 429 or status >= 500 or (code is not None and code not in NON_RETRYABLE_OAUTH
                                                       and status not in (400, 401, 403))
        text = f"{what}: HTTP {status}" + (f" {code}" if code else "") + (f": {description}" if description else "")
        return TokenEndpointError(text, client=name, retryable=retryable, error=code, status=status,
                                  retry_after=retry_after)

    def obtain(self, grant: str, creds: Credentials, refresh_token: str | None = None) -> Token:
        params: dict = {"grant_type": grant}
        if grant == "password":
            params["username"] = creds.username or ""
            params["password"] = creds.password or ""
        elif grant == "refresh_token":
            params["refresh_token"] = refresh_token or creds.refresh_token or ""
        if grant != "refresh_token":
            if self.client.scope:
                params["scope"] = self.client.scope
            if self.client.audience:
                params["audience"] = self.client.audience
        params.update(self.client.extra_params)
        sent_at = self.clock()
        what = f"{grant} grant"
        self._check_text(creds, params, what)
        token_url = self.endpoint("token_url")
        dialect = self.method if self.method in SECRET_METHODS else "post"
        response, body = self._post(token_url, params, creds, dialect=dialect, what=what)
        if response.status_code != 200:
            error = self._error(response, body, creds, f"{what} ({self.method})" if dialect != self.method else what,
                                sent=(params.get("refresh_token"), params.get("client_assertion")))
            if error.error == "invalid_client" and self.discovery is not None:
                self.discovery.stale()
            raise error
        return parse_token_response(body, client=self.client.name, sent_at=sent_at,
                                    default_lifetime=self.client.refresh.default_lifetime)

    def revoke(self, token: str, hint: str, creds: Credentials) -> None:
        """RFC 7009. Revocation is always form-encoded; the client authenticates in its own style."""
        url = self.endpoint("revocation_url")
        if not url:
            raise TokenEndpointError("no revocation_url configured", client=self.client.name, retryable=False)
        dialect = "basic" if self.method == "basic" else "post"
        what = f"revoke {hint}"
        params = {"token": token, "token_type_hint": hint}
        self._check_text(creds, params, what)
        response, body = self._post(url, params, creds, dialect=dialect, what=what)
        if response.status_code != 200:
            raise self._error(response, body, creds, what, sent=(token,))

    def introspect(self, token: str, creds: Credentials) -> bool:
        """RFC 7662: True when the server says the token is still active."""
        url = self.endpoint("introspection_url")
        if not url:
            raise TokenEndpointError("no introspection_url configured", client=self.client.name, retryable=False)
        dialect = "basic" if self.method == "basic" else "post"
        self._check_text(creds, {"token": token}, "introspection")
        response, body = self._post(url, {"token": token}, creds, dialect=dialect,
                                    what="introspection")
        if response.status_code != 200:
            raise self._error(response, body, creds, "introspection", sent=(token,))
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("active"), bool):
            raise TokenEndpointError("introspection: response has no boolean 'active'", client=self.client.name,
                                     retryable=True, error="malformed_response")
        return data["active"]
