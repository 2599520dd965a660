"""Idempotency-Key: a retried POST returns the first answer and never repeats the effect."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import func, select

from app.clock import ManualClock
from app.models import AccessRequest, AuditEvent, IdempotencyKey
from app.runtime import Runtime
from app.services import idempotency
from tests.conftest import TokenFactory

BODY = {"database": "main", "cidr": "8.8.8.8", "duration": "1h", "reason": "INC-3"}


def count(runtime: Runtime, model: Any) -> int:
    with runtime.sessions() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def test_a_retried_post_returns_the_first_answer_without_a_second_request(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime
) -> None:
    registered()
    alice = {**token_for("alice", "requester"), "Idempotency-Key": "retry-1"}

    first = client.post("/access-requests", json=BODY, headers=alice)
    second = client.post("/access-requests", json=BODY, headers=alice)

    assert first.status_code == second.status_code == 201
    assert second.get_json() == first.get_json()
    assert second.headers["Idempotent-Replayed"] == "true"
    assert count(runtime, AccessRequest) == 1
    with runtime.sessions() as session:
        creations = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "access_request:create")
        ).all()
    assert len(creations) == 1


def test_the_same_key_with_another_body_is_refused(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime
) -> None:
    registered()
    alice = {**token_for("alice", "requester"), "Idempotency-Key": "retry-2"}
    client.post("/access-requests", json=BODY, headers=alice)

    other = client.post("/access-requests", json={**BODY, "cidr": "1.1.1.1"}, headers=alice)
    elsewhere = client.post("/databases", json={"name": "x", "app": "a", "addon": "b"}, headers=alice)

    assert other.status_code == 422 and other.get_json()["code"] == "idempotency_key_reused"
    assert elsewhere.status_code == 422
    assert count(runtime, AccessRequest) == 1


def test_keys_belong_to_one_token(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime
) -> None:
    registered()
    alice = {**token_for("alice", "requester"), "Idempotency-Key": "shared"}
    erin = {**token_for("erin", "requester"), "Idempotency-Key": "shared"}
    assert client.post("/access-requests", json=BODY, headers=alice).get_json()["requester"] == "alice"
    assert client.post("/access-requests", json=BODY, headers=erin).get_json()["requester"] == "erin"
    assert count(runtime, AccessRequest) == 2


def test_errors_are_replayed_too_but_never_server_errors(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime
) -> None:
    registered()
    alice = {**token_for("alice", "requester"), "Idempotency-Key": "bad"}
    first = client.post("/access-requests", json={**BODY, "cidr": "10.0.0.1"}, headers=alice)
    again = client.post("/access-requests", json={**BODY, "cidr": "10.0.0.1"}, headers=alice)
    assert first.status_code == again.status_code == 422
    assert again.headers.get("Idempotent-Replayed") == "true"
    with runtime.sessions() as session:
        stored = session.scalars(select(IdempotencyKey)).one()
    assert stored.status == 422


def test_concurrent_retries_with_one_key_create_one_request(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime
) -> None:
    registered()
    alice = {**token_for("alice", "requester"), "Idempotency-Key": "storm"}
    barrier = threading.Barrier(8)
    answers: list[int] = []

    def retry() -> None:
        own = client.application.test_client()
        barrier.wait()
        answers.append(own.post("/access-requests", json=BODY, headers=alice).status_code)

    threads = [threading.Thread(target=retry) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert count(runtime, AccessRequest) == 1
    assert answers.count(201) >= 1
    assert set(answers) <= {201, 409}  # 409 while the first is still being answered
    assert client.post("/access-requests", json=BODY, headers=alice).status_code == 201  # then replays


def test_keys_are_kept_for_a_day(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime, clock: ManualClock
) -> None:
    registered()
    alice = {**token_for("alice", "requester"), "Idempotency-Key": "old"}
    first = client.post("/access-requests", json=BODY, headers=alice).get_json()
    client.post(f"/access-requests/{first['id']}/cancel", json={}, headers={**alice, "Idempotency-Key": "c1"})
    clock.advance(timedelta(hours=23))
    assert client.post("/access-requests", json=BODY, headers=alice).get_json()["id"] == first["id"]
    clock.advance(timedelta(hours=2))
    fresh = client.post("/access-requests", json=BODY, headers=alice)
    assert fresh.status_code == 201 and fresh.get_json()["id"] != first["id"]
    assert idempotency.purge_expired(runtime.sessions, now=clock.now() + timedelta(hours=25)) == 2


def test_malformed_keys_are_refused(client: FlaskClient, token_for: TokenFactory, registered: Any) -> None:
    registered()
    alice = token_for("alice", "requester")
    for key in ("", "x" * 256, "with space", "ünïcode"):
        answer = client.post("/access-requests", json=BODY, headers={**alice, "Idempotency-Key": key})
        assert answer.status_code == 422, key
