"""The dev token server's client authentication beside the secret dialects, checked strictly as a real
provider does: signed assertions (private_key_jwt, client_secret_jwt, jwt_bearer; signature, aud, exp,
jti replay) and client certificates (tls_client_auth), and the RFC 8414 metadata document.
pyjwt is imported only when an assertion arrives, so the server still starts fast."""

from __future__ import annotations

import hashlib
import hmac

AUTH_METHODS = ("client_secret_jwt", "private_key_jwt", "tls_client_auth", "jwt_bearer")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class _OAuthError(Exception):
    def __init__(self, error, description, status=400, headers=None):
        super().__init__(description)
        self.error, self.description, self.status, self.headers = error, description, status, headers or {}


class ClientAuthChecks:
    """Mixed into OAuthServer (which holds stats, rejections, _seen_jti, clock, the URLs and GRANTS)."""

    def _reject(self, client_id, reason):
        self.stats["invalid_client"] += 1
        self.rejections.append((client_id, reason))
        raise _OAuthError("invalid_client", f"Client authentication failed: {reason}.", 401)

    def _check_method(self, client_id, client, params, headers):
        """private_key_jwt, client_secret_jwt, jwt_bearer: a signed assertion (RFC 7523 §3); tls_client_auth:
        the handshake's certificate. Every failure is invalid_client, with the reason in the description."""
        if client.auth == "tls_client_auth":
            cert = headers.peer_cert
            if not cert:
                self._reject(client_id, "no client certificate")
            if not hmac.compare_digest(hashlib.sha256(cert).hexdigest(), (client.key or "").lower()):
                self._reject(client_id, "certificate not registered for this client")
            return
        import jwt

        if params.get("client_assertion_type") != ASSERTION_TYPE or not params.get("client_assertion"):
            self._reject(client_id, f"{client.auth} needs a client_assertion")
        if client.auth == "client_secret_jwt":
            key, algorithms = client.secret.encode(), ["HS256", "HS384", "HS512"]
        else:
            key, algorithms = client.key, ["RS256", "RS384", "PS256", "ES256", "ES384", "EdDSA"]
        audience = client.audience or [self.token_url, self.issuer]
        try:
            claims = jwt.decode(params["client_assertion"], key, algorithms=algorithms, audience=audience,
                                options={"require": ["exp", "iat", "jti"] if client.auth != "jwt_bearer" else ["exp"],
                                         "verify_iat": False}, leeway=0)
        except jwt.ExpiredSignatureError:
            self._reject(client_id, "assertion expired")
        except jwt.InvalidAudienceError:
            self._reject(client_id, "assertion audience is wrong")
        except jwt.InvalidSignatureError:
            self._reject(client_id, "assertion signature does not verify")
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            self._reject(client_id, f"assertion invalid ({type(exc).__name__})")
        if client.auth != "jwt_bearer" and not (claims.get("iss") == claims.get("sub") == client_id):
            self._reject(client_id, "assertion iss/sub is not the client")
        if claims["exp"] - self.clock() > 3600 and client.auth != "jwt_bearer":
            self._reject(client_id, "assertion lives too long")
        jti = claims.get("jti")
        if jti is not None and client.auth != "jwt_bearer":  # a projected token is sent until it is replaced
            now = self.clock()
            seen = self._seen_jti.get((client_id, jti))
            if seen is not None and seen > now:
                self._reject(client_id, "assertion jti replayed")
            self._seen_jti[(client_id, jti)] = claims["exp"]

    def _metadata(self, query, headers, body):
        return {"issuer": self.issuer, "token_endpoint": self.token_url, "revocation_endpoint": self.revocation_url,
                "introspection_endpoint": self.introspection_url,
                "grant_types_supported": ["client_credentials", "password", "refresh_token"],
                "token_endpoint_auth_methods_supported": list(self.auth_methods),
                "token_endpoint_auth_signing_alg_values_supported": ["RS256", "PS256", "ES256", "EdDSA", "HS256"]}

