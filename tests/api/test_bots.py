"""Bots acting for a user (X-On-Behalf-Of), and `"cidr": "auto"` through trusted proxies."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from app import create_app
from app.models import AccessRequest, AuditEvent
from app.runtime import Runtime
from tests.conftest import TokenFactory


def ask(client: FlaskClient, headers: dict[str, str], **overrides: Any) -> Any:
    body = {"database": "main", "cidr": "8.8.8.8", "duration": "1h", "reason": "INC-5"}
    body.update(overrides)
    return client.post("/access-requests", json=body, headers=headers)


def as_(bot: dict[str, str], user: str) -> dict[str, str]:
    return {**bot, "X-On-Behalf-Of": user}


def test_a_bot_files_a_request_for_a_user_and_the_audit_shows_both(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime
) -> None:
    registered()
    token_for("alice", "requester")
    bot = token_for("slackbot", "bot")

    created = ask(client, as_(bot, "alice"))

    assert created.status_code == 201
    body = created.get_json()
    assert (body["requester"], body["filed_by"]) == ("alice", "slackbot")
    with runtime.sessions() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "access_request:create")).one()
    assert (event.actor, event.on_behalf_of) == ("slackbot", "alice")
    listed = client.get("/access-requests", headers=as_(bot, "alice")).get_json()["items"]
    assert [r["id"] for r in listed] == [body["id"]]


def test_a_bot_without_a_user_can_do_nothing(
    client: FlaskClient, token_for: TokenFactory, registered: Any
) -> None:
    registered()
    bot = token_for("slackbot", "bot", "admin", "approver")
    assert ask(client, bot).status_code == 403
    assert client.get("/databases", headers=bot).status_code == 403
    assert client.get("/audit-events", headers=bot).status_code == 403


def test_a_bot_has_exactly_the_users_permissions(
    client: FlaskClient, token_for: TokenFactory, registered: Any
) -> None:
    registered()
    token_for("alice", "requester")
    token_for("bob", "approver")
    bot = token_for("slackbot", "bot", "admin")
    request_id = ask(client, as_(bot, "alice")).get_json()["id"]

    assert (
        client.post(f"/access-requests/{request_id}/approve", json={}, headers=as_(bot, "alice")).status_code
        == 403
    )
    assert client.get("/audit-events", headers=as_(bot, "bob")).status_code == 403
    approved = client.post(f"/access-requests/{request_id}/approve", json={}, headers=as_(bot, "bob"))
    assert approved.status_code == 200 and approved.get_json()["approvals"][0]["approver"] == "bob"


def test_no_path_through_a_bot_approves_ones_own_request(
    client: FlaskClient, token_for: TokenFactory, registered: Any
) -> None:
    registered()
    both = token_for("dana", "requester", "approver")
    bot = token_for("slackbot", "bot")
    request_id = ask(client, both).get_json()["id"]
    refused = client.post(f"/access-requests/{request_id}/approve", json={}, headers=as_(bot, "dana"))
    assert refused.status_code == 403 and refused.get_json()["code"] == "self_approval_forbidden"


def test_a_revoked_user_token_takes_the_users_permissions_away_from_bots(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime
) -> None:
    from app.services import tokens

    registered()
    alice = token_for("alice", "requester")
    bot = token_for("slackbot", "bot")
    with runtime.sessions() as session:
        tokens.revoke_token(session, token=alice["Authorization"].split()[1], clock=runtime.clock)
    assert ask(client, as_(bot, "alice")).status_code == 403


@pytest.mark.parametrize(
    ("value", "status"),
    [
        ("nobody", 403),
        ("alice smith", 422),
        ("alice\tx", 422),
        ("../../etc", 422),
        ("a" * 65, 422),
        ("", 422),
    ],
)
def test_bad_on_behalf_of_values_are_refused(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime, value: str, status: int
) -> None:
    registered()
    token_for("alice", "requester")
    bot = token_for("slackbot", "bot")
    answer = ask(client, as_(bot, value))
    assert answer.status_code == status
    with runtime.sessions() as session:
        assert session.scalars(select(AccessRequest)).all() == []


def test_only_bots_may_act_for_someone_else(
    client: FlaskClient, token_for: TokenFactory, registered: Any
) -> None:
    registered()
    token_for("alice", "requester")
    admin = token_for("root2", "admin", "requester")
    assert ask(client, as_(admin, "alice")).status_code == 403
    bot = token_for("slackbot", "bot")
    assert ask(client, as_(bot, "slackbot")).status_code == 403


@pytest.fixture
def behind_heroku_router(runtime: Runtime) -> Flask:
    from dataclasses import replace

    runtime.config = replace(runtime.config, trusted_proxies=1)
    app = create_app(runtime=runtime)
    app.config["TESTING"] = True
    return app


def test_auto_uses_the_address_the_trusted_proxy_saw_not_the_left_most_claim(
    behind_heroku_router: Flask, token_for: TokenFactory, registered: Any
) -> None:
    registered()
    client = behind_heroku_router.test_client()
    alice = token_for("alice", "requester")
    spoofed = {
        **alice,
        "X-Forwarded-For": "1.1.1.1, 9.9.9.9",
    }  # client claimed 1.1.1.1; the router saw 9.9.9.9

    created = client.post(
        "/access-requests",
        json={"database": "main", "cidr": "auto", "reason": "x"},
        headers=spoofed,
        environ_base={"REMOTE_ADDR": "10.1.2.3"},
    )

    assert created.status_code == 201, created.get_json()
    assert created.get_json()["cidr"] == "9.9.9.9/32"


def test_auto_without_trusted_proxies_uses_the_peer_and_refuses_private_ones(
    client: FlaskClient, token_for: TokenFactory, registered: Any
) -> None:
    registered()
    alice = token_for("alice", "requester")
    body = {"database": "main", "cidr": "auto", "reason": "x"}
    public = client.post(
        "/access-requests",
        json=body,
        headers={**alice, "X-Forwarded-For": "1.1.1.1"},
        environ_base={"REMOTE_ADDR": "8.8.4.4"},
    )
    assert public.get_json()["cidr"] == "8.8.4.4/32"  # X-Forwarded-For is not trusted by default
    private = client.post(
        "/access-requests",
        json={**body, "duration": "2h"},
        headers=token_for("erin", "requester"),
        environ_base={"REMOTE_ADDR": "127.0.0.1"},
    )
    assert private.status_code == 422 and "loopback" in private.get_json()["detail"]


def test_bots_must_send_an_explicit_cidr(
    client: FlaskClient, token_for: TokenFactory, registered: Any
) -> None:
    registered()
    token_for("alice", "requester")
    bot = token_for("slackbot", "bot")
    refused = client.post(
        "/access-requests",
        json={"database": "main", "cidr": "auto", "reason": "x"},
        headers=as_(bot, "alice"),
        environ_base={"REMOTE_ADDR": "8.8.4.4"},
    )
    assert refused.status_code == 422 and "explicit CIDR" in refused.get_json()["detail"]
