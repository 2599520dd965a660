"""Extending live access: within the policy's maximum, self-service up to a limit, approvers beyond it."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import select

from app.clock import ManualClock
from app.heroku.simulator import Simulator
from app.models import AuditEvent
from app.runtime import Runtime
from app.services import grants
from tests.conftest import TokenFactory

SETTINGS = grants.Settings(poll_interval=1)


def active_request(
    client: FlaskClient, token_for: TokenFactory, runtime: Runtime, simulator: Simulator, duration: str = "1h"
) -> tuple[str, dict[str, str], dict[str, str]]:
    alice, bob = token_for("alice", "requester"), token_for("bob", "approver")
    body = {"database": "main", "cidr": "8.8.8.8", "duration": duration, "reason": "INC-7"}
    request_id = client.post("/access-requests", json=body, headers=alice).get_json()["id"]
    client.post(f"/access-requests/{request_id}/approve", json={}, headers=bob)
    simulator.settings.authorize_after = 0
    assert runtime.heroku is not None
    for _ in range(2):
        grants.sweep(runtime.sessions, heroku=runtime.heroku, clock=runtime.clock, settings=SETTINGS)
    assert client.get(f"/access-requests/{request_id}", headers=alice).get_json()["status"] == "active"
    return request_id, alice, bob


def expires(body: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(body["expires_at"])


def test_self_extension_within_the_allowance_moves_only_the_end(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime, simulator: Simulator
) -> None:
    registered(self_extension="1h")
    request_id, alice, _ = active_request(client, token_for, runtime, simulator)
    before = client.get(f"/access-requests/{request_id}", headers=alice).get_json()

    extended = client.post(f"/access-requests/{request_id}/extend", json={"duration": "30m"}, headers=alice)

    assert extended.status_code == 200
    body = extended.get_json()
    assert expires(body) - expires(before) == timedelta(minutes=30)
    assert body["duration"] == "PT1H30M" and body["status"] == "active"
    assert body["ip_rule"] == before["ip_rule"]  # the rule stays in place
    assert simulator.count("ip_rule_create") == 1
    again = client.post(f"/access-requests/{request_id}/extend", json={"duration": "45m"}, headers=alice)
    assert again.get_json()["pending_extension"] == "PT45M"  # past the allowance: approvers decide
    assert expires(again.get_json()) == expires(body)


def test_an_extension_beyond_the_allowance_waits_for_someone_else(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime, simulator: Simulator
) -> None:
    registered()
    request_id, alice, bob = active_request(client, token_for, runtime, simulator)
    start = expires(client.get(f"/access-requests/{request_id}", headers=alice).get_json())

    asked = client.post(f"/access-requests/{request_id}/extend", json={"duration": "1h"}, headers=alice)
    assert asked.get_json()["pending_extension"] == "PT1H" and expires(asked.get_json()) == start
    assert (
        client.post(
            f"/access-requests/{request_id}/extend", json={"duration": "1h"}, headers=alice
        ).status_code
        == 409
    )
    assert client.post(f"/access-requests/{request_id}/approve", json={}, headers=alice).status_code == 403

    approved = client.post(f"/access-requests/{request_id}/approve", json={"comment": "ok"}, headers=bob)

    body = approved.get_json()
    assert approved.status_code == 200 and body["pending_extension"] is None
    assert expires(body) - start == timedelta(hours=1)
    assert [(a["approver"], a["round"]) for a in body["approvals"]] == [("bob", 0), ("bob", 1)]
    with runtime.sessions() as session:
        actions = list(session.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))
    assert actions[-3:] == [
        "access_request:request_extension",
        "access_request:approve_extension",
        "access_request:extend",
    ]


def test_a_denied_extension_leaves_access_as_it_was(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime, simulator: Simulator
) -> None:
    registered()
    request_id, alice, bob = active_request(client, token_for, runtime, simulator)
    start = expires(client.get(f"/access-requests/{request_id}", headers=alice).get_json())
    client.post(f"/access-requests/{request_id}/extend", json={"duration": "1h"}, headers=alice)

    denied = client.post(
        f"/access-requests/{request_id}/deny", json={"reason": "finish tomorrow"}, headers=bob
    )

    body = denied.get_json()
    assert body["status"] == "active" and body["pending_extension"] is None and expires(body) == start
    assert client.post(f"/access-requests/{request_id}/approve", json={}, headers=bob).status_code == 409


def test_extensions_stay_within_the_policy_maximum_and_only_for_active_access(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime, simulator: Simulator
) -> None:
    registered(max_duration="2h", self_extension="2h")
    request_id, alice, _ = active_request(client, token_for, runtime, simulator, duration="90m")

    too_much = client.post(f"/access-requests/{request_id}/extend", json={"duration": "1h"}, headers=alice)
    assert too_much.status_code == 422 and "0:30:00 more" in too_much.get_json()["detail"]
    assert (
        client.post(
            f"/access-requests/{request_id}/extend", json={"duration": "30m"}, headers=alice
        ).status_code
        == 200
    )
    assert (
        client.post(
            f"/access-requests/{request_id}/extend", json={"duration": "nope"}, headers=alice
        ).status_code
        == 422
    )

    pending = client.post(
        "/access-requests", json={"database": "main", "cidr": "1.1.1.1", "reason": "x"}, headers=alice
    ).get_json()["id"]
    assert (
        client.post(f"/access-requests/{pending}/extend", json={"duration": "5m"}, headers=alice).status_code
        == 409
    )
    mallory = token_for("mallory", "requester")
    assert (
        client.post(
            f"/access-requests/{request_id}/extend", json={"duration": "5m"}, headers=mallory
        ).status_code
        == 404
    )


def test_an_extended_request_expires_at_its_new_end(
    client: FlaskClient,
    token_for: TokenFactory,
    registered: Any,
    runtime: Runtime,
    simulator: Simulator,
    clock: ManualClock,
) -> None:
    registered(self_extension="1h")
    request_id, alice, _ = active_request(client, token_for, runtime, simulator)
    first_end = expires(client.get(f"/access-requests/{request_id}", headers=alice).get_json())
    client.post(f"/access-requests/{request_id}/extend", json={"duration": "20m"}, headers=alice)
    assert runtime.heroku is not None

    clock.set(first_end)
    grants.sweep(runtime.sessions, heroku=runtime.heroku, clock=clock, settings=SETTINGS)
    assert client.get(f"/access-requests/{request_id}", headers=alice).get_json()["status"] == "active"
    clock.advance(timedelta(minutes=20))
    grants.sweep(runtime.sessions, heroku=runtime.heroku, clock=clock, settings=SETTINGS)
    assert client.get(f"/access-requests/{request_id}", headers=alice).get_json()["status"] == "expired"
    assert simulator.rules(next(iter(simulator.addons.values()))) == []


def test_access_past_its_end_cannot_be_extended_even_before_the_worker_closes_it(
    client: FlaskClient,
    token_for: TokenFactory,
    registered: Any,
    runtime: Runtime,
    simulator: Simulator,
    clock: ManualClock,
) -> None:
    """With the worker down, a request can still read `active` after its end; extending it then would
    revive access that has lapsed."""
    registered(self_extension="1h")
    request_id, alice, bob = active_request(client, token_for, runtime, simulator, duration="30m")
    before = client.get(f"/access-requests/{request_id}", headers=alice).get_json()
    clock.advance(timedelta(minutes=31))

    late = client.post(f"/access-requests/{request_id}/extend", json={"duration": "30m"}, headers=alice)

    assert late.status_code == 409 and late.mimetype == "application/problem+json"
    assert "ended" in late.get_json()["detail"]
    after = client.get(f"/access-requests/{request_id}", headers=alice).get_json()
    assert after["expires_at"] == before["expires_at"] and after["pending_extension"] is None
    grants.sweep(runtime.sessions, heroku=runtime.heroku, clock=runtime.clock, settings=SETTINGS)  # type: ignore[arg-type]
    assert client.get(f"/access-requests/{request_id}", headers=alice).get_json()["status"] == "expired"


def test_an_extension_waiting_for_approval_cannot_be_approved_after_the_access_ended(
    client: FlaskClient,
    token_for: TokenFactory,
    registered: Any,
    runtime: Runtime,
    simulator: Simulator,
    clock: ManualClock,
) -> None:
    registered()
    request_id, alice, bob = active_request(client, token_for, runtime, simulator, duration="30m")
    asked = client.post(f"/access-requests/{request_id}/extend", json={"duration": "30m"}, headers=alice)
    assert asked.get_json()["pending_extension"] == "PT30M"
    clock.advance(timedelta(minutes=31))

    late = client.post(f"/access-requests/{request_id}/approve", json={}, headers=bob)

    assert late.status_code == 409
    body = client.get(f"/access-requests/{request_id}", headers=alice).get_json()
    assert body["duration"] == "PT30M" and body["approvals"] == asked.get_json()["approvals"]
