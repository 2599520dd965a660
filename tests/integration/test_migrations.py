"""The migrations build the schema the models describe, and come down and go up again, on both databases."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from app.cli import alembic_config
from app.db import Base
from tests.conftest import _postgres_or_skip, create_scratch_database, drop_scratch_database


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_url(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[str]:
    if request.param == "postgresql":
        _postgres_or_skip()
        url = create_scratch_database("drawbridge_migrations")
        yield url
        drop_scratch_database(url)
    else:
        yield f"sqlite:///{tmp_path}/migrations.db"


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_migrations_go_up_down_and_up_again_and_match_the_models(empty_url: str) -> None:
    config = alembic_config(empty_url)
    expected = {t.name for t in Base.metadata.sorted_tables}

    command.upgrade(config, "head")
    assert tables(empty_url) == expected
    command.downgrade(config, "base")
    assert tables(empty_url) == set()
    command.upgrade(config, "head")
    assert tables(empty_url) == expected

    engine = create_engine(empty_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
            )
            assert diff == []
    finally:
        engine.dispose()


def test_the_database_itself_refuses_a_self_approval(empty_url: str) -> None:
    command.upgrade(alembic_config(empty_url), "head")
    engine = create_engine(empty_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO users (id, name, created_at) VALUES (1, 'alice', '2026-01-01')"))
            conn.execute(
                text(
                    "INSERT INTO databases (id, name, app, addon, addon_id, plan, created_at, updated_at,"
                    " default_duration, max_duration, approvals_required, max_live_per_user, max_prefix,"
                    " approval_window, rule_headroom) VALUES (1, 'main', 'a', 'b',"
                    " '6f1c1f8e-4a1b-4c8e-9d2a-1b2c3d4e5f60', 'p', '2026-01-01', '2026-01-01', 3600, 7200,"
                    " 1, 5, 28, 86400, 5)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO access_requests (id, database_id, requester_id, cidr, duration, reason,"
                    " status, created_at) VALUES ('0b5d7f3c-1111-4222-8333-444455556666', 1, 1,"
                    " '8.8.8.8/32', 3600, 'r', 'pending', '2026-01-01')"
                )
            )
        with pytest.raises(Exception, match="(?i)check|constraint"):
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO approvals (request_id, requester_id, approver_id, created_at) VALUES"
                        " ('0b5d7f3c-1111-4222-8333-444455556666', 1, 1, '2026-01-01')"
                    )
                )
        with pytest.raises(Exception, match="(?i)check|constraint"):
            with engine.begin() as conn:
                conn.execute(text("UPDATE access_requests SET status = 'expired'"))  # no ended_at
    finally:
        engine.dispose()
