"""Bearer tokens and the Heroku API token never appear in logs, answers or stored rows, whatever happens:
bad and good tokens, Heroku failing, worker sweeps meeting faults, rate limiting and unexpected errors.

Every logger is captured at DEBUG (SQLAlchemy's statements and parameters and httpx's included), and the
captured text, every record's fields, every answer and every table are searched for the secrets.
"""

from __future__ import annotations

import base64
import logging
import secrets
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import text

from app import create_app
from app.clock import ManualClock
from app.config import Config
from app.db import Base
from app.heroku.client import HerokuClient
from app.heroku.simulator import SimAddon, Simulator, SimulatorTransport
from app.runtime import Runtime, build_runtime
from app.services import grants, tokens
from tests.conftest import empty_tables
from tests.worker.conftest import SETTINGS

HEROKU_TOKEN = f"hrku-{secrets.token_hex(20)}"


@pytest.fixture
def config(database_url: str) -> Config:
    return Config(database_url=database_url, min_duration=60, heroku_api_token=HEROKU_TOKEN)


@pytest.fixture
def simulator(clock: ManualClock) -> Simulator:
    sim = Simulator(clock=clock, token=HEROKU_TOKEN)
    sim.settings.authorize_after = 30
    return sim


@pytest.fixture
def runtime(config: Config, clock: ManualClock, simulator: Simulator) -> Iterator[Runtime]:
    heroku = HerokuClient(
        token=HEROKU_TOKEN,
        api_url="http://api.heroku.test",
        data_api_url="http://data.heroku.test",
        transport=SimulatorTransport(app=simulator),
        sleep=lambda seconds: None,
    )
    rt = build_runtime(config, clock=clock, heroku=heroku)
    rt.simulator = simulator
    empty_tables(rt)
    yield rt
    rt.close()


@pytest.fixture
def every_log(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    """Every logger that exists, and every one made later, at DEBUG and reaching the capture."""
    caplog.set_level(logging.DEBUG)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger):
            caplog.set_level(logging.DEBUG, logger=name)
            monkeypatch.setattr(logger, "propagate", True)
            monkeypatch.setattr(logger, "disabled", False)
    return caplog


class Recorder:
    """A test client whose every answer is kept for the search."""

    def __init__(self, client: FlaskClient) -> None:
        self.client = client
        self.answers: list[str] = []

    def __call__(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.client.open(path, method=method, **kwargs)
        self.answers.append(f"{response.status} {dict(response.headers)} {response.get_data(as_text=True)}")
        return response


def stored_text(runtime: Runtime) -> str:
    with runtime.engine.connect() as conn:
        return "\n".join(
            row[0]
            for table in Base.metadata.sorted_tables
            for row in conn.execute(text(f"SELECT CAST(t AS text) FROM {table.name} AS t"))
        )


def test_no_token_or_heroku_credential_leaks_anywhere(
    client: FlaskClient,
    runtime: Runtime,
    simulator: Simulator,
    addon: SimAddon,
    clock: ManualClock,
    token_for: Callable[..., dict[str, str]],
    every_log: pytest.LogCaptureFixture,
) -> None:
    call = Recorder(client)
    admin = token_for("root", "admin", "auditor")
    alice = token_for("alice", "requester")
    bob = token_for("bob", "approver")
    bot = token_for("chatops", "bot")
    revoked = token_for("mallory", "requester")
    with runtime.sessions() as session:
        tokens.revoke_token(session, token=revoked["Authorization"].split(" ")[1], clock=clock)
    alice_id = alice["Authorization"].split("_")[1]
    wrong_secret = secrets.token_urlsafe(32)
    bearer_secrets = [h["Authorization"].split("_", 2)[2] for h in (admin, alice, bob, bot, revoked)]
    bearer_secrets.append(wrong_secret)
    alice_secret = alice["Authorization"].removeprefix("Bearer ")

    # Tokens that do not authenticate, and tokens sent where they do not belong.
    for headers in (
        {},
        {"Authorization": f"Bearer dbt_{alice_id}_{wrong_secret}"},
        {"Authorization": f"Bearer {wrong_secret}"},
        {"Authorization": f"Token {alice_secret}"},
        {"Authorization": "Basic " + base64.b64encode(f"alice:{alice_secret}".encode()).decode()},
        revoked,
        {**bot, "X-On-Behalf-Of": f"Bearer {alice_secret}"},
        {**alice, "X-On-Behalf-Of": "bob"},
    ):
        assert call("GET", "/access-requests", headers=headers).status_code in (401, 403, 422)
    misplaced = {**alice, "Idempotency-Key": f"{alice_secret}\x01"}
    assert call("POST", "/access-requests", json={}, headers=misplaced).status_code == 422

    # Heroku failing while a database is registered, then succeeding.
    body = {"name": "main", "app": addon.app_name, "addon": addon.name}
    simulator.script("addon_lookup", "500", "503", "500")
    assert call("POST", "/databases", json=body, headers=admin).status_code in (502, 503)
    simulator.script("addon_lookup", "429", "429", "429")
    assert call("POST", "/databases", json=body, headers=admin).status_code in (502, 503)
    assert (
        call("POST", "/databases", json={**body, "addon": "no-such-addon"}, headers=admin).status_code < 500
    )
    assert call("POST", "/databases", json=body, headers=admin).status_code == 201

    # Requests asked, approved, filed by a bot, swept by the worker through faults, revoked and deleted.
    ids = []
    for cidr, who in (("8.8.8.8", alice), ("8.8.4.4", {**bot, "X-On-Behalf-Of": "alice"})):
        created = call(
            "POST",
            "/access-requests",
            json={"database": "main", "cidr": cidr, "reason": "INC-1"},
            headers=who,
        )
        assert created.status_code == 201, created.get_json()
        ids.append(created.get_json()["id"])
        assert call("POST", f"/access-requests/{ids[-1]}/approve", json={}, headers=bob).status_code == 200
    assert runtime.heroku is not None
    simulator.script("ip_rule_create", "ambiguous_500", "timeout", "503")
    simulator.script("ip_rules_list", "500", "429")
    simulator.settings.fault_rate = 0.3
    simulator.settings.seed = 7
    for _ in range(60):
        grants.sweep(
            runtime.sessions, heroku=runtime.heroku, clock=clock, settings=SETTINGS, with_reconcile=True
        )
        clock.advance(10)
    for request_id in ids:
        assert (
            call("POST", f"/access-requests/{request_id}/revoke", json={}, headers=alice).status_code == 200
        )
    simulator.script("ip_rule_delete", "500", "503", "timeout")
    for _ in range(30):
        grants.sweep(runtime.sessions, heroku=runtime.heroku, clock=clock, settings=SETTINGS)
        clock.advance(10)
    simulator.settings.fault_rate = 0.0

    # Everything an auditor reads, in every format.
    for accept in ("application/json", "text/csv", "application/x-ndjson"):
        assert call("GET", "/audit-events", headers={**admin, "Accept": accept}).status_code == 200
    assert call("GET", "/audit-events/verify", headers=admin).status_code == 200
    report = "/reports/access?database=main&from=2026-01-01T00:00:00Z&to=2027-01-01T00:00:00Z"
    assert call("GET", report, headers={**admin, "Accept": "text/csv"}).status_code == 200
    assert call("GET", f"/access-requests/{ids[0]}", headers=alice).status_code == 200

    # Rate limiting, which logs the key it refuses.
    limited = Recorder(
        create_app(
            runtime=replace(runtime, config=replace(runtime.config, rate_limit="1/hour"))
        ).test_client()
    )
    for headers in (
        alice,
        alice,
        {"Authorization": f"Bearer dbt_{alice_id}_{wrong_secret}"},
        {"Authorization": f"Bearer dbt_{alice_id}_{wrong_secret}"},
    ):
        limited("GET", "/databases", headers=headers)
    assert "429" in limited.answers[1] and "429" in limited.answers[3]

    # An unexpected failure while a valid token is presented, logged with its traceback.
    client.application.config.update(TESTING=False, PROPAGATE_EXCEPTIONS=False)
    original = runtime.sessions

    def broken() -> Any:
        raise RuntimeError("the database went away")

    runtime.sessions = broken  # type: ignore[assignment]  # a factory that fails, as a dead database would
    try:
        assert call("GET", "/databases", headers=alice).status_code == 500
    finally:
        runtime.sessions = original

    assert simulator.count(status=500) > 0 and simulator.count("ip_rule_delete") > 0
    logged = every_log.text + "\n".join(str(vars(record)) for record in every_log.records)
    assert "heroku" in logged and "SELECT" in logged  # the capture did see the Heroku client and SQL
    searched = {
        "logs": logged,
        "answers": "\n".join(call.answers + limited.answers),
        "stored rows": stored_text(runtime),
    }
    for secret in [*bearer_secrets, HEROKU_TOKEN]:
        for where, haystack in searched.items():
            assert secret not in haystack, f"a secret ({secret[:6]}…) appears in the {where}"
