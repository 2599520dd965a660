"""Shared fixtures: a real PostgreSQL database built by the migrations, the Heroku simulator, a manual clock.

PostgreSQL comes from DRAWBRIDGE_TEST_DATABASE_URL (default: the local service's `test` database). Each test
run creates its own database beside it, migrates it to head, empties its tables between tests and drops it
at the end. When PostgreSQL is unreachable its tests are skipped, unless DRAWBRIDGE_REQUIRE_POSTGRES=1 (CI),
which turns the skip into a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from app import create_app
from app.cli import alembic_config
from app.clock import ManualClock
from app.config import Config, normalize_database_url
from app.db import Base
from app.heroku.client import HerokuClient
from app.heroku.simulator import SimAddon, Simulator, SimulatorTransport
from app.runtime import Runtime, build_runtime
from app.services import tokens

ADMIN_URL = normalize_database_url(
    os.environ.get("DRAWBRIDGE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
)
REQUIRE_POSTGRES = os.environ.get("DRAWBRIDGE_REQUIRE_POSTGRES") == "1"
SIM_TOKEN = "test-heroku-token"


def _postgres_or_skip() -> None:
    try:
        engine = create_engine(ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure to connect means "no PostgreSQL here"
        message = f"PostgreSQL is not reachable at {make_url(ADMIN_URL).render_as_string()}: {exc}"
        if REQUIRE_POSTGRES:
            pytest.fail(message)
        pytest.skip(message)


def create_scratch_database(prefix: str = "drawbridge_test") -> str:
    """Create an empty PostgreSQL database next to the admin one and return its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    engine = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
        # Throwaway data: skip the fsync per commit, which would dominate the run time of worker tests.
        conn.execute(text(f'ALTER DATABASE "{name}" SET synchronous_commit = off'))
    engine.dispose()
    return make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def drop_scratch_database(url: str) -> None:
    name = make_url(url).database
    engine = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def migrate(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    _postgres_or_skip()
    url = create_scratch_database()
    migrate(url)
    yield url
    drop_scratch_database(url)


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("sqlite") / "drawbridge.db"
    url = f"sqlite:///{path}"
    migrate(url)
    return url


@pytest.fixture(params=["postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """The database a test runs on; modules may parametrize it indirectly to add "sqlite"."""
    fixture = "postgres_url" if request.param == "postgresql" else "sqlite_url"
    url: str = request.getfixturevalue(fixture)
    return url


def empty_tables(runtime: Runtime) -> None:
    with runtime.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            names = ", ".join(t.name for t in Base.metadata.sorted_tables)
            conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
        else:
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(table.delete())
        # What the migration writes into an empty log: the whole chain is in time order.
        conn.execute(text("INSERT INTO audit_marks (name, seq) VALUES ('time_ordered_from', 1)"))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def simulator(clock: ManualClock) -> Simulator:
    return Simulator(clock=clock, token=SIM_TOKEN)


@pytest.fixture
def addon(simulator: Simulator) -> SimAddon:
    """An add-on with mTLS Operational, as an admin would register it."""
    return simulator.add_addon(app="acme-api", name="postgresql-curved-12345")


def sim_client(simulator: Simulator) -> HerokuClient:
    return HerokuClient(
        token=SIM_TOKEN,
        api_url="http://api.heroku.test",
        data_api_url="http://data.heroku.test",
        transport=SimulatorTransport(app=simulator),
        sleep=lambda seconds: None,
    )


@pytest.fixture
def config(database_url: str) -> Config:
    return Config(database_url=database_url, min_duration=60)


@pytest.fixture
def runtime(config: Config, clock: ManualClock, simulator: Simulator) -> Iterator[Runtime]:
    rt = build_runtime(config, clock=clock, heroku=sim_client(simulator))
    rt.simulator = simulator
    empty_tables(rt)
    yield rt
    rt.close()


@pytest.fixture
def app(runtime: Runtime) -> Flask:
    flask_app = create_app(runtime=runtime)
    flask_app.config["TESTING"] = True
    return flask_app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


TokenFactory = Callable[..., dict[str, str]]


@pytest.fixture
def token_for(runtime: Runtime) -> TokenFactory:
    """`token_for("alice", "requester")` → an Authorization header for a new token."""

    def make(user: str, *roles: str) -> dict[str, str]:
        with runtime.sessions() as session:
            _, secret = tokens.create_token(session, user_name=user, roles=roles, clock=runtime.clock)
        return {"Authorization": f"Bearer {secret}"}

    return make


@pytest.fixture
def registered(client: FlaskClient, token_for: TokenFactory, addon: SimAddon) -> Callable[..., Any]:
    """Register a database through the API, with optional policy fields; returns its JSON."""
    admin = token_for("root", "admin")

    def register(name: str = "main", on: SimAddon | None = None, **policy: Any) -> dict[str, Any]:
        target = on or addon
        response = client.post(
            "/databases",
            json={"name": name, "app": target.app_name, "addon": target.name, **policy},
            headers=admin,
        )
        assert response.status_code == 201, response.get_json()
        body: dict[str, Any] = response.get_json()
        return body

    return register
