"""How a client proves who it is to the token, revocation and introspection endpoints.

One function per `auth_style`, registered in METHODS; each adds to the request's parameters and headers
and may answer an SSL context that presents a client certificate.

    basic              HTTP Basic (RFC 6749 §2.3.1)
    post, json, query  client_id/client_secret among the parameters
    client_secret_jwt  an HS256 assertion signed with the client secret (RFC 7523, OIDC Core §9)
    private_key_jwt    an assertion signed with the client's private key (RS256, PS256, ES256, EdDSA)
    tls_client_auth    the client certificate in the TLS handshake (RFC 8705); client_id in the body
    jwt_bearer_file    a JWT another party issues, read from a file that is replaced before it expires
                       (a Kubernetes projected service-account token), sent as the client assertion

Parsed keys and SSL contexts are cached by the fingerprint of the material, so a rotated key or
certificate in the source is used by the next request and an unchanged one costs nothing to reuse.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import threading
from urllib.parse import quote_plus

from tokensmith.errors import TokenEndpointError

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME = 60
SECRET_METHODS = ("basic", "post", "json", "query")
ASSERTION_METHODS = ("client_secret_jwt", "private_key_jwt", "jwt_bearer_file")
MAX_ASSERTION_FILE = 64 * 1024
_CACHE_SIZE = 64


def new_jti() -> str:
    return secrets.token_urlsafe(18)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwk_thumbprint(public_key) -> str:
    """RFC 7638: SHA-256 over the key's required JWK members, sorted, without whitespace."""
    from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, ed448, rsa

    if isinstance(public_key, rsa.RSAPublicKey):
        jwk, members = RSAAlgorithm.to_jwk(public_key, as_dict=True), ("e", "kty", "n")
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        jwk, members = ECAlgorithm.to_jwk(public_key, as_dict=True), ("crv", "kty", "x", "y")
    elif isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        jwk, members = OKPAlgorithm.to_jwk(public_key, as_dict=True), ("crv", "kty", "x")
    else:
        raise TypeError("unsupported key type")
    canonical = json.dumps({name: jwk[name] for name in members}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode()).digest())


def default_alg(private_key) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, ed448, rsa

    if isinstance(private_key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}.get(private_key.curve.name, "ES256")
    if isinstance(private_key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return "EdDSA"
    raise TypeError("unsupported key type")


def fingerprint(*parts: str | None) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update((part or "").encode() + b"\0")
    return digest.hexdigest()


class ClientAuth:
    """One client's authentication, with its caches. apply() is called for every request."""

    def __init__(self, client, clock):
        self.client = client
        self.clock = clock
        self.method = client.auth_style
        self._lock = threading.Lock()
        self._keys: dict[str, tuple] = {}
        self._contexts: dict[str, object] = {}
        self._file: tuple | None = None

    def error(self, problem: str, *, retryable: bool = False) -> TokenEndpointError:
        return TokenEndpointError(f"{self.method} client authentication: {problem}", client=self.client.name,
                                  retryable=retryable, error="invalid_client_material")

    def audience(self, token_url: str | None) -> str:
        wanted = self.client.assertion_audience
        if wanted in (None, "token_endpoint"):
            return token_url or ""
        if wanted == "issuer":
            return self.client.issuer or token_url or ""
        return wanted

    def apply(self, creds, params: dict, headers: dict, *, token_url: str | None, dialect: str):
        """Adds the client's proof to params/headers; answers an SSL context for mTLS, else None."""
        return METHODS[self.method](self, creds, params, headers, token_url, dialect)

    # the pieces the methods share

    def _signing_key(self, pem: str):
        key = fingerprint(pem, self.client.signing_alg, self.client.key_id)
        with self._lock:
            cached = self._keys.get(key)
        if cached is not None:
            return cached
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        try:
            private_key = load_pem_private_key(pem.encode(), password=None)
            alg = self.client.signing_alg or default_alg(private_key)
            kid = self.client.key_id or jwk_thumbprint(private_key.public_key())
        except (ValueError, TypeError, Exception) as exc:  # cryptography raises several unrelated types
            raise self.error(f"the source's private key cannot be used ({type(exc).__name__})") from None
        cached = (private_key, alg, kid)
        with self._lock:
            if len(self._keys) >= _CACHE_SIZE:
                self._keys.clear()
            self._keys[key] = cached
        return cached

    def assertion(self, signing_key, alg: str, kid: str | None, client_id: str, audience: str) -> str:
        import jwt

        now = int(self.clock())
        claims = {"iss": client_id, "sub": client_id, "aud": audience, "jti": new_jti(), "iat": now,
                  "exp": now + ASSERTION_LIFETIME}
        headers = {"kid": kid} if kid else None
        try:
            return jwt.encode(claims, signing_key, algorithm=alg, headers=headers)
        except (jwt.PyJWTError, ValueError, TypeError, NotImplementedError) as exc:
            raise self.error(f"cannot sign the assertion with {alg} ({type(exc).__name__})") from None

    def ssl_context(self, creds):
        if not creds.certificate or not creds.private_key:
            raise self.error("the source has no certificate and private_key")
        ca = str(self.client.ca_bundle) if self.client.ca_bundle else None
        key = fingerprint(creds.certificate, creds.private_key, ca)
        with self._lock:
            context = self._contexts.get(key)
        if context is not None:
            return context
        context = make_client_context(creds.certificate, creds.private_key, ca, self.error)
        with self._lock:
            if len(self._contexts) >= _CACHE_SIZE:
                self._contexts.clear()
            self._contexts[key] = context
        return context

    def read_assertion_file(self) -> str:
        path = self.client.assertion_file
        try:
            st = os.stat(path)
            signature = (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except OSError as exc:
            raise self.error(f"cannot read assertion file {path}: {exc.strerror}", retryable=True) from None
        cached = self._file
        if cached is not None and cached[0] == signature:
            return cached[1]
        try:
            with open(path, "rb") as handle:
                text = handle.read(MAX_ASSERTION_FILE + 1).decode().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise self.error(f"cannot read assertion file {path}: {getattr(exc, 'strerror', None) or 'not text'}",
                             retryable=True) from None
        if len(text) > MAX_ASSERTION_FILE or text.count(".") != 2:
            raise self.error(f"assertion file {path} does not hold a JWT", retryable=True)
        self._file = (signature, text)
        return text


def make_client_context(certificate: str, private_key: str, ca_bundle: str | None, error):
    """An SSL context verifying the server as usual and presenting the certificate. ssl loads a chain only
    from a path, so the PEM goes through an anonymous memory file, never the disk."""
    import ssl

    try:
        context = ssl.create_default_context(cafile=ca_bundle)
    except (OSError, ssl.SSLError) as exc:
        raise error(f"cannot load CA bundle {ca_bundle}", retryable=True) from exc
    fd = os.memfd_create("tokensmith-client-cert", os.MFD_CLOEXEC)
    try:
        os.write(fd, certificate.strip().encode() + b"\n" + private_key.strip().encode() + b"\n")
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    except (OSError, ssl.SSLError) as exc:
        raise error("the source's certificate and private_key cannot be used together "
                    f"({getattr(exc, 'reason', None) or type(exc).__name__})") from None
    finally:
        os.close(fd)
    return context


def _secret_in_params(auth, creds, params, headers, token_url, dialect):
    if dialect == "basic":
        pair = f"{quote_plus(creds.client_id)}:{quote_plus(creds.client_secret or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        return None
    params["client_id"] = creds.client_id
    if creds.client_secret is not None:
        params["client_secret"] = creds.client_secret
    return None


def _client_secret_jwt(auth, creds, params, headers, token_url, dialect):
    if not creds.client_secret:
        raise auth.error("the source has no client_secret to sign with")
    alg = auth.client.signing_alg or "HS256"
    params["client_id"] = creds.client_id
    params["client_assertion_type"] = ASSERTION_TYPE
    params["client_assertion"] = auth.assertion(creds.client_secret.encode(), alg, auth.client.key_id,
                                                creds.client_id, auth.audience(token_url))
    return None


def _private_key_jwt(auth, creds, params, headers, token_url, dialect):
    if not creds.private_key:
        raise auth.error("the source has no private_key")
    signing_key, alg, kid = auth._signing_key(creds.private_key)
    params["client_id"] = creds.client_id
    params["client_assertion_type"] = ASSERTION_TYPE
    params["client_assertion"] = auth.assertion(signing_key, alg, kid, creds.client_id, auth.audience(token_url))
    return None


def _tls_client_auth(auth, creds, params, headers, token_url, dialect):
    params["client_id"] = creds.client_id
    return auth.ssl_context(creds)


def _jwt_bearer_file(auth, creds, params, headers, token_url, dialect):
    if creds.client_id:
        params["client_id"] = creds.client_id
    params["client_assertion_type"] = ASSERTION_TYPE
    params["client_assertion"] = auth.read_assertion_file()
    return None


METHODS = {
    "basic": _secret_in_params,
    "post": _secret_in_params,
    "json": _secret_in_params,
    "query": _secret_in_params,
    "client_secret_jwt": _client_secret_jwt,
    "private_key_jwt": _private_key_jwt,
    "tls_client_auth": _tls_client_auth,
    "jwt_bearer_file": _jwt_bearer_file,
}
