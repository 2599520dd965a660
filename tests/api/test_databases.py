"""`/databases`: registration resolves the add-on at Heroku (the simulator) and policies are validated."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select

from app.heroku.simulator import SimAddon, Simulator
from app.models import AuditEvent, Database
from app.runtime import Runtime
from tests.conftest import TokenFactory


def database_count(runtime: Runtime) -> int:
    with runtime.sessions() as session:
        return session.scalar(select(func.count()).select_from(Database)) or 0


def test_registering_resolves_the_addon_and_checks_mtls(
    client: FlaskClient, token_for: TokenFactory, addon: SimAddon, simulator: Simulator, runtime: Runtime
) -> None:
    admin = token_for("root", "admin")

    answer = client.post(
        "/databases",
        json={"name": "main", "app": "acme-api", "addon": addon.name, "max_duration": "4h"},
        headers=admin,
    )

    assert answer.status_code == 201
    body = answer.get_json()
    assert body["addon_id"] == addon.id
    assert body["plan"] == "heroku-postgresql:private-0"
    assert (body["max_duration"], body["default_duration"]) == ("PT4H", "PT1H")
    assert (body["approvals_required"], body["max_prefix"], body["approval_window"]) == (1, 28, "P1D")
    assert simulator.count("addon_lookup") == 1
    assert simulator.count("mtls_status") == 1
    with runtime.sessions() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "database:register")).one()
    assert event.actor == "root" and event.database == "main"
    assert event.details["addon_id"] == addon.id
    listed = client.get("/databases", headers=token_for("alice", "requester")).get_json()
    assert [d["name"] for d in listed["items"]] == ["main"]


@pytest.mark.parametrize(
    ("setup", "status", "code"),
    [
        ("missing", 422, "invalid_input"),
        ("not_postgres", 422, "invalid_input"),
        ("mtls_off", 422, "invalid_input"),
        ("mtls_provisioning", 409, "mtls_not_operational"),
        ("heroku_down", 503, "heroku_unavailable"),
        ("heroku_rate_limited", 503, "heroku_unavailable"),
    ],
)
def test_registration_explains_why_heroku_said_no_and_stores_nothing(
    client: FlaskClient,
    token_for: TokenFactory,
    simulator: Simulator,
    runtime: Runtime,
    setup: str,
    status: int,
    code: str,
) -> None:
    name = "postgresql-target-1"
    if setup == "not_postgres":
        simulator.add_addon(app="acme-api", name=name, service="heroku-redis")
    elif setup == "mtls_off":
        simulator.add_addon(app="acme-api", name=name, mtls_status=None)
    elif setup == "mtls_provisioning":
        simulator.add_addon(app="acme-api", name=name, mtls_status="Provisioning")
    elif setup in ("heroku_down", "heroku_rate_limited"):
        simulator.add_addon(app="acme-api", name=name)
        fault = "503" if setup == "heroku_down" else "429"
        simulator.script("addon_lookup", fault, fault, fault)  # outlasts the client's retries

    answer = client.post(
        "/databases",
        json={"name": "main", "app": "acme-api", "addon": name},
        headers=token_for("root", "admin"),
    )

    assert answer.status_code == status, answer.get_json()
    assert answer.content_type == "application/problem+json"
    assert answer.get_json()["code"] == code
    if status == 503:
        assert answer.headers["Retry-After"]
    assert database_count(runtime) == 0


def test_a_refused_heroku_token_is_a_bad_gateway_not_a_server_error(
    client: FlaskClient, token_for: TokenFactory, addon: SimAddon, simulator: Simulator
) -> None:
    simulator.token = "rotated"
    answer = client.post(
        "/databases",
        json={"name": "main", "app": "acme-api", "addon": addon.name},
        headers=token_for("root", "admin"),
    )
    assert answer.status_code == 502
    assert answer.get_json()["code"] == "heroku_rejected"


def test_the_same_name_or_addon_cannot_be_registered_twice(
    client: FlaskClient, token_for: TokenFactory, registered: Any, addon: SimAddon, runtime: Runtime
) -> None:
    registered("main")
    admin = token_for("root2", "admin")
    same_name = client.post(
        "/databases", json={"name": "main", "app": "acme-api", "addon": "x"}, headers=admin
    )
    same_addon = client.post(
        "/databases", json={"name": "other", "app": "acme-api", "addon": addon.name}, headers=admin
    )
    assert same_name.status_code == 409
    assert same_addon.status_code == 409
    assert database_count(runtime) == 1


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        ({"max_duration": "30m", "default_duration": "1h"}, "max_duration"),
        ({"default_duration": "30s"}, "default_duration"),
        ({"approvals_required": 0}, "approvals_required"),
        ({"approvals_required": 11}, "approvals_required"),
        ({"max_prefix": 8}, "max_prefix"),
        ({"max_prefix": 33}, "max_prefix"),
        ({"rule_headroom": 60}, "rule_headroom"),
        ({"reason_pattern": "(unclosed"}, "reason_pattern"),
        ({"max_duration": "eternity"}, "max_duration"),
        ({"approvers": ["bob"]}, "approvers"),
    ],
)
def test_incoherent_policies_are_refused(
    client: FlaskClient,
    token_for: TokenFactory,
    addon: SimAddon,
    runtime: Runtime,
    policy: dict[str, Any],
    field: str,
) -> None:
    answer = client.post(
        "/databases",
        json={"name": "main", "app": "acme-api", "addon": addon.name, **policy},
        headers=token_for("root", "admin"),
    )
    assert answer.status_code == 422, answer.get_json()
    assert field in answer.get_json()["errors"]
    assert database_count(runtime) == 0


def test_policy_changes_are_validated_and_audited(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime
) -> None:
    registered()
    admin = token_for("root2", "admin")

    changed = client.patch(
        "/databases/main",
        json={"approvals_required": 2, "max_prefix": 32, "reason_pattern": "INC-"},
        headers=admin,
    )
    assert changed.status_code == 200
    assert (changed.get_json()["approvals_required"], changed.get_json()["max_prefix"]) == (2, 32)
    refused = client.patch("/databases/main", json={"max_duration": "1m"}, headers=admin)
    assert refused.status_code == 422
    cleared = client.patch("/databases/main", json={"reason_pattern": None}, headers=admin)
    assert cleared.get_json()["reason_pattern"] is None
    assert client.get("/databases/main", headers=admin).get_json()["max_duration"] == "PT8H"
    assert client.patch("/databases/absent", json={"max_prefix": 30}, headers=admin).status_code == 404

    with runtime.sessions() as session:
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "database:update_policy").order_by(AuditEvent.id)
        ).all()
    assert [e.details["changes"] for e in events] == [
        {
            "approvals_required": {"from": 1, "to": 2},
            "max_prefix": {"from": 28, "to": 32},
            "reason_pattern": {"from": None, "to": "INC-"},
        },
        {"reason_pattern": {"from": "INC-", "to": None}},
    ]


def test_a_policy_change_applies_to_the_next_request(
    client: FlaskClient, token_for: TokenFactory, registered: Any
) -> None:
    registered()
    admin, alice = token_for("root2", "admin"), token_for("alice", "requester")
    body = {"database": "main", "cidr": "8.8.8.0/30", "reason": "INC-1"}
    assert client.post("/access-requests", json=body, headers=alice).status_code == 201
    client.patch("/databases/main", json={"max_prefix": 32}, headers=admin)
    body["cidr"] = "8.8.4.0/30"
    assert client.post("/access-requests", json=body, headers=alice).status_code == 422
