"""A provider that echoes what it was sent (form body, JSON body, Authorization header) into its error
text gets every secret cut out, whatever encoding carries it: raw, percent-encoded, JSON-escaped or
base64 (standard or URL-safe, padded or not, alone or inside the Basic id:secret pair). The OAuth
error code itself is validated ([a-z_]{1,64}) and kept verbatim, not redacted."""

import base64
import binascii
import json
import logging
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, quote_plus, unquote, unquote_plus

import pytest

from fakes import FakeClock, MemorySink, StaticSource
from tokensmith.config import ClientConfig
from tokensmith.errors import TokenEndpointError
from tokensmith.keeper import Keeper
from tokensmith.redact import redact
from tokensmith.sources import Credentials
from tokensmith.state import ClientState, StateStore
from tokensmith.tokenclient import TokenClient

THREAT = "hostile or slow provider"
# characters that break the "long token-like word" heuristic, so only real redaction can hide them
SECRET = 'Sh!p#Se;cr"et\\ü&z/K+q'
PASSWORD = "pw:(Pa ss)!wörd%7E"
HELD_REFRESH = "rt/Held+Refresh/To+ken"
CURRENT_ACCESS = "at/Cur+rent/Acc+ess"


def encodings(secret: str) -> dict[str, str]:
    data = secret.encode()
    return {"raw": secret, "quote": quote(secret, safe=""), "quote_plus": quote_plus(secret),
            "quote_lower": re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), quote(secret, safe="")),
            "json": json.dumps(secret)[1:-1], "json_unicode": json.dumps(secret, ensure_ascii=False)[1:-1],
            "base64": base64.b64encode(data).decode(), "base64_unpadded": base64.b64encode(data).decode().rstrip("="),
            "base64url": base64.urlsafe_b64encode(data).decode(),
            "base64url_unpadded": base64.urlsafe_b64encode(data).decode().rstrip("=")}


def decoded_runs(text: str):
    """Everything a base64 run in text decodes to, at every alignment, in both alphabets."""
    for run in re.findall(r"[A-Za-z0-9+/_=-]{6,}", text):
        run = run.replace("-", "+").replace("_", "/").rstrip("=")
        for start in range(4):
            chunk = run[start:]
            chunk = chunk[:len(chunk) - len(chunk) % 4]
            try:
                yield base64.b64decode(chunk)
            except (binascii.Error, ValueError):
                pass


def assert_hidden(text: str, secret: str, where: str) -> None:
    """Neither the secret nor any 8-character piece of it, in any of the encodings."""
    for name, form in encodings(secret).items():
        assert form not in text, f"{name} form of a secret in {where}: {text!r}"
    pieces = {secret[i:i + 8] for i in range(max(len(secret) - 7, 1))}
    decoded = list(decoded_runs(text))
    for piece in pieces:
        for name in ("raw", "json", "json_unicode"):
            assert encodings(piece)[name] not in text, f"{name} piece {piece!r} of a secret in {where}: {text!r}"
        assert piece not in unquote_plus(text) and piece not in unquote(text), \
            f"percent-encoded piece {piece!r} of a secret in {where}: {text!r}"
        assert not any(piece.encode() in data for data in decoded), f"base64 of a secret in {where}: {text!r}"


class EchoServer:
    """A token endpoint that answers every request with an error whose description quotes the request
    body and Authorization header, and whatever else extra() adds, in several encodings."""

    def __init__(self, status=400, code="invalid_request", extra=lambda: ""):
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                auth = self.headers.get("Authorization", "")
                outer.requests.append((self.path, body, auth))
                sent = f"{self.path} {body} {auth}"
                echo = f"{extra()} {sent} | {base64.urlsafe_b64encode(sent.encode()).decode().rstrip('=')}"
                payload = json.dumps({"error": code, "error_description": echo}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.thread.join()


def config(url, auth_style="post", grant="client_credentials", **fields):
    return ClientConfig(name="echoed", token_url=url, auth_style=auth_style, grant=grant, source={"type": "env"},
                        sinks=[{"type": "file", "path": "/unused"}], **fields)


@pytest.mark.security(threat=THREAT, claim="A token endpoint echoing the request body or Authorization header into "
                      "its error text never gets the client secret or password into the exception message, in any "
                      "encoding (raw, percent-encoded, JSON-escaped, base64 of the secret or the Basic pair).")
@pytest.mark.parametrize("auth_style", ["post", "basic", "json", "query"])
@pytest.mark.parametrize("grant", ["client_credentials", "password"])
def test_echoed_credentials_are_cut_from_the_error(auth_style, grant):
    creds = Credentials(client_id="cid", client_secret=SECRET, username="alice", password=PASSWORD)
    with EchoServer() as server:
        with pytest.raises(TokenEndpointError) as info:
            TokenClient(config(server.url, auth_style, grant)).obtain(grant, creds)
    message = str(info.value)
    assert "[redacted]" in message  # the echo reached the message, so hiding the secret was real work
    assert_hidden(message, SECRET, "the error")
    if grant == "password":
        assert_hidden(message, PASSWORD, "the error")


@pytest.mark.security(threat=THREAT, claim="The token being exchanged, revoked or introspected is cut from the "
                      "provider's echoed error text in every encoding.")
def test_echoed_tokens_are_cut_from_the_error():
    creds = Credentials(client_id="cid", client_secret=SECRET)
    with EchoServer() as server:
        client = TokenClient(config(server.url, "basic", revocation_url=server.url, introspection_url=server.url))
        calls = [lambda: client.obtain("refresh_token", creds, refresh_token=HELD_REFRESH),
                 lambda: client.revoke(CURRENT_ACCESS, "access_token", creds),
                 lambda: client.introspect(CURRENT_ACCESS, creds)]
        for call in calls:
            with pytest.raises(TokenEndpointError) as info:
                call()
            for secret in (SECRET, HELD_REFRESH, CURRENT_ACCESS):
                assert_hidden(str(info.value), secret, "the error")


@pytest.mark.security(threat=THREAT, claim="An OAuth error code such as temporarily_unavailable is kept verbatim; a "
                      "code outside [a-z_]{1,64} (which may be an echo) is treated as no code and never shown.")
def test_error_codes_are_validated_not_redacted():
    with EchoServer(status=503, code="temporarily_unavailable") as server:
        with pytest.raises(TokenEndpointError) as info:
            TokenClient(config(server.url)).obtain("client_credentials", Credentials("cid", SECRET))
    assert info.value.error == "temporarily_unavailable" and info.value.reason == "temporarily_unavailable"
    assert "HTTP 503 temporarily_unavailable" in str(info.value)

    for code in (SECRET, "Invalid-Client", "x" * 65, "invalid client", "ünknown"):
        with EchoServer(status=400, code=code) as server:
            with pytest.raises(TokenEndpointError) as info:
                TokenClient(config(server.url)).obtain("client_credentials", Credentials("cid", SECRET))
        assert info.value.error is None and info.value.reason == "http_400"
        assert code not in str(info.value)
        assert_hidden(str(info.value), SECRET, "the error")


@pytest.mark.security(threat=THREAT, claim="When a provider echoes the held refresh token, the current access token "
                      "and the client secret in any encoding, none reaches the log, the keeper's status "
                      "(last_error), the saved state or the error returned to the caller.")
@pytest.mark.parametrize("auth_style", ["post", "basic"])
@pytest.mark.parametrize("encoding", sorted(encodings("x")))
def test_keeper_log_and_status_hold_no_encoded_secret(tmp_path, caplog, auth_style, encoding):
    clock = FakeClock()

    def extra():  # a provider that knows the tokens it issued, and quotes them encoded
        return " ".join(encodings(secret)[encoding] for secret in (CURRENT_ACCESS, HELD_REFRESH, SECRET))

    with EchoServer(status=503, code="temporarily_unavailable", extra=extra) as server:
        client = config(server.url, auth_style, refresh={"backoff_initial": 0.05, "backoff_max": 0.5})
        store = StateStore(tmp_path / "state")
        store.prepare()
        store.save("echoed", ClientState(access_token=CURRENT_ACCESS, obtained_at=clock() - 100,
                                         expires_at=clock() + 3500, refresh_token=HELD_REFRESH,
                                         refresh_token_obtained_at=clock() - 100))
        keeper = Keeper(client, StaticSource(client_id="cid", client_secret=SECRET), [MemorySink()],
                        TokenClient(client, clock=clock), store, clock=clock, rng=random.Random(1))
        keeper.load()
        with caplog.at_level(logging.DEBUG):
            outcome = keeper.refresh(reason="manual")
    assert not outcome.ok and outcome.error.error == "temporarily_unavailable"
    assert any(HELD_REFRESH in unquote_plus(body) for _, body, _ in server.requests)  # it was sent, then echoed
    status = keeper.status()
    assert status["failures"] == 1 and "temporarily_unavailable" in status["last_error"]
    saved = store.load("echoed")
    for secret in (SECRET, HELD_REFRESH, CURRENT_ACCESS):
        assert_hidden(caplog.text, secret, "the log")
        assert_hidden(status["last_error"], secret, "status last_error")
        assert_hidden(saved.last_error or "", secret, "the saved state")
        assert_hidden(str(outcome.error), secret, "the error handed back to a CLI or control-socket caller")


def test_redact_finds_a_secret_inside_any_base64_value():
    for prefix in ("", "a", "ab", "abc", "client-id:", "cid:"):
        for suffix in ("", "x", "tail"):
            data = (prefix + SECRET + suffix).encode()
            for encoded in (base64.b64encode(data).decode(), base64.urlsafe_b64encode(data).decode().rstrip("=")):
                assert_hidden(redact(f"see {encoded}.", [SECRET]), SECRET, "redacted text")
    assert redact("temporarily_unavailable and other words", [SECRET]) == "temporarily_unavailable and other words"
