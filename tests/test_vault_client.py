"""VaultClient against a real OpenBao dev server: auth methods, re-auth, error mapping."""

import base64
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tokensmith.config import VaultConfig
from tokensmith.errors import SinkError, SourceError
from tokensmith.vault import VaultClient

CLIENT = "billing-api"


def make(vault_kv, auth=None, **extra) -> VaultClient:
    return VaultClient(VaultConfig(**vault_kv.vault_config(auth, **extra)))


def remaining_uses(vault_kv, auth) -> int:
    response = vault_kv.root.write_data(f"auth/{auth['mount_point']}/role/app/secret-id/lookup",
                                        data={"secret_id": auth["secret_id"]})
    return response["data"]["secret_id_num_uses"]


def test_token_auth_reads_kv2_and_kv1(vault_kv):
    vault_kv.put("a", {"client_id": "id-1"})
    vault_kv.put("b", {"client_id": "id-v1"}, kv_version=1, mount=vault_kv.enable_kv1())
    vault = make(vault_kv, {"method": "token", "token": vault_kv.token()})
    assert vault.read_kv("secret", vault_kv.path("a"), 2, client=CLIENT) == {"client_id": "id-1"}
    assert vault.read_kv("kv1", vault_kv.path("b"), 1, client=CLIENT) == {"client_id": "id-v1"}
    vault.check(client=CLIENT)


@pytest.mark.security(threat="hostile secret store", claim="A revoked Vault token makes a one-line error that does "
                                                           "not echo the Vault token.")
def test_literal_token_revoked_is_not_retryable_and_not_echoed(vault_kv):
    vault_kv.put("a", {"client_id": "id-1"})
    token = vault_kv.token()
    vault = make(vault_kv, {"method": "token", "token": token})
    vault.read_kv("secret", vault_kv.path("a"), 2, client=CLIENT)
    vault_kv.root.auth.token.revoke(token)
    with pytest.raises(SourceError) as caught:
        vault.read_kv("secret", vault_kv.path("a"), 2, client=CLIENT)
    assert not caught.value.retryable
    assert "permission denied" in str(caught.value) and vault_kv.path("a") in str(caught.value)
    assert str(caught.value).startswith(f"client {CLIENT}: ")
    assert token not in str(caught.value)


def test_token_file_is_reread_on_reauth(vault_kv, tmp_path):
    vault_kv.put("a", {"client_id": "id-1"})
    token_file = tmp_path / "vault-token"
    first = vault_kv.token()
    token_file.write_text(first + "\n")
    vault = make(vault_kv, {"method": "token", "token_file": str(token_file)})
    vault.read_kv("secret", vault_kv.path("a"), 2, client=CLIENT)
    token_file.write_text(vault_kv.token())  # e.g. Vault Agent wrote a fresh one
    vault_kv.root.auth.token.revoke(first)
    assert vault.read_kv("secret", vault_kv.path("a"), 2, client=CLIENT) == {"client_id": "id-1"}


def test_approle_logs_in_lazily_and_once_per_revocation_across_threads(vault_kv):
    vault_kv.put("a", {"client_id": "id-1"})
    auth = vault_kv.approle(secret_id_num_uses=2)  # exactly one login plus one re-login possible
    vault = make(vault_kv, auth)
    assert remaining_uses(vault_kv, auth) == 2

    def read_in_threads():
        results, errors = [], []

        def read():
            try:
                results.append(vault.read_kv("secret", vault_kv.path("a"), 2, client=CLIENT))
            except Exception as exc:  # noqa: BLE001 - collected for the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=read) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == [] and len(results) == 8

    read_in_threads()
    assert remaining_uses(vault_kv, auth) == 1
    vault_kv.revoke_logins(auth["mount_point"])
    read_in_threads()


def test_approle_secret_id_file_and_bad_secret_id(vault_kv, tmp_path):
    vault_kv.put("a", {"client_id": "id-1"})
    auth = vault_kv.approle()
    secret_file = tmp_path / "secret-id"
    secret_file.write_text(auth.pop("secret_id") + "\n")
    good = make(vault_kv, {**auth, "secret_id_file": str(secret_file)})
    assert good.read_kv("secret", vault_kv.path("a"), 2, client=CLIENT) == {"client_id": "id-1"}

    bad_secret = "00000000-1111-2222-3333-444444444444"
    bad = make(vault_kv, {**auth, "secret_id": bad_secret})
    with pytest.raises(SourceError) as caught:
        bad.read_kv("secret", vault_kv.path("a"), 2, client=CLIENT)
    assert not caught.value.retryable
    assert "invalid role or secret ID" in str(caught.value) and auth["mount_point"] in str(caught.value)
    assert bad_secret not in str(caught.value)

    secret_file.unlink()
    with pytest.raises(SourceError, match="cannot read vault credential file") as caught:
        make(vault_kv, {**auth, "secret_id_file": str(secret_file)}).check(client=CLIENT, error_cls=SourceError)
    assert not caught.value.retryable


def test_policy_denial_after_reauth_is_not_retryable(vault_kv):
    vault = make(vault_kv, vault_kv.approle())
    vault_kv.root.secrets.kv.v2.create_or_update_secret("elsewhere/x", {"k": "v"}, mount_point="secret")
    with pytest.raises(SinkError, match="permission denied") as caught:
        vault.read_kv2_versioned("secret", "elsewhere/x", client=CLIENT, error_cls=SinkError)
    assert not caught.value.retryable


def test_missing_path_and_bad_mount_are_not_retryable(vault_kv):
    vault = make(vault_kv)
    with pytest.raises(SourceError, match="no secret at that path") as caught:
        vault.read_kv("secret", vault_kv.path("absent"), 2, client=CLIENT)
    assert not caught.value.retryable and vault_kv.path("absent") in str(caught.value)
    with pytest.raises(SourceError, match="no such mount") as caught:
        vault.read_kv("nomount", "x", 2, client=CLIENT)
    assert not caught.value.retryable
    vault_kv.put("a", {"client_id": "id"})
    with pytest.raises(SourceError, match="KV v2") as caught:
        vault.read_kv("secret", vault_kv.path("a"), 1, client=CLIENT)


def test_kv2_versioned_read_and_cas(vault_kv):
    vault = make(vault_kv)
    path = vault_kv.path("doc")
    assert vault.read_kv2_versioned("secret", path, client=CLIENT) == (None, None)
    vault.write_kv2("secret", path, {"v": "1"}, cas=0, client=CLIENT)
    assert vault.read_kv2_versioned("secret", path, client=CLIENT) == ({"v": "1"}, 1)
    with pytest.raises(SinkError, match="check-and-set") as caught:
        vault.write_kv2("secret", path, {"v": "stale"}, cas=0, client=CLIENT)
    assert caught.value.retryable
    vault_kv.root.secrets.kv.v2.delete_latest_version_of_secret(path, mount_point="secret")
    assert vault.read_kv2_versioned("secret", path, client=CLIENT) == (None, 1)
    vault.write_kv2("secret", path, {"v": "2"}, cas=1, client=CLIENT)
    assert vault.read_kv2_versioned("secret", path, client=CLIENT) == ({"v": "2"}, 2)


def test_sealed_is_retryable_then_recovers(openbao, vault_kv):
    vault_kv.put("a", {"client_id": "id-1"})
    vault = make(vault_kv)
    openbao.seal()
    try:
        with pytest.raises(SourceError, match="Vault is sealed") as caught:
            vault.read_kv("secret", vault_kv.path("a"), 2, client=CLIENT)
        assert caught.value.retryable
    finally:
        openbao.unseal()
    assert vault.read_kv("secret", vault_kv.path("a"), 2, client=CLIENT) == {"client_id": "id-1"}


def test_stopped_server_is_retryable(openbao, vault_kv):
    vault = make(vault_kv)
    openbao.stop()
    try:
        with pytest.raises(SourceError, match="cannot connect") as caught:
            vault.read_kv("secret", vault_kv.path("a"), 2, client=CLIENT)
        assert caught.value.retryable and openbao.address in str(caught.value)
    finally:
        openbao.start()  # dev mode: a fresh, empty server on the same port
    vault_kv.put("a", {"client_id": "after-restart"})
    assert vault.read_kv("secret", vault_kv.path("a"), 2, client=CLIENT) == {"client_id": "after-restart"}


def test_unanswered_request_times_out_after_one_attempt():
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    port = listener.getsockname()[1]
    vault = VaultClient(VaultConfig(address=f"http://127.0.0.1:{port}", timeout=0.5,
                                    auth={"method": "token", "token": "t"}))
    started = time.monotonic()
    try:
        with pytest.raises(SourceError, match="timed out") as caught:
            vault.read_kv("secret", "x", 2, client=CLIENT)
    finally:
        listener.close()
    assert caught.value.retryable
    assert time.monotonic() - started < 2 and len(accepted) == 1


class TokenReview:
    """Stands in for the Kubernetes API's TokenReview endpoint, which OpenBao's kubernetes auth
    method calls to validate the service-account JWT; records the JWTs it was asked about."""

    def __init__(self):
        self.reviewed, self.authenticated = [], True
        review = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                review.reviewed.append(body["spec"]["token"])
                status = {"authenticated": review.authenticated,
                          "user": {"username": "system:serviceaccount:apps:billing", "uid": "uid-1"}}
                if not review.authenticated:
                    status = {"authenticated": False, "error": "token expired"}
                data = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                   "status": status}).encode()
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


def service_account_jwt(serial: int) -> str:
    def part(data):
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    claims = {"iss": "kubernetes/serviceaccount", "sub": "system:serviceaccount:apps:billing",
              "kubernetes.io/serviceaccount/namespace": "apps",
              "kubernetes.io/serviceaccount/service-account.name": "billing",
              "kubernetes.io/serviceaccount/service-account.uid": "uid-1", "serial": serial}
    return f"{part({'alg': 'RS256', 'kid': 'k'})}.{part(claims)}.{part({'sig': serial})}"


def self_signed_pem() -> str:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-kubernetes-ca")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture
def kubernetes_auth(vault_kv):
    review = TokenReview()
    mount = "k8s-" + vault_kv.prefix.rsplit("/", 1)[-1]
    root = vault_kv.root
    root.sys.enable_auth_method("kubernetes", path=mount)
    # the CA is required with disable_local_ca_jwt; the plain-http stub never uses it
    root.write_data(f"auth/{mount}/config", data={"kubernetes_host": review.url, "disable_local_ca_jwt": True,
                                                    "kubernetes_ca_cert": self_signed_pem()})
    root.write_data(f"auth/{mount}/role/billing", data={
        "bound_service_account_names": "billing", "bound_service_account_namespaces": "apps",
        "token_policies": vault_kv.policy(), "token_ttl": "1h"})
    yield review, mount
    review.server.shutdown()
    review.server.server_close()


def test_kubernetes_login_reads_jwt_file_fresh(vault_kv, kubernetes_auth, tmp_path):
    review, mount = kubernetes_auth
    vault_kv.put("a", {"client_id": "id-k8s"})
    jwt_file = tmp_path / "token"
    jwt_file.write_text(service_account_jwt(1))
    vault = make(vault_kv, {"method": "kubernetes", "role": "billing", "mount_point": mount,
                            "jwt_file": str(jwt_file)})
    assert vault.read_kv("secret", vault_kv.path("a"), 2, client=CLIENT) == {"client_id": "id-k8s"}
    jwt_file.write_text(service_account_jwt(2))  # the kubelet rotated the projected token
    vault_kv.revoke_logins(mount)
    assert vault.read_kv("secret", vault_kv.path("a"), 2, client=CLIENT) == {"client_id": "id-k8s"}
    assert review.reviewed == [service_account_jwt(1), service_account_jwt(2)]


def test_kubernetes_login_rejected_is_not_retryable(vault_kv, kubernetes_auth, tmp_path):
    review, mount = kubernetes_auth
    review.authenticated = False
    jwt_file = tmp_path / "token"
    jwt_file.write_text(service_account_jwt(3))
    vault = make(vault_kv, {"method": "kubernetes", "role": "billing", "mount_point": mount,
                            "jwt_file": str(jwt_file)})
    with pytest.raises(SourceError) as caught:
        vault.read_kv("secret", vault_kv.path("a"), 2, client=CLIENT)
    assert not caught.value.retryable
    assert "kubernetes login" in str(caught.value) and "role billing" in str(caught.value)
    assert service_account_jwt(3) not in str(caught.value)
