"""`/healthz` and `/readyz` need no token; readiness follows the database."""

from __future__ import annotations

from flask.testing import FlaskClient
from sqlalchemy.orm import sessionmaker

from app.db import make_engine


def test_liveness_needs_no_token(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readiness_reports_a_reachable_database(client: FlaskClient) -> None:
    assert client.get("/readyz").get_json() == {"status": "ok"}


def test_readiness_fails_with_503_when_the_database_is_unreachable(client: FlaskClient) -> None:
    runtime = client.application.extensions["drawbridge"]
    original = runtime.sessions
    dead = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none", connect_args={"connect_timeout": 1})
    runtime.sessions = sessionmaker(bind=dead)
    try:
        response = client.get("/readyz")
    finally:
        runtime.sessions = original
        dead.dispose()
    assert response.status_code == 503
    assert response.content_type == "application/problem+json"
    assert response.get_json()["code"] == "database_unreachable"
