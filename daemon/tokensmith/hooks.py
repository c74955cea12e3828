"""Consumer hooks run after every new token: signal a process by pid file, or run a command,
so an application that caches the token in memory reloads it. The token is never passed: the
hook learns the client name and the token's fingerprint and reads the sink itself.

A command does not inherit the daemon's environment, which holds the Vault token, AWS keys and
env-source credentials: it gets PATH, the locale (LANG, LANGUAGE, LC_*), TZ, the TOKENSMITH_*
variables below, and only what its pass_env names."""

from __future__ import annotations

import logging
import os
import re
import signal

log = logging.getLogger("tokensmith.hooks")


def _signal(hook) -> None:
    try:
        text = hook.pid_file.read_text().strip()
    except OSError as exc:
        raise RuntimeError(f"cannot read pid file {hook.pid_file}: {exc.strerror}") from exc
    if not re.fullmatch(r"[0-9]+", text) or int(text) <= 1:  # not str.isdigit(), which takes "²"
        raise RuntimeError(f"pid file {hook.pid_file} does not hold a process id")
    try:
        os.kill(int(text), getattr(signal, "SIG" + hook.signal))
    except OSError as exc:
        raise RuntimeError(f"cannot signal pid {text}: {exc.strerror}") from exc


BASE_ENV = ("PATH", "LANG", "LANGUAGE", "TZ")


def hook_env(hook, client: str, token, environ=os.environ) -> dict[str, str]:
    env = {name: value for name, value in environ.items()
           if name in BASE_ENV or name.startswith("LC_") or name in hook.pass_env}
    env.update(TOKENSMITH_CLIENT=client, TOKENSMITH_TOKEN_FINGERPRINT=token.fingerprint,
               TOKENSMITH_EXPIRES_AT=str(int(token.expires_at)))
    return env


def _command(hook, client: str, token) -> None:
    import subprocess  # not at start-up: no first token waits for it

    env = hook_env(hook, client, token)
    try:
        result = subprocess.run(hook.argv, env=env, timeout=hook.timeout, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"command {hook.argv[0]} timed out after {hook.timeout:g}s") from None
    except OSError as exc:
        raise RuntimeError(f"cannot run {hook.argv[0]}: {exc.strerror}") from exc
    if result.returncode != 0:
        raise RuntimeError(f"command {hook.argv[0]} exited {result.returncode}")


class Hooks:
    def run(self, client, token) -> list[dict]:
        results = []
        for hook in client.hooks:
            label = f"signal:{hook.pid_file}" if hook.type == "signal" else f"command:{hook.argv[0]}"
            try:
                if hook.type == "signal":
                    _signal(hook)
                else:
                    _command(hook, client.name, token)
            except RuntimeError as exc:
                log.error("hook %s failed: %s", label, exc, extra={"client": client.name, "event": "hook_failed"})
                results.append({"hook": label, "ok": False, "error": str(exc)})
                continue
            except Exception as exc:  # a hook must not take the refresh (or the other hooks) down with it
                log.error("hook %s failed: unexpected %s", label, type(exc).__name__,
                          extra={"client": client.name, "event": "hook_failed"})
                results.append({"hook": label, "ok": False, "error": f"unexpected {type(exc).__name__}"})
                continue
            results.append({"hook": label, "ok": True})
        return results
