"""Defects the fault campaign (`drawbridge-chaos`) found, each pinned by the smallest world that shows it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from app.heroku.client import HerokuClient, IpRule, Priority, RateBudget
from app.models import AuditEvent, RequestStatus
from app.services import grants
from tests.conftest import sim_client
from tests.worker.conftest import World


class Stalls(HerokuClient):
    """A client whose first call of `operation` outlasts the lease: the clock moves past it, and another
    worker sweeps meanwhile, as a slow Heroku and a second worker process would."""

    def __init__(self, world: World, operation: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.world = world
        self.operation = operation
        self.stalled = False

    def _stall(self) -> None:
        if not self.stalled:
            self.stalled = True
            self.world.clock.advance(self.world.settings.lease + 1)
            self.world.sweep()  # the other worker

    def create_ip_rule(self, *, db: str, cidr: str, description: str) -> IpRule:
        rule = super().create_ip_rule(db=db, cidr=cidr, description=description)
        if self.operation == "create":
            self._stall()
        return rule

    def delete_ip_rule(self, *, db: str, rule_id: str) -> bool:
        gone = super().delete_ip_rule(db=db, rule_id=rule_id)
        if self.operation == "delete":
            self._stall()
        return gone


def stalling(world: World, operation: str) -> Stalls:
    return Stalls(
        world,
        operation,
        token=world.simulator.token,
        api_url="http://api.heroku.test",
        data_api_url="http://data.heroku.test",
        transport=sim_client(world.simulator)._http._transport,
        sleep=lambda s: None,
    )


def test_a_row_whose_lease_ran_out_while_its_batch_was_worked_is_left_to_the_worker_that_took_it(
    world: World,
) -> None:
    world.simulator.settings.duplicate_cidr = "allow"  # Heroku would not stop a second rule for one CIDR
    first = world.approved(cidr="8.8.8.8")
    second = world.approved(cidr="1.1.1.1", who="erin")

    world.sweep(heroku=stalling(world, "create"))  # claims both rules; the first create stalls

    assert world.simulator.count("ip_rule_create") == 2  # one per rule: the second was not created twice
    assert sorted(r.cidr for r in world.simulator.created) == ["1.1.1.1/32", "8.8.8.8/32"]
    world.until_status(first, "active", step=5)
    world.until_status(second, "active", step=5)
    assert world.simulator.count("ip_rule_delete") == 0  # no stray copy had to be removed


def test_a_delete_whose_lease_ran_out_while_its_batch_was_worked_is_sent_once(world: World) -> None:
    first = world.approved(cidr="8.8.8.8")
    second = world.approved(cidr="1.1.1.1", who="erin")
    world.until_status(first, "active", step=5)
    world.until_status(second, "active", step=5)
    world.clock.set(max(world.request(r).expires_at for r in (first, second)))  # type: ignore[type-var]

    world.sweep(heroku=stalling(world, "delete"))

    assert world.at_heroku() == []
    assert {r.status.value for r in world.rules()} == {"deleted"}
    # The stalled delete is repeated by the worker that took over (and finds the rule gone); the row
    # behind it in the stalled worker's batch is left to the other worker, which deleted it already.
    calls = [c for c in world.simulator.calls if c.operation == "ip_rule_delete"]
    assert sorted(c.status for c in calls) == [200, 200, 404]
    assert len({c.path for c in calls}) == 2


class SweepsDuringList(HerokuClient):
    """A client whose next list call returns Heroku's answer only after another worker has swept: the
    answer is already out of date when the caller reads it."""

    def __init__(self, world: World, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.world = world

    def list_ip_rules(self, *, db: str, priority: Priority = Priority.READ) -> list[IpRule]:
        rules = super().list_ip_rules(db=db, priority=priority)
        self.world.sweep()  # the other worker creates the rule that this answer does not show
        return rules


def one_created_one_waiting(world: World) -> None:
    """One rule authorizing at Heroku, and one whose create failed and waits to be tried again."""
    world.approved(cidr="8.8.8.8")
    world.sweep()
    world.approved(cidr="1.1.1.1", who="erin")
    world.simulator.script("ip_rule_create", "503")
    world.sweep()
    assert sorted(r.status.value for r in world.rules()) == ["authorizing", "creating"]
    world.clock.advance(world.settings.poll_interval + 1)


def a_list_that_goes_stale(world: World) -> SweepsDuringList:
    return SweepsDuringList(
        world,
        token=world.simulator.token,
        api_url="http://api.heroku.test",
        data_api_url="http://data.heroku.test",
        transport=sim_client(world.simulator)._http._transport,
        sleep=lambda s: None,
    )


def rule_actions(world: World) -> list[str]:
    with world.runtime.sessions() as session:
        return list(session.scalars(select(AuditEvent.action).where(AuditEvent.action.like("ip_rule:%"))))


@pytest.mark.parametrize("step", ["poll", "reconcile"])
def test_a_rule_created_while_the_list_was_answered_is_not_taken_for_missing(world: World, step: str) -> None:
    one_created_one_waiting(world)
    run = grants.poll_rules if step == "poll" else grants.reconcile

    run(
        world.runtime.sessions,
        heroku=a_list_that_goes_stale(world),
        clock=world.clock,
        settings=world.settings,
        report=grants.Report(),
    )

    assert "ip_rule:missing" not in rule_actions(world)
    assert sorted(r.status.value for r in world.rules()) == ["authorizing", "authorizing"]
    assert world.simulator.count("ip_rule_create") == 3  # two rules, one create failed once
    assert {r.heroku_rule_id for r in world.rules()} == {r.id for r in world.simulator.rules(world.addon)}


class SlowCreates(HerokuClient):
    """A Heroku that takes `seconds` (of the manual clock) to answer each create."""

    def __init__(self, world: World, seconds: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.world = world
        self.seconds = seconds

    def create_ip_rule(self, *, db: str, cidr: str, description: str) -> IpRule:
        rule = super().create_ip_rule(db=db, cidr=cidr, description=description)
        self.world.clock.advance(self.seconds)
        return rule


def test_a_long_queue_of_slow_creates_does_not_hold_an_expiry_back(world: World) -> None:
    early = world.approved(cidr="8.8.8.8", duration="1h")
    world.until_status(early, "active", step=5)
    expires = world.request(early).expires_at
    assert expires is not None
    for n in range(30):
        world.approved(cidr=f"9.9.{n}.1", who=f"user{n}")
    world.clock.set(expires - timedelta(seconds=1))
    slow = SlowCreates(
        world,
        5.0,
        token=world.simulator.token,
        api_url="http://api.heroku.test",
        data_api_url="http://data.heroku.test",
        transport=sim_client(world.simulator)._http._transport,
        sleep=lambda s: None,
    )

    for _ in range(10):
        world.sweep(heroku=slow)
        if "8.8.8.8/32" not in world.at_heroku():
            break

    deleted = next(c for c in world.simulator.calls if c.operation == "ip_rule_delete")
    assert (deleted.at - expires).total_seconds() <= 10 * 5.0  # ten creates at most, not thirty
    assert world.request(early).status is RequestStatus.EXPIRED


def counting_client(world: World) -> HerokuClient:
    """A client whose budget count follows the manual clock, as the worker's follows the real one."""
    return HerokuClient(
        token=world.simulator.token,
        api_url="http://api.heroku.test",
        data_api_url="http://data.heroku.test",
        transport=sim_client(world.simulator)._http._transport,
        budget=RateBudget(clock=world.clock),
        sleep=lambda s: None,
    )


def expired_rule(world: World) -> None:
    request_id = world.approved(cidr="8.8.8.8", duration="1h")
    world.until_status(request_id, "active", step=5)
    world.clock.set(world.request(request_id).expires_at)  # type: ignore[arg-type]


def test_a_delete_the_budget_cannot_pay_for_is_not_claimed_and_goes_out_once_it_can(world: World) -> None:
    expired_rule(world)
    heroku = counting_client(world)
    heroku.budget.observe("0")  # another client of the account spent it all
    calls = len(world.simulator.calls)

    report = world.sweep(heroku=heroku)

    assert report.counts["delete_waiting_for_budget"] == 1
    waiting = world.rules()[0]
    assert waiting.status.value == "deleting" and waiting.attempts == 0 and waiting.next_attempt_at is None
    assert world.simulator.calls[calls:] == []
    world.clock.advance(1)  # 1.25 calls refilled at 75 a minute
    world.sweep(heroku=heroku)
    assert world.at_heroku() == [] and world.rules()[0].status.value == "deleted"


def test_a_delete_refused_with_429_is_retried_as_the_budget_refills_not_after_a_growing_backoff(
    world: World,
) -> None:
    expired_rule(world)
    heroku = counting_client(world)
    sim = world.simulator
    sim.spend(float(sim.settings.bucket_capacity))
    sim.settings.bucket_drain_per_minute = (
        sim.settings.bucket_refill_per_minute
    )  # kept empty by another client

    for _ in range(120):  # two minutes of 429s, a sweep a second
        world.sweep(heroku=heroku)
        world.clock.advance(1)
    assert world.at_heroku() == ["8.8.8.8/32"] and sim.count("ip_rule_delete", status=429) > 60

    sim.settings.bucket_drain_per_minute = 0.0
    drained_until = world.clock.now()
    for _ in range(60):
        world.sweep(heroku=heroku)
        if not world.at_heroku():
            break
        world.clock.advance(1)
    deleted = next(c for c in sim.calls if c.operation == "ip_rule_delete" and c.status == 200)
    assert (deleted.at - drained_until).total_seconds() <= 2
