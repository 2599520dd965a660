"""The request state machine of DESIGN.md, as the code encodes it."""

from __future__ import annotations

from app.models import ALLOWED_TRANSITIONS, DECIDED_STATUSES, LIVE_STATUSES, RequestStatus

S = RequestStatus


def test_transitions_are_exactly_those_of_the_design() -> None:
    assert ALLOWED_TRANSITIONS[S.PENDING] == {S.APPROVED, S.DENIED, S.CANCELLED, S.TIMED_OUT}
    assert ALLOWED_TRANSITIONS[S.APPROVED] == {S.PROVISIONING, S.CANCELLED, S.REVOKED, S.FAILED}
    assert ALLOWED_TRANSITIONS[S.PROVISIONING] == {S.ACTIVE, S.REVOKED, S.FAILED}
    assert ALLOWED_TRANSITIONS[S.ACTIVE] == {S.EXPIRED, S.REVOKED}


def test_final_states_have_no_way_out_and_live_states_have_one() -> None:
    for status in S:
        if status in LIVE_STATUSES:
            assert ALLOWED_TRANSITIONS[status], status
        else:
            assert ALLOWED_TRANSITIONS[status] == frozenset(), status


def test_every_state_is_reachable_from_pending() -> None:
    seen = {S.PENDING}
    frontier = [S.PENDING]
    while frontier:
        for nxt in ALLOWED_TRANSITIONS[frontier.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen == set(S)


def test_states_past_a_decision_are_the_ones_that_carry_a_decision_time() -> None:
    assert S.PENDING not in DECIDED_STATUSES
    assert S.TIMED_OUT not in DECIDED_STATUSES
    assert S.CANCELLED not in DECIDED_STATUSES  # a pending request can be cancelled undecided
    assert {S.APPROVED, S.DENIED, S.ACTIVE, S.EXPIRED} <= DECIDED_STATUSES
