"""`drawbridge users link-slack` as an operator runs it: link, relink, refuse an id someone else holds."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, select

from app.models import AuditEvent, User
from tests.integration.test_cli import drawbridge


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    environment = {"DATABASE_URL": f"sqlite:///{tmp_path}/cli.db"}
    result = drawbridge("db", "upgrade", env=environment)
    assert result.returncode == 0, result.stderr
    return environment


def links(env: dict[str, str]) -> dict[str, str | None]:
    engine = create_engine(env["DATABASE_URL"])
    with engine.connect() as conn:
        rows = conn.execute(select(User.name, User.slack_user_id)).all()
    engine.dispose()
    return {name: slack_id for name, slack_id in rows}


def link_events(env: dict[str, str]) -> list[tuple[str, str, dict[str, object]]]:
    engine = create_engine(env["DATABASE_URL"])
    with engine.connect() as conn:
        rows = conn.execute(
            select(AuditEvent.actor, AuditEvent.source, AuditEvent.details)
            .where(AuditEvent.action == "user:link_slack")
            .order_by(AuditEvent.id)
        ).all()
    engine.dispose()
    return [(actor, source, details) for actor, source, details in rows]


def test_link_slack_creates_the_user_and_audits_the_link(env: dict[str, str]) -> None:
    result = drawbridge("users", "link-slack", "--user", "alice", "--slack-user-id", "U024BE7LH", env=env)

    assert result.returncode == 0, result.stderr
    assert "U024BE7LH is linked to alice" in result.stderr
    assert links(env) == {"alice": "U024BE7LH"}
    assert link_events(env) == [
        ("cli", "cli", {"user": "alice", "slack_user_id": "U024BE7LH", "previous": None}),
    ]


def test_relinking_replaces_the_old_id_and_linking_again_changes_nothing(env: dict[str, str]) -> None:
    assert drawbridge("tokens", "create", "--user", "bob", "--role", "approver", env=env).returncode == 0
    assert (
        drawbridge("users", "link-slack", "--user", "bob", "--slack-user-id", "U0OLD", env=env).returncode
        == 0
    )

    relinked = drawbridge("users", "link-slack", "--user", "bob", "--slack-user-id", "W0NEW", env=env)
    again = drawbridge("users", "link-slack", "--user", "bob", "--slack-user-id", "W0NEW", env=env)

    assert relinked.returncode == 0 and again.returncode == 0
    assert links(env) == {"bob": "W0NEW"}
    assert [details["previous"] for _, _, details in link_events(env)] == [None, "U0OLD"]


def test_a_slack_id_linked_to_someone_else_is_refused(env: dict[str, str]) -> None:
    assert (
        drawbridge("users", "link-slack", "--user", "alice", "--slack-user-id", "U0ALICE", env=env).returncode
        == 0
    )

    taken = drawbridge("users", "link-slack", "--user", "mallory", "--slack-user-id", "U0ALICE", env=env)

    assert taken.returncode != 0
    assert "already linked to alice" in taken.stderr and "Traceback" not in taken.stderr
    assert links(env) == {"alice": "U0ALICE"}
    assert len(link_events(env)) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--user", "alice", "--slack-user-id", "alice"), "not a Slack user id"),
        (("--user", "alice", "--slack-user-id", "u024be7lh"), "not a Slack user id"),
        (("--user", "alice smith", "--slack-user-id", "U024BE7LH"), "user name"),
        (("--user", "alice"), "Missing option '--slack-user-id'"),
    ],
)
def test_bad_names_and_ids_are_refused(env: dict[str, str], args: tuple[str, ...], message: str) -> None:
    result = drawbridge("users", "link-slack", *args, env=env)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert links(env) == {}
