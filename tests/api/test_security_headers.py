"""Every answer, success or error, carries the security headers; HSTS only when the client came over HTTPS."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from flask.testing import FlaskClient

from app import create_app
from app.runtime import Runtime
from tests.conftest import TokenFactory

EXPECTED = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def assert_hardened(response: Any) -> None:
    for name, value in EXPECTED.items():
        assert response.headers.get(name) == value, (name, response.status_code, dict(response.headers))


def test_every_kind_of_answer_carries_the_security_headers(
    client: FlaskClient, token_for: TokenFactory, registered: Any
) -> None:
    registered()
    alice = token_for("alice", "requester")
    auditor = token_for("audra", "auditor")
    created = client.post(
        "/access-requests", json={"database": "main", "cidr": "8.8.8.8", "reason": "INC-1"}, headers=alice
    )
    assert created.status_code == 201
    answers = {
        "created": created,
        "json": client.get("/access-requests", headers=alice),
        "csv stream": client.get("/audit-events", headers={**auditor, "Accept": "text/csv"}),
        "report": client.get("/reports/access?database=main&at=2026-01-05T09:00:00Z", headers=auditor),
        "openapi": client.get("/openapi.json"),
        "liveness": client.get("/healthz"),
        "readiness": client.get("/readyz"),
        "no token": client.get("/access-requests"),
        "forbidden": client.post("/databases", json={}, headers=alice),
        "unknown route": client.get("/nowhere"),
        "wrong method": client.delete("/databases"),
        "invalid": client.post("/access-requests", json={"database": 5}, headers=alice),
        "malformed json": client.post(
            "/access-requests", data=b"{", content_type="application/json", headers=alice
        ),
        "slack unsigned": client.post("/slack/commands", data={"text": "help"}),
    }
    assert answers["csv stream"].status_code == 200 and answers["json"].status_code == 200
    for name, response in answers.items():
        assert_hardened(response)
        assert "Strict-Transport-Security" not in response.headers, name


def test_an_unexpected_failure_carries_them_too(client: FlaskClient) -> None:
    app = client.application
    app.config["TESTING"] = False
    app.config["PROPAGATE_EXCEPTIONS"] = False

    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("kaboom")

    response = client.get("/boom")
    assert response.status_code == 500
    assert_hardened(response)


def test_hsts_is_sent_over_https(client: FlaskClient) -> None:
    response = client.get("/healthz", base_url="https://drawbridge.example.com")
    assert_hardened(response)
    assert response.headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"


@pytest.mark.parametrize(("trusted", "expected"), [(1, True), (0, False)])
def test_hsts_behind_a_proxy_only_when_the_proxy_is_trusted_to_say_https(
    runtime: Runtime, trusted: int, expected: bool
) -> None:
    app = create_app(runtime=replace(runtime, config=replace(runtime.config, trusted_proxies=trusted)))
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "8.8.8.8"}
    response = app.test_client().get("/healthz", headers=headers)
    assert_hardened(response)
    assert ("Strict-Transport-Security" in response.headers) is expected
