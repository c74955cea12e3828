"""The chart's operational parts: values table, image registry, extraEnv valueFrom, existingConfigMap,
NetworkPolicy, PodMonitor, the `helm test` pod, per-client revocability in NOTES, chart metadata and
the sample application chart that uses the sidecar named template (helm/examples/sample-app).

Rendered manifests are validated against the Kubernetes schemas (kubernetes-validate, strict) like
tests/test_helm.py; the `helm test` pod's check script is run for real against loopback servers.
"""

from __future__ import annotations

import http.server
import shutil
import subprocess
import sys
import threading

import pytest
import yaml

from test_helm import (  # noqa: F401  (fixtures)
    CHART, NAMESPACE, RELEASE, REPO, _example, _helm, _one_kind, _pod_spec, _render, _tokensmith_container,
    _volume, _write, helm, helm_env, kv, newest_kube,
)

FULLNAME = f"{RELEASE}-tokensmith"
NO_SCHEMA = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def _validate(kv, newest_kube, docs):
    for doc in docs:
        if doc["kind"] not in NO_SCHEMA:
            kv.validate(doc, newest_kube, strict=True)


def _match(selector: dict, labels: dict) -> bool:
    return selector["matchLabels"].items() <= labels.items()


# --- values table --------------------------------------------------------------------------------


def _leaf_paths(node, prefix=""):
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaf_paths(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1]


def test_values_table_is_current_and_complete():
    script = REPO / "scripts" / "helm-values-table"
    check = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    table = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
    rows = [line for line in table.splitlines()[2:]]
    keys = [row.split("`")[1] for row in rows]
    for row, key in zip(rows, keys):
        description = row.rsplit("|", 2)[-2].strip()
        assert description, f"{key} has no description"
    # Every value in values.yaml has a row (itself or an enclosing key, e.g. config, resources).
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for path in _leaf_paths(values):
        parts = path.split(".")
        assert any(".".join(parts[:n]) in keys for n in range(1, len(parts) + 1)), f"{path} missing from the table"
    assert (CHART / "README.md").read_text().count(table) == 1


def test_values_table_check_detects_a_stale_readme(tmp_path):
    chart = tmp_path / "helm" / "tokensmith"
    shutil.copytree(CHART, chart)
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "helm-values-table", tmp_path / "scripts")
    readme = chart / "README.md"
    readme.write_text(readme.read_text().replace("| `healthPort` |", "| `healthport` |"))
    script = tmp_path / "scripts" / "helm-values-table"
    stale = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert stale.returncode == 1 and "stale" in stale.stderr
    assert subprocess.run([sys.executable, str(script), "--write"]).returncode == 0
    assert subprocess.run([sys.executable, str(script), "--check"]).returncode == 0


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["home"].startswith("https://")
    assert chart["sources"] and all(s.startswith("https://") for s in chart["sources"])
    assert chart["icon"].startswith(("https://", "data:image/svg+xml;base64,"))


# --- values --------------------------------------------------------------------------------------


def test_image_registry(helm, helm_env, tmp_path):
    values = _write(tmp_path, "v.yaml", {"image": {"registry": "registry.example.com:5000/", "repository": "platform/tokensmith", "tag": "1.2.3", "digest": ""}})
    _, ts = _tokensmith_container(_pod_spec(_render(helm, helm_env, _example("central-aws.yaml"), values)))
    assert ts["image"] == "registry.example.com:5000/platform/tokensmith:1.2.3"
    digest = "sha256:" + "a" * 64
    values = _write(tmp_path, "d.yaml", {"image": {"registry": "registry.example.com", "repository": "platform/tokensmith", "digest": digest}})
    docs = _render(helm, helm_env, _example("central-aws.yaml"), values)
    _, ts = _tokensmith_container(_pod_spec(docs))
    assert ts["image"] == f"registry.example.com/platform/tokensmith@{digest}"
    assert _one_kind(docs, "Pod")["spec"]["containers"][0]["image"] == ts["image"]  # the helm test pod too


def test_extra_env_value_from(helm, helm_env, kv, newest_kube, tmp_path):
    env = [
        {"name": "PLAIN", "value": "1"},
        {"name": "REGION", "valueFrom": {"configMapKeyRef": {"name": "cluster-info", "key": "region"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    values = _write(tmp_path, "v.yaml", {"extraEnv": env})
    for example in ("central-aws.yaml", "sidecar.yaml"):
        docs = _render(helm, helm_env, _example(example), values)
        _validate(kv, newest_kube, docs)
        _, ts = _tokensmith_container(_pod_spec(docs))
        by_name = {e["name"]: e for e in ts["env"]}
        assert by_name["PLAIN"] == {"name": "PLAIN", "value": "1"}
        assert by_name["REGION"]["valueFrom"] == env[1]["valueFrom"]
        assert by_name["POD_NAME"]["valueFrom"] == env[2]["valueFrom"]


@pytest.mark.parametrize("value_from", [
    {"configMapKeyRef": {"name": "a", "key": "b"}, "fieldRef": {"fieldPath": "metadata.name"}},  # two sources
    {"vaultRef": {"path": "x"}},
    {},
])
def test_extra_env_value_from_is_checked(helm, helm_env, tmp_path, value_from):
    values = _write(tmp_path, "v.yaml", {"extraEnv": [{"name": "X", "valueFrom": value_from}]})
    result = _helm(helm, helm_env, "template", RELEASE, str(CHART), "-f", str(_example("central-aws.yaml")),
                   "-f", str(values), check=False)
    assert result.returncode != 0 and "/extraEnv/0" in result.stderr, result.stderr


@pytest.mark.parametrize("example", ["central-aws.yaml", "sidecar.yaml"])
def test_existing_config_map(helm, helm_env, kv, newest_kube, tmp_path, example):
    values = _write(tmp_path, "v.yaml", {"existingConfigMap": "my-tokensmith-config", "config": {"clients": []}})
    docs = _render(helm, helm_env, _example(example), values)
    _validate(kv, newest_kube, docs)
    assert not [d for d in docs if d["kind"] == "ConfigMap"]
    pod = _pod_spec(docs)
    assert _volume(pod, "tokensmith-config")["configMap"]["name"] == "my-tokensmith-config"
    other = _write(tmp_path, "o.yaml", {"existingConfigMap": "other-config", "config": {"clients": []}})
    checksum = lambda d: _one_kind(d, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/tokensmith-config"]
    assert checksum(docs) != checksum(_render(helm, helm_env, _example(example), other))


# --- NetworkPolicy -------------------------------------------------------------------------------


def test_network_policy(helm, helm_env, kv, newest_kube, tmp_path):
    values = _write(tmp_path, "v.yaml", {"networkPolicy": {"enabled": True}})
    docs = _render(helm, helm_env, _example("central-vault.yaml"), values)
    _validate(kv, newest_kube, docs)
    policy = _one_kind(docs, "NetworkPolicy")
    pod_labels = _one_kind(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert _match(policy["spec"]["podSelector"], pod_labels)
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress open by default
    assert "egress" not in policy["spec"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http-metrics", "protocol": "TCP"}]
    monitoring, test_pod = rule["from"]
    assert monitoring["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    assert monitoring["podSelector"] == {}
    assert _match(test_pod["podSelector"], _one_kind(docs, "Pod")["metadata"]["labels"])
    assert "namespaceSelector" not in test_pod  # the test pod only from the release's namespace


def test_network_policy_custom_selector_and_egress(helm, helm_env, kv, newest_kube, tmp_path):
    egress = [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 443, "protocol": "TCP"}]},
              {"ports": [{"port": 53, "protocol": "UDP"}]}]
    values = _write(tmp_path, "v.yaml", {"networkPolicy": {
        "enabled": True,
        "monitoringNamespaceSelector": {"matchLabels": {"team": "observability"}},
        "monitoringPodSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        "egress": egress,
    }})
    docs = _render(helm, helm_env, _example("central-vault.yaml"), values)
    _validate(kv, newest_kube, docs)
    policy = _one_kind(docs, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["egress"] == egress
    peer = policy["spec"]["ingress"][0]["from"][0]
    assert peer == {"namespaceSelector": {"matchLabels": {"team": "observability"}},
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}


def test_network_policy_is_central_only(helm, helm_env, tmp_path):
    values = _write(tmp_path, "v.yaml", {"networkPolicy": {"enabled": True}})
    docs = _render(helm, helm_env, _example("sidecar.yaml"), values)
    assert not [d for d in docs if d["kind"] == "NetworkPolicy"]


# --- PodMonitor ----------------------------------------------------------------------------------


def test_pod_monitor_sidecar_selects_the_app_pods(helm, helm_env, kv, newest_kube, tmp_path):
    values = _write(tmp_path, "v.yaml", {"metrics": {"podMonitor": {"enabled": True, "labels": {"release": "prom"}}}})
    docs = _render(helm, helm_env, _example("sidecar.yaml"), values)
    _validate(kv, newest_kube, docs)
    monitor = _one_kind(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    app = _one_kind(docs, "Deployment")
    assert _match(monitor["spec"]["selector"], app["spec"]["template"]["metadata"]["labels"])
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    _, ts = _tokensmith_container(_pod_spec(docs))
    assert endpoint["port"] in {p["name"] for p in ts["ports"]} and endpoint["path"] == "/metrics"


def test_pod_monitor_central_and_custom_selector(helm, helm_env, tmp_path):
    values = _write(tmp_path, "v.yaml", {"metrics": {"podMonitor": {"enabled": True}}})
    docs = _render(helm, helm_env, _example("central-aws.yaml"), values)
    monitor = _one_kind(docs, "PodMonitor")
    assert _match(monitor["spec"]["selector"], _one_kind(docs, "Deployment")["spec"]["template"]["metadata"]["labels"])
    selector = {"matchLabels": {"app": "mine"}}
    values = _write(tmp_path, "c.yaml", {"metrics": {"podMonitor": {"enabled": True, "selector": selector}}})
    assert _one_kind(_render(helm, helm_env, _example("sidecar.yaml"), values), "PodMonitor")["spec"]["selector"] == selector


# --- helm test -----------------------------------------------------------------------------------


class _Health(http.server.BaseHTTPRequestHandler):
    status = {"/healthz": 200, "/readyz": 200}

    def do_GET(self):
        self.send_response(self.status.get(self.path, 404))
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args):
        pass


def _serve(statuses: dict) -> http.server.HTTPServer:
    handler = type("Handler", (_Health,), {"status": statuses})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_helm_test_pod_checks_health_and_readiness(helm, helm_env, kv, newest_kube):
    docs = _render(helm, helm_env, _example("central-vault.yaml"))
    _validate(kv, newest_kube, docs)
    pod = _one_kind(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    _, ts = _tokensmith_container(_pod_spec(docs))
    assert container["image"] == ts["image"] and container["securityContext"] == ts["securityContext"]
    script = container["args"][0]
    service = _one_kind(docs, "Service")
    # the Service (and the PodMonitor/NetworkPolicy, which use the same labels) must not pick the test pod
    assert not _match({"matchLabels": service["spec"]["selector"]}, pod["metadata"]["labels"])
    base = f"http://{service['metadata']['name']}.{NAMESPACE}.svc:{service['spec']['ports'][0]['port']}"
    assert base in script
    # Run the pod's check for real against loopback servers standing in for the Service.
    for statuses, expected in (({"/healthz": 200, "/readyz": 200}, 0),
                               ({"/healthz": 200, "/readyz": 503}, 1),
                               ({"/healthz": 503, "/readyz": 200}, 1)):
        server = _serve(statuses)
        try:
            local = script.replace(base, f"http://127.0.0.1:{server.server_port}")
            result = subprocess.run([sys.executable, "-c", local], capture_output=True, text=True, timeout=30)
        finally:
            server.shutdown()
            server.server_close()
        assert result.returncode == expected, (statuses, result.stdout, result.stderr)


def test_helm_test_can_be_disabled(helm, helm_env, tmp_path):
    values = _write(tmp_path, "v.yaml", {"tests": {"enabled": False}})
    assert not [d for d in _render(helm, helm_env, _example("central-vault.yaml"), values) if d["kind"] == "Pod"]


# --- NOTES ---------------------------------------------------------------------------------------


def test_notes_say_per_client_what_rotation_does(helm, helm_env, tmp_path):
    base = yaml.safe_load(_example("central-aws.yaml").read_text())["config"]["clients"][0]
    clients = []
    for name, extra in (
        ("revocable", {"revocation_url": "https://auth.example.com/revoke"}),
        ("rt-grant", {"grant": "refresh_token"}),
        ("rt-strategy", {"refresh": {"strategy": "refresh_token"}}),
        ("plain", {}),
    ):
        client = {k: v for k, v in base.items() if k not in ("revocation_url", "grant", "refresh")}
        clients.append({**client, "name": name, **extra})
    values = _write(tmp_path, "v.yaml", {"config": {"clients": clients}})
    result = _helm(helm, helm_env, "install", RELEASE, str(CHART), "--namespace", NAMESPACE,
                   "-f", str(_example("central-aws.yaml")), "-f", str(values), "--dry-run=client")
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "the old\ntoken is revoked" not in notes and "old token is revoked" not in notes
    assert "revocable: revoked at its revocation_url" in notes
    assert "rt-grant: invalidated by spending its refresh token" in notes
    assert "rt-strategy: invalidated by spending its refresh token" in notes
    assert "plain: NOT revocable" in notes and "stays valid until it expires" in notes


# --- the sidecar named template in a user's chart ------------------------------------------------


def test_sample_app_chart_uses_the_sidecar_template(helm, helm_env, kv, newest_kube, tmp_path):
    """helm/examples/sample-app as a user would run it: dependency update (file://), template, validate."""
    shutil.copytree(REPO / "helm", tmp_path / "helm", ignore=shutil.ignore_patterns("charts", "Chart.lock"))
    app = tmp_path / "helm" / "examples" / "sample-app"
    _helm(helm, helm_env, "dependency", "update", str(app))
    assert (app / "charts" / "tokensmith-0.1.0.tgz").is_file()
    lint = _helm(helm, helm_env, "lint", "--strict", str(app), check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    out = _helm(helm, helm_env, "template", "orders", str(app), "--namespace", "shop").stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    _validate(kv, newest_kube, docs)
    assert {d["kind"] for d in docs} == {"ServiceAccount", "ConfigMap", "Deployment", "PodMonitor"}
    deployment = _one_kind(docs, "Deployment")
    assert deployment["metadata"]["name"] == "orders-sample-app"
    pod = deployment["spec"]["template"]["spec"]
    field, ts = _tokensmith_container(pod)
    assert field == "initContainers" and ts["restartPolicy"] == "Always"
    assert ts["image"] == "registry.example.com/platform/tokensmith:0.1.0"
    (app_container,) = pod["containers"]
    assert {"name": "tokensmith-tokens", "mountPath": "/var/run/tokens", "readOnly": True} in app_container["volumeMounts"]
    config_map = _one_kind(docs, "ConfigMap")
    assert _volume(pod, "tokensmith-config")["configMap"]["name"] == config_map["metadata"]["name"]
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert config["clients"][0]["sinks"][0]["path"] == "/var/run/tokens/orders.token"
    template = deployment["spec"]["template"]["metadata"]
    assert _match(_one_kind(docs, "PodMonitor")["spec"]["selector"], template["labels"])
    assert template["annotations"]["prometheus.io/port"] == "9464"
