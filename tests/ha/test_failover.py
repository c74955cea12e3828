"""Failover with real processes: three `tokensmith run` replicas share one Vault state backend
(the OpenBao dev server), refresh against the stateful token server (single-use rotating refresh
tokens, reuse detected), while a consumer reads every client's Vault sink continuously.

Figures (takeover seconds, reuse counts, expired-token seconds) are printed and recorded for
docs/ha.md (`pytest tests/ha/test_failover.py -s`)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from daemon_harness import wait_for
from ha_cluster import Cluster, Consumer
from tokensmith.devserver import OAuthServer

LEASE_TTL = 3.0
RENEW_EVERY = 1.0
LIFETIME = 15  # refreshed at half-life (7.5 s +- 1.5 s): longer left than a takeover takes
# the ttl, plus a renew and a campaign period, plus slack for a loaded machine
TAKEOVER_BOUND = LEASE_TTL + 2 * RENEW_EVERY + 5.0
# The provider revokes an access token when its refresh token is spent, so a sink holds a revoked
# token from that answer until the new one is written: milliseconds, or seconds on a loaded machine.
# A token a deposed leader wrote, or one left behind, would stay until the next refresh (>= 6 s).
REVOKED_BOUND = 3.0


@pytest.fixture
def token_server():
    with OAuthServer(access_lifetime=LIFETIME) as server:
        yield server


def figures(report, fault: str, outcome: str, **numbers) -> None:
    print(f"\nHA figures: {fault}: {outcome}: {numbers}")
    report.record(fault, outcome, **numbers)


def wait_new_leader(cluster: Cluster, old: str, timeout: float) -> tuple[str, int]:
    lease = wait_for(lambda: (lambda data: data if data and data.get("holder") not in (None, old) else None)(
        cluster.lease()), timeout, interval=0.05)
    return lease["holder"], int(lease["epoch"])


def kill_rounds(cluster: Cluster, rounds: int) -> tuple[list[float], list[float]]:
    """SIGKILL whoever leads, `rounds` times; each time a standby must take over with a later epoch.
    The killed replica comes back as a standby. Returns the takeover seconds and the kill instants."""
    takeovers, kills = [], []
    for _ in range(rounds):
        wait_for(cluster.leader, 10)
        time.sleep(1.0)  # let it refresh a little as leader
        lease = cluster.lease()  # who leads now (a starved store can make the lease change hands)
        leader = next(replica for replica in cluster.replicas if replica.name == lease["holder"])
        kills.append(time.monotonic())
        cluster.kill(leader)
        _, new_epoch = wait_new_leader(cluster, leader.name, TAKEOVER_BOUND)
        takeovers.append(round(time.monotonic() - kills[-1], 2))
        assert new_epoch > int(lease["epoch"])  # a takeover always moves the epoch on
        cluster.start(leader)  # it comes back as a standby
        cluster.wait_started()
    # every client keeps being refreshed by the last leader
    issued = cluster.server.stats["issued"]
    wait_for(lambda: cluster.server.stats["issued"] >= issued + len(cluster.names), 20, interval=0.2)
    cluster.wait_all_sinks(15)
    return takeovers, kills


def test_sigkill_the_leader_repeatedly(tmp_path, vault_kv, token_server, report):
    cluster = Cluster(tmp_path, vault_kv, token_server, clients=20, replicas=3, lifetime=LIFETIME,
                      lease_ttl=LEASE_TTL, renew_every=RENEW_EVERY)
    cluster.start_all()
    try:
        cluster.wait_all_sinks(30)
        cluster.wait_started()
        with Consumer(cluster) as consumer:
            takeovers, kills = kill_rounds(cluster, 3)
        reuse = token_server.stats["refresh_reuse"]
        assert not consumer.expired, f"a sink held an expired token: {consumer.expired[:5]}"
        # a kill between the provider's answer and the sink write leaves the revoked token there
        # until the new leader writes the stored one: those spans are left out
        longest = consumer.longest_revoked(excluding=kills, grace=1.0)
        assert longest < REVOKED_BOUND, f"a sink held a revoked token for {longest:.2f}s"
        # reuse only from a kill between the provider's answer and the state write: at most one per
        # refresh in flight (8 workers) per kill, and every client recovered (sinks fresh above)
        assert reuse <= 8 * len(kills)
        assert max(takeovers) < TAKEOVER_BOUND
        figures(report, "SIGKILL the leader (3 rounds, 3 replicas, 20 clients, lease_ttl 3 s)",
                "a standby took over every time; no sink held an expired token",
                takeover_seconds=takeovers, refresh_token_reuse=reuse, expired_samples=len(consumer.expired),
                samples=consumer.samples, longest_revoked_seconds=round(
                    max((span for _, _, span in consumer.revoked_spans), default=0.0), 2))
    finally:
        cluster.stop_all()


def test_paused_leader_is_fenced_when_it_resumes(tmp_path, vault_kv, token_server, report):
    cluster = Cluster(tmp_path, vault_kv, token_server, clients=20, replicas=2, lifetime=LIFETIME,
                      lease_ttl=LEASE_TTL, renew_every=RENEW_EVERY)
    cluster.start_all()
    try:
        cluster.wait_all_sinks(30)
        cluster.wait_started()
        with Consumer(cluster) as consumer:
            old = wait_for(cluster.leader, 10)
            time.sleep(1.0)
            old.process.send_signal(signal.SIGSTOP)
            paused_at = time.monotonic()
            holder, epoch = wait_new_leader(cluster, old.name, TAKEOVER_BOUND)
            takeover = time.monotonic() - paused_at
            # keep it paused until some of its clients were due, so it resumes with work it may not do
            time.sleep(max(0.0, 6.0 - takeover))
            before = token_server.stats["refresh_exchanges"]
            resumed_log = len(old.log)
            old.process.send_signal(signal.SIGCONT)
            wait_for(lambda: any(event in old.log[resumed_log:] for event in ("event=leader_deposed", "event=lease_lost")),
                     10, interval=0.1)
            time.sleep(2.0)  # let its overdue jobs and the new leader run side by side
            after_log = old.log[resumed_log:]
            cluster.wait_all_sinks(15)
        assert token_server.stats["refresh_reuse"] == 0, "the paused leader spent a refresh token"
        assert "event=refreshed" not in after_log, "the deposed leader refreshed after it resumed"
        assert cluster.lease()["holder"] == holder and int(cluster.lease()["epoch"]) == epoch
        assert not consumer.expired
        assert consumer.longest_revoked() < REVOKED_BOUND
        figures(report, "SIGSTOP the leader past its lease, then SIGCONT",
                "the resumed leader stepped down; it refreshed nothing and spent no refresh token",
                takeover_seconds=round(takeover, 2), refresh_token_reuse=token_server.stats["refresh_reuse"],
                exchanges_by_others=token_server.stats["refresh_exchanges"] - before,
                expired_samples=len(consumer.expired))
    finally:
        cluster.stop_all()


def test_restarting_every_replica_keeps_the_stored_tokens(tmp_path, vault_kv, report):
    clients = 50
    with OAuthServer(access_lifetime=300) as server:
        cluster = Cluster(tmp_path, vault_kv, server, clients=clients, replicas=2, lifetime=300,
                          lease_ttl=LEASE_TTL, renew_every=RENEW_EVERY)
        cluster.start_all()
        try:
            cluster.wait_all_sinks(40)
            cluster.stop_all()
            requests = server.stats["token_requests"]
            restarted = time.monotonic()
            cluster.start_all()
            leader = wait_for(cluster.leader, 30)
            wait_for(lambda: "event=takeover" in leader.log.split("event=stopping")[-1], 30, interval=0.1)
            elected = time.monotonic() - restarted
            # a takeover that refreshed what it could keep would do so at once; watch 5 s past it
            watch_until = time.monotonic() + 5.0
            while time.monotonic() < watch_until and server.stats["token_requests"] == requests:
                time.sleep(0.25)
            refreshed = server.stats["token_requests"] - requests
            assert cluster.all_sinks_fresh()
        finally:
            cluster.stop_all()
    assert refreshed < clients * 0.01, f"{refreshed} of {clients} clients refreshed after the restart"
    figures(report, "restart every replica at once (2 replicas, 50 clients)",
            "the new leader kept every stored token", token_requests_until_5s_after_takeover=refreshed,
            leader_elected_after_seconds=round(elected, 2))


@pytest.fixture
def slow_token_server():
    """Tokens that live 300 s: nothing refreshes by itself while a test compares views."""
    with OAuthServer(access_lifetime=300) as server:
        yield server


def test_standby_status_readiness_metrics_and_rotate_refusal(tmp_path, vault_kv, slow_token_server):
    import re
    import subprocess
    import sys
    import urllib.request

    token_server = slow_token_server
    cluster = Cluster(tmp_path, vault_kv, token_server, clients=3, replicas=2, lifetime=300,
                      lease_ttl=LEASE_TTL, renew_every=RENEW_EVERY)
    cluster.start_all()
    try:
        cluster.wait_all_sinks(30)
        cluster.wait_started()
        leader = wait_for(cluster.leader, 10)
        standby = next(replica for replica in cluster.replicas if replica is not leader)

        def cli(replica, *args, env=None):
            return subprocess.run([sys.executable, "-m", "tokensmith", *args, "--config",
                                   str(replica.root / "config.yaml")], capture_output=True, text=True, timeout=30,
                                  env={**os.environ, **(env or {})})

        def get(replica, path):
            port = int(wait_for(lambda: re.search(r"health endpoint listening on 127\.0\.0\.1:(\d+)", replica.log))
                       .group(1))
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

        # a standby shows the lease as it last read it: at start-up it may have read it before the leader won
        named = re.compile(rf"leader: {leader.name} \(epoch 1, lease expires in [0-9.]+s\)")
        status = wait_for(lambda: (lambda result: result if named.search(result.stdout) else None)(
            cli(standby, "status")), 15, interval=0.5)
        assert f"state backend: vault secret/{cluster.prefix}/leader" in status.stdout
        assert f"this replica: {standby.name}, standby" in status.stdout
        assert f"this replica: {leader.name}, active" in cli(leader, "status").stdout

        import json

        def tokens(replica):
            listing = json.loads(cli(replica, "status", "--json").stdout)["clients"]
            return {status["client"]: status["token"] for status in listing}

        tokens_before = tokens(leader)
        assert tokens(standby) == tokens_before  # read from the store, not what it saw at start-up

        issued = token_server.stats["issued"]
        refused = cli(standby, "rotate", "c000")
        assert refused.returncode != 0
        assert f"({standby.name}) is a standby: rotate on the leader {leader.name} (epoch 1)" in refused.stderr
        assert token_server.stats["issued"] == issued
        rotated = cli(leader, "rotate", "c000")
        assert rotated.returncode == 0, rotated.stderr
        assert token_server.stats["issued"] == issued + 1
        assert tokens(standby)["c000"] == tokens(leader)["c000"] != tokens_before["c000"]

        assert get(standby, "/readyz") == (200, "ready\n")
        assert get(standby, "/healthz")[0] == 200
        standby_metrics, leader_metrics = get(standby, "/metrics")[1], get(leader, "/metrics")[1]
        assert "tokensmith_is_leader 0.0" in standby_metrics
        # a standby's view of the clients would go stale: no per-client gauges there
        assert 'tokensmith_token_validity_seconds{client="c000"}' not in standby_metrics
        assert 'tokensmith_token_validity_seconds{client="c000"}' in leader_metrics
        assert "tokensmith_is_leader 1.0" in leader_metrics
        assert "tokensmith_leader_transitions_total 1.0" in leader_metrics
        assert "tokensmith_lease_renew_failures_total 0.0" in leader_metrics
        assert re.search(r'tokensmith_state_store_duration_seconds_count\{op="save"\} [1-9]', leader_metrics)
        assert re.search(r'tokensmith_state_store_duration_seconds_count\{op="lease"\} [1-9]', standby_metrics)

        # a CLI that cannot reach a daemon here rotates locally only with the lease: the leader renews it
        issued = token_server.stats["issued"]
        elsewhere = {"TOKENSMITH_RUNTIME_DIR": str(tmp_path / "no-daemon-here")}
        local = cli(standby, "rotate", "c001", env=elsewhere)
        assert local.returncode != 0
        assert f"the leader {leader.name} (epoch 1) holds the lease" in local.stdout + local.stderr
        assert token_server.stats["issued"] == issued

        cluster.kill(leader)  # no daemon anywhere; the dead leader's lease lapses after its ttl
        cluster.stop_all()
        offline = cli(standby, "status")  # no daemon: the lease as the store holds it
        assert f"leader: {leader.name} (epoch 1)\nthis replica: (no daemon here), not running" in offline.stdout
        local = cli(standby, "rotate", "c001")
        assert local.returncode == 0, local.stdout + local.stderr
        assert token_server.stats["issued"] == issued + 1
        assert cluster.lease()["holder"] is None and cluster.lease()["epoch"] == 2  # taken, then released
    finally:
        cluster.stop_all()


class RaftStore:
    """The 3-node Raft cluster seen as one store (what VaultKV needs): reads and writes go to the active node."""

    def __init__(self, raft):
        self.raft = raft
        self.root_token = raft.root_token

    @property
    def address(self) -> str:
        return self.raft.active().address

    def client(self, token: str | None = None):
        import hvac

        return hvac.Client(url=self.address, token=token or self.root_token, timeout=5)


def test_sigkill_the_leader_with_each_replica_on_its_own_raft_node(tmp_path, raft_cluster, token_server, report):
    import uuid

    from fixtures_stores import VaultKV

    raft_cluster.ensure_up()
    kv = VaultKV(RaftStore(raft_cluster), prefix=f"tokensmith-ha/{uuid.uuid4().hex[:10]}")
    cluster = Cluster(tmp_path, kv, token_server, clients=10, replicas=3, lifetime=LIFETIME, lease_ttl=LEASE_TTL,
                      renew_every=RENEW_EVERY, addresses=[node.address for node in raft_cluster.nodes])
    cluster.start_all()
    try:
        cluster.wait_all_sinks(30)
        cluster.wait_started()
        with Consumer(cluster) as consumer:
            takeovers, kills = kill_rounds(cluster, 2)
        assert not consumer.expired
        assert consumer.longest_revoked(excluding=kills, grace=1.0) < REVOKED_BOUND
        assert token_server.stats["refresh_reuse"] <= 8 * len(kills)
        figures(report, "SIGKILL the leader, replicas on different nodes of a 3-node OpenBao Raft cluster",
                "a standby took over every time; no sink held an expired token", takeover_seconds=takeovers,
                refresh_token_reuse=token_server.stats["refresh_reuse"], expired_samples=len(consumer.expired))
    finally:
        cluster.stop_all()


@pytest.fixture
def moto_process(tmp_path):
    """moto's server in a process of its own: three replicas and a consumer would starve one
    that shares the test process's interpreter."""
    import subprocess
    import sys
    import urllib.request

    from fixtures_stores import _death_signal, free_port

    port = free_port()
    log = open(tmp_path / "moto.log", "wb")
    process = subprocess.Popen([sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1",
                                "-p", str(port)], stdout=log, stderr=subprocess.STDOUT, preexec_fn=_death_signal())
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                return True
        except OSError:
            return False

    try:
        wait_for(up, 30, interval=0.1)
        yield url
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def test_sigkill_the_leader_on_dynamodb(tmp_path, moto_process, monkeypatch, token_server, report):
    """State and lease in a DynamoDB table, sinks in Secrets Manager (moto's server over HTTP)."""
    import uuid

    from fixtures_stores import AWS_ENV, fake_aws_env
    from ha_cluster import DynamoStore

    fake_aws_env(monkeypatch, tmp_path)
    tag = uuid.uuid4().hex[:10]
    dynamo = DynamoStore(moto_process, AWS_ENV["AWS_REGION"], f"tokensmith-{tag}", f"tokens-{tag}")
    dynamo.create_table()
    cluster = Cluster(tmp_path, None, token_server, clients=10, replicas=3, lifetime=LIFETIME, lease_ttl=LEASE_TTL,
                      renew_every=RENEW_EVERY, dynamo=dynamo)
    cluster.start_all()
    try:
        cluster.wait_all_sinks(30)
        cluster.wait_started()
        with Consumer(cluster, interval=0.2) as consumer:
            takeovers, kills = kill_rounds(cluster, 2)
        assert not consumer.expired
        assert consumer.longest_revoked(excluding=kills, grace=1.0) < REVOKED_BOUND
        assert token_server.stats["refresh_reuse"] <= 8 * len(kills)
        figures(report, "SIGKILL the leader, state and lease in DynamoDB (moto), sinks in Secrets Manager",
                "a standby took over every time; no sink held an expired token", takeover_seconds=takeovers,
                refresh_token_reuse=token_server.stats["refresh_reuse"], expired_samples=len(consumer.expired),
                samples=consumer.samples)
    finally:
        cluster.stop_all()


def test_store_outage_the_leader_steps_down_and_a_standby_reports_not_ready(tmp_path, vault_kv, slow_token_server):
    """The OpenBao server paused past the lease: the leader cannot renew and stops leading when its
    validity runs out; a standby that cannot reach the store is not ready. After it, one leads again."""
    import re
    import urllib.request

    cluster = Cluster(tmp_path, vault_kv, slow_token_server, clients=3, replicas=2, lifetime=300,
                      lease_ttl=LEASE_TTL, renew_every=RENEW_EVERY)
    cluster.start_all()
    bao = vault_kv.server.process
    try:
        cluster.wait_all_sinks(30)
        cluster.wait_started()
        leader = wait_for(cluster.leader, 10)
        standby = next(replica for replica in cluster.replicas if replica is not leader)

        def get(replica, path):
            port = int(re.search(r"health endpoint listening on 127\.0\.0\.1:(\d+)", replica.log).group(1))
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

        def readyz(replica):
            return get(replica, "/readyz")

        assert readyz(standby)[0] == 200
        bao.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: readyz(standby) == (503, "not ready: standby (the state store is unreachable)\n"),
                     10, interval=0.2)
            wait_for(lambda: "event=lease_lapsed" in leader.log, 10, interval=0.2)
            wait_for(lambda: "event=leader_deposed" in leader.log, 5, interval=0.1)
        finally:
            bao.send_signal(signal.SIGCONT)
        assert re.search(r"tokensmith_lease_renew_failures_total [1-9]", get(leader, "/metrics")[1])
        wait_for(lambda: any("event=leader_elected" in replica.log.split("event=leader_deposed")[-1]
                             for replica in cluster.replicas), 15, interval=0.2)
        wait_for(lambda: readyz(standby)[0] == 200 or cluster.leader() is standby, 10, interval=0.2)
        cluster.wait_all_sinks(15)
        assert slow_token_server.stats["refresh_reuse"] == 0
    finally:
        if bao.poll() is None:
            bao.send_signal(signal.SIGCONT)
        cluster.stop_all()
