"""Defects contract fuzzing (tests/contract) found, each pinned by a focused example."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select

from app.models import AuditEvent
from app.runtime import Runtime
from tests.conftest import TokenFactory

PROBLEM = "application/problem+json"
MISSING = "00000000-0000-0000-0000-000000000001"


def audit_count(runtime: Runtime) -> int:
    with runtime.sessions() as session:
        return session.scalar(select(func.count()).select_from(AuditEvent)) or 0


@pytest.mark.parametrize(
    ("method", "path", "body", "content_type"),
    [
        ("GET", "/reports/access?database=main&at=yesterday&from=x", None, None),
        ("GET", "/audit-events?limit=0&since=never", None, None),
        ("GET", "/access-requests?status=bogus", None, None),
        ("POST", "/access-requests", b'{"database": 7}', "application/json"),
        ("POST", "/databases", b"name=main", "text/plain"),
        ("PATCH", "/databases/main", b"{not json", "application/json"),
        ("POST", f"/access-requests/{MISSING}/deny", b"{}", "application/json"),
        ("POST", f"/access-requests/{MISSING}/extend", b'{"duration": "' + b"9" * 70000 + b'"}', None),
    ],
)
def test_without_a_token_invalid_input_is_refused_with_401_before_it_is_validated(
    client: FlaskClient, method: str, path: str, body: bytes | None, content_type: str | None
) -> None:
    """The arguments used to be parsed first, so a stranger got 400, 413, 415 or 422 (and learnt what the
    operation expects) instead of 401."""
    headers = {"Content-Type": content_type} if content_type else {}
    for auth in ({}, {"Authorization": "Bearer dbt_000000000000_not-a-secret"}):
        response = client.open(path, method=method, data=body, headers={**headers, **auth})
        assert response.status_code == 401, response.get_data(as_text=True)[:200]
        assert response.content_type == PROBLEM
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_operations_documented_as_public_still_answer_without_a_token(client: FlaskClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.options("/access-requests").status_code == 200
    slack = client.post("/slack/commands", data="text=help", content_type="application/x-www-form-urlencoded")
    assert slack.status_code == 401 and "Slack" in slack.get_json()["detail"]
    # RFC 9110: every 401 names how to authenticate; Slack's used to name nothing.
    assert slack.headers["WWW-Authenticate"].startswith("Slack-Signature")


@pytest.mark.parametrize("path", ["/slack/commands", "/slack/interactions"])
def test_an_unsigned_slack_request_is_refused_with_401_before_its_form_is_read(
    client: FlaskClient, path: str
) -> None:
    """A NUL in an unsigned form used to be refused with an undocumented 422 before the signature."""
    response = client.post(
        path,
        data="user_id=U0ALICE&text=list%00&payload=%00",
        content_type="application/x-www-form-urlencoded",
        headers={"X-Slack-Request-Timestamp": "1", "X-Slack-Signature": "v0=" + "0" * 64},
    )
    assert response.status_code == 401, response.get_json()
    assert response.content_type == PROBLEM
    assert response.headers["WWW-Authenticate"].startswith("Slack-Signature")


@pytest.mark.parametrize(
    ("path", "misspelt"),
    [
        ("/audit-events?actr=alice", "actr"),
        ("/access-requests?stauts=pending", "stauts"),
        ("/reports/access?database=main&at=2026-01-05T09:00:00Z&databse=other", "databse"),
        ("/audit-events?=0.0", ""),
    ],
)
def test_an_unknown_query_parameter_is_refused_instead_of_widening_the_answer(
    client: FlaskClient, token_for: TokenFactory, registered: Any, path: str, misspelt: str
) -> None:
    """webargs ignored unknown query parameters, so a misspelt filter returned every event or request."""
    registered()
    response = client.get(path, headers=token_for("audrey", "auditor", "approver"))
    assert response.status_code == 422
    assert response.content_type == PROBLEM
    assert misspelt in response.get_json()["errors"]


@pytest.mark.parametrize("action", ["approve", "cancel", "revoke"])
def test_an_operation_whose_fields_are_all_optional_takes_no_body_as_documented(
    client: FlaskClient, token_for: TokenFactory, registered: Any, action: str
) -> None:
    """openapi.yaml called these bodies required while the server took a missing one as `{}`."""
    registered()
    alice, bob = token_for("alice", "requester"), token_for("bob", "approver")
    body = {"database": "main", "cidr": "8.8.8.8", "reason": "INC-1"}
    request_id = client.post("/access-requests", json=body, headers=alice).get_json()["id"]
    if action == "revoke":
        client.post(f"/access-requests/{request_id}/approve", headers=bob)
    actor = bob if action == "approve" else alice

    response = client.post(f"/access-requests/{request_id}/{action}", headers=actor)

    assert response.status_code == 200, response.get_json()
    spec = client.get("/openapi.json").get_json()
    assert (
        spec["paths"]["/access-requests/{request_id}/" + action]["post"]["requestBody"]["required"] is False
    )


def test_a_policy_change_may_come_without_a_body_and_its_body_is_documented_optional(
    client: FlaskClient, token_for: TokenFactory, registered: Any
) -> None:
    registered()
    response = client.patch("/databases/main", headers=token_for("root", "admin"))
    assert response.status_code == 200
    spec = client.get("/openapi.json").get_json()
    assert spec["paths"]["/databases/{name}"]["patch"]["requestBody"]["required"] is False
    for required in ("/databases", "/access-requests", "/access-requests/{request_id}/deny"):
        assert spec["paths"][required]["post"]["requestBody"]["required"] is True


@pytest.mark.parametrize(
    "change",
    [
        {"rule_headroom": 2.5890419884777833e-42},
        {"rule_headroom": 2.5},
        {"approvals_required": "2"},
        {"max_prefix": 30.0},
    ],
)
def test_a_policy_number_must_be_a_json_integer_not_a_fraction_or_a_string(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime, change: dict[str, Any]
) -> None:
    """Integer fields truncated 2.5 to 2 and read "2" as 2, though the document says `type: integer`."""
    before = registered()
    admin = token_for("root", "admin")
    events = audit_count(runtime)

    response = client.patch("/databases/main", json=change, headers=admin)

    assert response.status_code == 422, response.get_json()
    assert list(response.get_json()["errors"]) == list(change)
    assert client.get("/databases/main", headers=admin).get_json() == before
    assert audit_count(runtime) == events
    created = client.post(
        "/databases", json={"name": "other", "app": "acme-api", "addon": "x", **change}, headers=admin
    )
    assert created.status_code == 422 and list(created.get_json()["errors"]) == list(change)
