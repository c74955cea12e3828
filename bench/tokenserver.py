"""A minimal, fast loopback OAuth2 token endpoint for benchmarks (not for tests: no seed semantics).

One asyncio process, HTTP/1.1 keep-alive, a hand-written request parser. It accepts any client
(client_credentials / password / refresh_token; form body, HTTP Basic, JSON body or query string)
and issues short opaque tokens with `expires_in`. It keeps just enough state to make revocation
real: live access tokens and refresh tokens in dicts, pruned when they expire.

    POST /token       -> {"access_token", "token_type", "expires_in"[, "refresh_token"]}
    POST /revoke      RFC 7009 (token=...)
    POST /introspect  RFC 7662 -> {"active": bool}
    GET  /stats       counters and this process's own CPU seconds
    POST /config      {"lifetime": N, "refresh_tokens": bool}: change what new tokens look like

Run: python bench/tokenserver.py --port 0 --lifetime 60  (prints "PORT <n>" on stdout when ready)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from urllib.parse import parse_qsl

STATUS = {200: b"200 OK", 400: b"400 Bad Request", 404: b"404 Not Found"}


class Store:
    def __init__(self, lifetime: float, refresh_tokens: bool):
        self.lifetime = lifetime
        self.refresh_tokens = refresh_tokens
        self.counter = 0
        self.prefix = os.urandom(4).hex()
        self.access: dict[str, float] = {}   # token -> expires_at (monotonic-free wall clock)
        self.refresh: dict[str, str] = {}    # refresh token -> its access token
        self.issued = 0
        self.revoked = 0
        self.requests = 0
        self.issued_at: list[float] = []     # only while recording is on
        self.recording = False
        self._last_prune = time.time()

    def new(self) -> bytes:
        now = time.time()
        if now - self._last_prune > 30:
            self._last_prune = now
            self.access = {t: e for t, e in self.access.items() if e > now}
        self.counter += 1
        token = f"at-{self.prefix}-{self.counter:x}-{os.urandom(6).hex()}"
        self.access[token] = now + self.lifetime
        self.issued += 1
        if self.recording:
            self.issued_at.append(now)
        body = {"access_token": token, "token_type": "Bearer", "expires_in": int(self.lifetime)}
        if self.refresh_tokens:
            refresh = f"rt-{self.prefix}-{self.counter:x}-{os.urandom(6).hex()}"
            self.refresh[refresh] = token
            body["refresh_token"] = refresh
        return json.dumps(body).encode()

    def token(self, params: dict) -> tuple[int, bytes]:
        grant = params.get("grant_type")
        if grant == "refresh_token":
            old = self.refresh.pop(params.get("refresh_token", ""), None)
            if old is None:
                return 400, b'{"error":"invalid_grant"}'
            self.access.pop(old, None)  # iQmetrix-like: the exchange revokes the paired access token
            return 200, self.new()
        if grant in ("client_credentials", "password"):
            return 200, self.new()
        return 400, b'{"error":"unsupported_grant_type"}'

    def revoke(self, params: dict) -> tuple[int, bytes]:
        token = params.get("token", "")
        if self.access.pop(token, None) is not None or self.refresh.pop(token, None) is not None:
            self.revoked += 1
        return 200, b"{}"

    def introspect(self, params: dict) -> tuple[int, bytes]:
        expires = self.access.get(params.get("token", ""))
        active = expires is not None and expires > time.time()
        return 200, b'{"active":true}' if active else b'{"active":false}'

    def stats(self) -> bytes:
        cpu = os.times()
        return json.dumps({"issued": self.issued, "revoked": self.revoked, "requests": self.requests,
                           "live_access_tokens": len(self.access), "cpu_user": cpu.user, "cpu_sys": cpu.system,
                           "pid": os.getpid()}).encode()


def parse_params(target: str, headers: dict, body: bytes) -> dict:
    params: dict = {}
    _, _, query = target.partition("?")
    if query:
        params.update(parse_qsl(query))
    if body:
        if headers.get(b"content-type", b"").startswith(b"application/json"):
            try:
                data = json.loads(body)
                if isinstance(data, dict):
                    params.update({str(k): str(v) for k, v in data.items()})
            except ValueError:
                pass
        else:
            params.update(parse_qsl(body.decode("latin-1")))
    return params


def make_handler(store: Store):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.split(b"\r\n")
                try:
                    method, target, _ = lines[0].split(b" ", 2)
                except ValueError:
                    return
                headers = {}
                for line in lines[1:]:
                    key, sep, value = line.partition(b":")
                    if sep:
                        headers[key.strip().lower()] = value.strip()
                length = int(headers.get(b"content-length", b"0") or 0)
                body = await reader.readexactly(length) if length else b""
                store.requests += 1
                path = target.decode("latin-1")
                route = path.partition("?")[0]
                status, reply = 404, b'{"error":"not_found"}'
                if method == b"POST" and route in ("/token", "/revoke", "/introspect"):
                    params = parse_params(path, headers, body)
                    status, reply = getattr(store, route[1:])(params)
                elif method == b"GET" and route == "/stats":
                    status, reply = 200, store.stats()
                elif method == b"POST" and route == "/config":
                    data = json.loads(body or b"{}")
                    if "lifetime" in data:
                        store.lifetime = float(data["lifetime"])
                    if "refresh_tokens" in data:
                        store.refresh_tokens = bool(data["refresh_tokens"])
                    if "record" in data:
                        store.recording = bool(data["record"])
                        store.issued_at = []
                    status, reply = 200, b"{}"
                elif method == b"GET" and route == "/issued_at":
                    status, reply = 200, json.dumps(store.issued_at).encode()
                writer.write(b"HTTP/1.1 " + STATUS[status] + b"\r\nContent-Type: application/json\r\n"
                             b"Cache-Control: no-store\r\nContent-Length: " + str(len(reply)).encode() +
                             b"\r\n\r\n" + reply)
                if headers.get(b"connection", b"").lower() == b"close":
                    await writer.drain()
                    return
                if writer.transport.get_write_buffer_size() > 65536:
                    await writer.drain()
        finally:
            writer.close()

    return handle


async def serve(host: str, port: int, store: Store) -> None:
    server = await asyncio.start_server(make_handler(store), host, port, backlog=1024)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--lifetime", type=float, default=60)
    parser.add_argument("--refresh-tokens", action="store_true")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.host, args.port, Store(args.lifetime, args.refresh_tokens)))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
