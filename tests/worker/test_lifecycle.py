"""The life of a request through the worker, the real client and the simulator."""

from __future__ import annotations

from datetime import timedelta

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
