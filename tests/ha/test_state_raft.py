"""The vault state backend on a real 3-node OpenBao cluster with Raft storage, through every node.

OpenBao (2.5+) standbys answer reads, and check a write's check-and-set version, from their own
copy of the data, which lags the active node. The backend sends the storage index of its latest
write with every request (forward-active-node), so a lagging node forwards instead of answering
from an old copy; a replica that takes over writes its lease first and so reads every earlier
state write. Killing the active node, the backend rides through the Raft election."""

from __future__ import annotations

import time
import uuid

import pytest

from daemon_harness import wait_for

from tokensmith.config import VaultConfig, VaultStateConfig
from tokensmith.errors import StateError
from tokensmith.state import ClientState, StaleStateError
from tokensmith.state.vault import VaultStateStore
from tokensmith.vault import VaultClient

FAILOVER_BOUND = 20.0  # seconds from killing the active node to a durable write through a survivor


@pytest.fixture
def cluster(raft_cluster):
    raft_cluster.ensure_up()
    return raft_cluster


@pytest.fixture
def prefix():
    return f"raft-test/{uuid.uuid4().hex[:10]}"


def store_via(cluster, node, prefix, tmp_path, timeout: float = 3.0) -> VaultStateStore:
    vault = VaultClient(VaultConfig(address=node.address, timeout=timeout,
                                    auth={"method": "token", "token": cluster.root_token}))
    return VaultStateStore(VaultStateConfig(type="vault", prefix=prefix), vault, tmp_path / node.name)


def state(n: int) -> ClientState:
    return ClientState(access_token=f"access-{n}", obtained_at=float(n), expires_at=float(n + 100),
                       refresh_token=f"refresh-{n}", refresh_token_obtained_at=float(n))


def take_lease(store: VaultStateStore, prefix: str, versions: dict) -> None:
    """What a replica does on takeover (leases/): a CAS write of the lease record, through the
    same VaultClient the state backend uses. A client that has written nothing yet may read the lease
    from a lagging standby; its CAS then fails and it reads again, as a lease candidate does."""
    key = f"{prefix}/leader"
    deadline = time.monotonic() + 5
    while True:
        try:
            _, version, _ = store.vault.kv2_get("secret", key, error_cls=StateError)
            new, _ = store.vault.kv2_put("secret", key, {"holder": id(store)}, version, error_cls=StateError)
        except StateError as exc:  # a node that has just rejoined forwards nothing for a moment (HTTP 500)
            assert exc.retryable and time.monotonic() < deadline, str(exc)
            time.sleep(0.05)
            continue
        if new is not None:
            versions[key] = new
            return
        assert time.monotonic() < deadline, "lease write kept conflicting"
        time.sleep(0.02)


def test_the_cluster_is_three_voters_and_every_node_serves(cluster):
    assert len(cluster.nodes) == 3 and cluster.voters() == {"node1", "node2", "node3"}
    assert len(cluster.standbys()) == 2 and cluster.active() not in cluster.standbys()
    print(f"raft cluster up in {cluster.startup_seconds:.1f}s")


def test_every_node_reads_its_own_writes_and_cas_never_trips_on_a_lagging_standby(cluster, prefix, tmp_path):
    for node in cluster.nodes:
        store = store_via(cluster, node, prefix, tmp_path)
        name = f"own-{node.name}"
        assert store.load(name) is None
        for n in range(25):
            store.save(name, state(n))  # CAS on the version just written: a lagging node must not refuse it
            assert store.load_if_changed(name) is None
            assert store.load(name) == state(n)
        assert store.versions[name] == 25


def test_handing_the_chain_between_nodes_a_new_writer_reads_the_latest_after_its_lease_write(cluster, prefix,
                                                                                               tmp_path):
    stores = [store_via(cluster, node, prefix, tmp_path) for node in cluster.nodes]
    lease: dict = {}
    for n in range(30):
        writer = stores[n % 3]  # a different replica, through a different node, every time
        take_lease(writer, prefix, lease)
        current = writer.load("chain")
        assert current == (state(n - 1) if n else None), f"round {n}: {writer.vault.config.address} read stale"
        writer.save("chain", state(n))


def test_a_stale_writer_through_a_standby_fails_and_the_record_is_unchanged(cluster, prefix, tmp_path):
    first, second = cluster.standbys()
    stale = store_via(cluster, first, prefix, tmp_path)
    fresh = store_via(cluster, second, prefix, tmp_path)
    fresh.save("billing", state(1))
    take_lease(stale, prefix, {})
    assert stale.load("billing") == state(1)
    fresh.save("billing", state(2))
    with pytest.raises(StaleStateError, match="another writer moved client billing on"):
        stale.save("billing", state(3))
    reader = store_via(cluster, cluster.active(), prefix, tmp_path)
    take_lease(reader, prefix, {})
    assert reader.load("billing") == state(2) and reader.versions["billing"] == 2


def test_the_backend_rides_through_losing_the_active_node(cluster, prefix, tmp_path):
    old_active = cluster.active()
    survivor = cluster.standbys()[0]
    store = store_via(cluster, survivor, prefix, tmp_path, timeout=2.0)
    store.save("billing", state(1))
    cluster.kill(old_active)
    killed_at = time.monotonic()
    errors = []
    n = 2
    while True:
        try:
            store.save("billing", state(n))
            break
        except StaleStateError:
            raise
        except StateError as exc:
            errors.append(exc)
            assert exc.retryable, str(exc)
            assert time.monotonic() - killed_at < FAILOVER_BOUND, f"no write within {FAILOVER_BOUND}s: {exc}"
            time.sleep(0.1)
    took = time.monotonic() - killed_at
    new_active = cluster.wait_active()
    assert new_active is not old_active
    print(f"failover: first durable write {took:.2f}s after the active node was killed, {len(errors)} retryable "
          f"errors before it; new active {new_active.name}")
    others = [node for node in cluster.nodes if node.running]
    for node in others:
        reader = store_via(cluster, node, prefix, tmp_path)
        take_lease(reader, prefix, {})
        assert reader.load("billing") == state(n)
    # the killed node comes back on its old data: reads through it are not stale either
    cluster.restart(old_active)
    back = store_via(cluster, old_active, prefix, tmp_path)
    take_lease(back, prefix, {})
    assert back.load("billing") == state(n)
    back.save("billing", state(n + 1))
    # a replica that has not written since reads through its node's copy: it sees the change once
    # that copy has it (ms); the one that matters, a new leader, writes its lease first (see above)
    assert wait_for(lambda: store.load_if_changed("billing"), timeout=5) == state(n + 1)
