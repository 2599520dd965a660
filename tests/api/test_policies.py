"""Per-database policy: who may approve, N-of-M quorum, auto-approval recorded as such, durations."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from app.models import AuditEvent
from app.runtime import Runtime
from tests.conftest import TokenFactory


def ask(client: FlaskClient, headers: dict[str, str], **overrides: Any) -> Any:
    body = {"database": "main", "cidr": "8.8.8.8", "duration": "1h", "reason": "INC-1"}
    body.update(overrides)
    return client.post("/access-requests", json=body, headers=headers)


def approve(client: FlaskClient, request_id: str, headers: dict[str, str]) -> Any:
    return client.post(f"/access-requests/{request_id}/approve", json={}, headers=headers)


def test_only_listed_approvers_may_approve_when_the_policy_names_them(
    client: FlaskClient, token_for: TokenFactory, registered: Any
) -> None:
    registered(approvers={"users": ["dana"], "roles": ["admin"]})
    alice = token_for("alice", "requester")
    bob = token_for("bob", "approver")
    dana = token_for("dana", "approver")
    boss = token_for("boss", "approver", "admin")
    first = ask(client, alice).get_json()["id"]
    second = ask(client, alice, cidr="8.8.4.4").get_json()["id"]

    refused = approve(client, first, bob)
    assert refused.status_code == 403 and "not among the approvers" in refused.get_json()["detail"]
    assert approve(client, first, dana).get_json()["status"] == "approved"
    assert approve(client, second, boss).get_json()["status"] == "approved"  # through the admin role


def test_a_quorum_of_three_needs_three_different_people(
    client: FlaskClient, token_for: TokenFactory, registered: Any
) -> None:
    registered(approvals_required=3)
    alice = token_for("alice", "requester")
    people = [token_for(name, "approver") for name in ("bob", "carol", "dave")]
    request_id = ask(client, alice).get_json()["id"]

    statuses = [approve(client, request_id, who).get_json()["status"] for who in people]

    assert statuses == ["pending", "pending", "approved"]


def test_auto_approval_applies_to_matching_requests_and_is_audited_as_policy(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime
) -> None:
    registered(auto_approve=[{"users": ["alice"], "max_duration": "30m"}])
    alice, erin = token_for("alice", "requester"), token_for("erin", "requester")

    short = ask(client, alice, duration="20m").get_json()
    too_long = ask(client, alice, cidr="8.8.4.4", duration="2h").get_json()
    someone_else = ask(client, erin, duration="20m").get_json()

    assert short["status"] == "approved" and short["approvals"] == []
    assert too_long["status"] == "pending"
    assert someone_else["status"] == "pending"
    with runtime.sessions() as session:
        event = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "access_request:auto_approve")
        ).one()
    assert event.actor == "policy" and event.source == "policy"
    assert str(event.request_id) == short["id"]
    assert event.details["policy"] == {"users": ["alice"], "max_duration": 1800}


def test_a_staging_database_can_approve_everything_up_to_a_duration(
    client: FlaskClient, token_for: TokenFactory, registered: Any
) -> None:
    registered(auto_approve=[{"max_duration": "8h"}])
    assert ask(client, token_for("anyone", "requester")).get_json()["status"] == "approved"


def test_policies_are_shown_validated_and_can_be_turned_off(
    client: FlaskClient, token_for: TokenFactory, registered: Any
) -> None:
    created = registered(
        approvers={"roles": ["approver"]},
        auto_approve=[{"users": ["alice"]}],
        self_extension="1h",
        warn_before="15m",
    )
    assert created["approvers"] == {"roles": ["approver"]}
    assert created["auto_approve"] == [{"users": ["alice"]}]
    assert (created["self_extension"], created["warn_before"]) == ("PT1H", "PT15M")
    admin = token_for("root2", "admin")
    cleared = client.patch(
        "/databases/main",
        json={"approvers": None, "auto_approve": None, "self_extension": None},
        headers=admin,
    ).get_json()
    assert (cleared["approvers"], cleared["auto_approve"], cleared["self_extension"]) == (None, None, "PT0S")


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        ({"approvers": {}}, "approvers"),
        ({"approvers": {"roles": ["bot"]}}, "approvers"),
        ({"approvers": {"users": ["not a name"]}}, "approvers"),
        ({"approvers": {"groups": ["x"]}}, "approvers"),
        ({"auto_approve": [{}]}, "auto_approve"),
        ({"auto_approve": [{"max_duration": "9h"}]}, "auto_approve"),
        ({"auto_approve": [{"users": []}]}, "auto_approve"),
        ({"self_extension": "9h"}, "self_extension"),
        ({"warn_before": "2d"}, "warn_before"),
    ],
)
def test_incoherent_access_rules_are_refused(
    client: FlaskClient, token_for: TokenFactory, registered: Any, policy: dict[str, Any], field: str
) -> None:
    registered()
    answer = client.patch("/databases/main", json=policy, headers=token_for("root2", "admin"))
    assert answer.status_code == 422, answer.get_json()
    assert field in answer.get_json()["errors"]


def test_policy_changes_to_access_rules_are_audited(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime
) -> None:
    registered()
    client.patch(
        "/databases/main", json={"auto_approve": [{"max_duration": "15m"}]}, headers=token_for("r", "admin")
    )
    with runtime.sessions() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "database:update_policy")).one()
    assert event.details["changes"] == {"auto_approve": {"from": None, "to": [{"max_duration": 900}]}}
