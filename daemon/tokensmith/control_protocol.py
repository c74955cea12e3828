"""The control socket's request format, parsed strictly: one JSON object per line, known ops and
known fields only, booleans as JSON booleans, a client named as the config names clients. A
request never carries a URL or any other destination: what the daemon contacts comes from its
config. Stdlib only (the CLI's fast path imports this)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

MAX_REQUEST = 64 * 1024
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # ClientConfig.name's pattern
FLAGS = ("all", "compromised", "accept_unrevoked", "reload_credentials", "verify")
FIELDS = {"ping": (), "status": (), "rotate": ("client", *FLAGS)}


class RequestError(ValueError):
    """A malformed control request; the message is one line and never echoes the request."""


@dataclass(frozen=True)
class Request:
    op: str
    client: str | None = None
    all: bool = False
    compromised: bool = False
    accept_unrevoked: bool = False
    reload_credentials: bool = False
    verify: bool = False

    def message(self) -> dict:
        """The smallest JSON object that parses back to this request."""
        message: dict = {"op": self.op}
        if self.client is not None:
            message["client"] = self.client
        message.update((flag, True) for flag in FLAGS if getattr(self, flag))
        return message

    def encode(self) -> bytes:
        return json.dumps(self.message()).encode() + b"\n"

    @property
    def verb(self) -> str:
        return "rotate --compromised" if self.op == "rotate" and self.compromised else self.op


def _no_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise RequestError(f"field {key!r} appears twice")
        seen[key] = value
    return seen


def _reject_constant(name):
    raise RequestError(f"{name} is not valid JSON")


def parse_request(data: bytes) -> Request:
    if len(data) > MAX_REQUEST:
        raise RequestError(f"request longer than {MAX_REQUEST} bytes")
    try:
        text = data.decode("utf-8")
        message = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except RequestError:
        raise
    except RecursionError:
        raise RequestError("request is nested too deeply") from None
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        raise RequestError("request is not one line of UTF-8 JSON") from None
    if not isinstance(message, dict):
        raise RequestError("request must be a JSON object")
    return _request_from(message)


def _request_from(message: dict) -> Request:
    op = message.get("op")
    if not isinstance(op, str) or op not in FIELDS:
        raise RequestError(f"unknown op; expected one of {', '.join(sorted(FIELDS))}")
    unknown = sorted(key for key in message if key != "op" and key not in FIELDS[op])
    if unknown:
        shown = unknown[0] if len(unknown[0]) <= 40 and unknown[0].isprintable() else "(unprintable)"
        raise RequestError(f"op {op}: unknown field {shown!r}")
    values = {}
    for flag in FLAGS:
        if flag in message:
            if not isinstance(message[flag], bool):
                raise RequestError(f"op {op}: field {flag!r} must be true or false")
            values[flag] = message[flag]
    if "client" in message:
        client = message["client"]
        if not isinstance(client, str) or not CLIENT_NAME.fullmatch(client):
            raise RequestError(f"op {op}: field 'client' must be a client name (letters, digits, '.', '_', '-')")
        values["client"] = client
    request = Request(op=op, **values)
    if op == "rotate":
        if (request.client is None) == (not request.all):
            raise RequestError("op rotate: give either client or all: true")
        if request.verify and not request.compromised:
            raise RequestError("op rotate: verify needs compromised")
    return request
