"""Compromise rotation: replace a leaked token, invalidate it as well as the provider allows,
prove it where possible, and leave an audit line. It says honestly what it achieved.

Invalidation, in order of preference (seeds: exchanging a refresh token revokes the access
token it came with; obtaining a new token does not):
  a. exchange the held refresh token; with an introspection endpoint, the old access token must then be
     inactive for the exchange to count (oidc-provider, for one, leaves it active);
  b. RFC 7009 revocation of the old access token (and of the old refresh token when it was not
     spent in step a), when a revocation endpoint is configured, unless introspection showed the
     exchange had invalidated it. A provider may revoke the whole grant then, the new token with it:
     with introspection that is checked and reported (new_token_revoked, exit 1);
  c. neither: the old token stays valid until it expires; exit EXIT_UNREVOKED unless accepted.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import threading
import time

from tokensmith.errors import StateError, TokenEndpointError, TokensmithError
from tokensmith.tokens import fingerprint

log = logging.getLogger("tokensmith.compromise")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNREVOKED = 3
EXIT_VERIFY_FAILED = 4
EXIT_SINK_FAILED = 5
EXIT_UNREACHABLE = 6

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _compromise_lock(name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(name, threading.Lock())


def operator_identity(uid: int | None = None) -> dict:
    uid = os.getuid() if uid is None else uid
    try:
        import pwd

        user = pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        user = getpass.getuser() if uid == os.getuid() else str(uid)
    return {"uid": uid, "user": user}


def _endpoint(keeper, field: str) -> str | None:
    """The client's revocation or introspection URL, configured or discovered; None when unknown."""
    lookup = getattr(keeper.token_client, "endpoint", None)
    if lookup is None:
        return getattr(keeper.client, field)
    try:
        return lookup(field)
    except TokensmithError:
        return None


def verify_with_resource(url: str, old_token: str, new_token: str, *, timeout: float, ca_bundle=None,
                         proxy: str | None = None) -> str:
    """--verify-url: the protected resource must refuse the old token (401) and take the new one.
    Each request has the token client's transport and deadline: no proxy from the environment sees
    either token (an https resource is reached through a CONNECT tunnel), no redirect is followed, TLS is
    verified against the client's CA bundle."""
    import http.client
    import ssl
    from urllib.parse import urlsplit

    from tokensmith.proxy import ProxyError, proxy_for
    from tokensmith.transport import BodyError, HttpPool, TLSSetupError

    if urlsplit(url).scheme not in ("http", "https"):
        return "error: not an http(s) URL"
    pool = HttpPool(pool_size=1)
    ca = str(ca_bundle) if ca_bundle else None
    statuses = []
    try:
        via = proxy_for(url, proxy)
        for token in (old_token, new_token):
            reply, _ = pool.get(url, {"Authorization": f"Bearer {token}", "Accept-Encoding": "identity",
                                      "User-Agent": "tokensmith"}, timeout=timeout, ca_bundle=ca, max_body=64 * 1024,
                                proxy=via)
            statuses.append(reply.status_code)
    except TimeoutError:
        return f"error: timed out after {timeout:g}s"
    except ProxyError as exc:
        return f"error: {exc}"
    except (ssl.SSLError, TLSSetupError):
        return "error: TLS verification failed"
    except (OSError, ValueError, BodyError, http.client.HTTPException) as exc:
        return f"error: {type(exc).__name__}"
    finally:
        pool.close()
    old, new = statuses
    if old != 401:
        return f"failed: old token got HTTP {old}"
    if not 200 <= new < 300:
        return f"failed: new token got HTTP {new}"
    return "verified"


def rotate_compromised(keeper, *, accept_unrevoked: bool = False, reload_credentials: bool = False,
                       operator: dict | None = None, audit_path=None, metrics=None, on_refreshed=None) -> dict:
    keeper = keeper.current()  # a reload may have replaced it since it was looked up
    target = fingerprint(keeper.state.access_token) if keeper.state.access_token else None
    requested_at = time.time()
    with _compromise_lock(keeper.name):
        keeper = keeper.current()
        last = keeper.last_compromise
        if last and target and last["old_token"] == target and last["finished_at"] >= requested_at:
            return dict(last, coalesced=True)
        # only the config names the resource that is shown both tokens; never a request or a flag
        result = _rotate(keeper, accept_unrevoked, reload_credentials, keeper.client.verify_url, operator,
                         on_refreshed)
        result["finished_at"] = time.time()
        keeper.current().last_compromise = result
    append_audit(audit_path, result, store=keeper.store)
    if metrics is not None and hasattr(metrics, "compromise_rotation"):
        metrics.compromise_rotation(keeper.name, result["result"])
    level = logging.WARNING if result["exit_code"] else logging.INFO
    log.log(level, "compromise rotation: %s (old %s, new %s, invalidation %s, verification %s)", result["result"],
            result["old_token"], result["new_token"], result["invalidation"], result["verification"],
            extra={"client": keeper.name, "event": "compromise_rotation"})
    return result


def _rotate(keeper, accept_unrevoked, reload_credentials, verify_url, operator, on_refreshed) -> dict:
    result = {"time": time.time(), "client": keeper.name, "operator": operator or operator_identity(),
              "old_token": None, "new_token": None,
              "reload_credentials": reload_credentials, "steps": [], "invalidation": "none",
              "verification": "unverified", "sinks": {}, "hooks": [], "result": "", "exit_code": EXIT_OK,
              "coalesced": False}
    steps = result["steps"]

    outcome = keeper.refresh(reason="compromised", exchange=True, reload_credentials=reload_credentials)
    keeper = outcome.keeper or keeper  # its successor, when a reload replaced it meanwhile
    if on_refreshed is not None:
        on_refreshed()
    old = outcome.old_token  # what was current when the rotation took the lock
    old_access = old.access_token if old else None
    old_refresh = old.refresh_token if old else None
    paired = outcome.old_paired
    result["old_token"] = old.fingerprint if old else None
    if not outcome.ok:
        result.update(result="failed", exit_code=EXIT_FAILED,
                      message=f"no new token: {outcome.error}; the old token is still valid")
        if outcome.fell_back:
            steps.append({"step": "refresh_exchange", "result": f"rejected ({outcome.fell_back})"})
        return result
    new = outcome.new_token
    result["new_token"] = new.fingerprint
    result["grant"] = outcome.grant
    result["sinks"] = {name: (error or "ok") for name, error in outcome.sinks.items()}
    result["hooks"] = outcome.hooks
    invalidated = []

    spent_refresh = outcome.grant == "refresh_token" and outcome.exchanged_refresh_token
    creds = keeper.creds
    can_introspect = bool(_endpoint(keeper, "introspection_url")) and creds is not None
    exchange_shown = False  # the provider said the old access token is inactive after the exchange
    if outcome.fell_back:
        steps.append({"step": "refresh_exchange", "result": f"rejected ({outcome.fell_back})"})
    elif spent_refresh and old_access:
        still_active = _active(keeper, old_access, creds) if paired and can_introspect else None
        if not paired:
            steps.append({"step": "refresh_exchange",
                          "result": "ok, but the old access token was not issued with that refresh token"})
        elif still_active:
            # not every provider revokes the access token on an exchange (oidc-provider does not)
            steps.append({"step": "refresh_exchange", "result": "ok, but the provider left the old access token "
                                                                "active"})
        else:
            steps.append({"step": "refresh_exchange", "result": "ok"})
            invalidated.append("refresh_exchange")
            exchange_shown = still_active is False

    if _endpoint(keeper, "revocation_url") and old_access and creds is not None:
        targets = [] if exchange_shown else [("access_token", old_access)]
        if old_refresh and not spent_refresh:
            targets.append(("refresh_token", old_refresh))
        for hint, value in targets:
            try:
                keeper.token_client.revoke(value, hint, creds)
            except TokensmithError as exc:
                steps.append({"step": f"revoke_{hint}", "result": f"failed: {exc.message}"})
                continue
            steps.append({"step": f"revoke_{hint}", "result": "ok"})
            if hint == "access_token":
                invalidated.append("revocation")
    result["invalidation"] = "+".join(invalidated) if invalidated else "none"

    if old_access and _endpoint(keeper, "introspection_url") and creds is not None:
        try:
            active = keeper.token_client.introspect(old_access, creds)
            result["verification"] = "failed: old token still active" if active else "verified"
        except TokenEndpointError as exc:
            result["verification"] = f"error: {exc.message}"
    if old_access and verify_url:
        by_resource = verify_with_resource(verify_url, old_access, new.access_token, timeout=keeper.client.timeout,
                                           ca_bundle=keeper.client.ca_bundle, proxy=keeper.client.proxy)
        result["verify_url"] = by_resource
        if result["verification"] in ("unverified", "verified") or by_resource != "verified":
            result["verification"] = by_resource

    # RFC 7009 lets a provider revoke the whole grant with one of its tokens (oidc-provider does): then
    # the new token, already in the sinks, is dead as well
    revoked = any(step["step"].startswith("revoke_") and step["result"] == "ok" for step in steps)
    new_revoked = bool(revoked and can_introspect and _active(keeper, new.access_token, creds) is False)
    if new_revoked:
        steps.append({"step": "check_new_token", "result": "inactive: the provider revoked it with the old one"})
        keeper.state.alert = ("compromise rotation: the provider revoked the new token together with the old one "
                              "(the whole grant); new credentials or a new refresh token are needed")

    if old_access:
        result["purged"] = purge_history(keeper, old_access)

    if not old_access:
        result.update(result="no_old_token", message="there was no token to invalidate; a new one was written")
    elif new_revoked:
        result.update(result="new_token_revoked", exit_code=EXIT_FAILED,
                      message=f"old token invalidated by {result['invalidation']}, but the provider revoked the new "
                              "token with it (the whole grant): new credentials or a new refresh token are needed")
    elif result["verification"].startswith(("failed", "error")):
        result.update(result="verification_failed", exit_code=EXIT_VERIFY_FAILED,
                      message="the old token could not be shown to be invalid")
    elif not invalidated:
        result.update(result="unrevoked",
                      message="the provider offers no way to invalidate the old token: it stays valid until "
                              f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(outcome.old_token.expires_at))}")
        if not accept_unrevoked:
            result["exit_code"] = EXIT_UNREVOKED
    else:
        result.update(result="rotated", message=f"old token invalidated by {result['invalidation']}")
    if not outcome.sinks_ok:
        result["message"] += "; some sinks were not written"
        if result["exit_code"] in (EXIT_OK, EXIT_UNREVOKED):
            result["exit_code"] = EXIT_SINK_FAILED
    if any(not hook["ok"] for hook in outcome.hooks):
        result["message"] += "; a consumer hook failed"
    return result


def _active(keeper, token: str, creds) -> bool | None:
    """RFC 7662 for one token; None when the provider gave no answer."""
    try:
        return keeper.token_client.introspect(token, creds)
    except TokensmithError:
        return None


def purge_history(keeper, old_access: str) -> dict:
    """Per sink, what was done to remove the leaked token from the store's version history (where the store
    keeps one and allows it). A failure is reported, not raised: the rotation itself has succeeded."""
    purged = {}
    for sink in keeper.sinks:
        purge = getattr(sink, "purge", None)
        if purge is None:
            purged[sink.name] = "nothing to remove: no version history"
            continue
        try:
            purged[sink.name] = purge(old_access)
        except TokensmithError as exc:
            purged[sink.name] = f"not removed: {exc.message}"
    return purged


def append_audit(path, result: dict, store=None) -> None:
    """The audit record (fingerprints only) goes to the log stream (journald / container stdout), to a
    shared state backend when there is one (it outlives the pod), and to the audit log file."""
    record = {key: result[key] for key in ("time", "client", "operator", "old_token", "new_token", "grant",
                                           "reload_credentials", "steps", "invalidation", "verification",
                                           "sinks", "purged", "hooks", "result", "exit_code") if key in result}
    record["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(result["time"]))
    log.info("%s", json.dumps(record, sort_keys=True, separators=(",", ":")),
             extra={"client": record.get("client"), "event": "audit"})
    if store is not None:
        try:
            store.append_audit(record)
        except StateError as exc:
            log.error("audit record not stored in the state backend (it is in the log stream): %s", exc.message,
                      extra={"client": record.get("client"), "event": "audit_store_failed"})
    if path is not None:
        write_audit_line(path, record)


def write_audit_line(path, record: dict) -> None:
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    from tokensmith.fsutil import make_dirs  # parents 0755 whatever the umask

    make_dirs(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:  # an existing log made wider by hand or by someone else
            os.fchmod(fd, 0o600)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
