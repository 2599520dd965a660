"""Approvers racing on one request (threads, real PostgreSQL): one transition, no duplicate approval."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select

from app.models import AccessRequest, Approval, AuditEvent, Database, RequestStatus
from app.runtime import Runtime
from app.services import access, tokens
from app.services.errors import DomainError
from app.services.identity import Principal


def setup(runtime: Runtime, approvals_required: int, approvers: int) -> tuple[uuid.UUID, list[Principal]]:
    now = runtime.clock.now()
    with runtime.sessions() as session:
        alice = tokens.ensure_user(session, name="alice", clock=runtime.clock)
        people = [
            tokens.ensure_user(session, name=f"approver{i}", clock=runtime.clock) for i in range(approvers)
        ]
        db = Database(
            name="main",
            app="a",
            addon="b",
            addon_id=uuid.uuid4(),
            plan="p",
            created_at=now,
            updated_at=now,
            default_duration=3600,
            max_duration=7200,
            approvals_required=approvals_required,
            max_live_per_user=5,
            max_prefix=28,
            approval_window=86400,
            rule_headroom=5,
        )
        session.add(db)
        session.commit()
        requester = Principal(user_id=alice.id, name="alice", roles=frozenset({"requester"}))  # type: ignore[arg-type]
        request = access.request_access(
            session,
            principal=requester,
            database="main",
            cidr="8.8.8.8",
            duration="1h",
            reason="race",
            min_duration=60,
            clock=runtime.clock,
        )
        principals = [
            Principal(user_id=p.id, name=p.name, roles=frozenset({"approver"}))  # type: ignore[arg-type]
            for p in people
        ]
        return request.id, principals


def race(runtime: Runtime, calls: list[Callable[[], Any]]) -> list[Any]:
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except DomainError as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def approve_call(runtime: Runtime, request_id: uuid.UUID, who: Principal) -> Callable[[], Any]:
    def call() -> Any:
        with runtime.sessions() as session:
            return access.approve(
                session, principal=who, request_id=request_id, comment=None, clock=runtime.clock
            )

    return call


def state(runtime: Runtime, request_id: uuid.UUID) -> tuple[RequestStatus, int, list[str]]:
    with runtime.sessions() as session:
        status = session.scalar(select(AccessRequest.status).where(AccessRequest.id == request_id))
        approvals = session.scalar(
            select(func.count()).select_from(Approval).where(Approval.request_id == request_id)
        )
        events = list(
            session.scalars(
                select(AuditEvent.details["status"].as_string()).where(
                    AuditEvent.request_id == request_id, AuditEvent.action == "access_request:approve"
                )
            )
        )
        assert status is not None
        return status, approvals or 0, events


def test_two_approvers_at_the_same_moment_make_exactly_one_transition(runtime: Runtime) -> None:
    for _ in range(5):
        from tests.conftest import empty_tables

        empty_tables(runtime)
        request_id, (bob, carol) = setup(runtime, approvals_required=1, approvers=2)

        results = race(
            runtime, [approve_call(runtime, request_id, bob), approve_call(runtime, request_id, carol)]
        )

        winners = [r for r in results if isinstance(r, AccessRequest)]
        losers = [r for r in results if isinstance(r, DomainError)]
        assert len(winners) == 1 and len(losers) == 1, results
        assert losers[0].code == "invalid_transition"
        assert state(runtime, request_id) == (RequestStatus.APPROVED, 1, ["approved"])


def test_a_quorum_reached_by_concurrent_approvers_transitions_once_with_an_event_each(
    runtime: Runtime,
) -> None:
    request_id, people = setup(runtime, approvals_required=3, approvers=3)

    results = race(runtime, [approve_call(runtime, request_id, p) for p in people])

    assert all(isinstance(r, AccessRequest) for r in results), results
    status, approvals, events = state(runtime, request_id)
    assert (status, approvals) == (RequestStatus.APPROVED, 3)
    assert sorted(events) == ["approved", "pending", "pending"]


def test_the_same_approver_twice_at_once_is_recorded_once(runtime: Runtime) -> None:
    request_id, (bob, _) = setup(runtime, approvals_required=2, approvers=2)

    results = race(runtime, [approve_call(runtime, request_id, bob), approve_call(runtime, request_id, bob)])

    assert sum(isinstance(r, AccessRequest) for r in results) == 1
    assert [r.code for r in results if isinstance(r, DomainError)] == ["already_approved"]
    assert state(runtime, request_id) == (RequestStatus.PENDING, 1, ["pending"])
