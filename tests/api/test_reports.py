"""`/reports/access`: who could reach a database at a moment or over a window, around every boundary."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import pytest
from flask.testing import FlaskClient

from app.clock import ManualClock
from app.heroku.simulator import Simulator
from app.runtime import Runtime
from app.services import grants
from tests.conftest import TokenFactory

SETTINGS = grants.Settings(poll_interval=1)


class Desk:
    """People with tokens, and the steps that turn a request into a grant through the API and the worker."""

    def __init__(
        self, client: FlaskClient, token_for: TokenFactory, runtime: Runtime, simulator: Simulator
    ) -> None:
        self.client = client
        self.runtime = runtime
        self.token_for = token_for
        self.bob = token_for("bob", "approver")
        self.carol = token_for("carol", "approver")
        self.auditor = token_for("audra", "auditor")
        self.people: dict[str, dict[str, str]] = {}
        simulator.settings.authorize_after = 0

    def person(self, name: str) -> dict[str, str]:
        if name not in self.people:
            self.people[name] = self.token_for(name, "requester")
        return self.people[name]

    def ask(self, who: str, cidr: str, duration: str = "1h", reason: str = "INC-7", **headers: str) -> str:
        body = {"database": "main", "cidr": cidr, "duration": duration, "reason": reason}
        response = self.client.post("/access-requests", json=body, headers={**self.person(who), **headers})
        assert response.status_code == 201, response.get_json()
        request_id: str = response.get_json()["id"]
        return request_id

    def approve(self, request_id: str, *approvers: dict[str, str]) -> None:
        for headers in approvers or (self.bob,):
            response = self.client.post(f"/access-requests/{request_id}/approve", json={}, headers=headers)
            assert response.status_code == 200, response.get_json()

    def sweep(self) -> None:
        assert self.runtime.heroku is not None
        grants.sweep(
            self.runtime.sessions, heroku=self.runtime.heroku, clock=self.runtime.clock, settings=SETTINGS
        )

    def activate(self, request_id: str) -> dict[str, Any]:
        """Sweep (without moving the clock) until the request is active; its access starts now."""
        for _ in range(3):
            self.sweep()
            if self.show(request_id)["status"] == "active":
                break
        shown = self.show(request_id)
        assert shown["status"] == "active", shown
        return shown

    def grant(
        self, who: str, cidr: str, duration: str = "1h", *approvers: dict[str, str], **kwargs: Any
    ) -> dict[str, Any]:
        request_id = self.ask(who, cidr, duration, **kwargs)
        self.approve(request_id, *approvers)
        return self.activate(request_id)

    def show(self, request_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self.client.get(f"/access-requests/{request_id}", headers=self.bob).get_json()
        return body

    def revoke(self, request_id: str) -> dict[str, Any]:
        response = self.client.post(f"/access-requests/{request_id}/revoke", json={}, headers=self.admin())
        assert response.status_code == 200, response.get_json()
        body: dict[str, Any] = response.get_json()
        return body

    def admin(self) -> dict[str, str]:
        if "root" not in self.people:
            self.people["root"] = self.token_for("root", "admin")
        return self.people["root"]

    def report(self, headers: dict[str, str] | None = None, **query: Any) -> Any:
        args = {"database": "main"}
        args.update({key.rstrip("_"): _text(value) for key, value in query.items()})
        return self.client.get(f"/reports/access?{urlencode(args)}", headers=headers or self.auditor)

    def at(self, moment: datetime) -> list[dict[str, Any]]:
        response = self.report(at=moment)
        assert response.status_code == 200, response.get_json()
        found: list[dict[str, Any]] = response.get_json()["grants"]
        return found

    def between(self, start: datetime, end: datetime) -> list[dict[str, Any]]:
        response = self.report(from_=start, to=end)
        assert response.status_code == 200, response.get_json()
        found: list[dict[str, Any]] = response.get_json()["grants"]
        return found


def _text(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def moment(body: dict[str, Any], key: str) -> datetime:
    return datetime.fromisoformat(body[key])


def ids(found: list[dict[str, Any]]) -> list[str]:
    return [g["request_id"] for g in found]


@pytest.fixture
def desk(
    client: FlaskClient, token_for: TokenFactory, runtime: Runtime, simulator: Simulator, registered: Any
) -> Desk:
    registered()
    return Desk(client, token_for, runtime, simulator)


def test_a_grant_that_ended_exactly_at_the_moment_is_out_and_one_that_started_then_is_in(
    desk: Desk, clock: ManualClock
) -> None:
    ended = desk.grant("alice", "8.8.8.8", "1h")
    clock.set(moment(ended, "expires_at"))
    started = desk.grant("erin", "1.1.1.1", "1h")  # this sweep also expires the first
    ended = desk.show(ended["id"])
    assert ended["status"] == "expired"
    boundary = moment(ended, "ended_at")
    assert moment(started, "activated_at") == boundary

    assert ids(desk.at(boundary)) == [started["id"]]
    assert ids(desk.at(boundary - timedelta(microseconds=1))) == [ended["id"]]
    assert ids(desk.at(moment(ended, "activated_at"))) == [ended["id"]]
    assert desk.at(moment(ended, "activated_at") - timedelta(microseconds=1)) == []


def test_the_moment_report_keeps_live_grants_and_drops_revoked_pending_and_denied_ones(
    desk: Desk, clock: ManualClock
) -> None:
    start = clock.now()
    active = desk.grant("alice", "8.8.8.8", "4h")
    clock.advance(timedelta(minutes=10))
    revoked = desk.grant("erin", "1.1.1.1", "4h")
    clock.advance(timedelta(minutes=10))
    desk.revoke(revoked["id"])
    pending = desk.ask("frank", "9.9.9.9")
    denied = desk.ask("gina", "9.9.9.8")
    assert (
        desk.client.post(
            f"/access-requests/{denied}/deny", json={"reason": "no"}, headers=desk.bob
        ).status_code
        == 200
    )
    clock.advance(timedelta(minutes=10))
    desk.sweep()

    now = desk.at(clock.now())
    assert ids(now) == [active["id"]]
    assert now[0]["status"] == "active" and now[0]["granted_until"] is None
    assert now[0]["expires_at"] == active["expires_at"]
    assert ids(desk.at(start + timedelta(minutes=15))) == [active["id"], revoked["id"]]
    everything = desk.between(start - timedelta(days=1), start + timedelta(days=1))
    assert pending not in ids(everything) and denied not in ids(everything)
    assert ids(everything) == [active["id"], revoked["id"]]
    gone = everything[1]
    assert gone["status"] == "revoked" and gone["granted_until"] == desk.show(revoked["id"])["ended_at"]


def test_a_window_lists_every_grant_that_overlapped_it_and_no_grant_that_only_touched_it(
    desk: Desk, clock: ManualClock
) -> None:
    first = desk.grant("alice", "8.8.8.8", "1h")
    clock.advance(timedelta(minutes=30))
    second = desk.grant("erin", "1.1.1.1", "1h")
    clock.advance(timedelta(minutes=30))
    desk.sweep()  # the first expires
    first = desk.show(first["id"])
    clock.advance(timedelta(hours=1))
    third = desk.grant("frank", "9.9.9.9", "1h")
    first_end, third_start = moment(first, "ended_at"), moment(third, "activated_at")
    second_start = moment(second, "activated_at")

    assert ids(desk.between(first_end - timedelta(hours=2), third_start)) == [first["id"], second["id"]]
    assert ids(desk.between(first_end, third_start)) == [second["id"]]
    assert ids(desk.between(first_end, third_start + timedelta(seconds=1))) == [second["id"], third["id"]]
    assert desk.between(first_end - timedelta(hours=3), moment(first, "activated_at")) == []
    assert ids(desk.between(second_start - timedelta(seconds=1), second_start)) == [first["id"]]


def test_grants_starting_together_are_ordered_by_network(desk: Desk, clock: ManualClock) -> None:
    cidrs = ["9.9.9.9", "11.0.0.1", "1.1.1.1", "23.0.0.0/28", "8.8.8.8", "101.0.0.1"]
    asked = [desk.ask(f"user{n}", cidr) for n, cidr in enumerate(cidrs)]
    for request_id in asked:
        desk.approve(request_id)
    for request_id in asked:
        desk.activate(request_id)

    found = desk.at(clock.now())
    assert [g["cidr"] for g in found] == [
        "1.1.1.1/32",
        "8.8.8.8/32",
        "9.9.9.9/32",
        "11.0.0.1/32",
        "23.0.0.0/28",
        "101.0.0.1/32",
    ]
    assert len({g["granted_from"] for g in found}) == 1
    clock.advance(1)
    desk.grant("zed", "1.0.0.1")
    assert desk.at(clock.now())[-1]["cidr"] == "1.0.0.1/32"  # a later start sorts after every CIDR


def test_who_could_reach_main_last_tuesday_at_two_and_who_approved_it(
    client: FlaskClient,
    token_for: TokenFactory,
    runtime: Runtime,
    simulator: Simulator,
    registered: Any,
    clock: ManualClock,
) -> None:
    registered(approvals_required=2, auto_approve=[{"users": ["dave"], "max_duration": "1h"}])
    desk = Desk(client, token_for, runtime, simulator)
    today = clock.now()
    last_tuesday = (today - timedelta(days=(today.weekday() - 1) % 7 or 7)).replace(hour=14, minute=0)
    assert last_tuesday.weekday() == 1 and last_tuesday < today

    clock.set(last_tuesday - timedelta(hours=1))
    slackbot = desk.token_for("slackbot", "bot")
    desk.person("alice")
    by_bot = desk.client.post(
        "/access-requests",
        json={"database": "main", "cidr": "8.8.8.8", "duration": "2h", "reason": "INC-42 slow query"},
        headers={**slackbot, "X-On-Behalf-Of": "alice"},
    ).get_json()["id"]
    desk.approve(by_bot, desk.bob, desk.carol)
    desk.activate(by_bot)
    ended_before = desk.ask("erin", "1.1.1.1", "1h")
    desk.approve(ended_before, desk.bob, desk.carol)
    desk.activate(ended_before)
    clock.set(last_tuesday - timedelta(minutes=30))
    extended = desk.client.post(
        f"/access-requests/{by_bot}/extend", json={"duration": "1h"}, headers=desk.person("alice")
    )
    assert extended.status_code == 200 and extended.get_json()["pending_extension"] == "PT1H"
    desk.approve(by_bot, desk.carol, desk.bob)
    clock.set(last_tuesday - timedelta(minutes=5))
    desk.revoke(ended_before)
    by_policy = desk.activate(desk.ask("dave", "9.9.9.9", "1h", reason="deploy"))
    clock.set(today)  # back to now: the worker closes everything that ran out meanwhile
    desk.sweep()
    desk.sweep()

    answer = desk.report(at=last_tuesday.isoformat())
    assert answer.status_code == 200
    body = answer.get_json()
    assert body["database"] == "main" and moment(body, "at") == last_tuesday and "from" not in body
    who = {
        g["cidr"]: (g["requester"], g["filed_by"], g["approvers"], g["approved_by_policy"])
        for g in body["grants"]
    }
    assert who == {
        "8.8.8.8/32": ("alice", "slackbot", ["bob", "carol"], False),
        "9.9.9.9/32": ("dave", None, [], True),
    }
    alice = body["grants"][0]
    assert alice["request_id"] == by_bot and alice["extension_approvers"] == ["carol", "bob"]
    assert alice["reason"] == "INC-42 slow query" and alice["status"] == "expired"
    assert moment(alice, "granted_from") == last_tuesday - timedelta(hours=1)
    assert moment(alice, "granted_until") == today  # expired when the worker next ran
    assert moment(alice, "expires_at") == last_tuesday + timedelta(hours=2)
    assert moment(alice, "rule_authorized_at") == last_tuesday - timedelta(hours=1)
    assert moment(alice, "rule_deleted_at") >= today
    assert body["grants"][1]["request_id"] == by_policy["id"]


def test_the_csv_report_has_one_row_per_grant_and_defuses_formulas(
    client: FlaskClient,
    token_for: TokenFactory,
    runtime: Runtime,
    simulator: Simulator,
    registered: Any,
    clock: ManualClock,
) -> None:
    registered(approvals_required=2)
    desk = Desk(client, token_for, runtime, simulator)
    first = desk.grant("alice", "8.8.8.8", "1h", desk.bob, desk.carol, reason='=HYPERLINK("http://x") INC-9')
    clock.advance(60)
    second = desk.grant("erin", "1.1.1.1", "1h", desk.carol, desk.bob)["id"]

    response = desk.report({**desk.auditor, "Accept": "text/csv"}, at=clock.now())

    assert response.status_code == 200 and response.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))
    assert list(rows[0]) == [
        "cidr",
        "request_id",
        "requester",
        "filed_by",
        "reason",
        "approvers",
        "approved_by_policy",
        "extension_approvers",
        "granted_from",
        "granted_until",
        "expires_at",
        "status",
        "rule_authorized_at",
        "rule_deleted_at",
    ]
    assert [r["request_id"] for r in rows] == [first["id"], second]
    assert rows[0]["reason"] == '\'=HYPERLINK("http://x") INC-9'
    assert rows[0]["approvers"] == "bob;carol" and rows[1]["approvers"] == "carol;bob"
    assert rows[0]["approved_by_policy"] == "false" and rows[0]["granted_until"] == ""
    assert rows[0]["granted_from"] == first["activated_at"] and rows[0]["status"] == "active"
    window = desk.report(
        {**desk.auditor, "Accept": "text/csv"}, from_=clock.now(), to=clock.now() + timedelta(hours=1)
    )
    assert len(list(csv.DictReader(io.StringIO(window.get_data(as_text=True))))) == 2
    refused = desk.report({**desk.auditor, "Accept": "application/xml"}, at=clock.now())
    assert refused.status_code == 406 and refused.content_type == "application/problem+json"


def test_a_window_report_echoes_its_bounds(desk: Desk) -> None:
    response = desk.report(from_="2026-01-05T08:00:00Z", to="2026-01-05T10:00:00+01:00")
    body = response.get_json()
    assert response.status_code == 200
    assert body == {
        "database": "main",
        "from": "2026-01-05T08:00:00+00:00",
        "to": "2026-01-05T09:00:00+00:00",
        "grants": [],
    }


def test_only_auditors_and_admins_may_read_reports(desk: Desk) -> None:
    desk.grant("alice", "8.8.8.8")
    for role in ("requester", "approver"):
        headers = desk.token_for(f"u-{role}", role)
        for accept in ("application/json", "text/csv"):
            response = desk.report({**headers, "Accept": accept}, at="2026-01-05T09:00:00Z")
            assert response.status_code == 403, (role, accept)
            assert response.content_type == "application/problem+json"
    assert desk.report(desk.admin(), at="2026-01-05T09:00:00Z").status_code == 200


def test_an_unknown_database_is_404(desk: Desk) -> None:
    response = desk.report(database="nope", at="2026-01-05T09:00:00Z")
    assert response.status_code == 404
    assert response.get_json()["code"] == "database_not_found"


@pytest.mark.parametrize(
    "query",
    [
        {},
        {"at": "2026-01-05T09:00:00Z", "from_": "2026-01-05T08:00:00Z", "to": "2026-01-05T10:00:00Z"},
        {"at": "2026-01-05T09:00:00Z", "to": "2026-01-05T10:00:00Z"},
        {"from_": "2026-01-05T08:00:00Z"},
        {"to": "2026-01-05T08:00:00Z"},
        {"from_": "2026-01-05T10:00:00Z", "to": "2026-01-05T10:00:00Z"},
        {"from_": "2026-01-05T10:00:00Z", "to": "2026-01-05T09:00:00Z"},
        {"at": "last tuesday"},
        {"at": "2026-01-05T09:00:00Z", "database": ""},
        {"start": "2026-01-05T08:00:00Z", "end": "2026-01-05T10:00:00Z"},  # the names are from/to
    ],
)
def test_a_query_that_is_not_exactly_one_form_is_a_422_problem(desk: Desk, query: dict[str, str]) -> None:
    response = desk.report(**query)
    assert response.status_code == 422, response.get_json()
    assert response.content_type == "application/problem+json"
    assert response.get_json()["errors"]


def test_a_query_without_a_database_is_a_422_problem(desk: Desk) -> None:
    response = desk.client.get("/reports/access?at=2026-01-05T09:00:00Z", headers=desk.auditor)
    assert response.status_code == 422
    assert "database" in response.get_json()["errors"]


def test_a_missing_timestamp_zone_is_read_as_utc(desk: Desk, clock: ManualClock) -> None:
    granted = desk.grant("alice", "8.8.8.8")
    naive = moment(granted, "activated_at").astimezone(UTC).replace(tzinfo=None)
    assert ids(desk.at(naive)) == [granted["id"]]
