"""The `tokensmith` command. `status` and `rotate` first try the running daemon's control socket
and import nothing heavy on that path (no pydantic, APScheduler, boto3 or hvac).

Exit codes (EXIT_CODES below; `tokensmith --help` lists them): 0 ok; 1 a refresh failed; 2 bad
usage (argparse); 3 compromise: new token written but the old one could not be invalidated;
4 compromise: verification failed (old token still active); 5 a sink write failed; 6 the daemon
did not answer on its socket; 7 check-config found problems; 8 no client of that name; 9 another
tokensmith daemon uses this state directory, or the health port is taken; 73 the state directory
is unusable; 77 the daemon refused the request (not authorised); 78 the config is invalid (EX_CONFIG).
"""

from __future__ import annotations

import json
import os
import sys
import time

from tokensmith import __version__
from tokensmith.control import Unreachable, default_runtime_dir, request
from tokensmith.control_protocol import Request
from tokensmith.logs import error_line

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_FORBIDDEN = 0, 1, 2, 6, 77
EXIT_CHECK_CONFIG, EXIT_NO_CLIENT, EXIT_IN_USE, EXIT_STATE, EXIT_CONFIG = 7, 8, 9, 73, 78
EXIT_CODES = {
    0: "success",
    1: "a refresh failed (once: some client has no fresh token; rotate: no new token, or the provider revoked "
       "the new one with the compromised one)",
    2: "bad usage (unknown option or missing argument)",
    3: "compromise: new token written, but the old one could not be invalidated",
    4: "compromise: verification failed, the old token still works",
    5: "a sink could not be written",
    6: "the daemon's control socket exists but the daemon did not answer",
    7: "check-config found problems",
    8: "no client of that name in the config",
    9: "in use: another tokensmith daemon uses this state directory or holds the leader lease (rotate on a "
       "standby), or the health port is taken",
    73: "the state directory cannot be created or written, or belongs to another user",
    77: "the daemon refused the request (not authorised)",
    78: "the config is invalid or missing (EX_CONFIG; systemd does not restart)",
}
DEFAULT_CONFIG = "/etc/tokensmith/config.yaml"
TIME_FIELDS = ("expires_at", "last_refresh", "next_refresh")
STATUS_FIELDS = ("client", "token", "valid", "expires_at", "last_refresh", "last_grant", "next_refresh",
                 "refresh_token_held", "failures", "last_error", "alert", "sinks_pending", "stuck_for")


def parser() -> argparse.ArgumentParser:
    import argparse

    epilog = "exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())
    top = argparse.ArgumentParser(prog="tokensmith", description="Keeps OAuth2 access tokens fresh.", epilog=epilog,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="version", version=f"tokensmith {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="config file (default: $TOKENSMITH_CONFIG, else "
                                         "$CONFIGURATION_DIRECTORY/config.yaml, else " + DEFAULT_CONFIG + ")")
    common.add_argument("--log-format", choices=["plain", "json"], help="override log.format")
    sub = top.add_subparsers(dest="command", required=True)
    sub.add_parser("run", parents=[common], help="run the daemon")
    once = sub.add_parser("once", parents=[common], help="make sure every client has a fresh token, then exit")
    once.add_argument("--force", action="store_true", help="refresh even tokens that are still fresh")
    once.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                      help="keep retrying a failing client for this long (default 30; 0: one attempt)")
    rotate = sub.add_parser("rotate", parents=[common], help="refresh now (via the daemon when it runs)",
                            epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = rotate.add_mutually_exclusive_group(required=True)
    target.add_argument("client", nargs="?", help="the client to refresh (its name in the config)")
    target.add_argument("--all", action="store_true", help="refresh every client")
    rotate.add_argument("--compromised", action="store_true", help="invalidate the current token and prove it")
    rotate.add_argument("--accept-unrevoked", action="store_true",
                        help="exit 0 even when the provider offers no way to invalidate the old token")
    rotate.add_argument("--reload-credentials", action="store_true",
                        help="re-read the client secret from its source first (after a secret reset)")
    rotate.add_argument("--verify", action="store_true",
                        help="with --compromised: require the client's configured verify_url check")
    rotate.add_argument("--verify-url", help=argparse.SUPPRESS)  # removed: refused with a pointer to verify_url
    rotate.add_argument("--json", action="store_true", help="print the results as JSON (times in ISO 8601 UTC)")
    status = sub.add_parser("status", parents=[common], help="show every client's token")
    status.add_argument("--json", action="store_true", help="print as JSON (the same fields with or without a "
                                                            "running daemon; times in ISO 8601 UTC)")
    check = sub.add_parser("check-config", parents=[common],
                           help="validate the config and the files, directories and programs it names")
    check.add_argument("--config-only", action="store_true",
                       help="validate the config file only, not the machine (e.g. in CI, away from the host)")
    check.add_argument("--online", action="store_true",
                       help="also read every client's credentials, check Vault, AWS and token endpoints answer, "
                            "discover each issuer and make one dry token request per client (no sink written)")
    check.add_argument("--json", action="store_true", help="print the findings as JSON")
    demo = sub.add_parser("demo", help="run against a built-in local token endpoint, with a live view")
    demo.add_argument("--dir", default="./demo", help="where the demo's config, credentials and tokens go")
    demo.add_argument("--lifetime", type=int, default=12, help="token lifetime in seconds")
    demo.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    return top


# ---- the light path: find the daemon's socket without loading the full config model

def config_candidates(environ=os.environ) -> list[str]:
    """Where the config is looked for without --config: $TOKENSMITH_CONFIG alone when set, else
    systemd's ConfigurationDirectory=, else /etc/tokensmith."""
    if environ.get("TOKENSMITH_CONFIG"):
        return [environ["TOKENSMITH_CONFIG"]]
    candidates = []
    if environ.get("CONFIGURATION_DIRECTORY"):
        candidates.append(os.path.join(environ["CONFIGURATION_DIRECTORY"].split(":")[0], "config.yaml"))
    return candidates + [DEFAULT_CONFIG]


def resolve_config(args) -> None:
    """Fill in args.config from the defaults; None when no file exists there (say so on the full path)."""
    if getattr(args, "config", None) or not hasattr(args, "config"):
        return
    candidates = config_candidates()
    args.config_searched = candidates
    args.config = next((path for path in candidates if os.path.exists(path)), None)
    if args.config is None and os.environ.get("TOKENSMITH_CONFIG"):
        args.config = os.environ["TOKENSMITH_CONFIG"]  # reading it reports the problem with its name


def no_config_file(args) -> str | None:
    """The one-line complaint when there is no config file and no config from the environment."""
    if args.config is not None:
        return None
    from tokensmith.config import ENV_PREFIX, ignored_env

    ignored = set(ignored_env(os.environ))
    if any(var.startswith(ENV_PREFIX) and var not in ignored for var in os.environ):
        return None  # a config given wholly in TOKENSMITH_* variables
    return (f"no config file: looked for {' and '.join(getattr(args, 'config_searched', [DEFAULT_CONFIG]))}; "
            f"pass --config FILE or set TOKENSMITH_CONFIG")


def socket_path(args) -> str:
    runtime_dir = os.environ.get("TOKENSMITH_RUNTIME_DIR")
    config = args.config
    if not runtime_dir and config:
        try:
            import yaml

            with open(config) as handle:
                data = yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            if isinstance(data, dict) and data.get("runtime_dir"):
                runtime_dir = str(data["runtime_dir"])
        except Exception:  # an unreadable config: the full loader reports it properly later
            pass
    return os.path.join(runtime_dir or default_runtime_dir(), "control.sock")


def via_daemon(args, message: dict):

    try:
        reply = request(socket_path(args), message)
    except Unreachable as exc:
        print(f"tokensmith: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_UNREACHABLE) from None
    code = {"forbidden": EXIT_FORBIDDEN, "busy": EXIT_UNREACHABLE, "timeout": EXIT_UNREACHABLE,
            "bad_request": EXIT_USAGE, "unknown_client": EXIT_NO_CLIENT, "no_verify_url": EXIT_CONFIG,
            "standby": EXIT_IN_USE}.get(reply.get("code") if reply and not reply.get("ok") else None)
    if code is not None:
        print(f"tokensmith: {reply.get('error')}", file=sys.stderr)
        raise SystemExit(code)
    return reply


# ---- the full path

def load(args, cached: bool = False):
    """The validated config; with cached, through the validated-config cache (configcache.py)."""
    from tokensmith.errors import ConfigError

    missing = no_config_file(args)
    if missing:
        error_line(missing)
        raise SystemExit(EXIT_CONFIG)
    outcome = None
    try:
        if cached:
            from tokensmith.configcache import load as load_cached

            settings, outcome = load_cached(args.config)
        else:
            from tokensmith.config import load_settings

            settings = load_settings(args.config)
    except ConfigError as exc:
        for line in getattr(exc, "problems", [str(exc)]):
            error_line(f"config: {line}")
        raise SystemExit(EXIT_CONFIG) from None
    from tokensmith import logs

    logs.setup(settings.log.level, getattr(args, "log_format", None) or settings.log.format)
    if outcome:
        import logging

        logging.getLogger("tokensmith.configcache").debug(outcome, extra={"event": "config_cache"})
    return settings


def no_such_client(name: str, known: list[str]) -> SystemExit:
    listed = ", ".join(known[:10]) + (f", ... ({len(known) - 10} more)" if len(known) > 10 else "")
    print(f"tokensmith: no client named {name!r} in the config (clients: {listed})", file=sys.stderr)
    return SystemExit(EXIT_NO_CLIENT)


def refuse_foreign_state_dir(settings) -> None:
    """Without a daemon the CLI writes state files itself. Written by root (sudo) into the service
    user's directory they would be unreadable to the service, so refuse instead. (Another user
    cannot write there at all, or shares it through the group, as in a pod with fsGroup.)"""
    try:
        owner = os.stat(settings.state_dir).st_uid
    except OSError:
        return  # created now, by this user; the daemon's own start-up reports an unusable one
    if os.geteuid() == 0 and owner != 0:
        print(f"tokensmith: state directory {settings.state_dir} belongs to uid {owner}, not to root: "
              f"files written now would lock the service out of its own state. "
              f"Start the daemon (systemctl start tokensmith) so it does this, or run as uid {owner}",
              file=sys.stderr)
        raise SystemExit(EXIT_STATE)


def local_daemon(args, only=None):
    from tokensmith.daemon import Daemon
    from tokensmith.errors import ConfigError, StateError

    settings = load(args)
    if only is not None:
        known = [client.name for client in settings.clients]
        unknown = [name for name in only if name not in known]
        if unknown:
            raise no_such_client(unknown[0], known)
        settings = settings.model_copy(update={"clients": [c for c in settings.clients if c.name in only]})
    refuse_foreign_state_dir(settings)
    daemon = Daemon(settings, args.config, serve=False)
    try:
        daemon.build()
    except StateError as exc:
        error_line(str(exc))
        raise SystemExit(EXIT_STATE) from None
    except ConfigError as exc:
        error_line(f"config: {exc}")
        raise SystemExit(EXIT_CONFIG) from None
    return daemon


def cmd_run(args) -> int:
    from tokensmith.daemon import Daemon, InUse
    from tokensmith.errors import ConfigError, StateError, TokensmithError

    settings = load(args, cached=True)
    daemon = Daemon(settings, args.config)
    daemon.load_config = reload_config
    daemon.handle_signals()
    # every start-up failure: one line, its own exit code, and nothing left behind (daemon.stop
    # removes the control socket and releases the state-directory lock)
    try:
        daemon.build()
        daemon.start()
    except StateError as exc:
        code, line = EXIT_STATE, str(exc)
    except InUse as exc:
        code, line = EXIT_IN_USE, str(exc)
    except (ConfigError, TokensmithError) as exc:
        code, line = EXIT_CONFIG, f"config: {exc}"
    except OSError as exc:
        code, line = EXIT_STATE, f"start-up failed: {exc.strerror or exc}" + (
            f": {exc.filename}" if getattr(exc, "filename", None) else "")
    else:
        from tokensmith.daemon import release_freed_memory

        release_freed_memory()
        return daemon.run_forever()
    error_line(line)
    daemon.stop()
    return code


def reload_config(path):
    """A reload validates in full unless the cache holds this very config (and keeps the cache current)."""
    import logging

    from tokensmith.configcache import load as load_cached

    settings, outcome = load_cached(path)
    logging.getLogger("tokensmith.configcache").debug(outcome, extra={"event": "config_cache"})
    return settings


def cmd_once(args) -> int:
    reply = via_daemon(args, {"op": "status"})
    if reply is not None:  # the running daemon stays the one writer
        failed = []
        for status in reply["clients"]:
            if args.force or not status.get("valid") or status.get("sinks_pending"):
                result = via_daemon(args, Request("rotate", client=status["client"]).message())
                if not result or not result.get("ok") or result["results"][0]["exit_code"]:
                    failed.append(status["client"])
        for status in via_daemon(args, {"op": "status"})["clients"]:
            print(format_status_line(status))
        return EXIT_FAILED if failed else EXIT_OK
    daemon = local_daemon(args)
    deadline = time.monotonic() + max(args.wait, 0.0)
    pending = [name for name, keeper in daemon.keepers.items() if args.force or not keeper.ready()]
    failed: list[str] = []
    delay = 1.0
    while pending:
        retry = []
        for name in pending:
            outcome = daemon.keepers[name].refresh(reason="once")
            if not outcome.ok or not outcome.sinks_ok:
                # a refused credential will not change by waiting: only transient failures are retried
                transient = outcome.error is None or getattr(outcome.error, "retryable", False)
                (retry if transient else failed).append(name)
        left = deadline - time.monotonic()
        if not retry or left <= 0:
            failed += retry
            break
        time.sleep(min(delay, left))
        delay = min(delay * 2, 8.0)
        pending = retry
    for status in daemon.statuses():
        print(format_status_line(status))
    return EXIT_FAILED if failed else EXIT_OK


def cmd_rotate(args) -> int:
    if args.verify_url is not None:
        print("tokensmith: --verify-url was removed: tokens go only where the config says; set verify_url in "
              "the client's config and use --verify", file=sys.stderr)
        return EXIT_USAGE
    if args.verify and not args.compromised:
        print("tokensmith: --verify needs --compromised", file=sys.stderr)
        return EXIT_USAGE
    message = Request("rotate", client=args.client, all=args.all, compromised=args.compromised,
                      accept_unrevoked=args.accept_unrevoked, reload_credentials=args.reload_credentials,
                      verify=args.verify).message()
    reply = via_daemon(args, message)
    if reply is None:
        daemon = local_daemon(args, only=None if args.all else [args.client])
        from tokensmith.commands import missing_verify_url, rotate_clients

        missing = missing_verify_url(daemon, list(daemon.keepers)) if args.verify else ""
        if missing:
            print(f"tokensmith: {missing}", file=sys.stderr)
            return EXIT_CONFIG
        results = rotate_clients(daemon, list(daemon.keepers), compromised=args.compromised,
                                 accept_unrevoked=args.accept_unrevoked, reload_credentials=args.reload_credentials)
        via = "locally (no daemon running)"
    elif not reply.get("ok"):
        print(f"tokensmith: {reply.get('error')}", file=sys.stderr)
        if isinstance(reply.get("exit_code"), int):
            return reply["exit_code"]
        return EXIT_NO_CLIENT if str(reply.get("error", "")).startswith("unknown client") else EXIT_FAILED
    else:
        results = reply["results"]
        via = "by the running daemon"
    if args.json:
        print(json.dumps({"via": "daemon" if reply else "local", "results": [iso_times(r) for r in results]},
                         indent=2, sort_keys=True))
    else:
        for result in results:
            print(format_rotation(result, via))
    codes = [result["exit_code"] for result in results if result["exit_code"]]
    return max(codes, key=severity) if codes else EXIT_OK


def severity(code: int) -> int:
    return {1: 5, 4: 4, 3: 3, 5: 2}.get(code, 1)


def format_rotation(result: dict, via: str) -> str:
    lines = [f"{result['client']}: {result['result']} {via}: {result.get('message', '')}",
             f"  old token {result.get('old_token') or '-'} -> new token {result.get('new_token') or '-'}"
             + (f" ({result['grant']} grant)" if result.get("grant") else "")]
    for step in result.get("steps", []):
        lines.append(f"  {step['step']}: {step['result']}")
    if "verification" in result:
        lines.append(f"  verification: {result['verification']}")
    for sink, outcome in result.get("sinks", {}).items():
        lines.append(f"  sink {sink}: {outcome}")
    for hook in result.get("hooks", []):
        lines.append(f"  hook {hook['hook']}: {'ok' if hook['ok'] else hook['error']}")
    return "\n".join(lines)


def iso(timestamp) -> str | None:
    """The one time format of --json output and the audit log: ISO 8601 UTC, to the second."""
    if timestamp is None or isinstance(timestamp, str):
        return timestamp
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def iso_times(record: dict) -> dict:
    return {key: iso(value) if (key in TIME_FIELDS or key.endswith("_at") or key == "time")
            and isinstance(value, (int, float)) and not isinstance(value, bool) else value
            for key, value in record.items()}


def when(timestamp) -> str:
    if not timestamp:
        return "-"
    delta = timestamp - time.time()
    if abs(delta) < 1:
        return f"{iso(timestamp)} (now)"
    amount = f"{abs(delta):.0f}s" if abs(delta) < 120 else f"{abs(delta) / 60:.0f}m" if abs(delta) < 7200 \
        else f"{abs(delta) / 3600:.1f}h"
    return f"{iso(timestamp)} ({'in ' + amount if delta >= 0 else amount + ' ago'})"


def format_status_line(status: dict) -> str:
    line = (f"{status['client']}: token {status.get('token') or '-'} "
            f"{'valid' if status.get('valid') else 'NOT VALID'}, expires {when(status.get('expires_at'))}, "
            f"last refresh {when(status.get('last_refresh'))}, next refresh {when(status.get('next_refresh'))}")
    if status.get("sinks_pending"):
        line += f", sinks pending: {', '.join(status['sinks_pending'])}"
    if status.get("stuck_for"):
        line += f", STUCK for {status['stuck_for']}s"
    if status.get("last_error"):
        line += f"\n  last error: {status['last_error']}"
    if status.get("alert"):
        line += f"\n  ALERT: {status['alert']}"
    return line


def local_statuses(settings) -> list[dict]:
    """What the daemon's status would say, from the state directory alone."""
    from tokensmith.state import build_state_backend
    from tokensmith.tokens import fingerprint

    store = build_state_backend(settings)
    now = time.time()
    statuses = []
    for client in settings.clients:
        status = dict.fromkeys(STATUS_FIELDS)
        status["client"] = client.name
        try:
            state = store.load(client.name)
        except Exception as exc:
            status.update(valid=False, last_error=str(exc))
            statuses.append(status)
            continue
        if state is not None:
            has_token = bool(state.access_token)
            status.update(token=fingerprint(state.access_token) if has_token else None,
                          expires_at=int(state.expires_at) if has_token else None,
                          valid=bool(has_token and state.expires_at > now),
                          last_refresh=int(state.last_refresh) if state.last_refresh else None,
                          last_grant=getattr(state, "last_grant", None),
                          refresh_token_held=bool(getattr(state, "refresh_token", None)),
                          last_error=state.last_error, alert=state.alert)
        else:
            status.update(valid=False, refresh_token_held=False)
        statuses.append(status)
    return statuses


def format_leadership(lead: dict) -> str:
    expiry = lead.get("lease_expires_in")
    leader = "none elected"
    if lead.get("leader"):
        leader = f"{lead['leader']} (epoch {lead['epoch']}"
        leader += f", lease expires in {expiry:g}s)" if expiry is not None else ")"
    return (f"state backend: {lead['backend']}\nleader: {leader}\n"
            f"this replica: {lead['identity']}, {lead['role']}")


def lease_status(settings) -> dict:
    """The lease record as the store holds it, for `status` without a daemon on this host."""
    from tokensmith.backends import Backends
    from tokensmith.leases import LeaseError, build_lease

    lease = build_lease(settings, Backends(settings))
    try:
        record = lease.read()
    except LeaseError as exc:
        return {"backend": lease.where, "identity": "(no daemon here)", "role": f"lease unreadable: {exc.message}",
                "leader": None, "epoch": 0, "lease_expires_in": None}
    return {"backend": lease.where, "identity": "(no daemon here)", "role": "not running",
            "leader": record.holder if record else None, "epoch": record.epoch if record else 0,
            "lease_expires_in": None}


def cmd_status(args) -> int:
    reply = via_daemon(args, {"op": "status"})
    if reply is None:
        settings = load(args)
        statuses = local_statuses(settings)
        daemon_running = False
        if settings.state.type != "file":
            reply = {"leadership": lease_status(settings)}
    else:
        statuses = reply["clients"]
        daemon_running = True
    leadership = (reply or {}).get("leadership")
    if args.json:
        clients = [iso_times({field: status.get(field) for field in STATUS_FIELDS}) for status in statuses]
        print(json.dumps({"daemon": daemon_running, "clients": clients,
                          **({"leadership": leadership} if leadership else {})}, indent=2, sort_keys=True))
    else:
        if not daemon_running:
            print("(no daemon running: showing the state directory)")
        if leadership:
            print(format_leadership(leadership))
        for status in statuses:
            print(format_status_line(status))
    return EXIT_OK if all(status.get("valid") for status in statuses) else EXIT_FAILED


def shared_state_warnings(settings) -> list[str]:
    if settings.state.type == "file":
        return []
    return [f"client {client.name}: file sink {sink.path} with state type {settings.state.type}: every replica "
            f"writes its own host's copy of this file"
            for client in settings.clients for sink in client.sinks if sink.type == "file"]


def cmd_check_config(args) -> int:
    from tokensmith.config import ignored_env, load_settings
    from tokensmith.errors import ConfigError

    findings = {"config": args.config, "ok": False, "clients": [], "problems": [], "notes": []}
    missing = no_config_file(args)
    settings = None
    if missing:
        findings["problems"].append({"where": None, "message": missing})
    else:
        try:
            settings = load_settings(args.config)
        except ConfigError as exc:
            findings["problems"] += [{"where": None, "message": line}
                                     for line in getattr(exc, "problems", [exc.message])]
    if settings is not None:
        findings["clients"] = [client.name for client in settings.clients]
    if settings is not None and not args.config_only:
        from tokensmith.checks import host_problems

        findings["problems"] += host_problems(settings, online=args.online)
    findings["notes"] = [f"{var} names no config field and is ignored" for var in ignored_env(os.environ)]
    findings["warnings"] = shared_state_warnings(settings) if settings is not None else []
    if settings is not None and args.online:
        import io

        from tokensmith.discovery import check_online

        out = io.StringIO()
        check_online(settings, out)
        for line in out.getvalue().splitlines():
            if line.startswith("error: "):
                findings["problems"].append({"where": None, "message": line[len("error: "):]})
            else:
                findings["notes"].append(line)
    findings["ok"] = not findings["problems"]
    if args.json:
        print(json.dumps(findings, indent=2, sort_keys=True))
    else:
        for problem in findings["problems"]:
            where = f"{problem['where']}: " if problem["where"] else ""
            print(f"error: {where}{problem['message']}")
        for warning in findings["warnings"]:
            print(f"warning: {warning}")
        for note in findings["notes"]:
            print(f"note: {note}")
        if findings["problems"]:
            print(f"{len(findings['problems'])} problem(s) found", file=sys.stderr)
        else:
            print(f"config ok: {len(settings.clients)} client(s): {', '.join(findings['clients'])}")
    return EXIT_OK if findings["ok"] else EXIT_CHECK_CONFIG


def cmd_demo(args) -> int:
    from tokensmith.demo import run_demo

    return run_demo(args.dir, lifetime=args.lifetime, duration=args.duration)


COMMANDS = {"run": cmd_run, "once": cmd_once, "rotate": cmd_rotate, "status": cmd_status,
            "check-config": cmd_check_config, "demo": cmd_demo}


def run_args(argv: list[str]):
    """`run` with only --config and --log-format, read without argparse: no first token waits for
    argparse and the whole parser. Anything else (None) goes to argparse, which parses it the same."""
    if not argv or argv[0] != "run":
        return None
    values: dict = {"config": None, "log_format": None}
    rest = argv[1:]
    while rest:
        option, equals, value = rest[0].partition("=")
        if option not in ("--config", "--log-format"):
            return None
        if not equals:
            if len(rest) < 2 or rest[1].startswith("-"):
                return None
            value = rest[1]
        rest = rest[1 if equals else 2:]
        if option == "--log-format" and value not in ("plain", "json"):
            return None
        values[option[2:].replace("-", "_")] = value
    from types import SimpleNamespace

    return SimpleNamespace(command="run", **values)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = run_args(argv) or parser().parse_args(argv)
    resolve_config(args)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
