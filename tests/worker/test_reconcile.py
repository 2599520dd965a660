"""Reconciliation: what the worker does when Heroku's rules and its own records disagree, and what it never
does to rules it did not create."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import timedelta

from sqlalchemy import select

from app.heroku.simulator import SimRule
from app.models import AuditEvent, Database, RequestStatus, RuleStatus
from app.services import grants
from tests.worker.conftest import World

PAST_INTERVAL = 301  # more than the reconcile interval of 300 s


def events(world: World, action: str) -> list[AuditEvent]:
    with world.runtime.sessions() as session:
        return list(
            session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id))
        )


def delete_calls(world: World, heroku_rule_id: str) -> int:
    return sum(
        1
        for c in world.simulator.calls
        if c.operation == "ip_rule_delete" and c.path.endswith(f"/ip-rules/{heroku_rule_id}")
    )


def reconcile(world: World) -> grants.Report:
    """Move past the reconcile interval and run a sweep that reconciles."""
    world.clock.advance(PAST_INTERVAL)
    report = world.sweep(with_reconcile=True)
    assert report.counts.get("reconciled") == 1, report.counts
    return report


def ours_at_heroku(world: World) -> list[str]:
    """CIDRs of the rules at Heroku whose description Drawbridge would claim as its own."""
    return sorted(
        r.cidr
        for r in world.simulator.rules(world.addon)
        if grants.parse_description(r.description) is not None
    )


def snapshot(rule: SimRule) -> tuple[str, str, str]:
    return rule.id, rule.cidr, rule.description


# -- our rules that our database does not track -----------------------------------------------------------


def test_an_untracked_rule_of_ours_is_deleted_once_its_time_has_passed_and_not_before(world: World) -> None:
    until = world.clock.now() + timedelta(hours=1)
    lost = world.simulator.add_foreign_rule(
        world.addon, cidr="8.8.8.8/32", description=grants.describe(uuid.uuid4(), until)
    )
    report = world.sweep(with_reconcile=True)
    assert report.counts.get("untracked_waiting") == 1
    assert world.at_heroku() == ["8.8.8.8/32"]

    world.clock.set(until - timedelta(seconds=PAST_INTERVAL - 1))
    world.sweep(with_reconcile=True)
    assert world.at_heroku() == ["8.8.8.8/32"]
    assert delete_calls(world, lost.id) == 0

    reconcile(world)
    assert world.at_heroku() == []
    assert delete_calls(world, lost.id) == 1
    [event] = events(world, "ip_rule:reconcile_delete")
    assert event.details["why"] == "untracked" and event.details["heroku_rule_id"] == lost.id
    assert event.details["deleted"] is True and event.database == "main"


def test_an_untracked_rule_of_ours_does_not_stop_a_request_for_another_cidr(world: World) -> None:
    until = world.clock.now() + timedelta(hours=3)
    world.simulator.add_foreign_rule(
        world.addon, cidr="8.8.4.4/32", description=grants.describe(uuid.uuid4(), until)
    )
    request_id = world.approved(cidr="8.8.8.8", duration="1h")
    world.sweep(with_reconcile=True)
    world.until_status(request_id, "active", step=5)
    assert world.at_heroku() == ["8.8.4.4/32", "8.8.8.8/32"]

    world.clock.set(until + timedelta(seconds=1))
    world.sweep(with_reconcile=True)
    assert world.request(request_id).status is RequestStatus.EXPIRED
    assert world.at_heroku() == []


# -- rules we believe deleted ----------------------------------------------------------------------------


def test_a_rule_we_track_as_deleted_that_is_still_at_heroku_is_deleted_again(world: World) -> None:
    request_id = world.approved(duration="1h")
    world.until_status(request_id, "active", step=5)
    [rule] = world.rules()
    sim_rule = world.simulator.rules(world.addon)[0]
    expires = world.request(request_id).expires_at
    assert expires is not None
    world.clock.set(expires)
    world.sweep()
    assert [r.status for r in world.rules()] == [RuleStatus.DELETED]
    assert world.at_heroku() == []

    # Heroku answered the delete but the rule comes back (a lost delete on Heroku's side).
    world.addon.rules[sim_rule.id] = replace(sim_rule)
    assert grants.parse_description(sim_rule.description) is not None
    until = grants.parse_description(sim_rule.description)
    assert until is not None and until[1] > world.clock.now() + timedelta(seconds=PAST_INTERVAL)

    world.sweep(with_reconcile=True)
    assert world.at_heroku() == []
    assert delete_calls(world, sim_rule.id) == 2
    [event] = events(world, "ip_rule:reconcile_delete")
    assert (
        event.details["why"] == "believed_deleted" and event.details["heroku_rule_id"] == rule.heroku_rule_id
    )

    reconcile(world)
    assert delete_calls(world, sim_rule.id) == 2
    assert len(events(world, "ip_rule:reconcile_delete")) == 1


# -- tracked rules that vanished at Heroku ------------------------------------------------------------------


def test_an_authorized_rule_that_vanished_at_heroku_is_created_again_and_requests_keep_working(
    world: World,
) -> None:
    request_id = world.approved(duration="8h")
    world.sweep(with_reconcile=True)
    world.until_status(request_id, "active", step=5)
    active = world.request(request_id)
    [rule] = world.rules()
    assert rule.heroku_rule_id is not None
    del world.addon.rules[rule.heroku_rule_id]
    assert world.at_heroku() == []

    report = reconcile(world)
    assert report.counts.get("recreated") == 1
    assert [e.details["heroku_rule_id"] for e in events(world, "ip_rule:missing")] == [rule.heroku_rule_id]
    world.sweep()
    assert world.ours_at_heroku() == ["8.8.8.8/32"]
    [again] = world.simulator.rules(world.addon)
    assert again.id != rule.heroku_rule_id
    assert grants.parse_description(again.description) == grants.parse_description(rule.description)

    later = world.approved(cidr="8.8.8.8", duration="1h", who="carol")
    world.until_status(later, "active", step=5)
    [recreated] = world.rules()
    assert recreated.id == rule.id and recreated.status is RuleStatus.AUTHORIZED
    assert recreated.heroku_rule_id == again.id
    kept = world.request(request_id)
    assert kept.status is RequestStatus.ACTIVE
    assert (kept.activated_at, kept.expires_at) == (active.activated_at, active.expires_at)
    assert world.request(later).ip_rule_id == rule.id
    assert world.simulator.count("ip_rule_create") == 2

    assert kept.expires_at is not None
    world.clock.set(kept.expires_at)
    world.sweep(with_reconcile=True)
    assert world.request(request_id).status is RequestStatus.EXPIRED
    assert world.request(later).status is RequestStatus.EXPIRED
    assert world.at_heroku() == []
    assert delete_calls(world, again.id) == 1


def test_a_request_kept_through_a_recreated_rule_has_no_error_once_the_rule_works_again(world: World) -> None:
    request_id = world.approved(duration="8h")
    world.until_status(request_id, "active", step=5)
    [rule] = world.rules()
    assert rule.heroku_rule_id is not None
    del world.addon.rules[rule.heroku_rule_id]

    reconcile(world)
    assert world.request(request_id).last_error is not None  # said while the rule is being created again
    world.run_for(world.simulator.settings.authorize_after + 2 * world.settings.poll_interval, step=5)
    assert [r.status for r in world.rules()] == [RuleStatus.AUTHORIZED]
    assert world.request(request_id).status is RequestStatus.ACTIVE
    assert world.request(request_id).last_error is None


def test_an_authorizing_rule_that_vanished_at_heroku_is_created_again_by_the_poll(world: World) -> None:
    request_id = world.approved(duration="1h")
    world.sweep()
    [rule] = world.rules()
    assert rule.status is RuleStatus.AUTHORIZING and rule.heroku_rule_id is not None
    del world.addon.rules[rule.heroku_rule_id]

    world.until_status(request_id, "active", step=5)
    assert world.simulator.count("ip_rule_create") == 2
    assert world.ours_at_heroku() == ["8.8.8.8/32"]
    [again] = world.rules()
    assert again.heroku_rule_id not in (None, rule.heroku_rule_id)


# -- rules we did not create ----------------------------------------------------------------------------


def test_foreign_rules_are_never_deleted_or_changed_even_when_they_share_our_cidr(world: World) -> None:
    world.simulator.settings.duplicate_cidr = "allow"
    foreign = [
        world.simulator.add_foreign_rule(world.addon, cidr="8.8.8.8/32", description=""),
        world.simulator.add_foreign_rule(world.addon, cidr="8.8.8.8/32", description="vpn"),
        world.simulator.add_foreign_rule(world.addon, cidr="1.2.3.4/32", description="vpn"),
        world.simulator.add_foreign_rule(
            world.addon, cidr="1.2.3.5/32", description="drawbridge rule=hand-made until=2020-01-01T00:00:00Z"
        ),
    ]
    before = sorted(snapshot(r) for r in foreign)
    request_id = world.approved(cidr="8.8.8.8", duration="1h")
    world.sweep(with_reconcile=True)
    world.until_status(request_id, "active", step=5)
    assert ours_at_heroku(world) == ["8.8.8.8/32"]
    reconcile(world)
    expires = world.request(request_id).expires_at
    assert expires is not None
    world.clock.set(expires)
    world.sweep()
    assert world.request(request_id).status is RequestStatus.EXPIRED
    for _ in range(3):
        reconcile(world)

    assert ours_at_heroku(world) == []
    after = sorted(snapshot(r) for r in world.simulator.rules(world.addon))
    assert after == before
    touched = [
        c
        for c in world.simulator.calls
        if c.method != "GET" and any(c.path.endswith(f"/ip-rules/{r.id}") for r in foreign)
    ]
    assert touched == []
    assert world.simulator.count("ip_rule_delete") == 1
    with world.runtime.sessions() as session:
        db = session.scalar(select(Database).where(Database.name == "main"))
        assert db is not None and db.foreign_rule_count == 4


def test_a_foreign_rule_for_the_requested_cidr_fails_the_request_and_is_left_alone(world: World) -> None:
    world.simulator.settings.duplicate_cidr = "reject"
    theirs = world.simulator.add_foreign_rule(world.addon, cidr="8.8.8.8/32", description="vpn")
    request_id = world.approved(cidr="8.8.8.8")

    world.sweep(with_reconcile=True)
    failed = world.request(request_id)
    assert failed.status is RequestStatus.FAILED
    assert failed.end_reason is not None and "did not create" in failed.end_reason
    assert theirs.id in failed.end_reason
    reconcile(world)
    assert [snapshot(r) for r in world.simulator.rules(world.addon)] == [snapshot(theirs)]
    assert world.simulator.count("ip_rule_delete") == 0
    assert [r.status for r in world.rules()] == [RuleStatus.DELETED]
