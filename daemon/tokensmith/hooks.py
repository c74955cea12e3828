"""Consumer hooks run after every new token: signal a process by pid file, or run a command,
so an application that caches the token in memory reloads it. The token is never passed: the
hook learns the client name and the token's fingerprint and reads the sink itself."""

from __future__ import annotations

import logging
import os
import signal
import subprocess

log = logging.getLogger("tokensmith.hooks")


def _signal(hook) -> None:
    try:
        text = hook.pid_file.read_text().strip()
    except OSError as exc:
        raise RuntimeError(f"cannot read pid file {hook.pid_file}: {exc.strerror}") from exc
    if not text.isdigit() or int(text) <= 1:
        raise RuntimeError(f"pid file {hook.pid_file} does not hold a process id")
    try:
        os.kill(int(text), getattr(signal, "SIG" + hook.signal))
    except OSError as exc:
        raise RuntimeError(f"cannot signal pid {text}: {exc.strerror}") from exc


def _command(hook, client: str, token) -> None:
    env = dict(os.environ, TOKENSMITH_CLIENT=client, TOKENSMITH_TOKEN_FINGERPRINT=token.fingerprint,
               TOKENSMITH_EXPIRES_AT=str(int(token.expires_at)))
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
            results.append({"hook": label, "ok": True})
        return results
