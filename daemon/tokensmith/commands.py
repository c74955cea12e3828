"""What `rotate` does for a set of clients, shared by the control socket (daemon running) and
the CLI (no daemon): the same code under the same per-client locks."""

from __future__ import annotations

from tokensmith.compromise import EXIT_FAILED, EXIT_OK, EXIT_SINK_FAILED, operator_identity, rotate_compromised


def rotate_plain(daemon, name: str, keeper=None) -> dict:
    outcome = daemon.refresh_now(name, keeper, reason="manual")
    result = {"client": name, "grant": outcome.grant,
              "old_token": outcome.old_token.fingerprint if outcome.old_token else None,
              "new_token": outcome.new_token.fingerprint if outcome.new_token else None,
              "sinks": {sink: (error or "ok") for sink, error in outcome.sinks.items()},
              "hooks": outcome.hooks}
    if not outcome.ok:
        result.update(result="failed", exit_code=EXIT_FAILED, message=str(outcome.error))
    elif not outcome.sinks_ok:
        result.update(result="sink_failed", exit_code=EXIT_SINK_FAILED, message="some sinks were not written")
    else:
        result.update(result="rotated", exit_code=EXIT_OK, message="new token written to every sink")
    return result


def missing_verify_url(daemon, names) -> str:
    """`rotate --compromised --verify` needs a verify_url in each client's config: a one-line error, or ""."""
    missing = [name for name in names if not daemon.keepers[name].client.verify_url]
    if not missing:
        return ""
    return (f"--verify: client(s) {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} have no verify_url "
            "in the config; add one (a protected resource of that provider) or leave out --verify")


def rotate_clients(daemon, names, *, compromised=False, accept_unrevoked=False, reload_credentials=False,
                   uid=None) -> list[dict]:
    results = []
    for name in names:
        keeper = daemon.keepers.get(name)
        if keeper is None:  # removed by a reload since the request was checked: the others still rotate
            results.append({"client": name, "result": "failed", "exit_code": EXIT_FAILED,
                            "message": "the client was removed from the config"})
            continue
        if not compromised:
            if reload_credentials:
                keeper.creds = None
            results.append(rotate_plain(daemon, name, keeper))
            continue
        result = rotate_compromised(
            keeper, accept_unrevoked=accept_unrevoked, reload_credentials=reload_credentials,
            operator=operator_identity(uid), audit_path=daemon.settings.audit_log_path,
            metrics=daemon.metrics,
            on_refreshed=(lambda name=name, keeper=keeper: daemon._reschedule(name, keeper.current().next_due()))
            if daemon.scheduler else None)
        results.append({key: value for key, value in result.items() if key != "finished_at"})
    return results
