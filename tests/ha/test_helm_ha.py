"""The chart's high-availability options: several central replicas on a shared state backend
(PodDisruptionBudget, anti-affinity, RollingUpdate, POD_NAME as the lease identity), the schema
refusing replicas > 1 without one, and the single-replica PersistentVolumeClaim option."""

from __future__ import annotations

import pytest

from test_helm import (CHART, RELEASE, _by_kind, _config, _example, _helm, _mount_for,  # noqa: F401
                       _one_kind, _pod_spec, _render, _tokensmith_container, _volume, _write,
                       helm, helm_env, kv, newest_kube)

SHARED = {"config": {"state": {"type": "vault", "mount": "secret", "prefix": "tokensmith/prod"},
                     "leader": {"lease_ttl": 15, "renew_every": 5}}}


def ha_values(tmp_path, name="ha.yaml", **central):
    return _write(tmp_path, name, {**SHARED, "central": {"replicas": 3, **central}})


def test_three_replicas_on_vault_state(helm, helm_env, kv, newest_kube, tmp_path):
    docs = _render(helm, helm_env, _example("central-vault.yaml"), ha_values(tmp_path))
    deployment = _one_kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                              "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    pdb = _one_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert all(pod_labels.get(key) == value for key, value in pdb["spec"]["selector"]["matchLabels"].items())

    pod = _pod_spec(docs)
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["weight"] == 100
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    selector = term["podAffinityTerm"]["labelSelector"]["matchLabels"]
    assert selector["app.kubernetes.io/component"] == "central"
    assert all(pod_labels.get(key) == value for key, value in selector.items())

    _, container = _tokensmith_container(pod)
    env = {item["name"]: item for item in container["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    config = _config(docs)
    assert config["state"]["type"] == "vault" and config["leader"] == {"lease_ttl": 15, "renew_every": 5}

    for doc in docs:
        if doc["kind"] != "ServiceMonitor":
            kv.validate(doc, newest_kube, strict=True)


def test_rendered_ha_config_is_accepted_by_tokensmith(helm, helm_env, tmp_path):
    from tokensmith.config import Settings

    docs = _render(helm, helm_env, _example("central-vault.yaml"), ha_values(tmp_path))
    settings = Settings(**_config(docs))
    assert settings.state.type == "vault" and settings.leader.lease_ttl == 15


def test_hard_anti_affinity_and_dynamodb(helm, helm_env, tmp_path):
    values = _write(tmp_path, "ddb.yaml", {"config": {"state": {"type": "dynamodb", "table": "tokensmith-state"}},
                                           "central": {"replicas": 2, "antiAffinity": "hard"}})
    docs = _render(helm, helm_env, _example("central-aws.yaml"), values)
    anti = _pod_spec(docs)["affinity"]["podAntiAffinity"]
    assert list(anti) == ["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == "kubernetes.io/hostname"
    assert _one_kind(docs, "Deployment")["spec"]["replicas"] == 2


def test_own_affinity_wins_and_pdb_can_be_disabled(helm, helm_env, tmp_path):
    own = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["infra"]}]}]}}}
    docs = _render(helm, helm_env, _example("central-vault.yaml"),
                   ha_values(tmp_path, affinity=own, podDisruptionBudget={"enabled": False}))
    assert _pod_spec(docs)["affinity"] == own
    assert not _by_kind(docs, "PodDisruptionBudget")


def test_single_replica_file_backend_is_unchanged(helm, helm_env):
    docs = _render(helm, helm_env, _example("central-vault.yaml"))
    deployment = _one_kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert not _by_kind(docs, "PodDisruptionBudget") and not _by_kind(docs, "PersistentVolumeClaim")
    assert "affinity" not in _pod_spec(docs)


@pytest.mark.parametrize("values, needle", [
    ({"central": {"replicas": 2}}, "state"),  # the default file backend
    ({"central": {"replicas": 2}, "config": {"state": {"type": "file"}}}, "state"),
    ({"central": {"replicas": 2, "persistence": {"enabled": True}}, **SHARED}, "persistence"),
    ({"central": {"persistence": {"enabled": True}}, **SHARED}, "persistence"),
    ({"central": {"replicas": 3, "antiAffinity": "sometimes"}, **SHARED}, "antiAffinity"),
])
def test_schema_refuses_replicas_without_a_shared_backend(helm, helm_env, tmp_path, values, needle):
    bad = _write(tmp_path, "bad.yaml", values)
    for args in (["lint", "--strict", str(CHART), "-f", str(_example("central-vault.yaml")), "-f", str(bad)],
                 ["template", RELEASE, str(CHART), "-f", str(_example("central-vault.yaml")), "-f", str(bad)]):
        result = _helm(helm, helm_env, *args, check=False)
        output = result.stdout + result.stderr
        assert result.returncode != 0, f"helm {args[0]} accepted {values}:\n{output}"
        assert "schema" in output, output


def test_persistent_state_for_one_replica(helm, helm_env, kv, newest_kube, tmp_path):
    values = _write(tmp_path, "pvc.yaml", {"central": {"persistence": {"enabled": True, "size": "128Mi",
                                                                       "storageClassName": "encrypted-gp3"}}})
    docs = _render(helm, helm_env, _example("central-vault.yaml"), values)
    pvc = _one_kind(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "128Mi"
    assert pvc["spec"]["storageClassName"] == "encrypted-gp3"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    pod = _pod_spec(docs)
    _, container = _tokensmith_container(pod)
    state = _volume(pod, _mount_for(container, _config(docs)["state_dir"])["name"])
    assert state == {"name": "tokensmith-state", "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}}
    assert _volume(pod, "tokensmith-runtime")["emptyDir"]["medium"] == "Memory"  # the socket stays in memory
    assert _one_kind(docs, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}  # RWO: never two pods
    for doc in docs:
        if doc["kind"] != "ServiceMonitor":
            kv.validate(doc, newest_kube, strict=True)
