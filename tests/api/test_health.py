"""`/healthz` and `/readyz` need no token; readiness follows the database and the worker's heartbeat."""

from __future__ import annotations

from flask.testing import FlaskClient
from sqlalchemy.orm import sessionmaker

from app.clock import ManualClock
from app.db import make_engine
from app.runtime import Runtime
from app.worker import Worker


def test_liveness_needs_no_token(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readiness_reports_a_reachable_database_and_a_sweeping_worker(
    client: FlaskClient, runtime: Runtime
) -> None:
    Worker(runtime).run_once()
    assert client.get("/readyz").get_json() == {"status": "ok"}


def test_readiness_fails_with_503_until_a_worker_has_swept(client: FlaskClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.content_type == "application/problem+json"
    assert response.get_json()["code"] == "worker_not_running"


def test_readiness_fails_once_the_worker_heartbeat_is_older_than_the_threshold(
    client: FlaskClient, runtime: Runtime, clock: ManualClock
) -> None:
    worker = Worker(runtime)
    worker.run_once()
    stale = runtime.config.heartbeat_stale

    clock.advance(stale)
    assert client.get("/readyz").status_code == 200

    clock.advance(1)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.content_type == "application/problem+json"
    body = response.get_json()
    assert body["code"] == "worker_stale"
    assert f"{stale + 1:.0f} s ago" in body["detail"]

    worker.run_once()
    assert client.get("/readyz").status_code == 200


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
