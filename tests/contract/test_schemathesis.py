"""Contract fuzzing: Schemathesis drives every operation of openapi.yaml against the real app and database.

The module seeds one world (two registered databases, people in every role, access requests in most
states) and grounds generated path parameters, filters, bodies and X-On-Behalf-Of in it, so cases also reach
real objects. Every response is held to the document with all of Schemathesis's checks: no 5xx, only
documented status codes, content types, headers and bodies (errors as application/problem+json),
authentication enforced, invalid data refused, and valid data not refused for reasons the document does not
state. Generation is derandomized with a fixed seed, so a run repeats exactly.

    .venv/bin/pytest tests/contract
"""

from __future__ import annotations

import re
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, settings

from app import create_app
from app.clock import ManualClock
from app.config import Config
from app.heroku.simulator import Simulator
from app.runtime import Runtime, build_runtime
from app.services import grants, tokens
from tests.conftest import SIM_TOKEN, empty_tables, sim_client

SPEC = Path(__file__).resolve().parents[2] / "openapi.yaml"
SLACK_SECRET = "contract-test-slack-secret"
SWEEP = grants.Settings(poll_interval=1)

# The user each operation is sent as: one the role rules let in, so generated data reaches the service
# layer. Every other role, and callers without a valid token, have their own test below.
ACTOR_BY_OPERATION = {
    "POST /databases": "root",
    "PATCH /databases/{name}": "root",
    "POST /access-requests/{request_id}/approve": "bob",
    "POST /access-requests/{request_id}/deny": "bob",
    "GET /audit-events": "audrey",
    "GET /audit-events/verify": "audrey",
    "GET /reports/access": "audrey",
    "GET /metrics": "root",
}
DEFAULT_ACTOR = "alice"
PEOPLE = {
    "root": ("admin",),
    "audrey": ("auditor",),
    "alice": ("requester",),
    "bob": ("approver",),
    "carol": ("requester", "approver"),
    "deploybot": ("bot",),
}
BOT = "deploybot"

# Drawbridge answers 422 for rules JSON Schema cannot state, so schema-valid input may still rightly be
# refused there: an opaque cursor it did not issue, a database or Heroku add-on that does not exist, a CIDR
# that is not public IPv4 or wider than the policy allows, a duration outside the policy's bounds, a reason
# not matching the policy's pattern, text with control or unassigned Unicode characters (a category test no
# JSON Schema regex dialect shares), a policy naming no approver, `at` given together with `from`/`to`, and
# an Idempotency-Key reused with another body. Operations that have no such rule must accept valid input.
SEMANTIC_422 = (
    "GET /access-requests",
    "POST /access-requests",
    "POST /access-requests/{request_id}/approve",
    "POST /access-requests/{request_id}/deny",
    "POST /access-requests/{request_id}/cancel",
    "POST /access-requests/{request_id}/revoke",
    "POST /access-requests/{request_id}/extend",
    "GET /audit-events",
    "POST /databases",
    "PATCH /databases/{name}",
    "GET /reports/access",
)
# positive_data_acceptance's own default, plus 422 where the rules above apply; 5xx is judged by
# not_a_server_error.
ACCEPTED_VALID = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
# negative_data_rejection's own default, plus 413: a generated body over the documented 64 KiB limit is
# refused for its size before its content is read.
REJECTED_INVALID = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
# /readyz exists to answer 503 while the process cannot serve (no database, or no worker sweeping; this
# test runs no worker), so there 503 is the documented answer rather than a server error.
READINESS = "GET /readyz"


def contract_config(*, mode: str, max_examples: int, coverage: bool) -> schemathesis.Config:
    """Deterministic generation (derandomized Hypothesis, fixed seed, no example database)."""
    return schemathesis.Config.from_dict(
        {
            "seed": 20260105,
            "generation": {
                "mode": mode,
                "max-examples": max_examples,
                "deterministic": True,
                "database": "none",
            },
            "phases": {"coverage": {"enabled": coverage}, "stateful": {"enabled": False}},
            "checks": {"negative_data_rejection": {"expected-statuses": REJECTED_INVALID}},
            "operations": [
                {
                    "include-name": list(SEMANTIC_422),
                    "checks": {"positive_data_acceptance": {"expected-statuses": [*ACCEPTED_VALID, "422"]}},
                },
                {
                    "include-name": READINESS,
                    "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]}},
                },
            ],
        }
    )


@dataclass
class World:
    """What one test runs against: the app, a token per person, and the objects seeded into it."""

    app: Flask
    auth: dict[str, dict[str, str]]
    request_ids: list[str] = field(default_factory=list)
    database_names: list[str] = field(default_factory=list)
    revoked: dict[str, str] = field(default_factory=dict)


class LiveApp:
    """The WSGI app of the running module. A schema loaded from a file is bound to one app object when the
    module is imported, and this one forwards to the app the `world` fixture seeded."""

    def __init__(self) -> None:
        self.world: World | None = None

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        assert self.world is not None, "the `world` fixture is not active"
        return self.world.app(environ, start_response)


LIVE = LiveApp()
ON_BEHALF_OF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
CIDRS = ["8.8.8.8", "1.1.1.0/28", "9.9.9.9/32", "auto"]
DURATIONS = ["1h", "PT30M", "90m"]


def build_schema(config: schemathesis.Config) -> Any:
    """openapi.yaml as committed (tests/api/test_openapi.py holds it equal to what the code serves)."""
    loaded = schemathesis.openapi.from_path(SPEC, config=config)
    loaded.app = LIVE
    return loaded


schema = build_schema(contract_config(mode="all", max_examples=25, coverage=True))
positive_schema = build_schema(contract_config(mode="positive", max_examples=3, coverage=False))


def _actor(label: str) -> str:
    return ACTOR_BY_OPERATION.get(label, DEFAULT_ACTOR)


def _is_uuid(value: Any) -> bool:
    try:
        uuid.UUID(value)
    except (TypeError, ValueError, AttributeError):
        return False
    return True


def _is_text(value: Any, longest: int) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= longest


class Grounding:
    """Swaps generated values for the world's real ones in about half of the cases, chosen from the case's
    own content so a run is repeatable. Only values that already satisfy their schema are swapped, for
    others of the same kind, so a case that is invalid stays invalid in the same way and one that is valid
    stays valid (Schemathesis judges the answer by how the case was generated)."""

    def __init__(self, case: Any, world: World) -> None:
        self.case = case
        self.world = world
        body = case.body if isinstance(case.body, dict | list | str | int | float | bool) else None
        self.seed = zlib.crc32(repr((case.path_parameters, case.query, body, case.headers)).encode())

    def choose(self, key: str, value: Any, real: list[str], *, keep: float = 0.5) -> Any:
        """`value` with probability `keep`, else one of `real`; a value already real stays (a case may be
        sent again, as when Hypothesis replays a failure)."""
        draw = zlib.crc32(key.encode(), self.seed)
        if not real or value in real or draw % 100 < keep * 100:
            return value
        return real[draw // 100 % len(real)]

    def apply(self) -> None:
        case, world = self.case, self.world
        path = case.path_parameters or {}
        if _is_uuid(path.get("request_id")):
            path["request_id"] = self.choose("request_id", path["request_id"], world.request_ids)
        if _is_text(path.get("name"), 1000):
            path["name"] = self.choose("name", path["name"], world.database_names)
        query = case.query or {}
        if _is_text(query.get("database"), 63):
            query["database"] = self.choose("query.database", query["database"], world.database_names)
        body = case.body
        if isinstance(body, dict):
            if _is_text(body.get("database"), 63):
                body["database"] = self.choose("database", body["database"], world.database_names)
            if _is_text(body.get("cidr"), 43):
                body["cidr"] = self.choose("cidr", body["cidr"], CIDRS)
            if _is_text(body.get("duration"), 40):
                body["duration"] = self.choose("duration", body["duration"], DURATIONS)
        headers = case.headers or {}
        on_behalf = headers.get("X-On-Behalf-Of")
        if isinstance(on_behalf, str) and ON_BEHALF_OF.match(on_behalf):
            # A bot acts for the operation's usual actor, so impersonation reaches the same code paths.
            headers["X-On-Behalf-Of"] = self.choose(
                "on_behalf", on_behalf, [_actor(case.operation.label)], keep=0.2
            )


def _post(client: FlaskClient, path: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    response = client.post(path, json=body, headers=headers)
    assert response.status_code in (200, 201), (path, response.get_json())
    created: dict[str, Any] = response.get_json()
    return created


def _sweep(runtime: Runtime) -> None:
    assert runtime.heroku is not None
    for _ in range(2):
        grants.sweep(runtime.sessions, heroku=runtime.heroku, clock=runtime.clock, settings=SWEEP)


@pytest.fixture(scope="module")
def world(postgres_url: str) -> Iterator[World]:
    """One world for the module, seeded once; the operations then change it as they run, in the
    document's order. Databases `main` (self-extension up to an hour) and `strict` (two approvals, a
    reason pattern, named approvers, auto-approval for carol); alice's requests pending, approved, active,
    active with an extension waiting, expired, revoked, denied and cancelled; one filed by a bot; carol's
    pending on `strict`; and a revoked token."""
    clock = ManualClock()
    simulator = Simulator(clock=clock, token=SIM_TOKEN)
    simulator.settings.authorize_after = 0
    config = Config(
        database_url=postgres_url,
        min_duration=60,
        slack_signing_secret=SLACK_SECRET,
        rate_limit="1000000/minute",
    )
    runtime = build_runtime(config, clock=clock, heroku=sim_client(simulator))
    empty_tables(runtime)
    app = create_app(runtime=runtime)
    app.config["TESTING"] = True
    client = app.test_client()
    auth: dict[str, dict[str, str]] = {}
    with runtime.sessions() as session:
        for name, roles in PEOPLE.items():
            _, secret = tokens.create_token(session, user_name=name, roles=roles, clock=clock)
            auth[name] = {"Authorization": f"Bearer {secret}"}
        row, revoked = tokens.create_token(session, user_name="zed", roles=["admin"], clock=clock)
        tokens.revoke_token(session, token=row.id, clock=clock)
    root, alice, bob = auth["root"], auth["alice"], auth["bob"]
    for name, addon, policy in (
        ("main", "postgresql-curved-12345", {"max_live_per_user": 100, "self_extension": "1h"}),
        (
            "strict",
            "postgresql-strict-67890",
            {
                "approvals_required": 2,
                "reason_pattern": "INC-[0-9]+",
                "approvers": {"roles": ["approver"]},
                "auto_approve": [{"users": ["carol"], "max_duration": "1h"}],
                "warn_before": "10m",
            },
        ),
    ):
        simulator.add_addon(app="acme-api", name=addon)
        _post(client, "/databases", {"name": name, "app": "acme-api", "addon": addon, **policy}, root)
    ids: dict[str, str] = {}

    def ask(key: str, cidr: str, duration: str = "2h", who: dict[str, str] = alice) -> str:
        body = {"database": "main", "cidr": cidr, "duration": duration, "reason": f"INC-1 {key}"}
        ids[key] = _post(client, "/access-requests", body, who)["id"]
        return ids[key]

    expiring = ask("expired", "8.8.4.4", duration="1m")
    _post(client, f"/access-requests/{expiring}/approve", {}, bob)
    _sweep(runtime)
    clock.advance(timedelta(minutes=5))
    _sweep(runtime)
    for key, cidr in (("active", "1.1.1.1"), ("extending", "1.0.0.1"), ("revoked", "9.9.9.9")):
        _post(client, f"/access-requests/{ask(key, cidr)}/approve", {"comment": "ok"}, bob)
    _sweep(runtime)
    _post(client, f"/access-requests/{ids['extending']}/extend", {"duration": "3h"}, alice)
    _post(client, f"/access-requests/{ids['revoked']}/revoke", {"reason": "done"}, alice)
    _post(client, f"/access-requests/{ask('approved', '4.2.2.2')}/approve", {}, bob)
    _post(client, f"/access-requests/{ask('denied', '4.4.4.4')}/deny", {"reason": "no ticket"}, bob)
    _post(client, f"/access-requests/{ask('cancelled', '5.5.5.5')}/cancel", {}, alice)
    ask("pending", "8.8.8.8")
    ask("pending-2", "64.6.64.0/28")
    ask("filed-by-bot", "64.6.65.6", who={**auth[BOT], "X-On-Behalf-Of": "alice"})
    ids["strict"] = _post(
        client,
        "/access-requests",
        {"database": "strict", "cidr": "8.8.8.8", "duration": "2h", "reason": "INC-2 strict"},
        auth["carol"],
    )["id"]
    seeded = World(
        app=app,
        auth=auth,
        request_ids=list(ids.values()),
        database_names=["main", "strict"],
        revoked={"Authorization": f"Bearer {revoked}"},
    )
    LIVE.world = seeded
    yield seeded
    LIVE.world = None
    empty_tables(runtime)
    runtime.close()


def _is_public(case: Any) -> bool:
    operation = case.operation
    return (
        operation.schema.raw_schema["paths"][operation.path][operation.method.lower()].get("security") == []
    )


def _headers_for(case: Any, world: World) -> dict[str, str]:
    # A case generated without valid credentials on purpose (negative mode on the security scheme) is sent as
    # generated, so it must be refused.
    if _is_public(case) or case.operation.schema.is_security_param_negated(case):
        return {}
    if case.headers and "X-On-Behalf-Of" in case.headers:
        return world.auth[BOT]
    return world.auth[_actor(case.operation.label)]


@schema.parametrize()
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_every_operation_keeps_its_contract(case: Any, world: World) -> None:
    """Examples, coverage cases (boundaries, missing headers, unexpected methods) and fuzzed cases, valid and
    invalid, each sent as a caller the role rules let in, and held to every built-in check."""
    Grounding(case, world).apply()
    response = case.call_and_validate(headers=_headers_for(case, world))
    if case.operation.label == "POST /access-requests" and response.status_code == 201:
        world.request_ids.append(response.json()["id"])


CALLERS = [*PEOPLE, "no token", "malformed token", "unknown token", "revoked token"]
REFUSED = {
    "no token": {},
    "malformed token": {"Authorization": "Basic dXNlcjpwYXNz"},
    "unknown token": {"Authorization": "Bearer dbt_000000000000_not-a-secret"},
}


@pytest.mark.parametrize("caller", CALLERS)
@positive_schema.parametrize()
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_every_caller_gets_a_documented_answer(case: Any, world: World, caller: str) -> None:
    """Valid cases sent by every role get documented answers; without a valid token (none, not Bearer,
    unknown, revoked) every bearer operation answers 401 with a Bearer challenge."""
    public = _is_public(case)
    Grounding(case, world).apply()
    if caller in PEOPLE:
        headers = world.auth[caller]
    else:
        headers = world.revoked if caller == "revoked token" else REFUSED[caller]
    if case.headers and not public:
        case.headers.pop("Authorization", None)
    response = case.call(headers=headers)
    case.validate_response(response, headers=headers)
    if caller not in PEOPLE and not public:
        assert response.status_code == 401, response.text
        assert response.headers["content-type"] == ["application/problem+json"]
        assert response.headers["www-authenticate"][0].startswith("Bearer")
