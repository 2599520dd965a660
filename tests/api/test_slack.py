"""Slack end to end: signed slash commands and button clicks through the Flask app, acting as linked users."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select, update
from werkzeug.test import TestResponse

from app import slack
from app.config import Config
from app.heroku.simulator import Simulator
from app.models import AccessRequest, Approval, AuditEvent, Notification, User
from app.runtime import Runtime
from app.services import grants, tokens, users
from tests.conftest import TokenFactory

SECRET = "slack-signing-secret-for-tests"
FORM = "application/x-www-form-urlencoded"
ALICE, BOB, CAROL, DANA, ERIN = "U0ALICE", "U0BOB", "U0CAROL", "U0DANA", "U0ERIN"
STRANGER = "U0STRANGER"


@pytest.fixture
def config(database_url: str) -> Config:
    return Config(database_url=database_url, min_duration=60, slack_signing_secret=SECRET)


@pytest.fixture
def people(runtime: Runtime, token_for: TokenFactory, registered: Any) -> None:
    """The database `main`, and people linked to Slack with their own roles (dana may ask and approve)."""
    registered()
    for name, slack_id, roles in [
        ("alice", ALICE, ("requester",)),
        ("bob", BOB, ("approver",)),
        ("carol", CAROL, ("approver",)),
        ("dana", DANA, ("requester", "approver")),
        ("erin", ERIN, ("requester",)),
    ]:
        token_for(name, *roles)
        with runtime.sessions() as session:
            users.link_slack(
                session, principal=tokens.CLI, user_name=name, slack_user_id=slack_id, clock=runtime.clock
            )


def signed(runtime: Runtime, body: bytes, *, secret: str = SECRET, skew: float = 0) -> dict[str, str]:
    timestamp = str(int((runtime.clock.now() + timedelta(seconds=skew)).timestamp()))
    return {
        "X-Slack-Request-Timestamp": timestamp,
        "X-Slack-Signature": slack.sign(secret=secret, timestamp=timestamp, body=body),
    }


def command_body(text: str, user: str) -> bytes:
    return urlencode(
        {
            "token": "gIkuvaNzQIHg97ATvDxqgjtO",
            "team_id": "T0001",
            "team_domain": "example",
            "channel_id": "C2147483705",
            "channel_name": "db-access",
            "user_id": user,
            "user_name": "someone",
            "command": "/drawbridge",
            "text": text,
            "response_url": "https://hooks.slack.com/commands/1234/5678",
            "trigger_id": "13345224609.738474920.8088930838d88f008e0",
        }
    ).encode()


def slash(client: FlaskClient, runtime: Runtime, text: str, *, user: str) -> TestResponse:
    body = command_body(text, user)
    return client.post("/slack/commands", data=body, headers=signed(runtime, body), content_type=FORM)


def reply(client: FlaskClient, runtime: Runtime, text: str, *, user: str) -> dict[str, Any]:
    answer = slash(client, runtime, text, user=user)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert answer.content_type == "application/json"
    body: dict[str, Any] = answer.get_json()
    return body


def click_body(action_id: str, value: str, user: str) -> bytes:
    payload = {
        "type": "block_actions",
        "user": {"id": user, "username": "someone", "team_id": "T0001"},
        "api_app_id": "A0001",
        "container": {"type": "message", "message_ts": "1548261231.000200", "channel_id": "C2147483705"},
        "channel": {"id": "C2147483705", "name": "db-access"},
        "response_url": "https://hooks.slack.com/actions/T0001/1/2",
        "actions": [
            {
                "type": "button",
                "action_id": action_id,
                "block_id": f"decide:{value}",
                "value": value,
                "action_ts": "1548426417.840180",
            }
        ],
    }
    return urlencode({"payload": json.dumps(payload)}).encode()


def click(client: FlaskClient, runtime: Runtime, action_id: str, value: str, *, user: str) -> dict[str, Any]:
    body = click_body(action_id, value, user)
    answer = client.post("/slack/interactions", data=body, headers=signed(runtime, body), content_type=FORM)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    result: dict[str, Any] = answer.get_json()
    return result


def request_ids(runtime: Runtime) -> set[str]:
    with runtime.sessions() as session:
        return {str(i) for i in session.scalars(select(AccessRequest.id))}


def file_request(client: FlaskClient, runtime: Runtime, *, user: str = ALICE, cidr: str = "8.8.8.8") -> str:
    """File a request through Slack and return its id."""
    before = request_ids(runtime)
    answer = reply(client, runtime, f"request main {cidr} 2h INC-1 restore a row", user=user)
    assert "Filed" in answer["text"], answer
    (new,) = request_ids(runtime) - before
    return new


def loaded(runtime: Runtime, request_id: str) -> AccessRequest:
    with runtime.sessions() as session:
        row = session.get(AccessRequest, uuid.UUID(request_id))
        assert row is not None
        session.expunge(row)
        return row


def trail(runtime: Runtime, request_id: str) -> list[tuple[str, str, str]]:
    with runtime.sessions() as session:
        rows = session.execute(
            select(AuditEvent.action, AuditEvent.actor, AuditEvent.source)
            .where(AuditEvent.request_id == uuid.UUID(request_id))
            .order_by(AuditEvent.id)
        )
        return [(a, b, c) for a, b, c in rows]


def counts(runtime: Runtime) -> tuple[int, ...]:
    with runtime.sessions() as session:
        return tuple(
            session.scalar(select(func.count()).select_from(model)) or 0
            for model in (AccessRequest, Approval, AuditEvent, Notification, User)
        )


def renumber(runtime: Runtime, request_id: str, new_id: str) -> str:
    """Give a fresh request a chosen id, so tests can make prefixes collide (its audit events, append-only,
    keep the id it was filed under)."""
    old, new = uuid.UUID(request_id), uuid.UUID(new_id)
    with runtime.sessions() as session:
        session.execute(update(AccessRequest).where(AccessRequest.id == old).values(id=new))
        session.execute(update(Notification).where(Notification.request_id == old).values(request_id=new))
        session.commit()
    return new_id


# -- slash commands ------------------------------------------------------------------------------------------


def test_a_linked_user_files_a_request_with_the_slash_command_audited_as_slack(
    client: FlaskClient, runtime: Runtime, people: None
) -> None:
    answer = reply(client, runtime, "request main 8.8.8.8 2h INC-1 restore  a row", user=ALICE)

    assert answer["response_type"] == "ephemeral"
    with runtime.sessions() as session:
        row = session.scalars(select(AccessRequest)).one()
        assert (row.requester.name, row.cidr, row.duration, row.reason, row.status.value) == (
            "alice",
            "8.8.8.8/32",
            7200,
            "INC-1 restore  a row",
            "pending",
        )
        request_id = str(row.id)
    assert f"`{request_id[:8]}`" in answer["text"]
    assert trail(runtime, request_id) == [("access_request:create", "alice", "slack")]


def test_an_approver_approves_by_id_prefix_and_the_channel_sees_it(
    client: FlaskClient, runtime: Runtime, people: None, simulator: Simulator
) -> None:
    request_id = file_request(client, runtime)
    simulator.reset_calls()

    answer = reply(client, runtime, f"approve {request_id[:6]} looks fine", user=BOB)

    assert answer["response_type"] == "in_channel"
    assert answer["text"].startswith("bob approved `" + request_id[:8])
    row = loaded(runtime, request_id)
    assert row.status.value == "approved"
    assert [(a.approver.name, a.comment) for a in row.approvals] == [("bob", "looks fine")]
    assert trail(runtime, request_id)[-1] == ("access_request:approve", "bob", "slack")
    assert simulator.count() == 0  # no Heroku call on the way: Slack's three seconds are safe


def test_an_approver_denies_with_a_reason(client: FlaskClient, runtime: Runtime, people: None) -> None:
    request_id = file_request(client, runtime)

    answer = reply(client, runtime, f"deny {request_id} use the read replica", user=BOB)

    assert answer["response_type"] == "in_channel" and "bob denied" in answer["text"]
    row = loaded(runtime, request_id)
    assert (row.status.value, row.end_reason) == ("denied", "use the read replica")
    assert trail(runtime, request_id)[-1] == ("access_request:deny", "bob", "slack")


def test_the_requester_revokes_granted_access(client: FlaskClient, runtime: Runtime, people: None) -> None:
    request_id = file_request(client, runtime)
    reply(client, runtime, f"approve {request_id[:8]}", user=BOB)

    answer = reply(client, runtime, f"revoke {request_id[:8]}", user=ALICE)

    assert "alice revoked" in answer["text"]
    assert loaded(runtime, request_id).status.value == "revoked"
    assert trail(runtime, request_id)[-1] == ("access_request:revoke", "alice", "slack")


def test_status_and_list_show_what_the_user_may_see(
    client: FlaskClient, runtime: Runtime, people: None
) -> None:
    mine = file_request(client, runtime, user=ALICE)
    theirs = file_request(client, runtime, user=ERIN, cidr="8.8.4.4")

    status = reply(client, runtime, f"status {mine[:5]}", user=ALICE)
    assert status["response_type"] == "ephemeral"
    assert mine in status["text"] and "INC-1 restore a row" in status["text"] and "pending" in status["text"]

    own_list = reply(client, runtime, "list", user=ALICE)["text"]
    assert mine[:8] in own_list and theirs[:8] not in own_list
    everything = reply(client, runtime, "list", user=BOB)["text"]
    assert mine[:8] in everything and theirs[:8] in everything
    assert "no access request" in reply(client, runtime, f"status {theirs[:8]}", user=ALICE)["text"]


def test_help_and_usage_mistakes_answer_only_the_caller(
    client: FlaskClient, runtime: Runtime, people: None
) -> None:
    before = counts(runtime)
    for text in ("", "help"):
        answer = reply(client, runtime, text, user=ALICE)
        assert answer["response_type"] == "ephemeral" and "/drawbridge request <database>" in answer["text"]
    assert "usage: `/drawbridge deny" in reply(client, runtime, "deny abcd1234", user=BOB)["text"]
    assert "no `fly` command" in reply(client, runtime, "fly me", user=BOB)["text"]
    assert counts(runtime) == before


def test_domain_errors_become_friendly_messages_and_change_nothing(
    client: FlaskClient, runtime: Runtime, people: None
) -> None:
    request_id = file_request(client, runtime)
    before = counts(runtime)

    cases = [
        ("request main 10.0.0.1 2h INC-2", ALICE, "private"),
        ("request main 8.8.8.8 9h INC-2", ALICE, "at most 8:00:00"),
        ("request nope 8.8.8.8 2h INC-2", ALICE, "no database named"),
        ("request main 8.8.8.8 2h again", ALICE, f"/drawbridge status {request_id[:8]}"),
        (f"approve {request_id[:8]}", ERIN, "approver role"),
        (f"revoke {request_id[:8]}", ALICE, "pending"),
    ]
    for text, user, message in cases:
        answer = reply(client, runtime, text, user=user)
        assert answer["response_type"] == "ephemeral", text
        assert answer["text"].startswith(":warning:") and message in answer["text"], (text, answer)
    assert counts(runtime) == before


def test_a_linked_user_without_any_role_can_do_nothing(
    client: FlaskClient, runtime: Runtime, people: None
) -> None:
    request_id = file_request(client, runtime)
    with runtime.sessions() as session:
        users.link_slack(
            session, principal=tokens.CLI, user_name="frank", slack_user_id="U0FRANK", clock=runtime.clock
        )
    before = counts(runtime)

    for text in ("request main 8.8.4.4 1h INC-3", f"approve {request_id[:8]}", "list"):
        assert "role" in reply(client, runtime, text, user="U0FRANK")["text"]
    assert counts(runtime) == before


def test_an_unknown_slack_user_is_told_so_and_nothing_happens(
    client: FlaskClient, runtime: Runtime, people: None
) -> None:
    request_id = file_request(client, runtime)
    before = counts(runtime)

    for text in ("request main 8.8.4.4 1h INC-3", f"approve {request_id[:8]}", "list", "deny abcd"):
        answer = reply(client, runtime, text, user=STRANGER)
        assert answer["response_type"] == "ephemeral"
        assert "not linked to a Drawbridge user" in answer["text"]
        assert f"--slack-user-id {STRANGER}" in answer["text"]
    clicked = click(client, runtime, "approve", request_id, user=STRANGER)
    assert clicked["replace_original"] is False and "not linked" in clicked["text"]

    assert counts(runtime) == before
    assert loaded(runtime, request_id).status.value == "pending"


@pytest.mark.parametrize("database_url", ["postgresql", "sqlite"], indirect=True)
def test_id_prefixes_must_be_unique_among_what_the_user_may_see(
    client: FlaskClient, runtime: Runtime, people: None
) -> None:
    first = renumber(runtime, file_request(client, runtime), "abcd1111-0000-4000-8000-000000000001")
    renumber(runtime, file_request(client, runtime, cidr="8.8.4.4"), "abcd2222-0000-4000-8000-000000000002")
    erins = renumber(
        runtime,
        file_request(client, runtime, user=ERIN, cidr="1.1.1.1"),
        "abcd3333-0000-4000-8000-000000000003",
    )
    before = counts(runtime)

    ambiguous = reply(client, runtime, "approve abcd", user=BOB)
    assert "more than one request" in ambiguous["text"] and "give more characters" in ambiguous["text"]
    assert "more than one request" in reply(client, runtime, "status ABCD-", user=ALICE)["text"]
    assert (
        "no access request has an id starting with ffff"
        in reply(client, runtime, "status ffff", user=BOB)["text"]
    )
    assert "at least 4 characters" in reply(client, runtime, "status abc", user=BOB)["text"]
    assert counts(runtime) == before

    # erin's request is not alice's to see, so for alice `abcd3` matches nothing, and `abcd` only her two.
    assert "no access request" in reply(client, runtime, "status abcd3", user=ALICE)["text"]
    assert erins in reply(client, runtime, "status abcd3", user=BOB)["text"]
    assert reply(client, runtime, "approve abcd1", user=BOB)["response_type"] == "in_channel"
    assert loaded(runtime, first).status.value == "approved"


def test_extend_through_slack_asks_approvers_who_can_approve_with_the_button(
    client: FlaskClient, runtime: Runtime, people: None, simulator: Simulator
) -> None:
    request_id = file_request(client, runtime, user=DANA)
    reply(client, runtime, f"approve {request_id[:8]}", user=BOB)
    simulator.settings.authorize_after = 0
    assert runtime.heroku is not None
    for _ in range(2):
        grants.sweep(
            runtime.sessions,
            heroku=runtime.heroku,
            clock=runtime.clock,
            settings=grants.Settings(poll_interval=1),
        )
    active = loaded(runtime, request_id)
    assert active.status.value == "active" and active.expires_at is not None

    asked = reply(client, runtime, f"extend {request_id[:8]} 30m", user=DANA)
    assert "asked to extend" in asked["text"] and "needs approval" in asked["text"]
    assert loaded(runtime, request_id).pending_extension == 1800
    assert "own request" in click(client, runtime, "approve", request_id, user=DANA)["text"]

    approved = click(client, runtime, "approve", request_id, user=CAROL)

    assert approved["replace_original"] is True
    assert approved["text"].startswith(":white_check_mark: carol approved more time for")
    extended = loaded(runtime, request_id)
    assert extended.expires_at == active.expires_at + timedelta(minutes=30)
    assert extended.pending_extension is None
    assert ("access_request:request_extension", "dana", "slack") in trail(runtime, request_id)
    assert trail(runtime, request_id)[-1] == ("access_request:extend", "carol", "slack")


def test_extending_a_request_that_is_not_active_is_explained(
    client: FlaskClient, runtime: Runtime, people: None
) -> None:
    request_id = file_request(client, runtime)
    answer = reply(client, runtime, f"extend {request_id[:8]} 30m", user=ALICE)
    assert answer["text"].startswith(":warning:") and "only active access can be extended" in answer["text"]


# -- buttons -------------------------------------------------------------------------------------------------


def test_the_approve_button_approves_and_replaces_the_message(
    client: FlaskClient, runtime: Runtime, people: None
) -> None:
    request_id = file_request(client, runtime)

    answer = click(client, runtime, "approve", request_id, user=BOB)

    assert answer["replace_original"] is True
    assert answer["text"].startswith(":white_check_mark: bob approved `" + request_id[:8])
    assert "blocks" not in answer
    assert loaded(runtime, request_id).status.value == "approved"
    assert trail(runtime, request_id)[-1] == ("access_request:approve", "bob", "slack")


def test_the_deny_button_denies_in_the_name_of_the_clicker(
    client: FlaskClient, runtime: Runtime, people: None
) -> None:
    request_id = file_request(client, runtime)

    answer = click(client, runtime, "deny", request_id, user=CAROL)

    assert answer["replace_original"] is True and answer["text"].startswith(":no_entry: carol denied")
    row = loaded(runtime, request_id)
    assert (row.status.value, row.end_reason) == ("denied", "denied in Slack by carol")
    assert trail(runtime, request_id)[-1] == ("access_request:deny", "carol", "slack")


def test_with_two_approvals_required_the_buttons_stay_for_the_second_approver(
    client: FlaskClient, runtime: Runtime, people: None, token_for: TokenFactory
) -> None:
    admin = token_for("root", "admin")
    assert client.patch("/databases/main", json={"approvals_required": 2}, headers=admin).status_code == 200
    request_id = file_request(client, runtime)

    first = click(client, runtime, "approve", request_id, user=BOB)
    assert first["replace_original"] is True
    assert [b["action_id"] for b in first["blocks"][-2]["elements"]] == ["approve", "deny"]
    assert "1 of 2 approvals" in json.dumps(first["blocks"])
    again = click(client, runtime, "approve", request_id, user=BOB)
    assert again["replace_original"] is False and "already approved" in again["text"]

    second = click(client, runtime, "approve", request_id, user=CAROL)
    assert second["text"].startswith(":white_check_mark: carol approved")
    assert [a.approver.name for a in loaded(runtime, request_id).approvals] == ["bob", "carol"]


def test_a_requester_cannot_approve_their_own_request_through_slack(
    client: FlaskClient, runtime: Runtime, people: None
) -> None:
    request_id = file_request(client, runtime, user=DANA)
    before = counts(runtime)

    clicked = click(client, runtime, "approve", request_id, user=DANA)
    typed = reply(client, runtime, f"approve {request_id[:8]}", user=DANA)
    denied = click(client, runtime, "deny", request_id, user=DANA)

    assert clicked["response_type"] == "ephemeral" and clicked["replace_original"] is False
    assert "you cannot approve your own request" in clicked["text"]
    assert "you cannot approve your own request" in typed["text"]
    assert "you cannot decide your own request" in denied["text"]
    assert counts(runtime) == before
    assert loaded(runtime, request_id).status.value == "pending"


def test_a_decided_request_cannot_be_decided_again_from_a_stale_button(
    client: FlaskClient, runtime: Runtime, people: None
) -> None:
    request_id = file_request(client, runtime)
    click(client, runtime, "deny", request_id, user=CAROL)

    late = click(client, runtime, "approve", request_id, user=BOB)

    assert late["replace_original"] is False and "denied" in late["text"]
    assert loaded(runtime, request_id).status.value == "denied"


def test_buttons_that_are_not_drawbridges_change_nothing(
    client: FlaskClient, runtime: Runtime, people: None
) -> None:
    request_id = file_request(client, runtime)
    before = counts(runtime)
    assert "does not handle" in click(client, runtime, "escalate", request_id, user=BOB)["text"]
    assert "does not name" in click(client, runtime, "approve", "not-a-uuid", user=BOB)["text"]
    assert "no access request" in click(client, runtime, "approve", str(uuid.uuid4()), user=BOB)["text"]
    assert counts(runtime) == before


# -- signatures ----------------------------------------------------------------------------------------------


def assert_unauthorized(answer: TestResponse) -> None:
    assert answer.status_code == 401
    assert answer.content_type == "application/problem+json"
    problem = answer.get_json()
    assert problem["status"] == 401 and problem["title"] == "Unauthorized"


@pytest.mark.parametrize("path", ["/slack/commands", "/slack/interactions"])
def test_requests_not_signed_by_slack_are_refused_with_401(
    client: FlaskClient, runtime: Runtime, people: None, path: str
) -> None:
    request_id = file_request(client, runtime)
    before = counts(runtime)
    body = (
        command_body(f"approve {request_id}", BOB)
        if path.endswith("commands")
        else click_body("approve", request_id, BOB)
    )
    tampered = body.replace(BOB.encode(), CAROL.encode())

    attempts = [
        (body, signed(runtime, body, secret="someone-elses-secret")),
        (tampered, signed(runtime, body)),
        (body, signed(runtime, body, skew=-301)),
        (body, signed(runtime, body, skew=301)),
        (body, {}),
        (body, {"X-Slack-Signature": signed(runtime, body)["X-Slack-Signature"]}),
        (body, {**signed(runtime, body), "X-Slack-Signature": "v0=nothex"}),
    ]
    for data, headers in attempts:
        assert_unauthorized(client.post(path, data=data, headers=headers, content_type=FORM))
    assert counts(runtime) == before

    runtime.clock.advance(300)  # a signature is good for five minutes, by the injected clock
    fresh = client.post(path, data=body, headers=signed(runtime, body, skew=-300), content_type=FORM)
    assert fresh.status_code == 200
    assert loaded(runtime, request_id).status.value == "approved"


def test_without_a_signing_secret_slack_is_refused(
    client: FlaskClient, runtime: Runtime, people: None
) -> None:
    runtime.config = replace(runtime.config, slack_signing_secret=None)
    body = command_body("help", ALICE)
    answer = client.post("/slack/commands", data=body, headers=signed(runtime, body), content_type=FORM)
    assert_unauthorized(answer)
    assert "SLACK_SIGNING_SECRET" in answer.get_json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        b"token=x",
        b"payload=not-json",
        b"payload=%5B%5D",
        b"payload=%7B%22type%22%3A%22block_actions%22%7D",
        b"\xff",
    ],
)
def test_a_signed_but_malformed_interaction_is_a_400(
    client: FlaskClient, runtime: Runtime, people: None, body: bytes
) -> None:
    answer = client.post("/slack/interactions", data=body, headers=signed(runtime, body), content_type=FORM)
    assert answer.status_code == 400
    assert answer.content_type == "application/problem+json"


def test_the_json_body_parser_is_not_involved(client: FlaskClient, runtime: Runtime, people: None) -> None:
    body = command_body("help", ALICE)
    answer = client.post("/slack/commands", data=body, headers=signed(runtime, body), content_type=FORM)
    assert answer.status_code == 200  # a JSON-only endpoint would answer 415
    assert "/drawbridge help" in answer.get_json()["text"]
