"""`/audit-events`: filters, cursor pages, and CSV / NDJSON exports of the whole selection."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from flask.testing import FlaskClient

from app.clock import ManualClock
from tests.conftest import TokenFactory


def walk(client: FlaskClient, headers: dict[str, str], query: str = "") -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    cursor = None
    while True:
        url = f"/audit-events?limit=2{query}" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(url, headers=headers).get_json()
        events.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return events


def populate(
    client: FlaskClient, token_for: TokenFactory, registered: Any, clock: ManualClock
) -> dict[str, Any]:
    registered()
    alice, bob = token_for("alice", "requester"), token_for("bob", "approver")
    ids = []
    for cidr in ("8.8.8.8", "8.8.4.4", "1.1.1.1"):
        clock.advance(60)
        body = {"database": "main", "cidr": cidr, "reason": '=HYPERLINK("http://x") INC-9'}
        ids.append(client.post("/access-requests", json=body, headers=alice).get_json()["id"])
    clock.advance(60)
    client.post(f"/access-requests/{ids[0]}/approve", json={"comment": "ok"}, headers=bob)
    client.post(f"/access-requests/{ids[1]}/deny", json={"reason": "no"}, headers=bob)
    client.post(f"/access-requests/{ids[2]}/cancel", json={}, headers=alice)
    return {"ids": ids, "auditor": token_for("audra", "auditor")}


def test_filters_select_events_by_request_actor_database_action_and_time(
    client: FlaskClient, token_for: TokenFactory, registered: Any, clock: ManualClock
) -> None:
    data = populate(client, token_for, registered, clock)
    auditor = data["auditor"]
    first = data["ids"][0]

    by_request = walk(client, auditor, f"&request_id={first}")
    assert [e["action"] for e in by_request] == ["access_request:create", "access_request:approve"]
    assert all(e["request_id"] == first for e in by_request)
    assert {e["actor"] for e in walk(client, auditor, "&actor=bob")} == {"bob"}
    assert len(walk(client, auditor, "&actor=bob")) == 2
    assert [e["action"] for e in walk(client, auditor, "&action=access_request:deny")] == [
        "access_request:deny"
    ]
    assert len(walk(client, auditor, "&database=main")) == 7  # register + 3 creates + 3 decisions

    start = "2026-01-05T09:01:00%2B00:00"
    end = "2026-01-05T09:03:00%2B00:00"
    windowed = walk(client, auditor, f"&since={start}&until={end}")
    assert [e["action"] for e in windowed] == ["access_request:create", "access_request:create"]
    assert client.get("/audit-events?since=yesterday", headers=auditor).status_code == 422
    assert client.get("/audit-events?request_id=42", headers=auditor).status_code == 422


def test_cursor_pages_cover_every_event_once_even_while_events_arrive(
    client: FlaskClient, token_for: TokenFactory, registered: Any, clock: ManualClock
) -> None:
    data = populate(client, token_for, registered, clock)
    auditor = data["auditor"]
    all_at_once = client.get("/audit-events?limit=200", headers=auditor).get_json()["items"]

    first_page = client.get("/audit-events?limit=3", headers=auditor).get_json()
    client.post(
        "/access-requests",
        json={"database": "main", "cidr": "9.9.9.9", "reason": "later"},
        headers=token_for("alice", "requester"),
    )
    rest = walk_from(client, auditor, first_page["next_cursor"])

    ids = [e["id"] for e in first_page["items"] + rest]
    assert ids == sorted(set(ids))
    assert ids[: len(all_at_once)] == [e["id"] for e in all_at_once]
    assert rest[-1]["action"] == "access_request:create" and rest[-1]["details"]["cidr"] == "9.9.9.9/32"
    assert client.get("/audit-events?cursor=%%%", headers=auditor).status_code == 422


def walk_from(client: FlaskClient, headers: dict[str, str], cursor: str | None) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while cursor:
        page = client.get(f"/audit-events?limit=2&cursor={cursor}", headers=headers).get_json()
        events.extend(page["items"])
        cursor = page["next_cursor"]
    return events


def test_csv_export_streams_the_whole_selection_and_defuses_formulas(
    client: FlaskClient, token_for: TokenFactory, registered: Any, clock: ManualClock
) -> None:
    data = populate(client, token_for, registered, clock)
    response = client.get("/audit-events?database=main", headers={**data["auditor"], "Accept": "text/csv"})

    assert response.status_code == 200
    assert response.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))
    assert len(rows) == 7
    assert list(rows[0]) == [
        "seq",
        "id",
        "occurred_at",
        "actor",
        "on_behalf_of",
        "source",
        "action",
        "request_id",
        "database",
        "details",
        "prev_hash",
        "hash",
    ]
    assert [int(r["seq"]) for r in rows] == sorted(int(r["seq"]) for r in rows)
    creates = [r for r in rows if r["action"] == "access_request:create"]
    assert json.loads(creates[0]["details"])["reason"].startswith("=HYPERLINK")
    assert creates[0]["request_id"] == data["ids"][0]
    approve = next(r for r in rows if r["action"] == "access_request:approve")
    assert approve["actor"] == "bob" and approve["occurred_at"].endswith("+00:00")


def test_ndjson_export_is_one_event_per_line(
    client: FlaskClient, token_for: TokenFactory, registered: Any, clock: ManualClock
) -> None:
    data = populate(client, token_for, registered, clock)
    response = client.get(
        "/audit-events?actor=alice", headers={**data["auditor"], "Accept": "application/x-ndjson"}
    )
    assert response.mimetype == "application/x-ndjson"
    lines = [json.loads(line) for line in response.get_data(as_text=True).splitlines()]
    assert [e["action"] for e in lines] == ["access_request:create"] * 3 + ["access_request:cancel"]


def test_a_cell_that_starts_like_a_formula_is_quoted() -> None:
    from app.api.audit_events import _cell

    assert _cell("=1+1") == "'=1+1"
    assert _cell("@SUM(A1)") == "'@SUM(A1)"
    assert _cell("alice") == "alice"
    assert _cell(None) == ""


def test_requesters_and_approvers_cannot_read_the_audit_log(
    client: FlaskClient, token_for: TokenFactory
) -> None:
    for role in ("requester", "approver"):
        headers = token_for(f"u-{role}", role)
        assert client.get("/audit-events", headers=headers).status_code == 403
        assert client.get("/audit-events", headers={**headers, "Accept": "text/csv"}).status_code == 403
