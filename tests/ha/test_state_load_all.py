"""A takeover's load_all on real OpenBao and moto's DynamoDB: every client's record exactly as last
written (also where a stale writer lost a check-and-set), read in parallel on vault and in one
consistent paged Scan on dynamodb, and a base for the new leader's next check-and-set writes."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from tokensmith.errors import StateError
from tokensmith.state import ClientState, StaleStateError

CLIENTS = 40
WORKERS = 6


def state(n: int, writer: str = "a") -> ClientState:
    return ClientState(access_token=f"at-{writer}-{n}", obtained_at=1000.0 + n, expires_at=2000.0 + n,
                       refresh_token=f"rt-{writer}-{n}", refresh_token_obtained_at=1000.0 + n,
                       sinks_written={"file": f"fp-{n}"}, last_grant="refresh_token")


def vault_stores(request, tmp_path):
    from tokensmith.config import VaultConfig, VaultStateConfig
    from tokensmith.state.vault import VaultStateStore
    from tokensmith.vault import VaultClient

    vault_kv = request.getfixturevalue("vault_kv")
    config = VaultStateConfig(type="vault", mount="secret", prefix=vault_kv.prefix)
    return lambda name: VaultStateStore(config, VaultClient(VaultConfig(**vault_kv.vault_config())), tmp_path / name)


def dynamo_stores(request, tmp_path):
    import boto3

    from tokensmith.config import DynamoStateConfig
    from tokensmith.state.dynamodb import DynamoStateStore

    endpoint = request.getfixturevalue("moto_server")
    from fixtures_stores import fake_aws_env

    fake_aws_env(request.getfixturevalue("monkeypatch"), tmp_path)
    table = "tokensmith-" + uuid.uuid4().hex[:10]
    make = lambda: boto3.session.Session().client("dynamodb", region_name="us-east-1", endpoint_url=endpoint)  # noqa: E731
    make().create_table(TableName=table, KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
                        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
                        BillingMode="PAY_PER_REQUEST")
    return lambda name: DynamoStateStore(DynamoStateConfig(type="dynamodb", table=table), make(), tmp_path / name)


@pytest.fixture(params=["vault", "dynamodb"])
def new_store(request, tmp_path):
    make = vault_stores(request, tmp_path) if request.param == "vault" else dynamo_stores(request, tmp_path)

    def new(name):
        store = make(name)
        store.workers = WORKERS
        return store

    return new


def written_fleet(new_store):
    """CLIENTS records by replica a; b moves client-07 on; a's stale write to it fails."""
    a, b = new_store("a"), new_store("b")
    expected = {}
    for n in range(CLIENTS):
        a.save(f"client-{n:02d}", state(n))
        expected[f"client-{n:02d}"] = state(n)
    a.save("client-03", state(103))  # version 2
    expected["client-03"] = state(103)
    assert b.load("client-07") == state(7)
    b.save("client-07", state(7, "b"))
    with pytest.raises(StaleStateError):
        a.save("client-07", state(8))
    expected["client-07"] = state(7, "b")
    a.append_audit({"client": "client-01", "result": "rotated"})  # not a client record
    return a, b, expected


def test_load_all_returns_exactly_the_records_written_including_after_a_cas_conflict(new_store):
    a, b, expected = written_fleet(new_store)
    leader = new_store("c")
    assert leader.load_all() == expected
    # the versions read are the base of the next writes: c writes on them, the losers' writes fail
    leader.save("client-07", state(9, "c"))
    leader.save("client-03", state(9, "c"))
    for stale in (a, b):
        with pytest.raises(StaleStateError):
            stale.save("client-07", state(10))
    with pytest.raises(StaleStateError):
        a.save("client-03", state(10))
    assert new_store("d").load_all() == {**expected, "client-07": state(9, "c"), "client-03": state(9, "c")}


def test_vault_load_all_reads_the_records_in_parallel_bounded_by_the_workers(request, tmp_path):
    new_store = vault_stores(request, tmp_path)
    a = new_store("a")
    for n in range(CLIENTS):
        a.save(f"client-{n:02d}", state(n))
    leader = new_store("c")
    leader.workers = WORKERS
    lock, active, most = threading.Lock(), [0], [0]
    read = leader._read

    def watched(client):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.01)  # long enough for the reads to overlap
            return read(client)
        finally:
            with lock:
                active[0] -= 1

    leader._read = watched
    assert len(leader.load_all()) == CLIENTS
    assert 1 < most[0] <= WORKERS


def test_vault_load_all_fails_whole_when_the_store_fails(request, tmp_path):
    """A store outage mid-way: no partial view (the takeover then gives the lease up and retries)."""
    new_store = vault_stores(request, tmp_path)
    a = new_store("a")
    for n in range(CLIENTS):
        a.save(f"client-{n:02d}", state(n))
    leader = new_store("c")
    leader.workers = WORKERS
    read = leader._read

    def failing(client):
        if client == "client-20":
            raise StateError("vault secret: HTTP 503", client=client, retryable=True)
        return read(client)

    leader._read = failing
    with pytest.raises(StateError, match="503"):
        leader.load_all()


def test_dynamodb_load_all_is_one_consistent_scan_not_a_read_per_client(request, tmp_path):
    new_store = dynamo_stores(request, tmp_path)
    a = new_store("a")
    for n in range(CLIENTS):
        a.save(f"client-{n:02d}", state(n))
    leader = new_store("c")
    scans, gets = [], []
    real_scan, real_get = leader.db.scan, leader.db.get_item

    def scan(**kwargs):
        scans.append(kwargs)
        return real_scan(Limit=15, **kwargs)  # moto's real scan in pages of 15: paging is exercised

    def get_item(**kwargs):
        gets.append(kwargs)
        return real_get(**kwargs)

    leader.db.scan, leader.db.get_item = scan, get_item
    assert leader.load_all() == {f"client-{n:02d}": state(n) for n in range(CLIENTS)}
    assert gets == [] and len(scans) >= 3 and all(call["ConsistentRead"] for call in scans)
    leader.save("client-05", state(50, "c"))  # on the version the scan read
    with pytest.raises(StaleStateError):
        a.save("client-05", state(51))
