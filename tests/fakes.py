"""Fakes that ship with the interfaces: an in-memory sink, a sink that fails N times, a static
source, and a fake clock, so keeper and scheduling tests never sleep."""

from __future__ import annotations

import threading

from tokensmith.errors import SinkError, SourceError
from tokensmith.sources import Credentials


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class MemorySink:
    type = "memory"

    def __init__(self, name: str = "memory:a"):
        self.name = name
        self.tokens = []
        self.checked = False

    def check(self) -> None:
        self.checked = True

    def write(self, token) -> None:
        self.tokens.append(token)

    @property
    def current(self):
        return self.tokens[-1] if self.tokens else None


class FailingSink(MemorySink):
    """Fails the first `failures` writes with a retryable SinkError, then behaves."""

    def __init__(self, failures: int, name: str = "memory:failing"):
        super().__init__(name)
        self.failures = failures
        self.attempts = 0

    def write(self, token) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise SinkError(f"{self.name}: injected failure {self.attempts}", retryable=True)
        super().write(token)


class StaticSource:
    def __init__(self, creds: Credentials | None = None, **fields):
        self.creds = creds or Credentials(**fields)
        self.reads = 0
        self.fail = 0

    def read(self) -> Credentials:
        self.reads += 1
        if self.fail:
            self.fail -= 1
            raise SourceError("static source: injected outage", retryable=True)
        return self.creds
