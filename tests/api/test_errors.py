"""Every error is an RFC 9457 problem document, framework-level ones included, and none is a 500."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient

from tests.conftest import TokenFactory

PROBLEM = "application/problem+json"


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.content_type == PROBLEM
    body: dict[str, Any] = response.get_json()
    assert body["status"] == status
    assert body["title"] and body["type"]
    return body


def test_unknown_routes_are_a_problem_404(client: FlaskClient) -> None:
    assert_problem(client.get("/no/such/thing"), 404)
    assert_problem(client.get("/access-requests/not-a-uuid"), 404)


def test_a_wrong_method_is_a_problem_405_with_allow(client: FlaskClient) -> None:
    response = client.delete("/access-requests")
    assert_problem(response, 405)
    assert "POST" in response.headers["Allow"]


@pytest.mark.parametrize(
    "raw",
    [b"{", b"{'single': 'quotes'}", b"[1,]", b"\xff\xfe\x00", b'{"a": NaN'],
)
def test_malformed_json_is_a_problem_400(
    client: FlaskClient, token_for: TokenFactory, registered: Any, raw: bytes
) -> None:
    registered()
    headers = {**token_for("alice", "requester"), "Content-Type": "application/json"}
    assert_problem(client.post("/access-requests", data=raw, headers=headers), 400)


@pytest.mark.parametrize("depth", [33, 1000, 30000])
def test_deeply_nested_json_is_a_problem_400(
    client: FlaskClient, token_for: TokenFactory, depth: int
) -> None:
    headers = {**token_for("alice", "requester"), "Content-Type": "application/json"}
    body = '{"reason": ' + "[" * depth + "]" * depth + "}"
    problem = assert_problem(client.post("/access-requests", data=body, headers=headers), 400)
    assert "nested" in problem["detail"]


def test_a_body_over_the_limit_is_a_problem_413(client: FlaskClient, token_for: TokenFactory) -> None:
    headers = {**token_for("alice", "requester"), "Content-Type": "application/json"}
    body = '{"reason": "' + "x" * (70 * 1024) + '"}'
    assert_problem(client.post("/access-requests", data=body, headers=headers), 413)


def test_a_body_that_is_not_json_is_a_problem_415(client: FlaskClient, token_for: TokenFactory) -> None:
    headers = {**token_for("alice", "requester"), "Content-Type": "text/plain"}
    assert_problem(client.post("/access-requests", data='{"database": "main"}', headers=headers), 415)
    form = {**token_for("bob", "requester")}
    assert_problem(client.post("/access-requests", data={"database": "main"}, headers=form), 415)


def test_field_errors_are_listed_by_field(client: FlaskClient, token_for: TokenFactory) -> None:
    problem = assert_problem(
        client.post("/access-requests", json={"cidr": 5}, headers=token_for("alice", "requester")), 422
    )
    assert set(problem["errors"]) == {"database", "cidr", "reason"}


def test_the_audit_export_refuses_unknown_formats_with_406(
    client: FlaskClient, token_for: TokenFactory
) -> None:
    headers = {**token_for("audra", "auditor"), "Accept": "application/pdf"}
    assert_problem(client.get("/audit-events", headers=headers), 406)


def test_an_unexpected_failure_is_a_problem_500_without_internals(
    client: FlaskClient, token_for: TokenFactory
) -> None:
    app = client.application
    app.config["TESTING"] = False
    app.config["PROPAGATE_EXCEPTIONS"] = False
    runtime = app.extensions["drawbridge"]
    runtime.engine.dispose()
    original = runtime.sessions

    def broken() -> Any:
        raise RuntimeError("secret internals: password=hunter2")

    runtime.sessions = broken
    try:
        response = client.get("/databases", headers={"Authorization": "Bearer dbt_x_y"})
    finally:
        runtime.sessions = original
    problem = assert_problem(response, 500)
    assert "hunter2" not in response.get_data(as_text=True)
    assert problem["detail"] == "an unexpected error occurred; it has been logged"
