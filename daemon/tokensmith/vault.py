"""One authenticated Vault/OpenBao session shared by the Vault source, sink, state backend and lease.

It speaks Vault's HTTP API over the project's own transport (tokensmith.transport): keep-alive
connections, one absolute deadline per request (connect, TLS, send, the whole response and any
redirect), forward proxies from the environment as for the token endpoint. Thin on purpose: no
retries (the keeper retries). It logs in lazily, and when Vault answers 401/403 (token revoked or
expired) it logs in once more and repeats the call once. Every failure is converted here into the
caller's error class with a message built from vetted parts, because Vault's error text can echo
request data.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import stat
import threading
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Callable
from urllib.parse import quote, urljoin, urlsplit

from tokensmith.errors import SinkError, SourceError, TokensmithError
from tokensmith.proxy import ProxyError, proxy_for
from tokensmith.transport import BodyError, HttpPool, TLSSetupError

if TYPE_CHECKING:  # the config cache's views stand in for the models: no pydantic on the first-token path
    from tokensmith.config import VaultConfig

MAX_BODY = 16 * 1024 * 1024  # a listing of 20,000 state records is ~1 MB
MAX_REDIRECTS = 3  # a standby that does not forward answers 307 to the active node
RETRYABLE_STATUS = (412, 429)  # and every 5xx; 412: a node has not applied the X-Vault-Index yet
# Server error strings known to carry no request data; anything else is reported by status only.
SAFE_PHRASES = ("permission denied", "invalid role or secret ID", "Vault is sealed", "no handler for route",
                "check-and-set parameter did not match the current version", "invalid role name",
                "role not found", "service account name not authorized", "namespace not authorized",
                "lookup failed", "not authorized", "invalid certificate or no client certificate supplied")
CAS_MISMATCH = "check-and-set parameter did not match"
DENIED = (401, 403)
SAFE_PATH = "/-._~!$&'()*+,;=:@"


class VaultHTTPError(Exception):
    """Vault answered an error status. .errors is its error list: server text, never shown as it is."""

    def __init__(self, status: int, body):
        self.status = status
        self.body = body if isinstance(body, dict) else {}
        errors = self.body.get("errors")
        self.errors = [str(error) for error in errors] if isinstance(errors, list) else [str(errors or "")]
        self.errors = [error for error in self.errors if error]
        super().__init__(f"HTTP {status}")


class Unreadable(ValueError):
    """The answer was not the JSON object Vault sends."""


def describe(exc: VaultHTTPError) -> str:
    text = " ".join(exc.errors)
    said = next((phrase for phrase in SAFE_PHRASES if phrase in text), None)
    if said == "no handler for route":
        said = "no such mount"
    if said is None:
        try:
            said = HTTPStatus(exc.status).phrase
        except ValueError:
            said = "unexpected status"
    return f"{said} (HTTP {exc.status})"


def _consistent(index: str | None) -> dict:
    """OpenBao: a node that has not applied `index` yet forwards the request to the active node
    (a standby checks a write's check-and-set version against its own copy before forwarding it)."""
    return {"X-Vault-Index": index, "X-Vault-Inconsistent": "forward-active-node"} if index else {}


def later_index(held: str | None, new: str) -> str:
    """The later of two storage indexes. OpenBao's is base64 JSON {"cluster", "value"}; anything
    else (or another cluster) counts as later, so concurrent writes never move the index back."""
    def parse(index):
        try:
            data = json.loads(base64.b64decode(index))
            return data["cluster"], int(data["value"])
        except (ValueError, TypeError, KeyError):
            return None

    old, now = parse(held) if held else None, parse(new)
    if old and now and old[0] == now[0] and old[1] > now[1]:
        return held
    return new


def _absent(exc: VaultHTTPError) -> bool:
    """A 404 for a KV v2 secret that is deleted (its metadata comes back) or was never written (no errors)."""
    return exc.status == 404 and bool(exc.body.get("data") or not exc.errors)


class VaultClient:
    def __init__(self, config: VaultConfig):
        self.config = config
        self._pool = HttpPool()
        self._ca_bundle = str(config.ca_bundle) if config.ca_bundle else None
        self._ssl: ssl.SSLContext | None = None  # with the client certificate (method cert), made at each login
        self._token: str | None = None
        self._lock = threading.Lock()
        self._logins = 0  # bumped by every login, so racing threads re-authenticate once, not each
        # OpenBao's storage index after this client's latest KV v2 write (any record: state, lease).
        # Sent with every kv2_* request, so no node answers from a copy older than that write.
        self.index: str | None = None

    def keep_connections(self, size: int) -> None:
        """Keep up to `size` idle keep-alive connections (one per worker that calls Vault)."""
        self._pool.pool_size = max(self._pool.pool_size, size)

    # ---- HTTP

    def _send(self, method: str, path: str, body: dict | None = None, *, query: str = "",
              headers: dict | None = None, login: bool = False) -> tuple[dict, str | None]:
        """One request to /v1/<path>: (the answer's JSON object, its X-Vault-Index). VaultHTTPError for an
        error status; transport errors as HttpPool.exchange raises them."""
        url = f"{self.config.address}/v1/{quote(path, safe=SAFE_PATH)}" + (f"?{query}" if query else "")
        fields = {"X-Vault-Request": "true"}
        if self.config.namespace:
            fields["X-Vault-Namespace"] = self.config.namespace
        if not login and self._token:
            fields["X-Vault-Token"] = self._token
        if headers:
            fields.update(headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            fields["Content-Type"] = "application/json"
        deadline = time.monotonic() + self.config.timeout
        for _ in range(MAX_REDIRECTS + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("deadline passed")
            reply, raw = self._pool.exchange(method, url, data, fields, timeout=left, ca_bundle=self._ca_bundle,
                                             max_body=MAX_BODY, proxy=proxy_for(url), ssl_context=self._ssl)
            location = reply.headers.get("location")
            if reply.status_code not in (307, 308) or not location:
                break
            target = urljoin(url, location)
            if urlsplit(target).scheme not in ("https", urlsplit(url).scheme):  # never from https down to http
                break
            url = target
        status = reply.status_code
        if len(raw) > MAX_BODY:
            raise Unreadable("too large")
        try:
            document = json.loads(raw) if raw.strip() else {}
        except ValueError:
            document = None
        if not 200 <= status < 300:
            raise VaultHTTPError(status, document)
        if not isinstance(document, dict):
            raise Unreadable("not a JSON object")
        return document, reply.headers.get("x-vault-index")

    def _json(self, method: str, path: str, body: dict | None = None, **kwargs) -> dict:
        return self._send(method, path, body, **kwargs)[0]

    # ---- KV

    def read_kv(self, mount: str, path: str, version: int, client: str | None = None,
                error_cls: type[TokensmithError] = SourceError) -> dict:
        what = f"vault secret {mount}/{path}"
        if version == 1:
            response = self._call(lambda: self._json("GET", f"{mount}/{path}"), what, client, error_cls)
            data = response.get("data")
        else:
            response = self._call(lambda: self._json("GET", f"{mount}/data/{path}"), what, client, error_cls)
            data = (response.get("data") or {}).get("data")
        if not isinstance(data, dict):
            raise error_cls(f"{what}: response holds no key/value data", client=client, retryable=False)
        return data

    def read_kv2_versioned(self, mount: str, path: str, client: str | None = None,
                           error_cls: type[TokensmithError] = SourceError) -> tuple[dict | None, int | None]:
        """(data, version) of the latest version; data None when deleted, (None, None) when absent."""
        def read() -> dict:
            try:
                return self._json("GET", f"{mount}/data/{path}")
            except VaultHTTPError as exc:
                if _absent(exc):
                    return exc.body
                raise

        body = self._call(read, f"vault secret {mount}/{path}", client, error_cls).get("data") or {}
        version = (body.get("metadata") or {}).get("version")
        data = body.get("data")
        return (data if isinstance(data, dict) else None), (int(version) if version else None)

    def write_kv2(self, mount: str, path: str, data: dict, cas: int | None, client: str | None = None,
                  error_cls: type[TokensmithError] = SinkError) -> None:
        options = {} if cas is None else {"cas": cas}
        self._call(lambda: self._json("POST", f"{mount}/data/{path}", {"options": options, "data": data}),
                   f"vault secret {mount}/{path}", client, error_cls)

    def kv2_metadata(self, mount: str, path: str, client: str | None = None,
                     error_cls: type[TokensmithError] = SinkError) -> dict:
        """The secret's metadata (its versions and when each was deleted or destroyed)."""
        response = self._call(lambda: self._json("GET", f"{mount}/metadata/{path}"), f"vault secret {mount}/{path}",
                              client, error_cls)
        return response.get("data") or {}

    def kv2_version(self, mount: str, path: str, number: int, client: str | None = None,
                    error_cls: type[TokensmithError] = SinkError) -> dict | None:
        """The data of one version; None when it is deleted or destroyed."""
        def read() -> dict:
            try:
                return self._json("GET", f"{mount}/data/{path}", query=f"version={int(number)}")
            except VaultHTTPError as exc:
                if _absent(exc):
                    return {}
                raise

        response = self._call(read, f"vault secret {mount}/{path} version {number}", client, error_cls)
        data = (response.get("data") or {}).get("data")
        return data if isinstance(data, dict) else None

    def kv2_destroy(self, mount: str, path: str, versions: list[int], client: str | None = None,
                    error_cls: type[TokensmithError] = SinkError) -> None:
        """Destroy those versions for good (their data is gone, not only marked deleted)."""
        self._call(lambda: self._json("POST", f"{mount}/destroy/{path}", {"versions": list(versions)}),
                   f"vault secret {mount}/{path}", client, error_cls)

    # ---- KV v2 records with versions and storage indexes (the shared state backend)

    def kv2_get(self, mount: str, path: str, *, index: str | None = None, client: str | None = None,
                error_cls: type[TokensmithError] = SourceError) -> tuple[dict | None, int, str | None]:
        """(data, version, storage index) of the latest version: data None when deleted or absent,
        version 0 when absent. With index (from an earlier answer), a standby that has not applied
        it yet forwards the read to the active node instead of answering from its older copy."""
        headers = _consistent(index or self.index)

        def read() -> tuple[dict, str | None]:
            try:
                return self._send("GET", f"{mount}/data/{path}", headers=headers)
            except VaultHTTPError as exc:
                if _absent(exc):
                    return exc.body, None
                raise

        answer, stored = self._call(read, f"vault secret {mount}/{path}", client, error_cls)
        body = answer.get("data") or {}
        version = (body.get("metadata") or {}).get("version") or 0
        data = body.get("data")
        return (data if isinstance(data, dict) else None), int(version), stored

    def kv2_put(self, mount: str, path: str, data: dict, cas: int, *, index: str | None = None,
                client: str | None = None, error_cls: type[TokensmithError] = SinkError
                ) -> tuple[int | None, str | None]:
        """Write only if the latest version is `cas` (0: only if there is none). (new version,
        storage index), or (None, None) when another writer got there first. A standby checks the
        version against its own copy before it forwards the write, so index matters here too."""
        headers = _consistent(index or self.index)

        def write() -> tuple[dict, str | None] | None:
            try:
                return self._send("POST", f"{mount}/data/{path}", {"options": {"cas": cas}, "data": data},
                                  headers=headers)
            except VaultHTTPError as exc:
                if exc.status == 400 and CAS_MISMATCH in " ".join(exc.errors):
                    return None
                raise

        answer = self._call(write, f"vault secret {mount}/{path}", client, error_cls)
        if answer is None:
            return None, None
        body, stored = answer
        if stored:
            self.index = later_index(self.index, stored)
        version = (body.get("data") or {}).get("version")
        if not version:
            raise error_cls(f"vault secret {mount}/{path}: the write answered no version", client=client,
                            retryable=True)
        return int(version), stored

    def kv2_list(self, mount: str, path: str, *, index: str | None = None, client: str | None = None,
                 error_cls: type[TokensmithError] = SourceError) -> list[str]:
        """The keys under a KV v2 folder ([] when there is none)."""
        headers = _consistent(index or self.index)

        def listing() -> dict:
            try:
                return self._json("GET", f"{mount}/metadata/{path}", query="list=true", headers=headers)
            except VaultHTTPError as exc:
                if exc.status == 404 and not exc.errors:
                    return {}
                raise

        keys = (self._call(listing, f"vault folder {mount}/{path}", client, error_cls).get("data") or {}).get("keys")
        return [key for key in keys or [] if isinstance(key, str)]

    def check(self, client: str | None = None, error_cls: type[TokensmithError] = SinkError) -> None:
        self._call(self._lookup_self, "vault token lookup-self", client, error_cls)

    def _lookup_self(self) -> dict:
        return self._json("GET", "auth/token/lookup-self").get("data") or {}

    # ---- calls, logins, errors

    def _call(self, fn: Callable[[], object], what: str, client: str | None,
              error_cls: type[TokensmithError]):
        try:
            seen = self._login_once(client, error_cls)
            try:
                return fn()
            except VaultHTTPError as exc:
                if exc.status not in DENIED or not self._can_reauth:
                    raise
            self._relogin(seen, client, error_cls)
            return fn()
        except TokensmithError:
            raise
        except Exception as exc:
            raise self._convert(exc, what, client, error_cls) from exc

    @property
    def _can_reauth(self) -> bool:
        auth = self.config.auth
        return not (auth.method == "token" and auth.token_file is None)

    def _login_once(self, client: str | None, error_cls: type[TokensmithError]) -> int:
        with self._lock:
            if self._logins == 0:
                self._login(client, error_cls)
            return self._logins

    def _relogin(self, seen: int, client: str | None, error_cls: type[TokensmithError]) -> None:
        with self._lock:
            if self._logins == seen:  # nobody else has logged in since our call was denied
                self._login(client, error_cls)

    def _login(self, client: str | None, error_cls: type[TokensmithError]) -> None:
        auth = self.config.auth
        where = f"vault {auth.method} login"
        try:
            if auth.method == "token":
                token = (auth.token.get_secret_value() if auth.token
                         else self._read_file(auth.token_file, client, error_cls))
                self._token = token.strip()
            else:
                mount = auth.mount_point or auth.method
                where += f" at auth/{mount}"
                if auth.method == "approle":
                    secret_id = (auth.secret_id.get_secret_value() if auth.secret_id
                                 else self._read_file(auth.secret_id_file, client, error_cls))
                    body = {"role_id": auth.role_id, "secret_id": secret_id.strip()}
                elif auth.method == "cert":
                    where += (f" as role {auth.role}" if auth.role else "") + f" with certificate {auth.cert_file}"
                    context = self._cert_context(client, error_cls)
                    self._ssl = context
                    self._pool.close()  # pooled connections still present the old certificate
                    body = {"name": auth.role or ""}
                else:
                    where += f" as role {auth.role}"
                    body = {"role": auth.role, "jwt": self._read_file(auth.jwt_file, client, error_cls).strip()}
                answer = self._json("POST", f"auth/{mount}/login", body, login=True)
                token = (answer.get("auth") or {}).get("client_token")
                if not isinstance(token, str) or not token:
                    raise error_cls(f"{where}: the answer holds no client token", client=client, retryable=False)
                self._token = token
        except TokensmithError:
            raise
        except Exception as exc:
            error = self._convert(exc, where, client, error_cls)
            if isinstance(exc, VaultHTTPError) and exc.status in (400, 404) + DENIED:
                error.retryable = False  # bad credentials or role: logging in again will not help
            raise error from exc
        self._logins += 1

    def _cert_context(self, client: str | None, error_cls: type[TokensmithError]) -> ssl.SSLContext:
        """A TLS context presenting the client certificate, read afresh at every login so rotated files
        are used without a restart; the key must stay private."""
        auth = self.config.auth
        try:
            fd = os.open(auth.key_file, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise error_cls(f"cannot read vault.auth.key_file {auth.key_file}: {exc.strerror}",
                            client=client, retryable=False) from exc
        with os.fdopen(fd, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise error_cls(f"vault.auth.key_file {auth.key_file} is accessible by group or others "
                            f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it", client=client, retryable=False)
        try:
            context = ssl.create_default_context(cafile=self._ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise error_cls(f"cannot load vault.ca_bundle {self._ca_bundle}", client=client, retryable=False) from exc
        try:
            context.load_cert_chain(auth.cert_file, auth.key_file, password=b"")
        except ssl.SSLError as exc:
            raise error_cls(f"vault.auth.cert_file {auth.cert_file} and key_file {auth.key_file} are not a "
                            f"usable PEM certificate and unencrypted private key ({exc.reason or 'unreadable'})",
                            client=client, retryable=False) from exc
        except OSError as exc:
            raise error_cls(f"cannot read vault.auth.cert_file {auth.cert_file}: {exc.strerror}",
                            client=client, retryable=False) from exc
        return context

    @staticmethod
    def _read_file(path, client: str | None, error_cls: type[TokensmithError]) -> str:
        try:
            return path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not text"
            raise error_cls(f"cannot read vault credential file {path}: {reason}", client=client,
                            retryable=False) from exc

    def _convert(self, exc: Exception, what: str, client: str | None,
                 error_cls: type[TokensmithError]) -> TokensmithError:
        address = self.config.address
        if isinstance(exc, VaultHTTPError):
            reason = describe(exc)
            if exc.status == 404 and "no such mount" not in reason:
                hint = " (is the mount KV v2?)" if "versioned K/V" in str(exc.body.get("warnings")) else ""
                return error_cls(f"{what}: no secret at that path{hint}", client=client, retryable=False)
            retryable = exc.status >= 500 or exc.status in RETRYABLE_STATUS or CAS_MISMATCH in reason
            return error_cls(f"{what}: {reason}", client=client, retryable=retryable)
        if isinstance(exc, Unreadable):
            return error_cls(f"{what}: unreadable response from {address}", client=client, retryable=False)
        if isinstance(exc, TLSSetupError):
            return error_cls(f"{what}: cannot load vault.ca_bundle {self._ca_bundle}", client=client, retryable=False)
        if isinstance(exc, ssl.SSLError):
            check = "vault.ca_bundle" + (" and vault.auth.cert_file" if self.config.auth.method == "cert" else "")
            return error_cls(f"{what}: TLS verification with {address} failed (check {check})",
                             client=client, retryable=False)
        if isinstance(exc, ProxyError):
            return error_cls(f"{what}: {exc.message}", client=client, retryable=True)
        if isinstance(exc, TimeoutError):
            return error_cls(f"{what}: timed out to {address}", client=client, retryable=True)
        if isinstance(exc, (OSError, http.client.RemoteDisconnected)):
            return error_cls(f"{what}: cannot connect to {address}", client=client, retryable=True)
        if isinstance(exc, http.client.InvalidURL) or isinstance(exc, ValueError):
            return error_cls(f"{what}: the request cannot be sent as it is (check vault.address, vault.namespace "
                             "and the path)", client=client, retryable=False)
        if isinstance(exc, (http.client.HTTPException, BodyError)):
            return error_cls(f"{what}: request to {address} failed ({type(exc).__name__})", client=client,
                             retryable=True)
        return error_cls(f"{what}: unexpected {type(exc).__name__}", client=client, retryable=False)
