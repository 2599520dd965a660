"""The worker at the edges: rules that never authorize, undecided requests, revocation, Heroku's 60-rule
limit, deletes that keep failing, the re-add error window and the variants of Heroku's answers."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from app.heroku.simulator import Fault
from app.models import AuditEvent, RequestStatus, RuleStatus
from app.services import access
from app.services.errors import InvalidTransition
from tests.worker.conftest import World

FOREIGN_DESCRIPTIONS = ("", "vpn")


def events(world: World, action: str) -> list[AuditEvent]:
    with world.runtime.sessions() as session:
        return list(
            session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id))
        )


def sweep_until(world: World, done: Callable[[], bool], *, step: float, limit: float) -> float:
    """Sweep every `step` manual seconds until `done()`; return the manual seconds it took."""
    waited = 0.0
    while True:
        world.sweep()
        if done():
            return waited
        assert waited < limit, f"not done after {waited} s of manual time"
        world.clock.advance(step)
        waited += step


def add_foreign_rules(world: World, count: int) -> list[str]:
    """`count` rules someone else made (public /32s, description "" or "vpn"); returns their Heroku ids."""
    return [
        world.simulator.add_foreign_rule(
            world.addon, cidr=f"1.2.3.{n + 1}/32", description=FOREIGN_DESCRIPTIONS[n % 2]
        ).id
        for n in range(count)
    ]


def pending(world: World, cidr: str = "8.8.8.8") -> uuid.UUID:
    with world.runtime.sessions() as session:
        request = access.request_access(
            session,
            principal=world.alice,
            database="main",
            cidr=cidr,
            duration="1h",
            reason="INC-2",
            min_duration=60,
            clock=world.clock,
        )
        return request.id


def deletes_of(world: World, heroku_rule_id: str) -> list[datetime]:
    return [
        c.at
        for c in world.simulator.calls
        if c.operation == "ip_rule_delete" and c.path.endswith(f"/ip-rules/{heroku_rule_id}")
    ]


# -- a rule Heroku never authorizes --------------------------------------------------------------------


def test_a_rule_that_never_authorizes_fails_its_request_after_the_timeout_and_is_deleted(
    world: World,
) -> None:
    world.simulator.settings.authorize_after = 10**7
    request_id = world.approved()
    world.sweep()
    assert world.request(request_id).status is RequestStatus.PROVISIONING
    [rule] = world.rules()
    heroku_id = rule.heroku_rule_id
    assert heroku_id is not None and world.at_heroku() == ["8.8.8.8/32"]
    started = world.clock.now()

    sweep_until(
        world, lambda: world.request(request_id).status is not RequestStatus.PROVISIONING, step=5, limit=2400
    )
    failed = world.request(request_id)
    assert failed.status is RequestStatus.FAILED
    assert failed.ended_at is not None
    timeout = timedelta(seconds=world.settings.provisioning_timeout)
    assert (
        timeout < failed.ended_at - started <= timeout + timedelta(seconds=world.settings.poll_interval + 5)
    )
    assert failed.end_reason is not None
    assert "did not authorize" in failed.end_reason and "0:30:00" in failed.end_reason
    assert failed.activated_at is None and failed.expires_at is None

    world.sweep()
    assert world.at_heroku() == []
    assert [r.status for r in world.rules()] == [RuleStatus.DELETED]
    assert len(deletes_of(world, heroku_id)) == 1
    [fail_event] = events(world, "access_request:fail")
    assert fail_event.request_id == request_id and fail_event.details["status"] == "failed"


def test_a_rule_heroku_never_confirms_fails_after_the_timeout_and_leaves_nothing_at_heroku(
    world: World,
) -> None:
    # The first create happens at Heroku but answers 500; every list that could find it fails for a while.
    world.simulator.script("ip_rule_create", "ambiguous_500", *["500"] * 100)
    lists: list[Fault] = ["503"] * (3 * 60)  # each list: the client tries 3 times
    world.simulator.script("ip_rules_list", *lists)
    request_id = world.approved()
    world.sweep()
    assert world.at_heroku() == ["8.8.8.8/32"]
    [creating] = world.rules()
    assert creating.status is RuleStatus.CREATING and creating.heroku_rule_id is None
    started = world.clock.now()

    sweep_until(
        world, lambda: world.request(request_id).status is not RequestStatus.PROVISIONING, step=5, limit=2400
    )
    failed = world.request(request_id)
    assert failed.status is RequestStatus.FAILED
    assert failed.end_reason is not None and "did not create the rule" in failed.end_reason
    assert failed.ended_at is not None and failed.ended_at - started > timedelta(minutes=30)

    assert world.at_heroku() == ["8.8.8.8/32"]  # still hidden from us: the lists keep failing
    sweep_until(world, lambda: world.at_heroku() == [], step=5, limit=3600)
    [rule] = world.rules()
    assert rule.status is RuleStatus.DELETED and rule.heroku_rule_id is not None
    [deleted] = events(world, "ip_rule:delete")
    assert deleted.details["deleted_at_heroku"] == [rule.heroku_rule_id]


# -- a request nobody decides --------------------------------------------------------------------------


def test_a_pending_request_nobody_decides_times_out_after_the_approval_window(world: World) -> None:
    request_id = pending(world)
    created = world.request(request_id).created_at

    world.clock.set(created + timedelta(hours=24) - timedelta(seconds=1))
    world.sweep()
    assert world.request(request_id).status is RequestStatus.PENDING

    world.clock.advance(1)
    world.sweep()
    ended = world.request(request_id)
    assert ended.status is RequestStatus.TIMED_OUT
    assert ended.ended_at == created + timedelta(hours=24)
    assert ended.end_reason is not None and "no decision within 1 day" in ended.end_reason
    [event] = events(world, "access_request:time_out")
    assert event.request_id == request_id and event.actor == "worker"
    assert world.simulator.count("ip_rule_create") == 0 and world.at_heroku() == []

    with world.runtime.sessions() as session, pytest.raises(InvalidTransition):
        access.approve(session, principal=world.bob, request_id=request_id, comment=None, clock=world.clock)


def test_a_request_past_its_approval_window_cannot_be_approved_before_the_worker_times_it_out(
    world: World,
) -> None:
    """The worker may be down when the window closes; the request still reads pending, but approving it
    now would grant what the policy says is too late to grant."""
    request_id = pending(world)
    created = world.request(request_id).created_at
    world.clock.set(created + timedelta(hours=24))

    with world.runtime.sessions() as session, pytest.raises(InvalidTransition, match="approval window"):
        access.approve(session, principal=world.bob, request_id=request_id, comment=None, clock=world.clock)

    assert world.request(request_id).status is RequestStatus.PENDING
    assert world.request(request_id).approvals == []
    world.sweep()
    assert world.request(request_id).status is RequestStatus.TIMED_OUT


# -- revocation ------------------------------------------------------------------------------------------


def revoke(world: World, request_id: uuid.UUID) -> None:
    with world.runtime.sessions() as session:
        access.revoke(session, principal=world.alice, request_id=request_id, reason=None, clock=world.clock)


def test_revoking_an_active_request_deletes_its_rule_on_the_next_sweep(world: World) -> None:
    request_id = world.approved(duration="8h")
    world.until_status(request_id, "active", step=5)
    [rule] = world.rules()
    assert world.at_heroku() == ["8.8.8.8/32"]
    world.clock.advance(60)

    revoke(world, request_id)
    revoked = world.request(request_id)
    assert revoked.status is RequestStatus.REVOKED and revoked.end_reason == "revoked by alice"
    assert world.at_heroku() == ["8.8.8.8/32"]  # the worker, not the API call, talks to Heroku

    world.sweep()
    assert world.at_heroku() == []
    assert deletes_of(world, rule.heroku_rule_id or "") == [world.clock.now()]
    assert [r.status for r in world.rules()] == [RuleStatus.DELETED]
    [deleted] = events(world, "ip_rule:delete")
    assert deleted.details["deleted_at_heroku"] == [rule.heroku_rule_id]


def test_revoking_a_request_whose_rule_is_still_authorizing_deletes_the_rule(world: World) -> None:
    request_id = world.approved()
    world.sweep()
    assert world.request(request_id).status is RequestStatus.PROVISIONING
    assert world.at_heroku() == ["8.8.8.8/32"]

    revoke(world, request_id)
    world.sweep()
    assert world.at_heroku() == []
    assert world.request(request_id).status is RequestStatus.REVOKED
    assert world.request(request_id).activated_at is None
    assert [r.status for r in world.rules()] == [RuleStatus.DELETED]


# -- Heroku's 60-rule limit --------------------------------------------------------------------------------


def test_a_request_fails_when_foreign_rules_alone_fill_the_usable_rule_slots(world: World) -> None:
    foreign = add_foreign_rules(world, 60 - 5)
    world.sweep(with_reconcile=True)
    request_id = world.approved()

    world.sweep()
    failed = world.request(request_id)
    assert failed.status is RequestStatus.FAILED
    assert failed.end_reason is not None and "cannot take another rule" in failed.end_reason
    assert "55 rules not managed by Drawbridge" in failed.end_reason
    assert world.simulator.count("ip_rule_create") == 0
    assert sorted(r.id for r in world.simulator.rules(world.addon)) == sorted(foreign)
    assert world.rules() == []


def test_a_request_waits_for_a_free_rule_slot_and_proceeds_once_one_frees(world: World) -> None:
    add_foreign_rules(world, 60 - 5 - 2)
    world.sweep(with_reconcile=True)
    first = world.approved(cidr="8.8.8.8", duration="1h")
    second = world.approved(cidr="8.8.4.4", duration="8h", who="carol")
    world.until_status(first, "active", step=5)
    world.until_status(second, "active", step=5)
    expires = world.request(first).expires_at
    assert expires is not None

    world.clock.set(expires - timedelta(minutes=10))
    third = world.approved(cidr="9.9.9.9", duration="1h", who="dave")
    world.sweep()
    waiting = world.request(third)
    assert waiting.status is RequestStatus.APPROVED
    assert waiting.last_error is not None and "waiting for a free rule slot" in waiting.last_error
    assert "55 of the 55" in waiting.last_error
    world.clock.advance(5 * 60)
    world.sweep()
    assert world.request(third).status is RequestStatus.APPROVED
    assert "9.9.9.9/32" not in world.at_heroku()
    assert world.simulator.count("ip_rule_create") == 2

    world.clock.set(expires)
    world.sweep()
    assert world.request(first).status is RequestStatus.EXPIRED
    assert "8.8.8.8/32" not in world.at_heroku()
    world.until_status(third, "active", step=5)
    assert world.request(third).last_error is None
    assert world.ours_at_heroku() == ["8.8.4.4/32", "9.9.9.9/32"]
    assert len(world.simulator.rules(world.addon)) == 55


def test_a_request_that_waits_longer_than_the_provisioning_timeout_for_a_slot_fails(world: World) -> None:
    add_foreign_rules(world, 60 - 5 - 1)
    world.sweep(with_reconcile=True)
    holder = world.approved(cidr="8.8.8.8", duration="8h")
    world.until_status(holder, "active", step=5)
    request_id = world.approved(cidr="9.9.9.9", who="carol")
    decided = world.request(request_id).decided_at
    assert decided is not None

    sweep_until(
        world, lambda: world.request(request_id).status is not RequestStatus.APPROVED, step=30, limit=3600
    )
    failed = world.request(request_id)
    assert failed.status is RequestStatus.FAILED
    assert failed.ended_at is not None and failed.ended_at - decided > timedelta(minutes=30)
    assert failed.end_reason is not None and "no free rule slot" in failed.end_reason
    assert "9.9.9.9/32" not in world.at_heroku()
    assert world.request(holder).status is RequestStatus.ACTIVE


# -- deletes that keep failing ----------------------------------------------------------------------------


def test_a_delete_that_keeps_failing_is_retried_with_backoff_until_heroku_answers(world: World) -> None:
    request_id = world.approved(duration="1h")
    world.until_status(request_id, "active", step=5)
    [rule] = world.rules()
    heroku_id = rule.heroku_rule_id
    assert heroku_id is not None
    attempts_that_fail = 25
    faults: list[Fault] = ["500"] * (3 * attempts_that_fail)  # each attempt: the client tries 3 times
    world.simulator.script("ip_rule_delete", *faults)
    expires = world.request(request_id).expires_at
    assert expires is not None
    world.clock.set(expires)

    world.sweep()
    assert world.request(request_id).status is RequestStatus.EXPIRED  # access ends on time regardless
    [failing] = world.rules()
    assert failing.status is RuleStatus.DELETING
    assert failing.last_error is not None and "500" in failing.last_error
    assert world.at_heroku() == ["8.8.8.8/32"]

    sweep_until(world, lambda: world.at_heroku() == [], step=2, limit=4 * 3600)
    calls = deletes_of(world, heroku_id)
    assert len(calls) == 3 * attempts_that_fail + 1
    tries = sorted(set(calls))  # one entry per attempt: the client's own retries share the manual time
    assert len(tries) == attempts_that_fail + 1
    gaps = [(b - a).total_seconds() for a, b in zip(tries, tries[1:], strict=False)]
    assert gaps[0] <= 4  # backoff starts small …
    assert max(gaps) <= world.settings.max_backoff + 2  # … and is capped …
    assert min(gaps[8:]) >= 0.8 * world.settings.max_backoff  # … after doubling up to the cap

    [deleted] = world.rules()
    assert deleted.status is RuleStatus.DELETED and deleted.last_error is None
    assert deleted.deleted_at == tries[-1]
    failures = events(world, "ip_rule:delete_failed")
    assert failures, "a failing delete must leave an audit trail"
    assert failures[0].occurred_at == tries[0]  # from its first failure on
    assert all(e.details["heroku_rule_id"] == heroku_id for e in failures)
    assert len(events(world, "ip_rule:delete")) == 1


def test_the_first_failed_delete_of_a_rule_is_audited(world: World) -> None:
    request_id = world.approved(duration="1h")
    world.until_status(request_id, "active", step=5)
    world.simulator.script("ip_rule_delete", "500", "500", "500")
    expires = world.request(request_id).expires_at
    assert expires is not None
    world.clock.set(expires)

    world.sweep()
    [rule] = world.rules()
    assert rule.status is RuleStatus.DELETING and rule.last_error is not None
    failures = events(world, "ip_rule:delete_failed")
    assert len(failures) == 1, "the first failure of a delete must be in the audit log"
    assert failures[0].details["heroku_rule_id"] == rule.heroku_rule_id
    assert "500" in failures[0].details["error"]

    sweep_until(world, lambda: world.at_heroku() == [], step=1, limit=60)
    assert [r.status for r in world.rules()] == [RuleStatus.DELETED]


# -- the re-add error window ----------------------------------------------------------------------------


def test_re_adding_a_cidr_right_after_its_rule_was_deleted_retries_until_heroku_accepts(world: World) -> None:
    world.simulator.settings.readd_window = 120
    first = world.approved(cidr="8.8.8.8", duration="1h")
    world.until_status(first, "active", step=5)
    expires = world.request(first).expires_at
    assert expires is not None
    world.clock.set(expires)
    world.sweep()
    assert world.at_heroku() == []
    deleted_at = world.clock.now()

    world.clock.advance(1)
    second = world.approved(cidr="8.8.8.8", duration="1h")
    world.until_status(second, "active", step=1, limit=1800)
    refused = world.simulator.count("ip_rule_create", status=500)
    assert refused >= 2
    accepted = [c.at for c in world.simulator.calls if c.operation == "ip_rule_create" and c.status == 201]
    assert len(accepted) == 2  # the first request's rule, then exactly one for the second
    assert accepted[-1] >= deleted_at + timedelta(seconds=120)
    assert accepted[-1] <= deleted_at + timedelta(seconds=120 + world.settings.max_backoff + 1)

    assert world.ours_at_heroku() == ["8.8.8.8/32"]
    assert len(world.simulator.rules(world.addon)) == 1
    live = [r for r in world.rules() if r.status is not RuleStatus.DELETED]
    assert len(live) == 1 and live[0].status is RuleStatus.AUTHORIZED and live[0].last_error is None
    assert world.request(second).ip_rule_id == live[0].id


# -- variants of Heroku's answers --------------------------------------------------------------------------


@pytest.mark.parametrize("timestamp_format", ["iso", "heroku"])
@pytest.mark.parametrize("delete_answer", [200, 204])
def test_a_whole_life_works_with_either_timestamp_format_and_delete_answer(
    world: World, timestamp_format: str, delete_answer: int
) -> None:
    world.simulator.settings.timestamp_format = timestamp_format  # type: ignore[assignment]
    world.simulator.settings.delete_answer = delete_answer  # type: ignore[assignment]
    request_id = world.approved(duration="1h")
    world.sweep()
    created = world.clock.now()
    world.until_status(request_id, "active", step=5)

    assert world.runtime.heroku is not None
    [seen] = world.runtime.heroku.list_ip_rules(db=world.addon.id)
    assert seen.authorized
    assert seen.created_at is not None
    assert abs(seen.created_at - created) < timedelta(seconds=1)

    expires = world.request(request_id).expires_at
    assert expires is not None
    world.clock.set(expires)
    world.sweep()
    assert world.request(request_id).status is RequestStatus.EXPIRED
    assert world.at_heroku() == []
    assert world.simulator.count("ip_rule_delete", status=delete_answer) == 1
    [rule] = world.rules()
    assert rule.status is RuleStatus.DELETED and rule.deleted_at == expires
    [deleted] = events(world, "ip_rule:delete")
    assert deleted.details["deleted_at_heroku"] == [rule.heroku_rule_id]
    assert deleted.details["already_gone"] is False
