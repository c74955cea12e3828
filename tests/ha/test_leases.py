"""The leader lease against real stores (OpenBao's KV v2, moto's DynamoDB), with injected monotonic
clocks: each candidate measures the lease on its own clock, as separate hosts would."""

from __future__ import annotations

import threading

import pytest

from fakes import FakeClock
from tokensmith.leases import Elector, FencedError, LeaseLost, LeaseRecord

TTL = 3.0
MARGIN = 0.3


def vault_lease(vault_kv):
    from tokensmith.config import VaultConfig
    from tokensmith.leases.vault import VaultLease
    from tokensmith.vault import VaultClient

    return lambda: VaultLease(VaultClient(VaultConfig(**vault_kv.vault_config())), "secret", vault_kv.prefix)


def dynamo_lease(aws_env):
    import boto3

    from tokensmith.leases.dynamodb import DynamoLease

    client = boto3.client("dynamodb", region_name=aws_env.region)
    client.create_table(TableName="tokensmith", KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
                        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
                        BillingMode="PAY_PER_REQUEST")
    return lambda: DynamoLease(boto3.client("dynamodb", region_name=aws_env.region), "tokensmith")


@pytest.fixture(params=["vault", "dynamodb"])
def make_lease(request):
    if request.param == "vault":
        return vault_lease(request.getfixturevalue("vault_kv"))
    return dynamo_lease(request.getfixturevalue("aws_env"))


def candidate(make_lease, name):
    clock = FakeClock(now=1000.0)
    return Elector(make_lease(), name, ttl=TTL, margin=MARGIN, clock=clock, wall=lambda: 1.8e9), clock


def test_first_candidate_acquires_epoch_one_and_renews(make_lease):
    a, clock = candidate(make_lease, "a")
    assert a.step() is True
    assert a.is_leader and a.epoch == 1
    assert a.remaining() == pytest.approx(TTL - MARGIN)
    version = a.held.version
    clock.advance(1.0)
    assert a.step() is True  # renew
    assert a.held.version > version and a.epoch == 1
    assert a.remaining() == pytest.approx(TTL - MARGIN)  # validity counts from the renew request
    stored = a.lease.read()
    assert (stored.holder, stored.epoch, stored.ttl) == ("a", 1, TTL)


def test_second_candidate_cannot_take_a_live_lease(make_lease):
    a, clock_a = candidate(make_lease, "a")
    b, clock_b = candidate(make_lease, "b")
    assert a.step()
    for _ in range(5):  # b watches for longer than a ttl in all, but a renews every second
        clock_a.advance(1.0)
        clock_b.advance(1.0)
        assert a.step() is True
        assert b.step() is False
    assert not b.is_leader
    with pytest.raises(FencedError, match="not the leader"):
        b.check()
    assert b.leader()["holder"] == "a"


def test_lapsed_lease_is_taken_over_with_next_epoch_and_old_holder_is_deposed(make_lease):
    a, clock_a = candidate(make_lease, "a")
    b, clock_b = candidate(make_lease, "b")
    assert a.step()
    assert b.step() is False  # b first sees a's record now
    clock_b.advance(TTL - 0.1)
    assert b.step() is False  # unchanged, but not yet for a whole ttl on b's clock
    clock_a.advance(TTL)  # a is paused: its lease lapses on its own clock too
    with pytest.raises(FencedError, match="0.0s left"):
        a.check()
    clock_b.advance(0.1)
    assert b.step() is True
    assert b.epoch == 2 and b.is_leader
    # the deposed holder's renew is a check-and-set on a version that is gone
    assert a.step() is False
    assert a.held is None and not a.is_leader
    with pytest.raises(FencedError):
        a.check()
    stored = b.lease.read()
    assert (stored.holder, stored.epoch) == ("b", 2)


def test_takeover_waits_a_ttl_on_the_candidates_own_clock_whatever_the_holder_wrote(make_lease):
    """A record's renewed_at from a host whose wall clock is far behind must not make it look lapsed."""
    lease = make_lease()
    lease.write(LeaseRecord("elsewhere", 7, TTL, 0, renewed_at=1.0), 0)  # wall time of 1970
    b, clock_b = candidate(make_lease, "b")
    assert b.step() is False
    clock_b.advance(TTL / 2)
    assert b.step() is False
    clock_b.advance(TTL / 2)
    assert b.step() is True and b.epoch == 8


def test_write_with_a_stale_version_is_lost(make_lease):
    lease = make_lease()
    first = lease.write(LeaseRecord("a", 1, TTL, 0), 0)
    with pytest.raises(LeaseLost):
        lease.write(LeaseRecord("b", 1, TTL, 0), 0)  # create-only: it exists
    second = lease.write(LeaseRecord("a", 1, TTL, 0), first.version)
    with pytest.raises(LeaseLost):
        lease.write(LeaseRecord("b", 2, TTL, 0), first.version)
    assert lease.read().version == second.version


def test_released_lease_is_taken_at_once(make_lease):
    a, _ = candidate(make_lease, "a")
    b, _ = candidate(make_lease, "b")
    assert a.step()
    assert b.step() is False
    a.release()
    assert not a.is_leader
    assert b.step() is True and b.epoch == 2


def test_racing_candidates_for_a_lapsed_lease_elect_exactly_one(vault_kv):
    """Vault only: moto's DynamoDB checks a condition and then writes with no lock between, so two
    threads can both pass the same condition there; DynamoDB itself serialises writes to an item."""
    make_lease = vault_lease(vault_kv)
    a, _ = candidate(make_lease, "a")
    assert a.step()
    racers = [candidate(make_lease, f"r{i}") for i in range(4)]
    for elector, clock in racers:
        assert elector.step() is False
        clock.advance(TTL)
    barrier = threading.Barrier(len(racers))
    results = []

    def race(elector):
        barrier.wait()
        results.append(elector.step())

    threads = [threading.Thread(target=race, args=(elector,)) for elector, _ in racers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(results) == [False, False, False, True]
    winner = next(elector for elector, _ in racers if elector.is_leader)
    assert winner.epoch == 2 and winner.lease.read().holder == winner.identity


def test_a_restarted_process_with_the_same_identity_takes_its_lease_back_at_once(make_lease):
    a, _ = candidate(make_lease, "pod-0")
    assert a.step()
    again, _ = candidate(make_lease, "pod-0")  # the same pod name after a container restart
    assert again.step() is True and again.epoch == 2
    assert a.step() is False  # the old incarnation, were it alive, is deposed


def test_leader_that_cannot_reach_the_store_stops_leading_when_its_validity_runs_out(vault_kv):
    from tokensmith.config import VaultConfig
    from tokensmith.leases import LeaseError
    from tokensmith.vault import VaultClient
    from fixtures_stores import free_port

    a, clock = candidate(vault_lease(vault_kv), "a")
    assert a.step()
    a.lease.vault = VaultClient(VaultConfig(**vault_kv.vault_config(address=f"http://127.0.0.1:{free_port()}")))
    clock.advance(1.0)
    with pytest.raises(LeaseError):
        a.step()
    assert a.is_leader and a.held is not None  # one failed renew: still within its validity
    a.check(1.0)
    clock.advance(TTL - MARGIN - 1.0)
    with pytest.raises(FencedError):
        a.check()  # writes stop at the validity's end even before the loop notices
    with pytest.raises(LeaseError):
        a.step()
    assert a.held is None and not a.is_leader


def test_leadership_refuses_a_token_request_the_lease_may_not_outlive(vault_kv):
    from types import SimpleNamespace

    from tokensmith.leadership import Leadership
    from tokensmith.leases import LeaseError

    clock = FakeClock(now=50.0)
    events = []
    settings = SimpleNamespace(leader=SimpleNamespace(name="a", renew_every=1.0, lease_ttl=TTL))
    leadership = Leadership(vault_lease(vault_kv)(), settings, on_elected=lambda epoch: events.append(epoch),
                            on_deposed=lambda: events.append("deposed"), clock=clock)
    with pytest.raises(FencedError, match="standby"):
        leadership.before_request(1.0)
    assert leadership.elector.step()
    leadership._elected()
    assert events == [1] and leadership.active
    leadership.before_request(1.0)  # 2.7 s of validity: a 1 s request plus the 0.3 s margin fits
    leadership.fence()
    clock.advance(1.5)
    with pytest.raises(LeaseError, match="waiting for its renewal"):
        leadership.before_request(1.0)  # 1.2 s left: the answer might come after the lease lapsed
    leadership.fence()  # writes are still allowed
    clock.advance(1.5)
    with pytest.raises(FencedError):
        leadership.fence()
    leadership.fenced("test")  # from a keeper's thread: leading ends now, the loop removes the jobs
    assert leadership.elector.held is None and events == [1]
    with pytest.raises(FencedError, match="not the leader"):
        leadership.before_request(1.0)


def test_dynamodb_state_write_of_a_deposed_leader_fails_inside_the_store(aws_env, tmp_path):
    """Fencing without any clock: the state write carries a ConditionCheck on the lease item, so
    once another replica holds the lease a paused leader's write fails even if it thinks it leads."""
    from tokensmith.config import DynamoStateConfig
    from tokensmith.state import ClientState, FencedError as StoreFenced
    from tokensmith.state.dynamodb import DynamoStateStore
    import boto3

    make = dynamo_lease(aws_env)
    a, clock_a = candidate(make, "a")
    b, clock_b = candidate(make, "b")
    assert a.step()
    store_a = DynamoStateStore(DynamoStateConfig(type="dynamodb", table="tokensmith"),
                               boto3.client("dynamodb", region_name=aws_env.region), tmp_path / "a")
    store_a.epoch = a.epoch
    store_a.lease_condition = a.lease.fence_condition("a", a.epoch)
    store_a.save("billing", ClientState(access_token="one", obtained_at=1.0, expires_at=100.0))
    assert b.step() is False
    clock_b.advance(TTL)
    assert b.step() is True and b.epoch == 2
    # a never noticed (its clock was stopped): its own check would let it write, the store does not
    assert a.is_leader
    with pytest.raises(StoreFenced, match="no longer holds the leader lease"):
        store_a.save("billing", ClientState(access_token="two", obtained_at=2.0, expires_at=100.0))
    assert store_a.load("billing").access_token == "one"


def test_the_lease_is_renewed_while_a_slow_takeover_reads_every_client(vault_kv):
    """Reading every client's state on takeover can outlast the lease: it must not stop the renewals."""
    from types import SimpleNamespace

    from daemon_harness import wait_for
    from tokensmith.leadership import Leadership

    lease = vault_lease(vault_kv)()
    reading = threading.Event()
    finish = threading.Event()

    def slow_takeover(epoch):
        reading.set()
        finish.wait(10)

    settings = SimpleNamespace(leader=SimpleNamespace(name="a", renew_every=0.2, lease_ttl=1.0))
    leadership = Leadership(lease, settings, on_elected=slow_takeover, on_deposed=lambda: None)
    leadership.start()
    try:
        assert reading.wait(5)
        first = lease.read().version
        wait_for(lambda: lease.read().version >= first + 5, timeout=5)  # > 1 s of renewals, over a 1 s lease
        assert leadership.elector.is_leader
        finish.set()
        wait_for(lambda: leadership.active, timeout=5)
    finally:
        finish.set()
        leadership.stop()
    assert lease.read().holder is None  # released on stop


def test_a_holder_that_stepped_down_waits_a_ttl_before_taking_its_own_lease_again(make_lease):
    a, clock = candidate(make_lease, "a")
    assert a.step()
    a.step_down()  # a fenced write: this process stops leading, its record still names it
    assert a.step() is False
    clock.advance(TTL)
    assert a.step() is True and a.epoch == 2
