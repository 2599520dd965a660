"""Roles × endpoints: 401 without a valid token, 403 for a role that may not, and the allowed roles get in."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from flask.testing import FlaskClient

from app.runtime import Runtime
from app.services import tokens
from tests.conftest import TokenFactory

ROLES = ("requester", "approver", "auditor", "admin", "bot")
ANY_HUMAN = {"requester", "approver", "auditor", "admin"}
MISSING = "00000000-0000-0000-0000-000000000001"

# (method, path, body, roles that pass the role check)
ENDPOINTS: list[tuple[str, str, dict[str, Any] | None, set[str]]] = [
    ("GET", "/databases", None, ANY_HUMAN),
    ("POST", "/databases", {"name": "x", "app": "acme-api", "addon": "absent"}, {"admin"}),
    ("GET", "/databases/main", None, ANY_HUMAN),
    ("PATCH", "/databases/main", {"max_prefix": 30}, {"admin"}),
    ("GET", "/access-requests", None, ANY_HUMAN),
    ("POST", "/access-requests", {"database": "main", "cidr": "8.8.8.8", "reason": "r"}, {"requester"}),
    ("GET", f"/access-requests/{MISSING}", None, ANY_HUMAN),
    ("POST", f"/access-requests/{MISSING}/approve", {}, {"approver"}),
    ("POST", f"/access-requests/{MISSING}/deny", {"reason": "no"}, {"approver"}),
    ("POST", f"/access-requests/{MISSING}/cancel", {}, {"requester", "admin"}),
    ("POST", f"/access-requests/{MISSING}/revoke", {}, {"requester", "admin"}),
    ("POST", f"/access-requests/{MISSING}/extend", {"duration": "1h"}, {"requester", "admin"}),
    ("GET", "/audit-events", None, {"auditor", "admin"}),
    ("GET", "/reports/access?database=main&at=2026-01-05T09:00:00Z", None, {"auditor", "admin"}),
]


def call(client: FlaskClient, method: str, path: str, body: Any, headers: dict[str, str]) -> Any:
    return client.open(path, method=method, json=body, headers=headers)


@pytest.mark.parametrize(("method", "path", "body", "allowed"), ENDPOINTS)
def test_without_a_valid_token_every_endpoint_answers_401(
    client: FlaskClient, runtime: Runtime, method: str, path: str, body: Any, allowed: set[str]
) -> None:
    with runtime.sessions() as session:
        row, secret = tokens.create_token(session, user_name="zed", roles=["admin"], clock=runtime.clock)
        tokens.revoke_token(session, token=row.id, clock=runtime.clock)
    token_id = secret.split("_")[1]
    for headers in (
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": f"Bearer dbt_{token_id}_wrongsecret"},
        {"Authorization": f"Bearer dbt_{uuid.uuid4().hex[:12]}_whatever"},
        {"Authorization": f"Bearer {secret}"},  # revoked
    ):
        response = call(client, method, path, body, headers)
        assert response.status_code == 401, (headers, response.get_json())
        assert response.content_type == "application/problem+json"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(("method", "path", "body", "allowed"), ENDPOINTS)
def test_each_role_is_refused_exactly_where_it_does_not_belong(
    client: FlaskClient,
    token_for: TokenFactory,
    registered: Any,
    method: str,
    path: str,
    body: Any,
    allowed: set[str],
    role: str,
) -> None:
    registered()
    response = call(client, method, path, body, token_for(f"user-{role}", role))
    if role in allowed:
        assert response.status_code not in (401, 403), response.get_json()
        assert response.status_code < 500
    else:
        assert response.status_code == 403, response.get_json()
        assert response.content_type == "application/problem+json"
