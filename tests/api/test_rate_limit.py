"""Per-token rate limiting: one budget per token across the API, per address without a valid token, answered
with a 429 problem document and Retry-After; health probes and Slack are never limited.

The limiter (flask-limiter over the `limits` library) counts in wall-clock time and takes no clock, so these
tests use a budget of three an hour, spend it at once and never wait for a window to pass.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from app import create_app
from app.config import Config, ConfigError
from app.models import IdempotencyKey
from app.runtime import Runtime
from tests.conftest import TokenFactory

PROBLEM = "application/problem+json"
LIMIT = 3
WINDOW = 3600


@pytest.fixture
def config(database_url: str) -> Config:
    return Config(database_url=database_url, min_duration=60, rate_limit=f"{LIMIT}/hour")


def app_with(runtime: Runtime, **changes: Any) -> Flask:
    """Another app over the same runtime, with some settings changed."""
    app = create_app(runtime=replace(runtime, config=replace(runtime.config, **changes)))
    app.config["TESTING"] = True
    return app


def assert_rate_limited(response: Any) -> dict[str, Any]:
    assert response.status_code == 429, response.get_data(as_text=True)
    assert response.content_type == PROBLEM
    body: dict[str, Any] = response.get_json()
    assert body["status"] == 429 and body["code"] == "rate_limited" and body["title"] == "Too Many Requests"
    assert 1 <= int(response.headers["Retry-After"]) <= WINDOW
    assert response.headers["X-RateLimit-Remaining"] == "0"
    return body


def spend(client: FlaskClient, headers: dict[str, str], times: int = LIMIT) -> None:
    for _ in range(times):
        assert client.get("/databases", headers=headers).status_code == 200


def test_a_token_that_spent_its_budget_gets_429_with_retry_after(
    client: FlaskClient, token_for: TokenFactory
) -> None:
    alice = token_for("alice", "requester")
    for left in range(LIMIT - 1, -1, -1):
        response = client.get("/databases", headers=alice)
        assert response.status_code == 200
        assert response.headers["X-RateLimit-Limit"] == str(LIMIT)
        assert response.headers["X-RateLimit-Remaining"] == str(left)
        assert int(response.headers["X-RateLimit-Reset"]) > 0
        assert "Retry-After" not in response.headers
    body = assert_rate_limited(client.get("/databases", headers=alice))
    assert f"{LIMIT} per 1 hour" in body["detail"]


def test_another_token_of_the_same_user_or_another_user_is_unaffected(
    client: FlaskClient, token_for: TokenFactory
) -> None:
    alice, bob = token_for("alice", "requester"), token_for("bob", "approver")
    spend(client, alice)
    assert_rate_limited(client.get("/databases", headers=alice))
    assert client.get("/databases", headers=bob).status_code == 200
    assert client.get("/databases", headers=token_for("alice", "requester")).status_code == 200


def test_the_budget_is_one_for_the_whole_api_not_one_per_endpoint(
    client: FlaskClient, token_for: TokenFactory, registered: Any
) -> None:
    registered()
    alice = token_for("alice", "requester")
    assert client.get("/databases", headers=alice).status_code == 200
    assert client.get("/access-requests", headers=alice).status_code == 200
    created = client.post(
        "/access-requests", json={"database": "main", "cidr": "8.8.8.8", "reason": "INC-1"}, headers=alice
    )
    assert created.status_code == 201
    assert_rate_limited(client.get(f"/access-requests/{created.get_json()['id']}", headers=alice))
    assert_rate_limited(
        client.post(f"/access-requests/{created.get_json()['id']}/cancel", json={}, headers=alice)
    )


def test_a_limited_post_changes_nothing_and_is_not_kept_as_an_idempotent_answer(
    client: FlaskClient, runtime: Runtime, token_for: TokenFactory, registered: Any
) -> None:
    registered()
    alice = token_for("alice", "requester")
    spend(client, alice)
    response = client.post(
        "/access-requests",
        json={"database": "main", "cidr": "8.8.8.8", "reason": "INC-1"},
        headers={**alice, "Idempotency-Key": "retry-me"},
    )
    assert_rate_limited(response)
    with runtime.sessions() as session:
        assert session.scalar(select(func.count()).select_from(IdempotencyKey)) == 0
    assert client.get("/access-requests", headers=token_for("audra", "auditor")).get_json()["items"] == []


def test_requests_without_a_valid_token_draw_on_the_client_address(
    client: FlaskClient, token_for: TokenFactory
) -> None:
    alice = token_for("alice", "requester")
    token_id = alice["Authorization"].split("_")[1]
    forged = {"Authorization": f"Bearer dbt_{token_id}_not-the-secret"}
    for headers in ({}, {"Authorization": "Bearer nonsense"}, forged):
        assert client.get("/databases", headers=headers).status_code == 401
    assert_rate_limited(client.get("/databases", headers=forged))
    # A made-up token that carries alice's token id spent the sender's address, not alice's budget.
    assert client.get("/databases", headers=alice).status_code == 200
    assert client.get("/databases", environ_base={"REMOTE_ADDR": "198.51.100.9"}).status_code == 401


def test_addresses_are_told_apart_through_trusted_proxies_only(
    runtime: Runtime, token_for: TokenFactory
) -> None:
    client = app_with(runtime, trusted_proxies=1).test_client()
    router = {"REMOTE_ADDR": "10.1.2.3"}

    def anonymous(forwarded_for: str) -> int:
        headers = {"X-Forwarded-For": forwarded_for}
        status: int = client.get("/databases", headers=headers, environ_base=router).status_code
        return status

    assert [anonymous(f"{n}.1.1.1, 8.8.8.8") for n in range(1, LIMIT + 1)] == [401] * LIMIT
    # The left-most entries are the client's own claims: changing them does not buy a new budget.
    assert anonymous("9.9.9.9, 8.8.8.8") == 429
    assert anonymous("8.8.8.8, 8.8.4.4") == 401


def test_health_probes_and_slack_are_never_limited(client: FlaskClient) -> None:
    for _ in range(LIMIT + 2):
        for response in (
            client.get("/healthz"),
            client.get("/readyz"),
            client.post("/slack/commands", data={"text": "help"}),
            client.post("/slack/interactions", data={"payload": "{}"}),
        ):
            assert response.status_code != 429
            assert "X-RateLimit-Limit" not in response.headers


def test_the_limiter_keys_tokens_by_id_never_by_secret(client: FlaskClient, token_for: TokenFactory) -> None:
    alice = token_for("alice", "requester")
    spend(client, alice)
    secret = alice["Authorization"].split("_", 2)[2]
    token_id = alice["Authorization"].split("_")[1]
    limiter = client.application.extensions["drawbridge_limiter"]
    keys = list(limiter.storage.storage)
    assert any(f"token:{token_id}" in key for key in keys), keys
    assert not any(secret in key for key in keys)


def test_429_is_documented_on_every_limited_operation_and_only_there(client: FlaskClient) -> None:
    spec = client.get("/openapi.json").get_json()
    assert "Retry-After" in spec["components"]["responses"]["RATE_LIMITED"]["headers"]
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if method == "parameters":
                continue
            exempt = path in ("/healthz", "/readyz") or path.startswith("/slack/")
            assert ("429" in operation["responses"]) != exempt, (path, method)


@pytest.mark.skipif(importlib.util.find_spec("redis") is not None, reason="the redis client is installed")
def test_a_shared_storage_without_its_client_library_stops_the_app_at_start(runtime: Runtime) -> None:
    with pytest.raises(ConfigError) as refused:
        app_with(runtime, rate_limit_storage="redis://:hunter2@cache.example.com:6379/0")
    assert "DRAWBRIDGE_RATE_LIMIT_STORAGE" in str(refused.value) and "redis" in str(refused.value)
    assert "hunter2" not in str(refused.value)
