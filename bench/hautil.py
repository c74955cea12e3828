"""Helpers for bench/ha.py: bench/tokenserver.py with refresh-token reuse counted, and a log watcher.

Run as a token server: python bench/hautil.py --port 0 --lifetime 60 --refresh-tokens
(the same protocol as tokenserver.py; /stats also has `reused`: refresh tokens presented again
after they were spent, and `refresh_grants`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tokenserver  # noqa: E402


class CountingStore(tokenserver.Store):
    def __init__(self, lifetime: float, refresh_tokens: bool):
        super().__init__(lifetime, refresh_tokens)
        self.spent: set[str] = set()
        self.reused = 0
        self.refresh_grants = 0

    def token(self, params: dict) -> tuple[int, bytes]:
        if params.get("grant_type") == "refresh_token":
            self.refresh_grants += 1
            presented = params.get("refresh_token", "")
            if presented in self.spent:
                self.reused += 1
            elif presented in self.refresh:
                self.spent.add(presented)
        return super().token(params)

    def stats(self) -> bytes:
        data = json.loads(super().stats())
        data.update(reused=self.reused, refresh_grants=self.refresh_grants)
        return json.dumps(data).encode()


class LogWatch:
    """Follows a daemon's log file and records the wall time each `event=<name>` line first appears."""

    def __init__(self, path: Path, events: tuple[str, ...]):
        self.path, self.events = path, events
        self.seen: dict[str, float] = {}
        self.lines: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        offset, pending = 0, b""
        while not self._stop.is_set():
            try:
                with open(self.path, "rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read()
            except FileNotFoundError:
                chunk = b""
            now = time.time()
            offset += len(chunk)
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            for raw in lines:
                line = raw.decode("utf-8", "replace")
                for event in self.events:
                    if f"event={event}" in line and event not in self.seen:
                        self.seen[event] = now
                        self.lines[event] = line[:300]
            self._stop.wait(0.05)

    def wait(self, event: str, timeout: float, alive=lambda: True) -> float:
        deadline = time.monotonic() + timeout
        while event not in self.seen:
            if time.monotonic() > deadline or not alive():
                raise RuntimeError(f"no event={event} in {self.path} within {timeout:.0f} s")
            time.sleep(0.05)
        return self.seen[event]

    def close(self) -> None:
        self._stop.set()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--lifetime", type=float, default=60)
    parser.add_argument("--refresh-tokens", action="store_true")
    args = parser.parse_args(argv)
    try:
        asyncio.run(tokenserver.serve(args.host, args.port, CountingStore(args.lifetime, args.refresh_tokens)))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
