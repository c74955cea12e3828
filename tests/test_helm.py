"""Tests for the Helm chart in helm/tokensmith.

Every example values file is linted (`helm lint --strict`), rendered
(`helm template`) and every rendered manifest is validated against the
Kubernetes OpenAPI schemas shipped by the kubernetes-validate package, in
strict mode (unknown fields are errors). ServiceMonitor is a CRD
(monitoring.coreos.com/v1) for which kubernetes-validate has no schema; it is
checked structurally here instead.

helm comes from $TOKENSMITH_HELM or scripts/install-helm.sh (pinned, cached).
A missing tool is a failure, never a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "tokensmith"
EXAMPLES = sorted((CHART / "ci").glob("*-values.yaml"))
INSTALL_HELM = REPO / "scripts" / "install-helm.sh"
RELEASE = "ts"
NAMESPACE = "tokens"
CONFIG_PATH = "/etc/tokensmith/config.yaml"
UID = 10001

try:
    import kubernetes_validate
    import kubernetes_validate.utils as kv_utils
except ImportError:  # reported by the fixture below as a failure
    kubernetes_validate = None

EXPECTED_EXAMPLES = {"central-vault.yaml", "central-aws.yaml", "sidecar.yaml", "sidecar-classic.yaml"}
# Kinds kubernetes-validate has no schema for (CRDs); checked by hand below.
NO_SCHEMA_KINDS = {"ServiceMonitor"}


# --- tools -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kv():
    if kubernetes_validate is None:
        pytest.fail("kubernetes-validate is not installed: pip install kubernetes-validate", pytrace=False)
    return kv_utils


@pytest.fixture(scope="session")
def newest_kube(kv) -> str:
    """The newest Kubernetes minor version kubernetes-validate has schemas for."""
    return ".".join(kv.latest_version().split(".")[:2])


@pytest.fixture(scope="session")
def helm_env(tmp_path_factory) -> dict[str, str]:
    # Keep helm's config/cache/data out of the user's home.
    home = tmp_path_factory.mktemp("helm-home")
    return dict(
        os.environ,
        HELM_CONFIG_HOME=str(home / "config"),
        HELM_CACHE_HOME=str(home / "cache"),
        HELM_DATA_HOME=str(home / "data"),
    )


@pytest.fixture(scope="session")
def helm(helm_env) -> str:
    path = os.environ.get("TOKENSMITH_HELM")
    if path:
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            pytest.fail(f"TOKENSMITH_HELM={path} is not an executable file", pytrace=False)
    else:
        result = subprocess.run(
            ["bash", str(INSTALL_HELM)],
            capture_output=True,
            text=True,
            timeout=900,
            env=dict(os.environ, PYTHON=sys.executable),
        )
        if result.returncode != 0:
            pytest.fail(f"scripts/install-helm.sh failed (rc {result.returncode}):\n{result.stderr}", pytrace=False)
        path = result.stdout.strip().splitlines()[-1]
    version = subprocess.run([path, "version", "--short"], capture_output=True, text=True, env=helm_env)
    if version.returncode != 0 or not version.stdout.startswith(("v3.", "v4.")):
        pytest.fail(f"{path} is not a working helm: {version.stdout}{version.stderr}", pytrace=False)
    return path


def _helm(helm, helm_env, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, env=helm_env)
    if check:
        assert result.returncode == 0, f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _values_args(values: list[Path | str]) -> list[str]:
    args = []
    for v in values:
        args += ["-f", str(v)]
    return args


def _render(helm, helm_env, *values: Path | str, kube_version: str | None = None, chart: Path = CHART) -> list[dict]:
    args = ["template", RELEASE, str(chart), "--namespace", NAMESPACE, *_values_args(list(values))]
    if kube_version:
        args += ["--kube-version", kube_version]
    out = _helm(helm, helm_env, *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def _write(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _example(name: str) -> Path:
    return CHART / "ci" / name.replace(".yaml", "-values.yaml")


def _load_example(name: str) -> dict:
    return yaml.safe_load(_example(name).read_text())


# --- manifest helpers ----------------------------------------------------------------


def _by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _one_kind(docs: list[dict], kind: str) -> dict:
    found = _by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def _pod_spec(docs: list[dict]) -> dict:
    return _one_kind(docs, "Deployment")["spec"]["template"]["spec"]


def _tokensmith_container(pod: dict) -> tuple[str, dict]:
    hits = [
        (field, c)
        for field in ("initContainers", "containers")
        for c in pod.get(field, [])
        if c["name"] == "tokensmith"
    ]
    assert len(hits) == 1, hits
    return hits[0]


def _config(docs: list[dict]) -> dict:
    cm = _one_kind(docs, "ConfigMap")
    return yaml.safe_load(cm["data"]["config.yaml"])


def _volume(pod: dict, name: str) -> dict:
    (vol,) = [v for v in pod["volumes"] if v["name"] == name]
    return vol


def _mount_for(container: dict, path: str) -> dict:
    """The volumeMount whose mountPath contains `path` (longest match)."""
    mounts = [
        m
        for m in container.get("volumeMounts", [])
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"{path} is on no volume of container {container['name']}"
    return max(mounts, key=lambda m: len(m["mountPath"]))


# --- the chart's files ------------------------------------------------------------------


def test_example_files_present():
    assert {p.name.replace("-values.yaml", ".yaml") for p in EXAMPLES} == EXPECTED_EXAMPLES


def test_schema_is_draft_07():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["properties"]["mode"]["enum"] == ["central", "sidecar"]
    assert schema["additionalProperties"] is False


# --- lint, render, validate ---------------------------------------------------------------


@pytest.mark.parametrize("example", sorted(EXPECTED_EXAMPLES))
def test_lint_strict(helm, helm_env, example):
    result = _helm(helm, helm_env, "lint", "--strict", str(CHART), "-f", str(_example(example)))
    assert "0 chart(s) failed" in result.stdout + result.stderr


def _kube_versions(example: str, newest: str) -> list[str]:
    # Newest schemas for everything; also the oldest version each variant is
    # meant for: native sidecars need 1.29, the classic one is for older
    # clusters (1.25 is the oldest kubernetes-validate knows).
    if example == "sidecar.yaml":
        return ["1.29", newest]
    if example == "sidecar-classic.yaml":
        return ["1.25", newest]
    return [newest]


@pytest.mark.parametrize("example", sorted(EXPECTED_EXAMPLES))
def test_rendered_manifests_validate(helm, helm_env, kv, newest_kube, example):
    for version in _kube_versions(example, newest_kube):
        docs = _render(helm, helm_env, _example(example), kube_version=f"{version}.0")
        assert docs
        validated = 0
        for doc in docs:
            if doc["kind"] in NO_SCHEMA_KINDS:
                continue  # CRD: no schema in kubernetes-validate, see test_service_monitor
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{example} @ {version}: {doc['kind']}/{doc['metadata']['name']} {path}: {exc.message}")
            validated += 1
        assert validated >= 3


def test_validation_is_strict(kv, newest_kube, helm, helm_env):
    # Guard against a vacuous validator: an unknown container field must fail.
    docs = _render(helm, helm_env, _example("sidecar.yaml"))
    dep = _one_kind(docs, "Deployment")
    dep["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, newest_kube, strict=True)


@pytest.mark.parametrize(
    "example, kinds",
    [
        ("central-vault.yaml", {"ServiceAccount", "ConfigMap", "Service", "Deployment", "ServiceMonitor", "Pod"}),
        ("central-aws.yaml", {"ServiceAccount", "ConfigMap", "Service", "Deployment", "Pod"}),
        ("sidecar.yaml", {"ServiceAccount", "ConfigMap", "Deployment"}),
        ("sidecar-classic.yaml", {"ServiceAccount", "ConfigMap", "Deployment"}),
    ],
)
def test_rendered_kinds(helm, helm_env, example, kinds):
    docs = _render(helm, helm_env, _example(example))
    assert sorted(d["kind"] for d in docs) == sorted(kinds)


# --- pod contents -----------------------------------------------------------------------------


@pytest.mark.parametrize("example", sorted(EXPECTED_EXAMPLES))
def test_security_probes_and_resources(helm, helm_env, example):
    docs = _render(helm, helm_env, _example(example))
    pod = _pod_spec(docs)
    _, ts = _tokensmith_container(pod)

    sc = ts["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == UID
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    if example.startswith("central"):
        assert pod["securityContext"]["runAsUser"] == UID

    assert ts["resources"]["requests"]["cpu"] and ts["resources"]["requests"]["memory"]
    assert ts["resources"]["limits"]["memory"]

    (port,) = ts["ports"]
    assert port["containerPort"] == 9464
    assert ts["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert ts["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert ts["args"] == ["run", "--config", CONFIG_PATH]


@pytest.mark.parametrize("example", sorted(EXPECTED_EXAMPLES))
def test_config_fits_the_pod(helm, helm_env, example):
    docs = _render(helm, helm_env, _example(example))
    pod = _pod_spec(docs)
    _, ts = _tokensmith_container(pod)
    config = _config(docs)

    # Probes reach the health server only on a non-loopback address.
    assert config["health"] == {"enabled": True, "listen": "0.0.0.0:9464"}
    # The config file is the mounted ConfigMap.
    cfg_mount = _mount_for(ts, CONFIG_PATH)
    assert cfg_mount.get("readOnly") is True
    assert _volume(pod, cfg_mount["name"])["configMap"]["name"] == _one_kind(docs, "ConfigMap")["metadata"]["name"]
    # Everything the daemon writes is on in-memory emptyDirs (read-only root FS).
    for key in ("state_dir", "runtime_dir"):
        mount = _mount_for(ts, config[key])
        assert not mount.get("readOnly")
        assert _volume(pod, mount["name"])["emptyDir"]["medium"] == "Memory"
    assert _volume(pod, _mount_for(ts, "/tmp/x")["name"])["emptyDir"]["medium"] == "Memory"
    # state_dir is below its mount point: the daemon must own (chmod 0700) it.
    assert config["state_dir"] != _mount_for(ts, config["state_dir"])["mountPath"]


def _walk(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield path + (k,), v
            yield from _walk(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, path + (i,))


@pytest.mark.parametrize("example", sorted(EXPECTED_EXAMPLES))
def test_no_credentials_in_clear(helm, helm_env, example):
    docs = _render(helm, helm_env, _example(example))
    assert not _by_kind(docs, "Secret")
    # (source/sink "secret_id" elsewhere is an AWS secret's name, not a secret;
    # "keys" maps field names.)
    secret_keys = {"token", "client_secret", "password", "refresh_token", "aws_secret_access_key"}
    for path, _ in _walk(_config(docs)):
        if (path[-1] in secret_keys and "keys" not in path) or path == ("vault", "auth", "secret_id"):
            pytest.fail(f"credential in the ConfigMap: {'.'.join(map(str, path))}")
    _, ts = _tokensmith_container(_pod_spec(docs))
    for env in ts.get("env", []):
        looks_secret = any(w in env["name"].upper() for w in ("SECRET", "TOKEN", "PASSWORD"))
        if looks_secret:
            assert "secretKeyRef" in env.get("valueFrom", {}), env


def test_native_sidecar(helm, helm_env):
    values = _load_example("sidecar.yaml")
    token_dir = values["sidecar"]["tokenDir"]
    docs = _render(helm, helm_env, _example("sidecar.yaml"))
    pod = _pod_spec(docs)
    field, ts = _tokensmith_container(pod)
    assert field == "initContainers"
    assert ts["restartPolicy"] == "Always"
    assert ts["startupProbe"]["httpGet"]["path"] == "/readyz?strict=1"  # every client has its token
    assert ts["startupProbe"]["httpGet"]["port"] == ts["ports"][0]["name"]
    assert [c["name"] for c in pod["containers"]] == ["app"]

    # The token directory: one in-memory emptyDir, written by tokensmith,
    # mounted read-only by the app, and every file sink writes into it.
    tokens = _volume(pod, _mount_for(ts, token_dir + "/x")["name"])
    assert tokens["emptyDir"]["medium"] == "Memory"
    app_mount = _mount_for(pod["containers"][0], token_dir + "/x")
    assert app_mount["name"] == tokens["name"] and app_mount["readOnly"] is True
    assert not _mount_for(ts, token_dir + "/x").get("readOnly")
    sinks = [s for c in _config(docs)["clients"] for s in c["sinks"] if s["type"] == "file"]
    assert sinks and all(s["path"].startswith(token_dir + "/") for s in sinks)
    # The app runs as another user: the group-readable sink plus fsGroup is
    # what lets it read the token.
    assert pod["securityContext"]["fsGroup"] == UID
    assert all(s["mode"] == "0640" for s in sinks)
    # secretEnv -> secretKeyRef
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in ts["env"]}
    assert refs["ORDERS_CLIENT_SECRET"] == {"name": "orders-oauth", "key": "client_secret"}


def test_classic_sidecar(helm, helm_env):
    docs = _render(helm, helm_env, _example("sidecar-classic.yaml"), kube_version="1.25.0")
    pod = _pod_spec(docs)
    field, ts = _tokensmith_container(pod)
    assert field == "containers"
    assert "restartPolicy" not in ts
    assert "initContainers" not in pod
    assert ts["startupProbe"]["httpGet"]["path"] == "/readyz?strict=1"  # every client has its token
    assert sorted(c["name"] for c in pod["containers"]) == ["app", "tokensmith"]
    tokens = _volume(pod, _mount_for(ts, "/var/run/tokens/x")["name"])
    assert tokens["emptyDir"]["medium"] == "Memory"


def test_native_sidecar_needs_kubernetes_1_29(helm, helm_env):
    result = _helm(
        helm, helm_env, "template", RELEASE, str(CHART), "-f", str(_example("sidecar.yaml")),
        "--kube-version", "1.28.0", check=False,
    )
    assert result.returncode != 0
    assert "sidecar.native needs Kubernetes >= 1.29" in result.stderr


def test_central_vault(helm, helm_env):
    docs = _render(helm, helm_env, _example("central-vault.yaml"))
    dep = _one_kind(docs, "Deployment")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    auth = _config(docs)["vault"]["auth"]
    assert auth["method"] == "kubernetes" and auth["role"] == "tokensmith"
    # Vault Kubernetes auth reads the service account token.
    pod = dep["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is True
    assert auth["jwt_file"] == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    sa = _one_kind(docs, "ServiceAccount")
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert [c["name"] for c in pod["containers"]] == ["tokensmith"]


def test_central_aws_irsa(helm, helm_env):
    values = _load_example("central-aws.yaml")
    docs = _render(helm, helm_env, _example("central-aws.yaml"))
    sa = _one_kind(docs, "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == values["serviceAccount"]["irsaRoleArn"]
    # No Vault auth, no service account token in the pod (IRSA injects its own).
    assert _pod_spec(docs)["automountServiceAccountToken"] is False
    assert sa["automountServiceAccountToken"] is False
    _, ts = _tokensmith_container(_pod_spec(docs))
    assert ts["image"] == f"{values['image']['repository']}@{values['image']['digest']}"


def test_service_and_service_monitor(helm, helm_env):
    docs = _render(helm, helm_env, _example("central-vault.yaml"))
    svc = _one_kind(docs, "Service")
    pod_labels = _one_kind(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["targetPort"] == "http-metrics"

    # Structural check of the CRD kubernetes-validate cannot validate.
    sm = _one_kind(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == svc_port["name"] and endpoint["path"] == "/metrics"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"

    annotations = _one_kind(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9464"


def test_notes_explain_compromise_rotation(helm, helm_env):
    for example, target in (("central-vault.yaml", f"deploy/{RELEASE}-tokensmith"), ("sidecar.yaml", "POD")):
        result = _helm(
            helm, helm_env, "install", RELEASE, str(CHART), "--namespace", NAMESPACE,
            "-f", str(_example(example)), "--dry-run=client",
        )
        notes = result.stdout.split("NOTES:", 1)[1]
        assert f"kubectl -n {NAMESPACE} exec {target} -c tokensmith --" in notes
        assert f"tokensmith rotate CLIENT --compromised --config {CONFIG_PATH}" in notes


def test_sidecar_from_a_parent_chart(helm, helm_env, kv, newest_kube, tmp_path):
    """The documented subchart usage: include "tokensmith.sidecar" .Subcharts.tokensmith."""
    parent = tmp_path / "myapp"
    (parent / "templates").mkdir(parents=True)
    shutil.copytree(CHART, parent / "charts" / "tokensmith")
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: myapp\nversion: 1.0.0\n"
        "dependencies:\n  - name: tokensmith\n    version: 0.1.0\n"
    )
    sidecar_values = _load_example("sidecar.yaml")
    sidecar_values["sidecar"]["exampleApp"]["enabled"] = False
    (parent / "values.yaml").write_text(yaml.safe_dump({"tokensmith": sidecar_values}))
    (parent / "templates" / "deployment.yaml").write_text(
        """\
{{- $ts := include "tokensmith.sidecar" .Subcharts.tokensmith | fromYaml }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: myapp
spec:
  selector:
    matchLabels: {app: myapp}
  template:
    metadata:
      labels: {app: myapp}
      annotations: {{- toYaml $ts.podAnnotations | nindent 8 }}
    spec:
      securityContext: {fsGroup: 10001}
      initContainers: {{- toYaml $ts.initContainers | nindent 8 }}
      containers:
        - name: myapp
          image: myapp:1
          volumeMounts: {{- toYaml $ts.appVolumeMounts | nindent 12 }}
        {{- with $ts.containers }}{{ toYaml . | nindent 8 }}{{ end }}
      volumes: {{- toYaml $ts.volumes | nindent 8 }}
"""
    )
    docs = _render(helm, helm_env, chart=parent)
    for doc in docs:
        kv.validate(doc, newest_kube, strict=True)
    dep = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "myapp"]
    assert len(dep) == 1
    pod = dep[0]["spec"]["template"]["spec"]
    field, ts = _tokensmith_container(pod)
    assert field == "initContainers" and ts["restartPolicy"] == "Always"
    cm_name = _one_kind(docs, "ConfigMap")["metadata"]["name"]
    assert _volume(pod, "tokensmith-config")["configMap"]["name"] == cm_name


# --- bad values fail at install time -----------------------------------------------------------


BAD_VALUES = {
    "mode: bogus": ("central-aws.yaml", {"mode": "bogus"}, "/mode"),
    "unknown top-level key": ("central-aws.yaml", {"replicas": 2}, "replicas"),
    "writable root fs": (
        "central-aws.yaml", {"securityContext": {"readOnlyRootFilesystem": False}}, "readOnlyRootFilesystem"
    ),
    "privilege escalation": (
        "central-aws.yaml", {"securityContext": {"allowPrivilegeEscalation": True}}, "allowPrivilegeEscalation"
    ),
    "vault token in clear": (
        "sidecar-classic.yaml",
        {"config": {"vault": {"address": "https://v:8200", "auth": {"method": "token", "token": "s.hunter2"}}}},
        "token",
    ),
    "world-readable token file": (
        "sidecar.yaml",
        {"config": {"clients": [{"name": "a", "token_url": "https://x/t", "source": {"type": "env"},
                                 "sinks": [{"type": "file", "path": "/var/run/tokens/a", "mode": "0644"}]}]}},
        "mode",
    ),
    "unknown source type": (
        "central-aws.yaml",
        {"config": {"clients": [{"name": "a", "token_url": "https://x/t", "source": {"type": "ldap"},
                                 "sinks": [{"type": "aws", "secret_id": "s"}]}]}},
        "source",
    ),
    "kubernetes auth without role": (
        "central-vault.yaml", {"vault": {"kubernetesAuth": {"enabled": True, "role": ""}}}, "role"
    ),
    "service monitor in sidecar mode": ("sidecar.yaml", {"metrics": {"serviceMonitor": {"enabled": True}}}, "mode"),
    "bad IRSA ARN": ("central-aws.yaml", {"serviceAccount": {"irsaRoleArn": "tokensmith"}}, "irsaRoleArn"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_fail_lint_and_template(helm, helm_env, tmp_path, case):
    example, override, needle = BAD_VALUES[case]
    bad = _write(tmp_path, "bad.yaml", override)
    for args in (
        ["lint", "--strict", str(CHART), "-f", str(_example(example)), "-f", str(bad)],
        ["template", RELEASE, str(CHART), "-f", str(_example(example)), "-f", str(bad)],
    ):
        result = _helm(helm, helm_env, *args, check=False)
        output = result.stdout + result.stderr
        assert result.returncode != 0, f"{case}: helm {args[0]} accepted it:\n{output}"
        assert "schema" in output and needle in output, output


def test_defaults_lint_and_deploy_nothing(helm, helm_env):
    # The default values have no clients: plain `helm lint` passes, and nothing that would run
    # (and crash-loop on an empty config) is rendered; NOTES says what to set.
    lint = _helm(helm, helm_env, "lint", "--strict", str(CHART), check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = _render(helm, helm_env)
    assert {d["kind"] for d in docs} == {"ServiceAccount"}
    result = _helm(helm, helm_env, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client")
    assert "No clients are configured" in result.stdout.split("NOTES:", 1)[1]


def test_sidecar_without_file_sink_in_token_dir_fails(helm, helm_env, tmp_path):
    bad = _write(tmp_path, "bad.yaml", {"sidecar": {"tokenDir": "/srv/tokens"}})
    result = _helm(
        helm, helm_env, "template", RELEASE, str(CHART),
        "-f", str(_example("sidecar.yaml")), "-f", str(bad), check=False,
    )
    assert result.returncode != 0
    assert "no client has a file sink under sidecar.tokenDir" in result.stderr


# --- scripts/install-helm.sh --------------------------------------------------------------------


def test_install_helm_script_is_idempotent(helm):
    env = dict(os.environ, PYTHON=sys.executable)
    runs = [
        subprocess.run(["bash", str(INSTALL_HELM)], capture_output=True, text=True, timeout=900, env=env)
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr
    first, second = (r.stdout.strip() for r in runs)
    assert first == second and os.access(first, os.X_OK)
    assert "downloading" not in runs[1].stderr
    assert subprocess.run([first, "version", "--short"], capture_output=True, text=True).stdout.startswith("v4.")
