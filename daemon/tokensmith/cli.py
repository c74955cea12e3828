"""The `tokensmith` command. `status` and `rotate` first try the running daemon's control socket
and import nothing heavy on that path (no pydantic, APScheduler, boto3 or hvac).

Exit codes: 0 ok; 1 a refresh failed; 2 check-config found problems (or bad usage);
3 compromise: new token written but the old one could not be invalidated; 4 compromise:
verification failed (old token still active); 5 a sink write failed; 6 the daemon did not
answer on its socket; 73 the state directory is unusable; 78 the config is invalid (EX_CONFIG).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from tokensmith import __version__
from tokensmith.control import Unreachable, default_runtime_dir, request

EXIT_OK, EXIT_FAILED, EXIT_CHECK_CONFIG, EXIT_UNREACHABLE, EXIT_STATE, EXIT_CONFIG = 0, 1, 2, 6, 73, 78


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="tokensmith", description="Keeps OAuth2 access tokens fresh.")
    top.add_argument("--version", action="version", version=f"tokensmith {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="config file (default: $TOKENSMITH_CONFIG)")
    common.add_argument("--log-format", choices=["plain", "json"], help="override log.format")
    sub = top.add_subparsers(dest="command", required=True)
    sub.add_parser("run", parents=[common], help="run the daemon")
    once = sub.add_parser("once", parents=[common], help="make sure every client has a fresh token, then exit")
    once.add_argument("--force", action="store_true", help="refresh even tokens that are still fresh")
    rotate = sub.add_parser("rotate", parents=[common], help="refresh now (via the daemon when it runs)")
    target = rotate.add_mutually_exclusive_group(required=True)
    target.add_argument("client", nargs="?")
    target.add_argument("--all", action="store_true")
    rotate.add_argument("--compromised", action="store_true", help="invalidate the current token and prove it")
    rotate.add_argument("--accept-unrevoked", action="store_true",
                        help="exit 0 even when the provider offers no way to invalidate the old token")
    rotate.add_argument("--reload-credentials", action="store_true",
                        help="re-read the client secret from its source first (after a secret reset)")
    rotate.add_argument("--verify-url", help="a protected resource that must answer 401 to the old token")
    rotate.add_argument("--json", action="store_true")
    status = sub.add_parser("status", parents=[common], help="show every client's token")
    status.add_argument("--json", action="store_true")
    check = sub.add_parser("check-config", parents=[common], help="validate the config and list every problem")
    check.add_argument("--online", action="store_true",
                       help="also discover each issuer and make one dry token request per client (no sink written)")
    demo = sub.add_parser("demo", help="run against a built-in local token endpoint, with a live view")
    demo.add_argument("--dir", default="./demo", help="where the demo's config, credentials and tokens go")
    demo.add_argument("--lifetime", type=int, default=12, help="token lifetime in seconds")
    demo.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    return top


# ---- the light path: find the daemon's socket without loading the full config model

def socket_path(args) -> str:
    runtime_dir = os.environ.get("TOKENSMITH_RUNTIME_DIR")
    config = args.config or os.environ.get("TOKENSMITH_CONFIG")
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
        return request(socket_path(args), message)
    except Unreachable as exc:
        print(f"tokensmith: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_UNREACHABLE) from None


# ---- the full path

def load(args):
    from tokensmith.config import load_settings
    from tokensmith.errors import ConfigError

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        for line in getattr(exc, "problems", [str(exc)]):
            print(f"tokensmith: config: {line}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    from tokensmith import logs

    logs.setup(settings.log.level, getattr(args, "log_format", None) or settings.log.format)
    return settings


def local_daemon(args, only=None):
    from tokensmith.daemon import Daemon
    from tokensmith.errors import ConfigError, StateError

    settings = load(args)
    if only is not None:
        unknown = [name for name in only if name not in {client.name for client in settings.clients}]
        if unknown:
            print(f"tokensmith: no client named {unknown[0]!r} in the config", file=sys.stderr)
            raise SystemExit(EXIT_CONFIG)
        settings = settings.model_copy(update={"clients": [c for c in settings.clients if c.name in only]})
    daemon = Daemon(settings, args.config, serve=False)
    try:
        daemon.build()
    except StateError as exc:
        print(f"tokensmith: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_STATE) from None
    except ConfigError as exc:
        print(f"tokensmith: config: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    return daemon


def cmd_run(args) -> int:
    from tokensmith.daemon import Daemon
    from tokensmith.errors import ConfigError, StateError, TokensmithError

    settings = load(args)
    daemon = Daemon(settings, args.config)
    daemon.handle_signals()
    try:
        daemon.build()
        daemon.start()
    except StateError as exc:
        print(f"tokensmith: {exc}", file=sys.stderr)
        daemon.stop()
        return EXIT_STATE
    except (ConfigError, TokensmithError, RuntimeError) as exc:
        print(f"tokensmith: config: {exc}", file=sys.stderr)
        daemon.stop()
        return EXIT_CONFIG
    return daemon.run_forever()


def cmd_once(args) -> int:
    reply = via_daemon(args, {"op": "status"})
    if reply is not None:  # the running daemon stays the one writer
        failed = []
        for status in reply["clients"]:
            if args.force or not status.get("valid") or status.get("sinks_pending"):
                result = via_daemon(args, {"op": "rotate", "client": status["client"]})
                if not result or not result.get("ok") or result["results"][0]["exit_code"]:
                    failed.append(status["client"])
        for status in via_daemon(args, {"op": "status"})["clients"]:
            print(format_status_line(status))
        return EXIT_FAILED if failed else EXIT_OK
    daemon = local_daemon(args)
    failed = []
    for name, keeper in daemon.keepers.items():
        if args.force or not keeper.ready():
            outcome = keeper.refresh(reason="once")
            if not outcome.ok or not outcome.sinks_ok:
                failed.append(name)
    for status in daemon.statuses():
        print(format_status_line(status))
    return EXIT_FAILED if failed else EXIT_OK


def cmd_rotate(args) -> int:
    message = {"op": "rotate", "client": args.client, "all": args.all, "compromised": args.compromised,
               "accept_unrevoked": args.accept_unrevoked, "reload_credentials": args.reload_credentials,
               "verify_url": args.verify_url}
    reply = via_daemon(args, message)
    if reply is None:
        daemon = local_daemon(args, only=None if args.all else [args.client])
        from tokensmith.commands import rotate_clients

        results = rotate_clients(daemon, list(daemon.keepers), compromised=args.compromised,
                                 accept_unrevoked=args.accept_unrevoked, reload_credentials=args.reload_credentials,
                                 verify_url=args.verify_url)
        via = "locally (no daemon running)"
    elif not reply.get("ok"):
        print(f"tokensmith: {reply.get('error')}", file=sys.stderr)
        return EXIT_CONFIG
    else:
        results = reply["results"]
        via = "by the running daemon"
    if args.json:
        print(json.dumps({"via": "daemon" if reply else "local", "results": results}, indent=2, sort_keys=True))
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


def when(timestamp) -> str:
    if not timestamp:
        return "-"
    delta = timestamp - time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
    return f"{stamp} ({'in ' if delta >= 0 else ''}{abs(delta):.0f}s{'' if delta >= 0 else ' ago'})"


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


def cmd_status(args) -> int:
    reply = via_daemon(args, {"op": "status"})
    if reply is None:
        settings = load(args)
        from tokensmith.state import StateStore

        store = StateStore(settings.state_dir)
        statuses = []
        for client in settings.clients:
            try:
                state = store.load(client.name)
            except Exception as exc:
                statuses.append({"client": client.name, "valid": False, "last_error": str(exc)})
                continue
            from tokensmith.tokens import fingerprint

            statuses.append({
                "client": client.name,
                "token": fingerprint(state.access_token) if state and state.access_token else None,
                "expires_at": int(state.expires_at) if state and state.access_token else None,
                "valid": bool(state and state.access_token and state.expires_at > time.time()),
                "last_refresh": int(state.last_refresh) if state and state.last_refresh else None,
                "next_refresh": None, "last_error": state.last_error if state else None,
                "alert": state.alert if state else None})
        daemon_running = False
    else:
        statuses = reply["clients"]
        daemon_running = True
    if args.json:
        print(json.dumps({"daemon": daemon_running, "clients": statuses}, indent=2, sort_keys=True))
    else:
        if not daemon_running:
            print("(no daemon running: showing the state directory)")
        for status in statuses:
            print(format_status_line(status))
    return EXIT_OK if all(status.get("valid") for status in statuses) else EXIT_FAILED


def cmd_check_config(args) -> int:
    from tokensmith.config import load_settings
    from tokensmith.errors import ConfigError

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        problems = getattr(exc, "problems", [exc.message])
        for line in problems:
            print(f"error: {line}")
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return EXIT_CHECK_CONFIG
    from tokensmith.config import ignored_env

    for var in ignored_env(os.environ):
        print(f"note: {var} names no config field and is ignored")
    print(f"config ok: {len(settings.clients)} client(s): {', '.join(c.name for c in settings.clients)}")
    if getattr(args, "online", False):
        from tokensmith.discovery import check_online

        if check_online(settings, sys.stdout):
            return EXIT_CHECK_CONFIG
    return EXIT_OK


def cmd_demo(args) -> int:
    from tokensmith.demo import run_demo

    return run_demo(args.dir, lifetime=args.lifetime, duration=args.duration)


COMMANDS = {"run": cmd_run, "once": cmd_once, "rotate": cmd_rotate, "status": cmd_status,
            "check-config": cmd_check_config, "demo": cmd_demo}


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
