"""Crashes and ambiguous answers around Heroku calls: one rule per need, adopted, deleted on time."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from app.heroku.client import HerokuClient, IpRule
from app.models import AuditEvent
from tests.conftest import sim_client
from tests.worker.conftest import World


class WorkerDied(BaseException):
    """Stands for the process dying: nothing after the call runs, no handler catches it."""


class DiesAfter(HerokuClient):
    """A client whose process dies right after Heroku answered `operation`, before anything is committed."""

    def __init__(self, operation: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.operation = operation

    def create_ip_rule(self, *, db: str, cidr: str, description: str) -> IpRule:
        rule = super().create_ip_rule(db=db, cidr=cidr, description=description)
        if self.operation == "create":
            raise WorkerDied
        return rule

    def delete_ip_rule(self, *, db: str, rule_id: str) -> bool:
        gone = super().delete_ip_rule(db=db, rule_id=rule_id)
        if self.operation == "delete":
            raise WorkerDied
        return gone


def dying_client(world: World, operation: str) -> DiesAfter:
    base = sim_client(world.simulator)
    return DiesAfter(
        operation,
        token=world.simulator.token,
        api_url="http://api.heroku.test",
        data_api_url="http://data.heroku.test",
        transport=base._http._transport,
        sleep=lambda s: None,
    )


def actions(world: World) -> list[str]:
    with world.runtime.sessions() as session:
        return list(session.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))


@pytest.mark.parametrize("fault", ["ambiguous_500", "ambiguous_timeout"])
def test_a_rule_created_behind_an_error_is_adopted_not_created_twice(world: World, fault: str) -> None:
    request_id = world.approved()
    world.simulator.script("ip_rule_create", fault)  # type: ignore[arg-type]

    world.sweep()
    assert world.at_heroku() == ["8.8.8.8/32"]  # Heroku has it, though the caller saw a failure
    assert world.rules()[0].heroku_rule_id is None

    world.until_status(request_id, "active", step=5)
    assert world.simulator.count("ip_rule_create") == 1
    assert world.at_heroku() == ["8.8.8.8/32"]
    rule = world.rules()[0]
    assert rule.heroku_rule_id == world.simulator.rules(world.addon)[0].id
    assert "ip_rule:adopt" in actions(world)

    world.clock.set(world.request(request_id).expires_at)  # type: ignore[arg-type]
    world.sweep()
    assert world.at_heroku() == []
    assert world.request(request_id).status.value == "expired"


def test_a_worker_that_dies_after_the_create_leaves_one_rule_that_the_next_worker_adopts(
    world: World,
) -> None:
    request_id = world.approved()

    with pytest.raises(WorkerDied):
        world.sweep(heroku=dying_client(world, "create"))
    assert world.at_heroku() == ["8.8.8.8/32"]
    assert world.rules()[0].heroku_rule_id is None  # the result never reached our database

    world.sweep()  # a restarted worker: the lease still protects the row, nothing is created again
    assert world.simulator.count("ip_rule_create") == 1
    world.clock.advance(world.settings.lease + 1)
    world.until_status(request_id, "active", step=5)

    assert world.simulator.count("ip_rule_create") == 1
    assert world.at_heroku() == ["8.8.8.8/32"]
    world.clock.set(world.request(request_id).expires_at)  # type: ignore[arg-type]
    world.sweep()
    assert world.at_heroku() == []
    assert world.request(request_id).status.value == "expired"


def test_a_worker_that_dies_after_the_delete_is_healed_by_the_next_one(world: World) -> None:
    request_id = world.approved()
    world.until_status(request_id, "active", step=5)
    world.clock.set(world.request(request_id).expires_at)  # type: ignore[arg-type]

    with pytest.raises(WorkerDied):
        world.sweep(heroku=dying_client(world, "delete"))
    assert world.at_heroku() == []
    assert world.rules()[0].status.value == "deleting"

    world.clock.advance(world.settings.lease + 1)
    world.sweep()
    rule = world.rules()[0]
    assert rule.status.value == "deleted"
    assert world.simulator.count("ip_rule_delete", status=404) == 1  # already gone is gone


def test_a_rule_released_while_its_create_was_in_flight_is_still_deleted(world: World) -> None:
    request_id = world.approved()
    with pytest.raises(WorkerDied):
        world.sweep(heroku=dying_client(world, "create"))
    with world.runtime.sessions() as session:
        from app.services import access

        access.revoke(session, principal=world.alice, request_id=request_id, reason=None, clock=world.clock)

    world.sweep()
    assert world.rules()[0].status.value == "deleting"  # waits for the lease of the dead worker
    world.clock.advance(world.settings.lease + 1)
    world.sweep()

    assert world.rules()[0].status.value == "deleted"
    assert world.at_heroku() == []


def test_restarting_with_a_new_process_loses_nothing(world: World) -> None:
    from app.runtime import build_runtime

    first = world.approved(cidr="8.8.8.8")
    second = world.approved(cidr="1.1.1.1", who="erin")
    world.sweep()
    world.clock.advance(timedelta(minutes=11))

    fresh = build_runtime(world.runtime.config, clock=world.clock, heroku=sim_client(world.simulator))
    try:
        world.runtime = fresh
        world.until_status(first, "active", step=5)
        world.until_status(second, "active", step=5)
    finally:
        fresh.close()
    assert world.simulator.count("ip_rule_create") == 2


class BreaksOn(HerokuClient):
    """A client with a bug that only one CIDR triggers."""

    def create_ip_rule(self, *, db: str, cidr: str, description: str) -> IpRule:
        if cidr == "1.1.1.1/32":
            raise ValueError("a bug nobody foresaw")
        return super().create_ip_rule(db=db, cidr=cidr, description=description)


def test_one_bad_row_neither_stops_the_sweep_nor_spins(world: World) -> None:
    base = sim_client(world.simulator)
    buggy = BreaksOn(
        token=world.simulator.token,
        api_url="http://api.heroku.test",
        data_api_url="http://data.heroku.test",
        transport=base._http._transport,
        sleep=lambda s: None,
    )
    bad = world.approved(cidr="1.1.1.1")
    good = world.approved(cidr="8.8.8.8", who="erin")

    report = world.sweep(heroku=buggy)

    assert report.counts.get("row_errors") == 1
    assert world.at_heroku() == ["8.8.8.8/32"]  # the good request went on
    broken = next(r for r in world.rules() if r.cidr == "1.1.1.1/32")
    assert broken.last_error == "internal error: ValueError"
    assert broken.next_attempt_at is not None and broken.next_attempt_at > world.clock.now()
    world.sweep(heroku=buggy)
    assert world.sweep(heroku=buggy).counts.get("row_errors") is None  # backing off, not retried at once
    assert world.request(bad).status.value == "provisioning"
    assert world.request(good).status.value == "provisioning"
