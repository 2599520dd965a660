"""The life of a request through the worker, the real client and the simulator."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from app.models import RequestStatus
from tests.worker.conftest import World


def test_an_approved_request_gets_a_rule_that_authorizes_then_vanishes_at_expiry(world: World) -> None:
    request_id = world.approved(duration="1h")

    world.sweep()
    assert world.request(request_id).status.value == "provisioning"
    assert world.at_heroku() == ["8.8.8.8/32"]
    assert world.simulator.count("ip_rule_create") == 1

    waited = world.until_status(request_id, "active", step=5)
    assert 600 <= waited <= 600 + 15 + 5  # Heroku's authorize time plus at most one poll interval
    active = world.request(request_id)
    assert active.activated_at is not None and active.expires_at == active.activated_at + timedelta(hours=1)
    polls = world.simulator.count("ip_rules_list")
    assert polls <= waited / 15 + 1

    world.clock.set(active.expires_at - timedelta(seconds=1))
    world.sweep()
    assert world.at_heroku() == ["8.8.8.8/32"]
    world.clock.advance(1)
    world.sweep()
    assert world.request(request_id).status.value == "expired"
    assert world.at_heroku() == []
    delete = [c for c in world.simulator.calls if c.operation == "ip_rule_delete"]
    assert len(delete) == 1 and (delete[0].at - active.expires_at) <= timedelta(seconds=1)
    assert [r.status.value for r in world.rules()] == ["deleted"]


def test_a_burst_of_expiries_larger_than_a_batch_is_closed_in_one_sweep(world: World) -> None:
    """Expire, release and delete take a batch at a time; a sweep keeps closing while batches come back
    full, so twelve grants ending together (batch of five) are all gone after one sweep, not three."""
    world.simulator.settings.authorize_after = 0
    ids = [world.approved(cidr=f"8.8.{i}.1", duration="1h", who=f"user{i}") for i in range(12)]
    for _ in range(3):
        world.sweep()
    assert {world.request(i).status for i in ids} == {RequestStatus.ACTIVE}
    assert len(world.ours_at_heroku()) == 12
    world.settings = replace(world.settings, batch=5)
    world.clock.advance(timedelta(hours=1, seconds=1))

    report = world.sweep()

    assert {world.request(i).status for i in ids} == {RequestStatus.EXPIRED}
    assert world.ours_at_heroku() == []
    assert report.counts["expired"] == report.counts["deleted"] == 12
