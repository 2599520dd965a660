"""`/access-requests` over HTTP: asking, four-eyes approval, denial, cancellation, revocation and reading."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select

from app.models import AccessRequest, Approval, AuditEvent
from app.runtime import Runtime
from tests.conftest import TokenFactory


def ask(client: FlaskClient, headers: dict[str, str], **overrides: Any) -> Any:
    body = {"database": "main", "cidr": "8.8.8.8", "duration": "2h", "reason": "INC-1 restore a row"}
    body.update(overrides)
    return client.post("/access-requests", json=body, headers=headers)


def counts(runtime: Runtime) -> tuple[int, int, int]:
    with runtime.sessions() as session:
        return (
            session.scalar(select(func.count()).select_from(AccessRequest)) or 0,
            session.scalar(select(func.count()).select_from(Approval)) or 0,
            session.scalar(select(func.count()).select_from(AuditEvent)) or 0,
        )


def actions(runtime: Runtime, request_id: str) -> list[tuple[str, str]]:
    with runtime.sessions() as session:
        rows = session.execute(
            select(AuditEvent.action, AuditEvent.actor)
            .where(AuditEvent.request_id == uuid.UUID(request_id))
            .order_by(AuditEvent.id)
        )
        return [(a, b) for a, b in rows]


@pytest.mark.parametrize("database_url", ["postgresql", "sqlite"], indirect=True)
def test_a_request_is_asked_approved_by_someone_else_and_audited(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime
) -> None:
    registered()
    alice = token_for("alice", "requester")
    bob = token_for("bob", "approver")

    created = ask(client, alice)
    assert created.status_code == 201
    body = created.get_json()
    assert body["status"] == "pending"
    assert body["cidr"] == "8.8.8.8/32"
    assert body["duration"] == "PT2H"
    assert body["requester"] == "alice" and body["filed_by"] is None
    assert body["created_at"].endswith("+00:00")

    approved = client.post(
        f"/access-requests/{body['id']}/approve", json={"comment": "go ahead"}, headers=bob
    )
    assert approved.status_code == 200
    result = approved.get_json()
    assert result["status"] == "approved"
    assert result["approvals"] == [
        {"approver": "bob", "round": 0, "comment": "go ahead", "approved_at": result["decided_at"]}
    ]
    assert actions(runtime, body["id"]) == [
        ("access_request:create", "alice"),
        ("access_request:approve", "bob"),
    ]
    assert client.get(f"/access-requests/{body['id']}", headers=alice).get_json()["status"] == "approved"


def test_a_requester_never_approves_their_own_request(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime
) -> None:
    registered()
    both = token_for("dana", "requester", "approver")
    request_id = ask(client, both).get_json()["id"]
    before = counts(runtime)

    answer = client.post(f"/access-requests/{request_id}/approve", json={}, headers=both)

    assert answer.status_code == 403
    assert answer.get_json()["code"] == "self_approval_forbidden"
    assert answer.content_type == "application/problem+json"
    assert counts(runtime) == before
    assert (
        client.post(f"/access-requests/{request_id}/deny", json={"reason": "no"}, headers=both).status_code
        == 403
    )


def test_n_approvals_means_n_distinct_approvers(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime
) -> None:
    registered(approvals_required=2)
    alice = token_for("alice", "requester")
    bob, carol = token_for("bob", "approver"), token_for("carol", "approver")
    request_id = ask(client, alice).get_json()["id"]

    first = client.post(f"/access-requests/{request_id}/approve", json={}, headers=bob)
    assert first.status_code == 200
    assert first.get_json()["status"] == "pending"
    again = client.post(f"/access-requests/{request_id}/approve", json={}, headers=bob)
    assert again.status_code == 409
    assert again.get_json()["code"] == "already_approved"
    # A second token of the same person is still the same approver.
    bob_again = token_for("bob", "approver")
    assert (
        client.post(f"/access-requests/{request_id}/approve", json={}, headers=bob_again).status_code == 409
    )
    assert client.get(f"/access-requests/{request_id}", headers=alice).get_json()["status"] == "pending"

    second = client.post(f"/access-requests/{request_id}/approve", json={}, headers=carol)
    assert second.status_code == 200
    assert second.get_json()["status"] == "approved"
    assert [a["approver"] for a in second.get_json()["approvals"]] == ["bob", "carol"]
    assert counts(runtime)[1] == 2


def test_a_decided_request_cannot_be_decided_again(
    client: FlaskClient, token_for: TokenFactory, registered: Any
) -> None:
    registered()
    alice = token_for("alice", "requester")
    bob, carol = token_for("bob", "approver"), token_for("carol", "approver")
    request_id = ask(client, alice).get_json()["id"]
    assert client.post(f"/access-requests/{request_id}/approve", json={}, headers=bob).status_code == 200

    late_approval = client.post(f"/access-requests/{request_id}/approve", json={}, headers=carol)
    late_denial = client.post(f"/access-requests/{request_id}/deny", json={"reason": "no"}, headers=carol)

    assert late_approval.status_code == 409
    assert late_denial.status_code == 409
    assert late_denial.get_json()["code"] == "invalid_transition"


def test_a_denied_request_ends_with_the_reason(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime
) -> None:
    registered()
    alice, bob = token_for("alice", "requester"), token_for("bob", "approver")
    request_id = ask(client, alice).get_json()["id"]

    missing_reason = client.post(f"/access-requests/{request_id}/deny", json={}, headers=bob)
    assert missing_reason.status_code == 422
    denied = client.post(
        f"/access-requests/{request_id}/deny", json={"reason": "use the replica"}, headers=bob
    )

    assert denied.status_code == 200
    body = denied.get_json()
    assert body["status"] == "denied"
    assert body["end_reason"] == "use the replica"
    assert body["ended_at"] is not None and body["decided_at"] is not None
    assert actions(runtime, request_id)[-1] == ("access_request:deny", "bob")


def test_the_requester_can_cancel_a_pending_request_but_not_someone_elses(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime
) -> None:
    registered()
    alice, mallory = token_for("alice", "requester"), token_for("mallory", "requester")
    bob = token_for("bob", "approver")
    request_id = ask(client, alice).get_json()["id"]

    assert client.post(f"/access-requests/{request_id}/cancel", json={}, headers=mallory).status_code == 404
    assert client.get(f"/access-requests/{request_id}", headers=mallory).status_code == 404
    assert client.post(f"/access-requests/{request_id}/cancel", json={}, headers=bob).status_code == 403

    cancelled = client.post(
        f"/access-requests/{request_id}/cancel", json={"reason": "not needed"}, headers=alice
    )
    assert cancelled.status_code == 200
    assert cancelled.get_json()["status"] == "cancelled"
    assert cancelled.get_json()["end_reason"] == "not needed"
    assert client.post(f"/access-requests/{request_id}/cancel", json={}, headers=alice).status_code == 409
    assert actions(runtime, request_id)[-1] == ("access_request:cancel", "alice")


def test_granted_access_can_be_revoked_by_the_requester_or_an_admin(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime
) -> None:
    registered()
    alice, bob = token_for("alice", "requester"), token_for("bob", "approver")
    admin = token_for("root2", "admin")
    first = ask(client, alice).get_json()["id"]
    second = ask(client, alice, cidr="8.8.4.4").get_json()["id"]

    assert client.post(f"/access-requests/{first}/revoke", json={}, headers=alice).status_code == 409
    for request_id in (first, second):
        assert client.post(f"/access-requests/{request_id}/approve", json={}, headers=bob).status_code == 200

    by_owner = client.post(f"/access-requests/{first}/revoke", json={}, headers=alice)
    by_admin = client.post(f"/access-requests/{second}/revoke", json={"reason": "offboarding"}, headers=admin)

    assert by_owner.status_code == 200 and by_owner.get_json()["status"] == "revoked"
    assert by_admin.status_code == 200 and by_admin.get_json()["end_reason"] == "offboarding"
    assert actions(runtime, second)[-1] == ("access_request:revoke", "root2")


def test_a_second_live_request_for_the_same_grant_returns_the_existing_one(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime
) -> None:
    registered()
    alice = token_for("alice", "requester")
    first = ask(client, alice).get_json()["id"]

    duplicate = ask(client, alice, cidr="8.8.8.8/32", reason="again")

    assert duplicate.status_code == 409
    assert duplicate.get_json()["existing_id"] == first
    assert counts(runtime)[0] == 1
    client.post(f"/access-requests/{first}/cancel", json={}, headers=alice)
    assert ask(client, alice).status_code == 201


def test_the_policy_limits_live_requests_per_user(
    client: FlaskClient, token_for: TokenFactory, registered: Any
) -> None:
    registered(max_live_per_user=2)
    alice = token_for("alice", "requester")
    assert ask(client, alice, cidr="8.8.8.8").status_code == 201
    assert ask(client, alice, cidr="8.8.4.4").status_code == 201
    third = ask(client, alice, cidr="1.1.1.1")
    assert third.status_code == 409
    assert third.get_json()["code"] == "too_many_live_requests"


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"cidr": "10.0.0.1"}, "cidr", "private"),
        ({"cidr": "192.168.0.0/16"}, "cidr", "private"),
        ({"cidr": "127.0.0.1"}, "cidr", "loopback"),
        ({"cidr": "100.64.1.1"}, "cidr", "carrier-grade"),
        ({"cidr": "203.0.113.7"}, "cidr", "documentation"),
        ({"cidr": "8.8.8.0/24"}, "cidr", "widest accepted prefix is /28"),
        ({"cidr": "2001:4860::8888"}, "cidr", "IPv6"),
        ({"cidr": "not-an-ip"}, "cidr", "not an IPv4"),
        ({"duration": "9h"}, "duration", "at most 8:00:00"),
        ({"duration": "30s"}, "duration", "at least 0:01:00"),
        ({"duration": "forever"}, "duration", "not a duration"),
        ({"duration": "P1M"}, "duration", "months"),
        ({"reason": "   "}, "reason", "required"),
        ({"reason": "bad\u0007bell"}, "reason", "control"),
        ({"database": "nope"}, "database", "no database named"),
    ],
)
def test_bad_input_gets_a_problem_document_and_stores_nothing(
    client: FlaskClient,
    token_for: TokenFactory,
    registered: Any,
    runtime: Runtime,
    overrides: dict[str, str],
    field: str,
    message: str,
) -> None:
    registered()
    alice = token_for("alice", "requester")
    before = counts(runtime)

    answer = ask(client, alice, **overrides)

    assert answer.status_code == 422, answer.get_json()
    assert answer.content_type == "application/problem+json"
    problem = answer.get_json()
    assert problem["status"] == 422
    assert message in " ".join(problem["errors"][field])
    assert counts(runtime) == before


@pytest.mark.parametrize(
    "body",
    [
        {"cidr": "8.8.8.8", "reason": "x"},
        {"database": "main", "reason": "x"},
        {"database": "main", "cidr": "8.8.8.8"},
        {"database": "main", "cidr": "8.8.8.8", "reason": "x", "approved": True},
        {"database": 1, "cidr": "8.8.8.8", "reason": "x"},
        {"database": "main", "cidr": ["8.8.8.8"], "reason": "x"},
        {"database": "main", "cidr": "8.8.8.8", "reason": "x" * 1001},
        ["database", "main"],
        "main",
        None,
    ],
)
def test_malformed_bodies_are_refused_with_422(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime, body: Any
) -> None:
    registered()
    alice = token_for("alice", "requester")
    before = counts(runtime)
    answer = client.post("/access-requests", json=body, headers=alice)
    assert answer.status_code == 422
    assert answer.content_type == "application/problem+json"
    assert counts(runtime) == before


def test_the_policy_can_require_a_ticket_in_the_reason(
    client: FlaskClient, token_for: TokenFactory, registered: Any
) -> None:
    registered(reason_pattern=r"\bINC-\d+\b")
    alice = token_for("alice", "requester")
    refused = ask(client, alice, reason="just looking")
    assert refused.status_code == 422
    assert refused.get_json()["code"] == "policy_violation"
    assert ask(client, alice, reason="INC-77 fix a row").status_code == 201


def test_listing_filters_and_pages_with_a_cursor(
    client: FlaskClient, token_for: TokenFactory, registered: Any, clock: Any
) -> None:
    registered()
    registered(
        "replica",
        on=client.application.extensions["drawbridge"].simulator.add_addon(
            app="acme-api", name="postgresql-replica-1"
        ),
    )
    alice, erin = token_for("alice", "requester"), token_for("erin", "requester")
    bob = token_for("bob", "approver")
    ids = []
    for i, (who, db) in enumerate([(alice, "main"), (erin, "main"), (alice, "replica"), (erin, "replica")]):
        clock.advance(1)
        ids.append(ask(client, who, database=db, cidr=f"8.8.8.{i + 1}").get_json()["id"])
    client.post(f"/access-requests/{ids[0]}/approve", json={}, headers=bob)

    everything = client.get("/access-requests", headers=bob).get_json()
    assert [r["id"] for r in everything["items"]] == list(reversed(ids))
    assert everything["next_cursor"] is None
    assert [
        r["id"] for r in client.get("/access-requests?status=approved", headers=bob).get_json()["items"]
    ] == [ids[0]]
    assert [
        r["id"]
        for r in client.get("/access-requests?database=replica&requester=erin", headers=bob).get_json()[
            "items"
        ]
    ] == [ids[3]]

    own = client.get("/access-requests", headers=alice).get_json()["items"]
    assert {r["requester"] for r in own} == {"alice"}
    assert client.get("/access-requests?requester=erin", headers=alice).get_json()["items"] == []

    page1 = client.get("/access-requests?limit=3", headers=bob).get_json()
    page2 = client.get(f"/access-requests?limit=3&cursor={page1['next_cursor']}", headers=bob).get_json()
    assert [r["id"] for r in page1["items"] + page2["items"]] == list(reversed(ids))
    assert page2["next_cursor"] is None

    bad_cursor = client.get("/access-requests?cursor=garbage", headers=bob)
    assert bad_cursor.status_code == 422
    assert client.get("/access-requests?status=bogus", headers=bob).status_code == 422
    assert client.get("/access-requests?limit=0", headers=bob).status_code == 422
    assert client.get("/access-requests?limit=100000", headers=bob).status_code == 422
    assert client.get("/access-requests/00000000-0000-0000-0000-000000000000", headers=bob).status_code == 404
