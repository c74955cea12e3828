"""Cutting secrets out of text a provider or a library wrote, in every form they travel in.

A provider that echoes what it was sent may quote the form body (percent-encoded, `+` for space),
the JSON body (escaped), or the Authorization header (base64 of `id:secret`). Each secret is cut
out raw, percent-encoded (quote, quote_plus, either hex case), JSON-escaped, and base64-encoded
(standard and URL-safe, padded or not), including the run of base64 it makes inside a longer
encoded value such as the Basic pair, whatever its offset there."""

from __future__ import annotations

import base64
import json
import re
from urllib.parse import quote, quote_plus

MARK = "[redacted]"
MIN_CORE = 6  # shorter base64 runs would cut unrelated text


def _quote(text: str, safe: str = "/") -> str:
    return quote(text, safe=safe, errors="surrogatepass")  # a secret that is not UTF-8 is still cut out


def _quote_plus(text: str) -> str:
    return quote_plus(text, errors="surrogatepass")


def _lower_hex(text: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda match: match.group().lower(), text)


def _base64_runs(data: bytes) -> set[str]:
    """The base64 characters that depend only on data, for each of the three offsets data can start at."""
    runs = set()
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + data).decode()
        first = -(-8 * shift // 6)
        last = 8 * (shift + len(data)) // 6
        core = encoded[first:last]
        if len(core) >= MIN_CORE:
            runs.add(core)
    return runs


def forms(secret: str) -> set[str]:
    """Every spelling of secret that redact() cuts out."""
    if not secret:
        return set()
    data = secret.encode("utf-8", "surrogatepass")
    found = {secret}
    for encoded in (_quote(secret, safe=""), _quote(secret), _quote(secret, safe="-_.!~*'()"), _quote_plus(secret)):
        found.update((encoded, _lower_hex(encoded)))
    for ensure_ascii in (True, False):
        escaped = json.dumps(secret, ensure_ascii=ensure_ascii)[1:-1]
        found.update((escaped, escaped.replace("/", "\\/")))
    padded = base64.b64encode(data).decode()
    runs = _base64_runs(data) | {padded, padded.rstrip("=")}
    found.update(runs)
    found.update(run.replace("+", "-").replace("/", "_") for run in runs)
    return {form for form in found if form}


class Redactor:
    """Cuts the given secrets out of text; built once per error, so it may be thrown away."""

    __slots__ = ("pattern",)

    def __init__(self, secrets, pairs=()):
        every: set[str] = set()
        for secret in secrets:
            if secret:
                every |= forms(secret)
        for client_id, secret in pairs:  # HTTP Basic: base64 of the (form-encoded) id:secret pair
            if secret:
                every |= forms(f"{client_id}:{secret}") | forms(f"{_quote_plus(client_id)}:{_quote_plus(secret)}")
        # longest first, so a form that holds a shorter one is cut whole
        ordered = sorted(every, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __call__(self, text: str) -> str:
        if self.pattern is None or not text:
            return text
        return self.pattern.sub(MARK, text)


def redact(text: str, secrets, pairs=()) -> str:
    return Redactor(secrets, pairs)(text)
