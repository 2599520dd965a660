"""Hostile input: every attempt gets a 4xx problem document, never a 500, and leaves every table as it was.

Complements test_errors.py (malformed JSON, nesting on one endpoint, one oversized body, two content types)
with the rest of the surface: every endpoint that takes a body, text PostgreSQL cannot store (NUL, lone
surrogates), control and invisible characters, header injection through X-On-Behalf-Of, SQL fragments in
every filter, enormous limits, malformed ids and other people's ids.

SQL fragments in a free-text filter (a database, user or action name) are a name that matches nothing: the
answer is an empty 200 page (or 404 for a report on a database that does not exist), never more rows.
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from flask.testing import FlaskClient
from sqlalchemy import text

from app import slack
from app.config import Config
from app.db import Base
from app.runtime import Runtime
from tests.conftest import TokenFactory

PROBLEM = "application/problem+json"
SLACK_SECRET = "slack-signing-secret-for-attack-tests"
SQL = [
    "' OR '1'='1",
    "main' OR 1=1 --",
    "x'; DROP TABLE audit_events; --",
    "1) OR (1=1",
    "%' OR '%'='",
    "\\'; SELECT pg_sleep(5); --",
    "$$ OR 1=1 $$",
]


@pytest.fixture
def config(database_url: str) -> Config:
    return Config(database_url=database_url, min_duration=60, slack_signing_secret=SLACK_SECRET)


@dataclass
class Desk:
    client: FlaskClient
    runtime: Runtime
    alice: dict[str, str]
    mallory: dict[str, str]
    bob: dict[str, str]
    dana: dict[str, str]
    audra: dict[str, str]
    admin: dict[str, str]
    bot: dict[str, str]
    request_id: str

    def snapshot(self) -> dict[str, tuple[int, str]]:
        """Every table's row count and a digest of its content."""
        with self.runtime.engine.connect() as conn:
            return {
                table.name: tuple(  # type: ignore[misc]
                    conn.execute(
                        text(
                            f"SELECT count(*), md5(coalesce(string_agg(CAST(t AS text), '|' "
                            f"ORDER BY CAST(t AS text)), '')) FROM {table.name} AS t"
                        )
                    ).one()
                )
                for table in Base.metadata.sorted_tables
            }


@pytest.fixture
def desk(client: FlaskClient, runtime: Runtime, token_for: TokenFactory, registered: Any) -> Desk:
    """The database `main`, people in every role, and alice's pending request."""
    registered()
    alice = token_for("alice", "requester")
    asked = client.post(
        "/access-requests",
        json={"database": "main", "cidr": "8.8.8.8", "reason": "INC-1 restore a row"},
        headers=alice,
    )
    assert asked.status_code == 201
    return Desk(
        client=client,
        runtime=runtime,
        alice=alice,
        mallory=token_for("mallory", "requester"),
        bob=token_for("bob", "approver"),
        dana=token_for("dana", "requester", "approver"),
        audra=token_for("audra", "auditor"),
        admin=token_for("root2", "admin"),
        bot=token_for("chatops", "bot"),
        request_id=asked.get_json()["id"],
    )


def assert_problem(response: Any, *statuses: int) -> dict[str, Any]:
    assert response.status_code in statuses, (response.status_code, response.get_data(as_text=True))
    assert response.content_type == PROBLEM
    body: dict[str, Any] = response.get_json()
    assert body["status"] == response.status_code and body["title"] and body["type"]
    return body


def bodies(request_id: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(who, method, path, a valid body) for every endpoint that takes a JSON body."""
    return [
        ("alice", "POST", "/access-requests", {"database": "main", "cidr": "8.8.4.4", "reason": "INC-2"}),
        ("bob", "POST", f"/access-requests/{request_id}/approve", {"comment": "fine"}),
        ("bob", "POST", f"/access-requests/{request_id}/deny", {"reason": "no"}),
        ("alice", "POST", f"/access-requests/{request_id}/cancel", {"reason": "done"}),
        ("alice", "POST", f"/access-requests/{request_id}/revoke", {"reason": "done"}),
        ("alice", "POST", f"/access-requests/{request_id}/extend", {"duration": "30m"}),
        ("admin", "POST", "/databases", {"name": "other", "app": "acme-api", "addon": "postgresql-x"}),
        (
            "admin",
            "PATCH",
            "/databases/main",
            {"reason_pattern": "INC-\\d+", "approvers": {"users": ["bob"]}},
        ),
    ]


def poisoned(body: dict[str, Any], poison: str) -> list[dict[str, Any]]:
    """The body with `poison` inside each of its strings in turn, and as a key."""
    out = []
    for key, value in body.items():
        if isinstance(value, str):
            out.append({**body, key: value[:1] + poison + value[1:]})
        elif isinstance(value, dict):
            out.append({**body, key: {k: [poison] for k in value}})
    out.append({**body, f"extra{poison}": "x"})
    return out


@pytest.mark.parametrize(
    "poison", ["\x00", "\ud800", "\udfff"], ids=["nul", "high-surrogate", "low-surrogate"]
)
def test_text_postgresql_cannot_store_is_a_422_in_every_body_field(desk: Desk, poison: str) -> None:
    before = desk.snapshot()
    for who, method, path, body in bodies(desk.request_id):
        for bad in poisoned(body, poison):
            raw = json.dumps(bad).encode()  # escapes both as \u0000 / \ud800, as a client would send them
            response = desk.client.open(
                path, method=method, data=raw, content_type="application/json", headers=getattr(desk, who)
            )
            problem = assert_problem(response, 422)
            assert "U+0000" in problem["detail"], (path, bad)
    assert desk.snapshot() == before


@pytest.mark.parametrize(
    ("reason", "accepted"),
    [
        ("bell \x07 rings", False),
        ("escape \x1b[31m red", False),
        ("right-to-left \u202e override", False),
        ("zero\u200bwidth", False),
        ("private use \ue000", False),
        ("INC-1 🔥 日本語 Ünïcödé", True),
    ],
)
def test_control_and_invisible_characters_in_reasons_are_refused_and_plain_unicode_kept(
    desk: Desk, reason: str, accepted: bool
) -> None:
    before = desk.snapshot()
    asked = desk.client.post(
        "/access-requests", json={"database": "main", "cidr": "8.8.4.4", "reason": reason}, headers=desk.alice
    )
    denied = desk.client.post(
        f"/access-requests/{desk.request_id}/deny", json={"reason": reason}, headers=desk.bob
    )
    if accepted:
        assert asked.status_code == 201 and asked.get_json()["reason"] == reason
        assert denied.status_code == 200 and denied.get_json()["end_reason"] == reason
        return
    assert "reason" in assert_problem(asked, 422)["errors"]
    assert "reason" in assert_problem(denied, 422)["errors"]
    assert desk.snapshot() == before


@pytest.mark.parametrize("name", ["Main", "ma in", "maïn", "main\n", "-main", "m" * 64, "main;drop", "../x"])
def test_database_names_outside_the_grammar_are_refused(desk: Desk, name: str) -> None:
    before = desk.snapshot()
    body = {"name": name, "app": "acme-api", "addon": "postgresql-curved-12345"}
    assert_problem(desk.client.post("/databases", json=body, headers=desk.admin), 422)
    assert desk.snapshot() == before


def test_nul_in_any_query_parameter_is_a_422_and_in_a_path_a_404(desk: Desk) -> None:
    before = desk.snapshot()
    queries = [
        ("/access-requests", desk.alice, ["status", "database", "requester", "cursor", "limit"]),
        (
            "/audit-events",
            desk.audra,
            [
                "actor",
                "on_behalf_of",
                "database",
                "action",
                "request_id",
                "since",
                "until",
                "cursor",
                "limit",
            ],
        ),
        ("/reports/access", desk.audra, ["database", "at", "from", "to"]),
    ]
    for path, headers, names in queries:
        for name in names:
            response = desk.client.get(f"{path}?{name}=ma%00in", headers=headers)
            assert name in assert_problem(response, 422)["errors"], (path, name)
        assert_problem(desk.client.get(f"{path}?x%00y=1", headers=headers), 422)
    for method in ("GET", "PATCH"):
        response = desk.client.open("/databases/ma%00in", method=method, json={}, headers=desk.admin)
        assert_problem(response, 404)
    assert desk.snapshot() == before


def test_nul_in_a_slack_form_is_refused(desk: Desk) -> None:
    before = desk.snapshot()
    for fields in (
        {"user_id": "U0ALICE", "command": "/drawbridge", "text": "request ma\x00in 8.8.4.4 1h INC-1"},
        {"user_id": "U0\x00ALICE", "command": "/drawbridge", "text": "list"},
    ):
        body = urlencode(fields).encode()
        timestamp = str(int(desk.runtime.clock.now().timestamp()))
        headers = {
            "X-Slack-Request-Timestamp": timestamp,
            "X-Slack-Signature": slack.sign(secret=SLACK_SECRET, timestamp=timestamp, body=body),
        }
        response = desk.client.post(
            "/slack/commands", data=body, headers=headers, content_type="application/x-www-form-urlencoded"
        )
        assert_problem(response, 422)
    assert desk.snapshot() == before


@pytest.mark.parametrize(
    "value",
    [
        "alice\r\nX-Injected: 1",
        "alice\nSet-Cookie: session=stolen",
        "alice\r",
        "alice\n",
        "a" * 10_000,
        "alïce",
        "\u202ealice",
        "alice\x00",
        "alice\t",
        " alice",
        "alice,bob",
    ],
)
def test_header_injection_through_on_behalf_of_is_refused_and_never_reflected(desk: Desk, value: str) -> None:
    before = desk.snapshot()
    # The test client refuses CR and LF in headers, as any HTTP library does; the raw WSGI environ does not.
    environ = {"HTTP_X_ON_BEHALF_OF": value}
    answers = [
        desk.client.get("/access-requests", headers=desk.bot, environ_overrides=environ),
        desk.client.post(
            "/access-requests",
            json={"database": "main", "cidr": "8.8.4.4", "reason": "INC-3"},
            headers=desk.bot,
            environ_overrides=environ,
        ),
    ]
    for response in answers:
        problem = assert_problem(response, 422)
        assert problem["errors"] == {"X-On-Behalf-Of": [problem["detail"]]}
        assert "X-Injected" not in response.headers and "Set-Cookie" not in response.headers
        assert value not in response.get_data(as_text=True)
    assert desk.snapshot() == before


def test_sql_fragments_in_every_filter_match_nothing_and_change_nothing(desk: Desk) -> None:
    before = desk.snapshot()
    checks = [
        ("/access-requests", desk.alice, ["database", "requester"], ["status", "cursor"]),
        ("/access-requests", desk.audra, ["database", "requester"], ["status", "cursor"]),
        (
            "/audit-events",
            desk.audra,
            ["actor", "on_behalf_of", "database", "action"],
            ["request_id", "since", "until", "cursor"],
        ),
    ]
    for path, headers, free_text, typed in checks:
        for fragment in SQL:
            for name in free_text:
                response = desk.client.get(f"{path}?{name}={quote(fragment)}", headers=headers)
                assert response.status_code == 200, (path, name, fragment)
                assert response.get_json()["items"] == [], (path, name, fragment)
            for name in typed:
                response = desk.client.get(f"{path}?{name}={quote(fragment)}", headers=headers)
                assert name in assert_problem(response, 422)["errors"], (path, name, fragment)
    for fragment in SQL:
        at = "2026-01-05T09:00:00Z"
        report = desk.client.get(f"/reports/access?database={quote(fragment)}&at={at}", headers=desk.audra)
        assert_problem(report, 404)
        for name in ("at", "from", "to"):
            others = {"at": {}, "from": {"to": at}, "to": {"from": at}}[name]
            query = urlencode({"database": "main", name: fragment, **others})
            assert (
                name
                in assert_problem(desk.client.get(f"/reports/access?{query}", headers=desk.audra), 422)[
                    "errors"
                ]
            )
    assert desk.snapshot() == before


@pytest.mark.parametrize(
    "limit", ["0", "-1", "201", "1000000", "9" * 400, "9" * 5000, "1.5", "1e3", "0x10", "", "NaN", "½"]
)
def test_out_of_range_or_malformed_limits_are_a_422(desk: Desk, limit: str) -> None:
    for path, headers in (("/access-requests", desk.alice), ("/audit-events", desk.audra)):
        response = desk.client.get(f"{path}?limit={quote(limit)}", headers=headers)
        assert "limit" in assert_problem(response, 422)["errors"], (path, limit)


@pytest.mark.parametrize(
    "moment",
    [
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:59:59-14:00",
        "99999-01-01T00:00:00Z",
        "2026-13-01T00:00:00Z",
    ],
)
def test_times_outside_the_representable_range_are_a_422(desk: Desk, moment: str) -> None:
    for path in (f"/audit-events?since={quote(moment)}", f"/reports/access?database=main&at={quote(moment)}"):
        assert_problem(desk.client.get(path, headers=desk.audra), 422)


def test_others_requests_are_404_to_those_who_cannot_see_them_and_403_to_those_who_can(desk: Desk) -> None:
    before = desk.snapshot()
    mine, unknown = desk.request_id, str(uuid.uuid4())
    actions = [("cancel", {}), ("revoke", {}), ("extend", {"duration": "30m"})]
    as_mallory_via_bot = {**desk.bot, "X-On-Behalf-Of": "mallory"}

    # A requester who may see only their own requests cannot tell someone else's from one that does not exist.
    for headers in (desk.mallory, as_mallory_via_bot):
        for request_id in (mine, unknown):
            read = assert_problem(desk.client.get(f"/access-requests/{request_id}", headers=headers), 404)
            assert read["code"] == "request_not_found"
            for action, body in actions:
                response = desk.client.post(
                    f"/access-requests/{request_id}/{action}", json=body, headers=headers
                )
                assert assert_problem(response, 404)["code"] == "request_not_found", (action, request_id)
            for action, body in (("approve", {}), ("deny", {"reason": "no"})):
                response = desk.client.post(
                    f"/access-requests/{request_id}/{action}", json=body, headers=headers
                )
                assert assert_problem(response, 403)["code"] == "permission_denied"
        listed = desk.client.get("/access-requests?requester=alice", headers=headers)
        assert listed.status_code == 200 and listed.get_json()["items"] == []
        audit = desk.client.get(f"/audit-events?request_id={mine}", headers=headers)
        assert_problem(audit, 403)

    # Those who may see every request (approvers, auditors) but not end it get 403; for them a missing
    # request is a 404 (dana, who also has the requester role) or the same 403 (roles checked first).
    for headers in (desk.bob, desk.audra, desk.dana):
        assert desk.client.get(f"/access-requests/{mine}", headers=headers).status_code == 200
        for action, body in actions:
            response = desk.client.post(f"/access-requests/{mine}/{action}", json=body, headers=headers)
            assert assert_problem(response, 403)["code"] == "permission_denied", action
            missing = desk.client.post(f"/access-requests/{unknown}/{action}", json=body, headers=headers)
            assert_problem(missing, 404 if headers is desk.dana else 403)
    assert desk.snapshot() == before


@pytest.mark.parametrize(
    "request_id",
    [
        "not-a-uuid",
        "a" * 10_000,
        "00000000-0000-0000-0000-00000000000g",
        "00000000-0000-0000-0000-0000000000000",
        "{00000000-0000-0000-0000-000000000000}",
        "urn:uuid:00000000-0000-0000-0000-000000000000",
        "..%2F..%2Fdatabases",
        "%20",
        "1;DROP TABLE access_requests",
    ],
)
def test_malformed_request_ids_are_404_in_paths_and_422_in_filters(desk: Desk, request_id: str) -> None:
    before = desk.snapshot()
    assert_problem(desk.client.get(f"/access-requests/{request_id}", headers=desk.alice), 404)
    for action, who in (
        ("approve", desk.bob),
        ("deny", desk.bob),
        ("cancel", desk.alice),
        ("revoke", desk.alice),
    ):
        response = desk.client.post(
            f"/access-requests/{request_id}/{action}", json={"reason": "x"}, headers=who
        )
        assert_problem(response, 404)
    response = desk.client.get(f"/audit-events?request_id={quote(request_id)}", headers=desk.audra)
    if request_id.startswith(("{", "urn:uuid:")):
        # Other spellings of a UUID, which the filter reads as that UUID: it has no events.
        assert response.status_code == 200 and response.get_json()["items"] == []
    else:
        assert "request_id" in assert_problem(response, 422)["errors"]
    assert desk.snapshot() == before


def test_bodies_over_64_kib_are_a_413_on_every_endpoint(desk: Desk) -> None:
    before = desk.snapshot()
    for who, method, path, body in bodies(desk.request_id):
        raw = json.dumps({**body, "padding": "x" * (65 * 1024)})
        response = desk.client.open(
            path, method=method, data=raw, content_type="application/json", headers=getattr(desk, who)
        )
        assert_problem(response, 413)
    big_form = urlencode({"text": "x" * (65 * 1024)})
    for path in ("/slack/commands", "/slack/interactions"):
        response = desk.client.post(path, data=big_form, content_type="application/x-www-form-urlencoded")
        assert_problem(response, 413)
    assert desk.snapshot() == before


def test_a_chunked_body_without_a_length_is_cut_off_at_the_limit(desk: Desk) -> None:
    before = desk.snapshot()
    raw = json.dumps({"database": "main", "cidr": "8.8.4.4", "reason": "x" * (200 * 1024)}).encode()
    response = desk.client.post(
        "/access-requests",
        input_stream=io.BytesIO(raw),
        content_type="application/json",
        headers={**desk.alice, "Transfer-Encoding": "chunked"},
        # What a server such as gunicorn says of a chunked body it has de-chunked.
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert_problem(response, 413)
    assert desk.snapshot() == before


@pytest.mark.parametrize("depth", [33, 5000, 30_000])
def test_deeply_nested_json_is_a_400_on_every_endpoint(desk: Desk, depth: int) -> None:
    before = desk.snapshot()
    for who, method, path, body in bodies(desk.request_id):
        raw = '{"' + next(iter(body)) + '": ' + "[" * depth + "]" * depth + "}"
        response = desk.client.open(
            path, method=method, data=raw, content_type="application/json", headers=getattr(desk, who)
        )
        assert "nested" in assert_problem(response, 400)["detail"]
    assert desk.snapshot() == before


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/xml",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=xyz",
        "application/octet-stream",
        "text/json",
        "application/javascript",
    ],
)
def test_a_body_that_is_not_sent_as_json_is_a_415_on_every_endpoint(
    desk: Desk, content_type: str | None
) -> None:
    before = desk.snapshot()
    for who, method, path, body in bodies(desk.request_id):
        response = desk.client.open(
            path, method=method, data=json.dumps(body), content_type=content_type, headers=getattr(desk, who)
        )
        assert_problem(response, 415)
    assert desk.snapshot() == before


@pytest.mark.parametrize(
    "body", ['"main"', "[]", "null", "42", "true", '{"": ""}', '{"database": {"$ne": null}}']
)
def test_json_that_is_not_the_expected_object_is_a_422_on_every_endpoint(desk: Desk, body: str) -> None:
    before = desk.snapshot()
    for who, method, path, _ in bodies(desk.request_id):
        response = desk.client.open(
            path, method=method, data=body, content_type="application/json", headers=getattr(desk, who)
        )
        assert_problem(response, 422)
    assert desk.snapshot() == before
