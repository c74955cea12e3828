"""The Grafana dashboard (dashboards/tokensmith.json, shipped in the chart as a ConfigMap) and the
chart's PrometheusRule.

Every PromQL expression of the dashboard and of the alerts is checked by promtool (Debian's
prometheus package, installed by scripts/test); the alerts are unit-tested with `promtool test rules`
on synthetic series, so each one is shown to fire when it should and to stay quiet otherwise. Every
metric name they use must be one tokensmith exposes (daemon/tokensmith/metrics.py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from test_helm import CHART, REPO, _example, _one_kind, _render, _write, helm, helm_env  # noqa: F401

DASHBOARD = REPO / "dashboards" / "tokensmith.json"
METRICS_SOURCE = REPO / "daemon" / "tokensmith" / "metrics.py"
# Grafana's variables, replaced the way scripts/render-dashboard does for Prometheus itself
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$client": ".*"}
PROMQL_FUNCTIONS = {
    "sum", "min", "max", "count", "avg", "rate", "increase", "time", "vector", "histogram_quantile", "changes",
    "by", "without", "and", "or", "unless", "on", "ignoring", "bool", "le", "humanizeDuration",
}


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if not path:
        pytest.fail("promtool is missing: install Debian's prometheus package (scripts/test does)", pytrace=False)
    return path


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panel_exprs(dashboard: dict) -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def _substitute(expr: str) -> str:
    for name, value in GRAFANA_VARS.items():
        expr = expr.replace(name, value)
    return expr


def _rules(helm, helm_env, tmp_path, values: dict | None = None) -> dict:
    extra = [_write(tmp_path, "rules-values.yaml", {"metrics": {"prometheusRule": {"enabled": True, **(values or {})}}})]
    rule = _one_kind(_render(helm, helm_env, _example("central-aws.yaml"), *extra), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    return rule["spec"]


def _exposed_names() -> set[str]:
    """Metric names tokensmith's own code declares (families as f"{PREFIX}_name")."""
    names = set(re.findall(r'f"\{PREFIX\}_([a-z_]+)"', METRICS_SOURCE.read_text()))
    return {f"tokensmith_{name}" for name in names}


def _metric_names(expr: str) -> set[str]:
    return {name for name in re.findall(r"\btokensmith_[a-z_]+", expr)}


def _family(name: str) -> str:
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# --- the dashboard -------------------------------------------------------------------------------


def test_dashboard_is_shipped_once_in_two_places(helm, helm_env, tmp_path):
    chart_copy = CHART / "dashboards" / "tokensmith.json"
    assert chart_copy.read_bytes() == DASHBOARD.read_bytes(), "helm/tokensmith/dashboards/tokensmith.json differs"
    values = _write(tmp_path, "v.yaml", {"metrics": {"dashboard": {"enabled": True, "annotations": {"grafana_folder": "Auth"}}}})
    config_map = [d for d in _render(helm, helm_env, _example("central-aws.yaml"), values)
                  if d["kind"] == "ConfigMap" and "tokensmith.json" in d.get("data", {})]
    assert len(config_map) == 1
    assert config_map[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map[0]["metadata"]["annotations"] == {"grafana_folder": "Auth"}
    assert json.loads(config_map[0]["data"]["tokensmith.json"]) == _dashboard()
    assert not [d for d in _render(helm, helm_env, _example("central-aws.yaml")) if "tokensmith.json" in d.get("data", {})]


def test_dashboard_covers_the_operational_questions():
    dashboard = _dashboard()
    assert dashboard["uid"] == "tokensmith"
    panels = {panel["title"]: panel for panel in dashboard["panels"]}
    exprs = {title: " ".join(t["expr"] for t in panel["targets"]) for title, panel in panels.items()}
    assert "tokensmith_token_validity_seconds" in exprs["Token time to expiry"]
    assert panels["Token time to expiry"]["fieldConfig"]["defaults"]["unit"] == "s"
    assert "tokensmith_refresh_success_total" in exprs["Refresh outcomes"]
    assert "tokensmith_refresh_failures_total" in exprs["Refresh outcomes"]
    assert "by (reason)" in exprs["Failures by reason"]
    assert "tokensmith_sink_last_success_timestamp_seconds" in exprs["Sink lag"]
    assert "tokensmith_is_leader" in exprs["Leadership"] and "tokensmith_leader_transitions_total" in exprs["Leadership"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(set(ids)) == len(ids)
    # every panel reads the chosen data source and every per-client query honours the client filter
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            if "client" in target.get("legendFormat", ""):
                assert 'client=~"$client"' in target["expr"], (panel["title"], target["expr"])
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["client"]["includeAll"] and variables["client"]["allValue"] == ".*"


def test_dashboard_queries_are_valid_promql(promtool, tmp_path):
    rules = [{"record": f"tokensmith:panel_{i}", "expr": _substitute(expr)}
             for i, (_, expr) in enumerate(_panel_exprs(_dashboard()))]
    path = tmp_path / "panels.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_promtool_rejects_a_bad_query(promtool, tmp_path):
    # the check above can fail: an unbalanced expression is refused
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum(rate(a[1m])"}]}]}))
    assert subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, timeout=60).returncode != 0


def test_dashboard_and_alerts_use_only_metrics_tokensmith_exposes(helm, helm_env, tmp_path):
    exposed = _exposed_names()
    assert "tokensmith_token_validity_seconds" in exposed  # the scan itself finds names
    used = {name for _, expr in _panel_exprs(_dashboard()) for name in _metric_names(expr)}
    for group in _rules(helm, helm_env, tmp_path)["groups"]:
        for rule in group["rules"]:
            used |= _metric_names(rule["expr"])
    unknown = sorted(name for name in used if _family(name) not in exposed and name not in exposed)
    assert not unknown, f"not exposed by daemon/tokensmith/metrics.py: {unknown}"


# --- the alerts ----------------------------------------------------------------------------------


def test_alert_rules_pass_promtool(helm, helm_env, promtool, tmp_path):
    spec = _rules(helm, helm_env, tmp_path)
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {rule["alert"] for group in spec["groups"] for rule in group["rules"]}
    assert {"TokensmithTokenExpiringSoon", "TokensmithRefreshFailing", "TokensmithInvalidClient",
            "TokensmithLeadershipFlapping"} <= alerts


def _alert(name: str, **labels) -> dict:
    return {"exp_labels": {"alertname": name, **labels}}


UNIT_TESTS = [
    {
        "interval": "1m",
        "input_series": [
            # a expires at t=600 s and keeps failing; b expires as soon but refreshes fine; c fails but has time
            {"series": 'tokensmith_token_expiry_timestamp_seconds{client="a"}', "values": "600x20"},
            {"series": 'tokensmith_token_expiry_timestamp_seconds{client="b"}', "values": "600x20"},
            {"series": 'tokensmith_token_expiry_timestamp_seconds{client="c"}', "values": "100000x20"},
            {"series": 'tokensmith_client_consecutive_failures{client="a"}', "values": "2x20"},
            {"series": 'tokensmith_client_consecutive_failures{client="b"}', "values": "0x20"},
            {"series": 'tokensmith_client_consecutive_failures{client="c"}', "values": "0 0 0 0 0 1x15"},
            {"series": 'tokensmith_token_validity_seconds{client="a"}', "values": "300 240 180 120 60 0x15"},
            {"series": 'tokensmith_token_validity_seconds{client="b"}', "values": "300x20"},
            {"series": 'tokensmith_refresh_failures_total{client="a",reason="invalid_client"}', "values": "0 0 0 1x17"},
            {"series": 'tokensmith_refresh_failures_total{client="c",reason="server_error"}', "values": "0 0 0 0 0 1+1x15"},
            {"series": "tokensmith_config_last_reload_successful{instance=\"p1\"}", "values": "1 1 0x18"},
            {"series": "tokensmith_config_last_reload_successful{instance=\"p2\"}", "values": "1x20"},
            {"series": 'tokensmith_leader_transitions_total{instance="p1"}', "values": "0+1x20"},
            {"series": 'tokensmith_leader_transitions_total{instance="p2"}', "values": "1x20"},
        ],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "TokensmithTokenExpiringSoon", "exp_alerts": [_alert("TokensmithTokenExpiringSoon", client="a", severity="critical")]},
            {"eval_time": "4m", "alertname": "TokensmithNoValidToken", "exp_alerts": []},
            {"eval_time": "11m", "alertname": "TokensmithNoValidToken", "exp_alerts": [_alert("TokensmithNoValidToken", client="a", severity="critical")]},
            {"eval_time": "9m", "alertname": "TokensmithRefreshFailing", "exp_alerts": []},
            {"eval_time": "11m", "alertname": "TokensmithRefreshFailing", "exp_alerts": [_alert("TokensmithRefreshFailing", client="a", severity="warning")]},
            {"eval_time": "16m", "alertname": "TokensmithRefreshFailing", "exp_alerts": [
                _alert("TokensmithRefreshFailing", client="a", severity="warning"),
                _alert("TokensmithRefreshFailing", client="c", severity="warning")]},
            {"eval_time": "2m", "alertname": "TokensmithInvalidClient", "exp_alerts": []},
            {"eval_time": "5m", "alertname": "TokensmithInvalidClient", "exp_alerts": [_alert("TokensmithInvalidClient", client="a", reason="invalid_client", severity="critical")]},
            {"eval_time": "6m", "alertname": "TokensmithConfigReloadFailed", "exp_alerts": []},
            {"eval_time": "8m", "alertname": "TokensmithConfigReloadFailed", "exp_alerts": [_alert("TokensmithConfigReloadFailed", instance="p1", severity="warning")]},
            {"eval_time": "3m", "alertname": "TokensmithLeadershipFlapping", "exp_alerts": []},
            {"eval_time": "16m", "alertname": "TokensmithLeadershipFlapping", "exp_alerts": [_alert("TokensmithLeadershipFlapping", instance="p1", severity="warning")]},
        ],
    }
]


def test_alerts_fire_when_they_should(helm, helm_env, promtool, tmp_path):
    spec = _rules(helm, helm_env, tmp_path)
    for group in spec["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)  # templated text is checked by `check rules`; the tests compare labels
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    tests = tmp_path / "tests.yaml"
    tests.write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": UNIT_TESTS}))
    result = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_thresholds_come_from_values(helm, helm_env, tmp_path):
    spec = _rules(helm, helm_env, tmp_path, {"expiryWarningMinutes": 5, "refreshFailingMinutes": 3,
                                             "leaderTransitions": 7, "severity": "page", "labels": {"release": "prom"}})
    rules = {rule["alert"]: rule for group in spec["groups"] for rule in group["rules"]}
    assert "< 300" in rules["TokensmithTokenExpiringSoon"]["expr"]
    assert rules["TokensmithRefreshFailing"]["for"] == "3m"
    assert rules["TokensmithRefreshFailing"]["labels"]["severity"] == "page"
    assert rules["TokensmithLeadershipFlapping"]["expr"].endswith("> 7")
