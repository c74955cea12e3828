"""Kill the active OpenBao node under running daemons: tokensmith rides through the Raft failover.

Three real `tokensmith run` replicas share one `state: {type: vault}` backend (state, leader lease
and Vault KV sinks) on a real 3-node OpenBao Raft cluster, against the stateful token server
(rotating single-use refresh tokens, reuse detection), with 30 s tokens refreshed at 30 %.

The deployment modelled: tokensmith's `vault.address` is one URL, and a Vault cluster is reached
through a load balancer (or DNS with health checks) in front of every node. Here each replica has
its own small loopback TCP balancer (`Balancer`) that sends connections to "its" node while that
node is healthy (`/v1/sys/health?standbyok=true`, as HAProxy's httpchk does) and to the next
healthy node otherwise. So the three replicas read and write through three different nodes — two of
them standbys, which answer reads from their own copy unless the request's X-Vault-Index asks them
to forward — and the leader's balancer points at the active node, the one that is SIGKILLed.
(The alternative rig, a replica whose only node died staying a standby, is not how Vault is run.)

A consumer samples every sink continuously through the two nodes that survive, asking the token
server whether each token is still active. Figures: `pytest tests/ha/test_raft_node_kill.py -s`."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from types import SimpleNamespace

import pytest
import yaml

from daemon_harness import wait_for
from fixtures_stores import VaultKV
from ha_cluster import Cluster, Consumer
from tokensmith.devserver import OAuthServer
from tokensmith.state.shared import decode

# A lease longer than a Raft election (seconds), as in real deployments (default 15 s): the leader
# rides through the election; on a machine so loaded that it does not, a standby takes over.
LEASE_TTL = 8.0
RENEW_EVERY = 1.0
LIFETIME = 30
AT_FRACTION = 0.3  # refreshed at 9 s +- 3 s: 18 s of validity left, more than election + ttl
CLIENTS = 10
# the token server runs in this (busy) test process: a 1 s deadline is missed under load, and an
# exchange answered too late is a spent refresh token the retry presents again (reuse, not a failover)
TOKEN_TIMEOUT = 3.0
ELECTION_BOUND = 10.0  # a Raft election among the two survivors, on a loaded machine
RECOVERY_BOUND = ELECTION_BOUND + LEASE_TTL + RENEW_EVERY + 4.0
# test_failover.py: an exchange revokes the old token until the new one is written (ms, or seconds
# under load); one whose sink write met the dead store waits for the store to be back
REVOKED_BOUND = 3.0


class Balancer:
    """A TCP load balancer on loopback for one replica: each connection goes to the first healthy
    node in `order`; a node that refuses the connection is skipped at once."""

    def __init__(self, order, health):
        self.order = order
        self.health = health
        self.connections = {node.name: 0 for node in order}
        self.drop_replies = False  # a node's answer is read and dropped: the request took effect, the client never hears
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(downstream,), daemon=True).start()

    def _serve(self, downstream: socket.socket) -> None:
        upstream = None
        for node in sorted(self.order, key=lambda node: not self.health.up(node)):
            try:
                upstream = socket.create_connection(("127.0.0.1", node.port), timeout=1)
            except OSError:
                continue
            upstream.settimeout(None)
            self.connections[node.name] += 1
            break
        if upstream is None:
            downstream.close()
            return
        back = threading.Thread(target=_pump, args=(upstream, downstream, self), daemon=True)
        back.start()
        _pump(downstream, upstream)
        back.join()
        upstream.close()
        downstream.close()


def _pump(source: socket.socket, target: socket.socket, replies: Balancer | None = None) -> None:
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            if replies is not None and replies.drop_replies:
                target.shutdown(socket.SHUT_RDWR)  # the client sees its connection drop with no answer
                break
            target.sendall(data)
    except OSError:
        pass
    finally:
        try:
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class Health:
    """The balancers' health checks: every node's /v1/sys/health?standbyok=true, four times a second."""

    def __init__(self, nodes):
        self.nodes = nodes
        self._up = {node.name: True for node in nodes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def up(self, node) -> bool:
        return self._up[node.name]

    def _run(self) -> None:
        while not self._stop.is_set():
            for node in self.nodes:
                try:
                    with urllib.request.urlopen(f"{node.address}/v1/sys/health?standbyok=true", timeout=1) as answer:
                        self._up[node.name] = answer.status == 200
                except (OSError, urllib.error.URLError):
                    self._up[node.name] = False
            self._stop.wait(0.25)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def kv_read(node, token: str, path: str, timeout: float = 5.0) -> tuple[dict | None, int]:
    """A plain KV v2 read through one node, as any application would do it: (data, version)."""
    request = urllib.request.Request(f"{node.address}/v1/secret/data/{path}", headers={"X-Vault-Token": token})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            body = json.loads(answer.read())["data"]
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None, 0
        raise
    return body["data"], int(body["metadata"]["version"])


class Survivors:
    """Reads that go round-robin through the nodes that are not killed, counting reads per node."""

    def __init__(self, nodes, token: str):
        self.nodes = nodes
        self.token = token
        self.reads = {node.name: 0 for node in nodes}
        self._next = 0
        self._lock = threading.Lock()

    def read(self, path: str) -> tuple[dict | None, int]:
        with self._lock:
            node = self.nodes[self._next % len(self.nodes)]
            self._next += 1
        answer = kv_read(node, self.token, path)
        self.reads[node.name] += 1
        return answer


@pytest.fixture
def token_server():
    with OAuthServer(access_lifetime=LIFETIME) as server:
        yield server


def test_killing_the_active_openbao_node_under_running_replicas(tmp_path, raft_cluster, token_server, report):
    raft = raft_cluster
    raft.ensure_up()
    active = raft.active()
    standbys = [node for node in raft.nodes if node is not active]
    health = Health(raft.nodes)
    # replica r0 through the active node, r1 and r2 through one standby each; each fails over to the others
    orders = [[active, *standbys], [standbys[0], standbys[1], active], [standbys[1], standbys[0], active]]
    balancers = [Balancer(order, health) for order in orders]
    kv = VaultKV(SimpleNamespace(address=active.address, root_token=raft.root_token),
                 prefix=f"tokensmith-raft/{uuid.uuid4().hex[:10]}")
    cluster = Cluster(tmp_path, kv, token_server, clients=CLIENTS, replicas=3, lifetime=LIFETIME,
                      lease_ttl=LEASE_TTL, renew_every=RENEW_EVERY,
                      addresses=[balancer.address for balancer in balancers])
    for replica in cluster.replicas:
        path = replica.root / "config.yaml"
        config = yaml.safe_load(path.read_text())
        for client in config["clients"]:
            client["refresh"]["at_fraction"] = AT_FRACTION
            client["timeout"] = TOKEN_TIMEOUT
        path.write_text(yaml.safe_dump(config))
    survivors = Survivors(standbys, raft.root_token)

    def lease() -> tuple[dict | None, int]:
        try:
            return survivors.read(f"{cluster.prefix}/leader")
        except (OSError, ValueError, KeyError):
            return None, -1

    def lease_after(version: int, holder_needed: bool = False):
        data, now = lease()
        return (data, now) if now > version and (data.get("holder") or not holder_needed) else None

    def sink(name: str) -> dict | None:
        return survivors.read(cluster.sink_path(name))[0]

    def sink_or_none(name: str) -> dict | None:  # for polling: a slow answer on a loaded machine is "not yet"
        try:
            return sink(name)
        except (OSError, ValueError, KeyError):
            return None

    consumer_view = SimpleNamespace(names=cluster.names, server=token_server, sink_reader=lambda: sink)
    first, others = cluster.replicas[0], cluster.replicas[1:]
    try:
        # r0 first, so that the leader is the replica whose node is killed; then the two standbys
        cluster.start(first)
        wait_for(lambda: (lease()[0] or {}).get("holder") == first.name, 30, interval=0.1)
        for replica in others:
            cluster.start(replica)
        wait_for(lambda: all(sink_or_none(name) for name in cluster.names), 30, interval=0.2)
        cluster.wait_started()
        with Consumer(consumer_view, interval=0.1) as consumer:
            # kill while the chains are moving: half of the clients have exchanged their refresh token
            wait_for(lambda: token_server.stats["refresh_exchanges"] >= CLIENTS // 2, LIFETIME, interval=0.05)
            before, before_version = lease()
            assert before["holder"] == first.name
            exchanges_at_kill = token_server.stats["refresh_exchanges"]
            raft.kill(active)
            killed = time.monotonic()
            wait_for(lambda: any(node.health() == 200 for node in standbys), ELECTION_BOUND, interval=0.05)
            election = time.monotonic() - killed
            # the first durable write after the kill: the lease record moves on (a renewal or a takeover)
            after = wait_for(lambda: lease_after(before_version), RECOVERY_BOUND, interval=0.05)
            first_write = time.monotonic() - killed
            # a replica leads, and goes on renewing: the record moves on again, naming it
            led, _ = wait_for(lambda: lease_after(after[1], holder_needed=True), RECOVERY_BOUND, interval=0.05)
            leading = time.monotonic() - killed
            # tokens keep being refreshed: every client gets a new token after that
            recovered = time.monotonic()
            issued = {name: len(token_server.issued_tokens(name)) for name in cluster.names}
            wait_for(lambda: all(len(token_server.issued_tokens(name)) > issued[name] for name in cluster.names),
                     LIFETIME * (AT_FRACTION + 0.1) + 5.0, interval=0.2)
            all_refreshed = time.monotonic() - recovered
            wait_for(lambda: all((lambda doc: doc and token_server.is_active(doc["access_token"]))(sink_or_none(name))
                                 for name in cluster.names), 10, interval=0.2)
        cluster.stop_all()
        health.stop()
        rode_through = (led["holder"], led["epoch"]) == (before["holder"], before["epoch"])
        figures = {"raft_election_seconds": round(election, 2), "first_durable_write_seconds": round(first_write, 2),
                   "leader_renewing_seconds": round(leading, 2),
                   "leader": f"{before['holder']} epoch {before['epoch']} -> {led['holder']} epoch {led['epoch']}",
                   "every_client_refreshed_within_seconds": round(all_refreshed, 2),
                   "exchanges": f"{exchanges_at_kill} before the kill, {token_server.stats['refresh_exchanges']} in all",
                   "refresh_token_reuse": token_server.stats["refresh_reuse"],
                   "expired_samples": len(consumer.expired), "samples": consumer.samples,
                   "longest_revoked_seconds": round(consumer.longest_revoked(), 2),
                   "reads_per_surviving_node": dict(survivors.reads)}
        logs = "".join(replica.log for replica in cluster.replicas)
        late = figures["token_endpoint_timeouts"] = len(
            re.findall(r"grant: timed out, no complete response from \S+/oauth2/token", logs))
        print(f"\nHA figures: kill the active OpenBao node: {figures}")

        assert consumer.samples > 0 and all(survivors.reads.values())
        assert not consumer.expired, f"a sink held an expired token: {consumer.expired[:5]}"
        # an exchange answered as the node died revokes the old token, and the sink write that would
        # replace it waits for the store; any other revoked token would stay until the next refresh
        assert consumer.longest_revoked() < leading + REVOKED_BOUND, consumer.revoked_spans
        assert consumer.longest_revoked(excluding=[killed], grace=leading) < REVOKED_BOUND, consumer.revoked_spans
        # reuse only of a refresh token whose exchange's answer was lost: one the token server answered
        # after the client's deadline, or, when the leader lost its lease during the election, one
        # answered while the store was down (its new chain never became durable); each one detected
        # (the provider said invalid_grant, the replica fell back to its grant) and recovered (below)
        unsaved = set() if rode_through else set(
            re.findall(r"client=(\S+) event=state_write_failed .*its refresh token stays unused", first.log))
        rejected = re.findall(r"client=(\S+) event=refresh_token_rejected", logs)
        assert token_server.stats["refresh_reuse"] <= late + len(unsaved), (late, unsaved, rejected)
        assert len(rejected) == token_server.stats["refresh_reuse"], rejected
        # the leader's balancer moved to a survivor; the others talked to their own standby node all along
        assert balancers[0].connections[active.name] > 0
        assert sum(balancers[0].connections[node.name] for node in standbys) > 0
        for balancer, node in zip(balancers[1:], standbys):
            assert balancer.connections[node.name] > 0

        # the store is consistent: every record reads the same through every node, the killed one
        # too once it is back, and holds the live end of its client's refresh-token chain
        raft.restart(active)

        def consistent(name: str):
            try:
                answers = [kv_read(node, raft.root_token, f"{cluster.prefix}/clients/{name}") for node in raft.nodes]
            except (OSError, ValueError, KeyError):  # the restarted node is still catching up
                return None
            return answers[0] if all(answer == answers[0] for answer in answers) and answers[0][1] else None

        for name in cluster.names:
            record, version = wait_for(lambda name=name: consistent(name), 20, interval=0.1)
            state = decode(record)
            assert state.refresh_token == token_server.issued_refresh_tokens(name)[-1]
            assert state.access_token == token_server.issued_tokens(name)[-1]
            assert token_server.is_active(state.access_token)
            assert wait_for(lambda name=name: sink_or_none(name), 10)["access_token"] == state.access_token
        report.record("SIGKILL the active OpenBao node under 3 replicas (each through its own node)",
                      "the replicas rode through the Raft failover; no sink held an expired token", **figures)
    finally:
        cluster.stop_all()
        health.stop()
        for balancer in balancers:
            balancer.close()


def test_a_leader_spends_no_refresh_token_while_its_lease_renewals_fail(vault_kv):
    """Seen in the test above with a lease shorter than the election: the leader went on exchanging
    refresh tokens after its renewals had begun to fail (its lease still had seconds left, and standbys
    answer reads during an election), could not store the answers, lost the lease, and the new leader
    presented the spent refresh tokens. While the latest renewal failed, no exchange is started."""
    from tokensmith.config import VaultConfig
    from tokensmith.leadership import Leadership
    from tokensmith.leases import LeaseError
    from tokensmith.leases.vault import VaultLease
    from tokensmith.vault import VaultClient

    from fakes import FakeClock
    from fixtures_stores import free_port

    def client(**extra):
        return VaultClient(VaultConfig(**vault_kv.vault_config(timeout=1, **extra)))

    lease = VaultLease(client(), "secret", vault_kv.prefix)
    settings = SimpleNamespace(leader=SimpleNamespace(name="a", renew_every=0.2, lease_ttl=10.0))
    leadership = Leadership(lease, settings, on_elected=lambda epoch: None, on_deposed=lambda: None,
                            clock=FakeClock(now=50.0))  # the lease never runs out: only the store fails
    leadership.start()
    try:
        wait_for(lambda: leadership.active, 10)
        leadership.before_request(1.0)
        store = lease.vault
        lease.vault = client(address=f"http://127.0.0.1:{free_port()}")  # the store stops answering
        wait_for(lambda: not leadership.store_reachable, 10)
        assert leadership.elector.remaining() > 5  # a lease with time to spare, as after a Raft node loss
        with pytest.raises(LeaseError, match="did not answer the last lease renewal"):
            leadership.before_request(1.0)
        leadership.fence()  # an answer already in hand may still be stored when the store is back
        lease.vault = store
        wait_for(lambda: leadership.store_reachable, 10)
        leadership.before_request(1.0)
    finally:
        leadership.stop()


def test_a_renewal_stored_but_not_acknowledged_keeps_the_lease(vault_kv):
    """Seen in the test above under load: a renewal timed out (an election in flight) although the
    store had taken it; the next renewal's check-and-set met that write, and the leader stepped down
    as if another replica had taken the lease, leaving every client without a leader for a whole ttl.
    A renewal that meets the holder's own unacknowledged write goes on from that version."""
    from tokensmith.config import VaultConfig
    from tokensmith.leases import Elector, LeaseError
    from tokensmith.leases.vault import VaultLease
    from tokensmith.vault import VaultClient

    from fakes import FakeClock

    port = int(vault_kv.server.address.rsplit(":", 1)[1])
    balancer = Balancer([SimpleNamespace(name="bao", port=port)], SimpleNamespace(up=lambda node: True))
    try:
        lease = VaultLease(VaultClient(VaultConfig(**vault_kv.vault_config(address=balancer.address, timeout=2))),
                           "secret", vault_kv.prefix)
        clock = FakeClock(now=100.0)
        elector = Elector(lease, "a", ttl=10.0, margin=1.0, clock=clock)
        assert elector.step() and elector.held.version == 1

        def stored_version() -> int:
            return vault_kv.get("leader")["metadata"]["version"]

        balancer.drop_replies = True
        clock.advance(1.0)
        with pytest.raises(LeaseError):
            elector.step()
        assert stored_version() == 2  # the renewal was stored; its answer was lost
        balancer.drop_replies = False
        clock.advance(1.0)
        assert elector.step() is True, "the leader gave up a lease nobody else had written"
        assert elector.held.version == 3 and elector.epoch == 1 and stored_version() == 3
        assert elector.remaining() == pytest.approx(10.0 - 1.0)
        # a record another replica wrote still ends the lease
        rival = Elector(VaultLease(VaultClient(VaultConfig(**vault_kv.vault_config())), "secret", vault_kv.prefix),
                        "b", ttl=10.0, margin=1.0, clock=FakeClock(now=0.0))
        assert rival.step() is False
        rival.clock.advance(10.0)
        assert rival.step() is True and rival.epoch == 2
        clock.advance(1.0)
        assert elector.step() is False and elector.held is None
    finally:
        balancer.close()
