"""Request ids and secret masking, without any I/O."""

from __future__ import annotations

import uuid

import pytest

from app import logs


@pytest.mark.parametrize("presented", ["0f8e2c1a-9b7d-4e3f-8a6b-5c4d3e2f1a0b", "trace:abc_123.x/y+z="])
def test_a_sane_request_id_is_kept(presented: str) -> None:
    assert logs.accept_request_id(presented) == presented


@pytest.mark.parametrize(
    "presented", [None, "", "short", "with space 1234", "new\nline-12345", "é" * 10, "x" * 201]
)
def test_anything_else_gets_a_fresh_uuid(presented: str | None) -> None:
    assert uuid.UUID(logs.accept_request_id(presented))


def test_a_request_scope_binds_its_id_and_restores_the_outer_one() -> None:
    assert logs.current_request_id() is None
    with logs.request_scope("outer-0001") as outer:
        with logs.request_scope() as inner:
            assert logs.current_request_id() == inner != outer
        assert logs.current_request_id() == "outer-0001"
    assert logs.current_request_id() is None


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("token dbt_a1b2c3d4e5f6_Zx-9_kLmN refused", "token dbt_[redacted] refused"),
        ("{'Authorization': 'Bearer abc.def-ghi'}", "{'Authorization': 'Bearer [redacted]'}"),
        ("authorization: bearer abc", "authorization: bearer [redacted]"),
        ("key HRKU-AAbb_cc-DD0011 rejected", "key HRKU-[redacted] rejected"),
        ("signed with s3cr3t-signing-key!", "signed with [redacted]!"),
        ("a short secret like abc is left alone", "a short secret like abc is left alone"),
    ],
)
def test_tokens_bearer_values_heroku_keys_and_configured_secrets_are_masked(line: str, shown: str) -> None:
    assert logs.Redactor(["s3cr3t-signing-key", "abc", None])(line) == shown
