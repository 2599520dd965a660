"""The `drawbridge` command as an operator runs it: migrate, issue and revoke tokens, refuse bad config."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from app import create_app
from app.config import Config


def drawbridge(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    environment = {"DATABASE_URL": f"sqlite:///{tmp_path}/cli.db"}
    result = drawbridge("db", "upgrade", env=environment)
    assert result.returncode == 0, result.stderr
    return environment


def test_tokens_create_prints_the_secret_alone_and_stores_only_a_hash(
    env: dict[str, str], tmp_path: Path
) -> None:
    result = drawbridge(
        "tokens", "create", "--user", "alice", "--role", "requester", "--role", "approver", env=env
    )

    assert result.returncode == 0, result.stderr
    secret = result.stdout.strip()
    assert result.stdout == secret + "\n"
    assert re.fullmatch(r"dbt_[0-9a-f]{12}_[A-Za-z0-9_-]{40,}", secret)
    assert secret not in (tmp_path / "cli.db").read_bytes().decode("latin-1")

    client: FlaskClient = create_app(Config(database_url=env["DATABASE_URL"])).test_client()
    assert client.get("/access-requests", headers={"Authorization": f"Bearer {secret}"}).status_code == 200

    revoked = drawbridge("tokens", "revoke", secret.split("_")[1], env=env)
    assert revoked.returncode == 0, revoked.stderr
    assert client.get("/access-requests", headers={"Authorization": f"Bearer {secret}"}).status_code == 401


def test_unknown_roles_and_bad_names_are_refused(env: dict[str, str]) -> None:
    bad_role = drawbridge("tokens", "create", "--user", "alice", "--role", "root", env=env)
    bad_name = drawbridge("tokens", "create", "--user", "alice smith", "--role", "requester", env=env)
    unknown = drawbridge("tokens", "revoke", "ffffffffffff", env=env)
    assert bad_role.returncode != 0 and bad_role.stdout == ""
    assert bad_name.returncode != 0 and "user name" in bad_name.stderr
    assert unknown.returncode != 0 and "no token" in unknown.stderr


def test_a_bad_setting_stops_the_command_with_a_clear_message(env: dict[str, str]) -> None:
    result = drawbridge(
        "tokens", "create", "--user", "a", "--role", "admin", env={**env, "DRAWBRIDGE_SWEEP_INTERVAL": "soon"}
    )
    assert result.returncode != 0
    assert "DRAWBRIDGE_SWEEP_INTERVAL" in result.stderr
    assert "Traceback" not in result.stderr


def test_db_upgrade_migrates_postgresql(postgres_url: str) -> None:
    from tests.conftest import create_scratch_database, drop_scratch_database

    url = create_scratch_database("drawbridge_cli")
    try:
        plain = url.replace("postgresql+psycopg://", "postgres://")
        result = drawbridge("db", "upgrade", env={"DATABASE_URL": plain})
        assert result.returncode == 0, result.stderr
        again = drawbridge("db", "upgrade", env={"DATABASE_URL": plain})
        assert again.returncode == 0
    finally:
        drop_scratch_database(url)
