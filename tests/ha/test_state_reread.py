"""The re-read before a refresh (load_if_changed) on a shared backend, with a real lease on real
OpenBao and moto's DynamoDB: it is skipped only when this replica wrote the client's current version
itself in the lease holding still in force, and made whenever the holding changed in between."""

from __future__ import annotations

import pytest

from fakes import FakeClock
from tokensmith.leases import Elector
from tokensmith.state import ClientState, StaleStateError

TTL = 3.0
MARGIN = 0.3


class Replica:
    """One replica's lease (own monotonic clock) and state backend, its record reads counted."""

    def __init__(self, name: str, lease, store):
        self.clock = FakeClock(now=1000.0)
        self.elector = Elector(lease, name, ttl=TTL, margin=MARGIN, clock=self.clock, wall=lambda: 1.8e9)
        self.store = store
        store.tenure = self.elector.tenure  # as leadership.for_daemon wires it
        self.reads = 0
        read = store._read  # every _read is one request to the store (a KV v2 GET, a DynamoDB GetItem)

        def counted(client):
            self.reads += 1
            return read(client)

        store._read = counted

    def step(self) -> bool:
        leading = self.elector.step()
        if leading:
            self.store.epoch = self.elector.epoch  # as the daemon's takeover does
        return leading

    def reads_for(self, fn):
        before = self.reads
        result = fn()
        return result, self.reads - before


def vault_pair(vault_kv, tmp_path):
    from tokensmith.config import VaultConfig, VaultStateConfig
    from tokensmith.leases.vault import VaultLease
    from tokensmith.state.vault import VaultStateStore
    from tokensmith.vault import VaultClient

    def replica(name):
        vault = VaultClient(VaultConfig(**vault_kv.vault_config()))  # one client for lease and state, as a daemon
        config = VaultStateConfig(type="vault", mount="secret", prefix=vault_kv.prefix)
        return Replica(name, VaultLease(vault, "secret", vault_kv.prefix), VaultStateStore(config, vault, tmp_path / name))

    def remove(client):  # what an operator does with the root token
        vault_kv.root.secrets.kv.v2.delete_metadata_and_all_versions(f"{vault_kv.prefix}/clients/{client}",
                                                                     mount_point="secret")

    return replica("a"), replica("b"), remove


def dynamo_pair(aws_env, tmp_path):
    import boto3

    from tokensmith.config import DynamoStateConfig
    from tokensmith.leases.dynamodb import DynamoLease
    from tokensmith.state.dynamodb import DynamoStateStore

    db = boto3.client("dynamodb", region_name=aws_env.region)
    db.create_table(TableName="tokensmith", KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
                    AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
                    BillingMode="PAY_PER_REQUEST")

    def replica(name):
        client = boto3.client("dynamodb", region_name=aws_env.region)
        store = DynamoStateStore(DynamoStateConfig(type="dynamodb", table="tokensmith"), client, tmp_path / name)
        return Replica(name, DynamoLease(client, "tokensmith"), store)

    def remove(client):
        db.delete_item(TableName="tokensmith", Key={"pk": {"S": f"client#{client}"}})

    return replica("a"), replica("b"), remove


@pytest.fixture(params=["vault", "dynamodb"])
def store_pair(request, tmp_path):
    if request.param == "vault":
        return vault_pair(request.getfixturevalue("vault_kv"), tmp_path)
    return dynamo_pair(request.getfixturevalue("aws_env"), tmp_path)


@pytest.fixture
def replicas(store_pair):
    return store_pair[:2]


def state(n: int) -> ClientState:
    return ClientState(access_token=f"at-{n}", obtained_at=1000.0 + n, expires_at=2000.0 + n,
                       refresh_token=f"rt-{n}", refresh_token_obtained_at=1000.0 + n, last_grant="refresh_token")


def test_no_reread_of_a_version_this_leader_wrote_while_its_lease_is_held(replicas):
    a, _ = replicas
    assert a.step()
    assert a.store.load("billing") is None
    a.store.save("billing", state(1))
    for n in (2, 3):
        a.clock.advance(1.0)
        assert a.step()  # renewals keep the holding: still the same tenure
        assert a.reads_for(lambda: a.store.load_if_changed("billing")) == (None, 0)
        a.store.save("billing", state(n))
    assert a.reads_for(lambda: a.store.load_if_changed("billing")) == (None, 0)
    assert a.store.load("billing") == state(3)


def test_a_version_only_read_is_read_again(replicas):
    """Read at takeover, not written: a deposed leader's write in flight could still land on it."""
    a, _ = replicas
    assert a.step()
    a.store.save("billing", state(1))
    a.store.load("billing")
    assert a.reads_for(lambda: a.store.load_if_changed("billing")) == (None, 1)


def test_reread_after_the_lease_was_lost_and_taken_again(replicas):
    a, b = replicas
    assert a.step() and a.elector.epoch == 1
    a.store.save("billing", state(1))
    assert a.reads_for(lambda: a.store.load_if_changed("billing")) == (None, 0)
    # a stops renewing (paused); b sees the lease unchanged for a ttl and takes it
    assert b.step() is False
    b.clock.advance(TTL)
    assert b.step() and b.elector.epoch == 2
    assert b.store.load("billing") == state(1)
    b.store.save("billing", state(2))
    b.elector.release()
    # a's renewal meets b's record: lost; then the released lease is free and a takes it (epoch 3)
    assert a.step() is False
    assert a.step() and a.elector.epoch == 3
    assert a.elector.is_leader  # leading again, but not without interruption: what b wrote must be read
    assert a.reads_for(lambda: a.store.load_if_changed("billing")) == (state(2), 1)
    a.store.save("billing", state(3))  # on b's version
    assert a.reads_for(lambda: a.store.load_if_changed("billing")) == (None, 0)
    assert b.store.load("billing") == state(3)


def test_reread_when_the_lease_ran_out_without_a_renewal(replicas):
    a, _ = replicas
    assert a.step()
    a.store.save("billing", state(1))
    a.clock.advance(TTL - MARGIN)  # validity over: another replica may lead by now
    assert not a.elector.is_leader
    assert a.reads_for(lambda: a.store.load_if_changed("billing")) == (None, 1)


def test_a_conflict_ends_the_skip(replicas):
    """A write this replica did not expect (an operator's, say) fails its next save; from then on it reads."""
    a, b = replicas
    assert a.step()
    a.store.save("billing", state(1))
    assert b.store.load("billing") == state(1)
    b.store.save("billing", state(2))  # b has no fence or lease here: a writer outside the protocol
    with pytest.raises(StaleStateError):
        a.store.save("billing", state(3))
    assert a.reads_for(lambda: a.store.load_if_changed("billing")) == (state(2), 1)
    a.store.save("billing", state(3))
    assert b.store.load("billing") == state(3)


def test_a_record_an_operator_removed_under_a_skipping_leader_is_created_again(store_pair):
    a, b, remove = store_pair
    assert a.step()
    a.store.save("billing", state(1))
    a.store.save("billing", state(2))
    remove("billing")
    assert a.reads_for(lambda: a.store.load_if_changed("billing")) == (None, 0)
    a.store.save("billing", state(3))  # its version is gone: stored again as a new record
    assert a.store.versions["billing"] == 1
    assert b.store.load("billing") == state(3)


def test_a_write_whose_answer_was_lost_is_read_before_the_next_one(replicas):
    """A write can commit while its answer is lost (a timeout): the next refresh must read the
    record first, or its own next write would meet a version it never saw and be refused."""
    from tokensmith.errors import StateError

    a, _ = replicas
    assert a.step()
    a.store.save("billing", state(1))
    write = a.store._write

    def committed_unanswered(client, record, cas):
        write(client, record, cas)
        raise StateError("state store: no answer within 5s", client=client, retryable=True)

    a.store._write = committed_unanswered
    with pytest.raises(StateError, match="no answer"):
        a.store.save("billing", state(2))
    a.store._write = write
    assert a.reads_for(lambda: a.store.load_if_changed("billing")) == (state(2), 1)
    a.store.save("billing", state(3))  # on the version that write made
    assert a.store.load("billing") == state(3)
