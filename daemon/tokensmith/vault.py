"""One authenticated hvac session shared by the Vault/OpenBao source and sink.

Thin on purpose: no retries (the keeper retries). It logs in lazily, and when Vault answers 403
(token revoked or expired) it logs in once more and repeats the call once. Every hvac/requests
exception is converted here into the caller's error class with a message built from vetted parts,
because hvac's own text can carry server output.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import stat
import threading
from typing import Callable

from tokensmith.errors import ConfigError, SinkError, SourceError, TokensmithError

try:
    import hvac
    import requests
    import urllib3
    from hvac import exceptions as vault_exc
    from hvac.adapters import RawAdapter
    from requests.adapters import HTTPAdapter
except ImportError as exc:  # a file- or AWS-only install
    raise ConfigError("the config uses Vault/OpenBao but hvac is not installed: "
                      "pip install 'tokensmith[vault]'") from exc

from tokensmith.config import VaultConfig
from tokensmith.deadline import limit, watched_pool_classes

STATUS = {vault_exc.InvalidRequest: 400, vault_exc.Unauthorized: 401, vault_exc.Forbidden: 403,
          vault_exc.InvalidPath: 404, vault_exc.RateLimitExceeded: 429, vault_exc.InternalServerError: 500,
          vault_exc.VaultNotInitialized: 501, vault_exc.BadGateway: 502, vault_exc.VaultDown: 503}
RETRYABLE = (vault_exc.RateLimitExceeded, vault_exc.InternalServerError, vault_exc.VaultNotInitialized,
             vault_exc.BadGateway, vault_exc.VaultDown, vault_exc.UnexpectedError)
# Server error strings known to carry no request data; anything else is reported by status only.
SAFE_PHRASES = ("permission denied", "invalid role or secret ID", "Vault is sealed", "no handler for route",
                "check-and-set parameter did not match the current version", "invalid role name",
                "role not found", "service account name not authorized", "namespace not authorized",
                "lookup failed", "not authorized", "invalid certificate or no client certificate supplied")
CAS_MISMATCH = "check-and-set parameter did not match"
DENIED = (vault_exc.Forbidden, vault_exc.Unauthorized)


WATCHED_POOLS = watched_pool_classes(urllib3.HTTPConnectionPool, urllib3.HTTPSConnectionPool)


class WatchedAdapter(HTTPAdapter):
    """No retries, and connections whose sockets the deadline reaper can shut down."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = WATCHED_POOLS

    def proxy_manager_for(self, *args, **kwargs):
        manager = super().proxy_manager_for(*args, **kwargs)
        manager.pool_classes_by_scheme = WATCHED_POOLS
        return manager


class DeadlineSession(requests.Session):
    """Each request, its redirects and its whole response, within one deadline (urllib3's timeout is
    per recv: a server dripping bytes would hold the caller for ever)."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        adapter = WatchedAdapter(max_retries=0)
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def send(self, request, **kwargs):
        with limit(self.seconds) as call:
            try:
                reply = super().send(request, **kwargs)
            except requests.RequestException as exc:
                if call.expired:
                    raise requests.exceptions.ReadTimeout(f"no complete response within {self.seconds:g}s") \
                        from exc
                raise
            if call.expired:  # the reaper cut what looked like the end of the response (endless trailers)
                raise requests.exceptions.ReadTimeout(f"no complete response within {self.seconds:g}s")
            return reply


def describe(exc: vault_exc.VaultError) -> str:
    errors = exc.errors if isinstance(exc.errors, list) else [exc.errors or ""]
    text = " ".join(str(error) for error in errors)
    said = next((phrase for phrase in SAFE_PHRASES if phrase in text), None) or type(exc).__name__
    if said == "no handler for route":
        said = "no such mount"
    status = STATUS.get(type(exc))
    return f"{said} (HTTP {status})" if status else said


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


class VaultClient:
    def __init__(self, config: VaultConfig):
        self.config = config
        verify = str(config.ca_bundle) if config.ca_bundle else True
        session = DeadlineSession(config.timeout)
        session.verify = verify
        if config.auth.method == "cert":  # presented on every connection; urllib3 reads the files per connection
            session.cert = (str(config.auth.cert_file), str(config.auth.key_file))
        self._hvac = hvac.Client(url=config.address, namespace=config.namespace, verify=verify,
                                 timeout=config.timeout, session=session)
        self._lock = threading.Lock()
        self._logins = 0  # bumped by every login, so racing threads re-authenticate once, not each
        # OpenBao's storage index after this client's latest KV v2 write (any record: state, lease).
        # Sent with every kv2_* request, so no node answers from a copy older than that write.
        self.index: str | None = None

    def read_kv(self, mount: str, path: str, version: int, client: str | None = None,
                error_cls: type[TokensmithError] = SourceError) -> dict:
        what = f"vault secret {mount}/{path}"
        if version == 1:
            response = self._call(lambda kv: kv.secrets.kv.v1.read_secret(path, mount_point=mount),
                                  what, client, error_cls)
            data = response.get("data")
        else:
            response = self._call(lambda kv: kv.secrets.kv.v2.read_secret_version(
                path, mount_point=mount, raise_on_deleted_version=True), what, client, error_cls)
            data = (response.get("data") or {}).get("data")
        if not isinstance(data, dict):
            raise error_cls(f"{what}: response holds no key/value data", client=client, retryable=False)
        return data

    def read_kv2_versioned(self, mount: str, path: str, client: str | None = None,
                           error_cls: type[TokensmithError] = SourceError) -> tuple[dict | None, int | None]:
        """(data, version) of the latest version; data None when deleted, (None, None) when absent."""
        what = f"vault secret {mount}/{path}"

        def read(kv: hvac.Client) -> dict:
            try:
                return kv.secrets.kv.v2.read_secret_version(path, mount_point=mount, raise_on_deleted_version=True)
            except vault_exc.InvalidPath as exc:
                body = exc.json if isinstance(exc.json, dict) else {}
                if body.get("data") or not (exc.errors or []):  # a deleted version, or simply no secret
                    return body
                raise

        response = self._call(read, what, client, error_cls)
        body = response.get("data") or {}
        version = (body.get("metadata") or {}).get("version")
        data = body.get("data")
        return (data if isinstance(data, dict) else None), (int(version) if version else None)

    def write_kv2(self, mount: str, path: str, data: dict, cas: int | None, client: str | None = None,
                  error_cls: type[TokensmithError] = SinkError) -> None:
        self._call(lambda kv: kv.secrets.kv.v2.create_or_update_secret(path, secret=data, cas=cas, mount_point=mount),
                   f"vault secret {mount}/{path}", client, error_cls)

    # ---- KV v2 records with versions and storage indexes (the shared state backend)

    def kv2_get(self, mount: str, path: str, *, index: str | None = None, client: str | None = None,
                error_cls: type[TokensmithError] = SourceError) -> tuple[dict | None, int, str | None]:
        """(data, version, storage index) of the latest version: data None when deleted or absent,
        version 0 when absent. With index (from an earlier answer), a standby that has not applied
        it yet forwards the read to the active node instead of answering from its older copy."""
        headers = _consistent(index or self.index)

        def read(kv: hvac.Client) -> dict:
            try:
                response = RawAdapter.request(kv.adapter, "get", f"/v1/{mount}/data/{path}", headers=dict(headers))
            except vault_exc.InvalidPath as exc:
                body = exc.json if isinstance(exc.json, dict) else {}
                if body.get("data") or not (exc.errors or []):
                    return {"body": body, "index": None}
                raise
            return {"body": response.json(), "index": response.headers.get("X-Vault-Index")}

        answer = self._call(read, f"vault secret {mount}/{path}", client, error_cls)
        body = (answer.get("body") or {}).get("data") or {}
        version = (body.get("metadata") or {}).get("version") or 0
        data = body.get("data")
        return (data if isinstance(data, dict) else None), int(version), answer.get("index")

    def kv2_put(self, mount: str, path: str, data: dict, cas: int, *, index: str | None = None,
                client: str | None = None, error_cls: type[TokensmithError] = SinkError
                ) -> tuple[int | None, str | None]:
        """Write only if the latest version is `cas` (0: only if there is none). (new version,
        storage index), or (None, None) when another writer got there first. A standby checks the
        version against its own copy before it forwards the write, so index matters here too."""
        headers = _consistent(index or self.index)

        def write(kv: hvac.Client) -> dict:
            try:
                response = RawAdapter.request(kv.adapter, "post", f"/v1/{mount}/data/{path}", headers=dict(headers),
                                              json={"options": {"cas": cas}, "data": data})
            except vault_exc.InvalidRequest as exc:
                if CAS_MISMATCH in " ".join(str(error) for error in (exc.errors or [])):
                    return {"conflict": True}
                raise
            return {"body": response.json(), "index": response.headers.get("X-Vault-Index")}

        answer = self._call(write, f"vault secret {mount}/{path}", client, error_cls)
        if answer.get("conflict"):
            return None, None
        if answer.get("index"):
            self.index = later_index(self.index, answer["index"])
        version = ((answer.get("body") or {}).get("data") or {}).get("version")
        if not version:
            raise error_cls(f"vault secret {mount}/{path}: the write answered no version", client=client,
                            retryable=True)
        return int(version), answer.get("index")

    def kv2_list(self, mount: str, path: str, *, index: str | None = None, client: str | None = None,
                 error_cls: type[TokensmithError] = SourceError) -> list[str]:
        """The keys under a KV v2 folder ([] when there is none)."""
        headers = _consistent(index or self.index)

        def listing(kv: hvac.Client) -> dict:
            try:
                return RawAdapter.request(kv.adapter, "list", f"/v1/{mount}/metadata/{path}",
                                          headers=dict(headers)).json()
            except vault_exc.InvalidPath as exc:
                if not (exc.errors or []):
                    return {}
                raise

        keys = (self._call(listing, f"vault folder {mount}/{path}", client, error_cls).get("data") or {}).get("keys")
        return [key for key in keys or [] if isinstance(key, str)]

    def check(self, client: str | None = None, error_cls: type[TokensmithError] = SinkError) -> None:
        self._call(lambda kv: kv.auth.token.lookup_self(), "vault token lookup-self", client, error_cls)

    def _call(self, fn: Callable[[hvac.Client], dict], what: str, client: str | None,
              error_cls: type[TokensmithError]) -> dict:
        try:
            seen = self._login_once(client, error_cls)
            try:
                return self._document(fn(self._hvac))
            except DENIED:
                if not self._can_reauth:
                    raise
            self._relogin(seen, client, error_cls)
            return self._document(fn(self._hvac))
        except TokensmithError:
            raise
        except Exception as exc:
            raise self._convert(exc, what, client, error_cls) from exc

    @staticmethod
    def _document(result) -> dict:
        """hvac answers a requests.Response for anything but a JSON 200: fine for a 204, unreadable otherwise."""
        if isinstance(result, dict):
            return result
        if result is None or getattr(result, "status_code", None) == 204:
            return {}
        raise ValueError("not a JSON object")

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
                token = auth.token.get_secret_value() if auth.token else self._read_file(auth.token_file, client, error_cls)
                self._hvac.token = token.strip()
            elif auth.method == "approle":
                where += f" at auth/{auth.mount_point or 'approle'}"
                secret_id = (auth.secret_id.get_secret_value() if auth.secret_id
                             else self._read_file(auth.secret_id_file, client, error_cls))
                self._hvac.auth.approle.login(auth.role_id, secret_id.strip(), mount_point=auth.mount_point or "approle")
            elif auth.method == "cert":
                where += (f" at auth/{auth.mount_point or 'cert'}" + (f" as role {auth.role}" if auth.role else "")
                          + f" with certificate {auth.cert_file}")
                self._check_cert(client, error_cls)
                self._hvac.adapter.session.close()  # pooled connections still present the old certificate
                self._hvac.auth.cert.login(name=auth.role or "", cert_pem=str(auth.cert_file),
                                           key_pem=str(auth.key_file), mount_point=auth.mount_point or "cert")
            else:
                where += f" at auth/{auth.mount_point or 'kubernetes'} as role {auth.role}"
                jwt = self._read_file(auth.jwt_file, client, error_cls)
                self._hvac.auth.kubernetes.login(auth.role, jwt.strip(), mount_point=auth.mount_point or "kubernetes")
        except TokensmithError:
            raise
        except Exception as exc:
            error = self._convert(exc, where, client, error_cls)
            if isinstance(exc, (vault_exc.InvalidRequest, vault_exc.InvalidPath) + DENIED):
                error.retryable = False  # bad credentials or role: logging in again will not help
            raise error from exc
        self._logins += 1

    def _check_cert(self, client: str | None, error_cls: type[TokensmithError]) -> None:
        """Re-read at every login, so rotated files are used without a restart; the key stays private."""
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
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(auth.cert_file, auth.key_file, password=b"")
        except ssl.SSLError as exc:
            raise error_cls(f"vault.auth.cert_file {auth.cert_file} and key_file {auth.key_file} are not a "
                            f"usable PEM certificate and unencrypted private key ({exc.reason or 'unreadable'})",
                            client=client, retryable=False) from exc
        except OSError as exc:
            raise error_cls(f"cannot read vault.auth.cert_file {auth.cert_file}: {exc.strerror}",
                            client=client, retryable=False) from exc

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
        if isinstance(exc, vault_exc.VaultError):
            reason = describe(exc)
            if isinstance(exc, vault_exc.InvalidPath) and "no such mount" not in reason:
                hint = " (is the mount KV v2?)" if "versioned K/V" in str((exc.json or {}).get("warnings")) else ""
                return error_cls(f"{what}: no secret at that path{hint}", client=client, retryable=False)
            retryable = isinstance(exc, RETRYABLE) or CAS_MISMATCH in reason
            return error_cls(f"{what}: {reason}", client=client, retryable=retryable)
        if isinstance(exc, requests.exceptions.SSLError):
            check = "vault.ca_bundle" + (" and vault.auth.cert_file" if self.config.auth.method == "cert" else "")
            return error_cls(f"{what}: TLS verification with {self.config.address} failed (check {check})",
                             client=client, retryable=False)
        if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
            kind = "timed out" if isinstance(exc, requests.Timeout) else "cannot connect"
            return error_cls(f"{what}: {kind} to {self.config.address}", client=client, retryable=True)
        if isinstance(exc, ValueError):  # the response was not the JSON Vault sends
            return error_cls(f"{what}: unreadable response from {self.config.address}", client=client,
                             retryable=False)
        if isinstance(exc, requests.RequestException):
            return error_cls(f"{what}: request to {self.config.address} failed ({type(exc).__name__})",
                             client=client, retryable=True)
        return error_cls(f"{what}: unexpected {type(exc).__name__}", client=client, retryable=False)
