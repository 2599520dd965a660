"""What Drawbridge says in Slack: the request message with its buttons, replies, and button payloads."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app import slack

REQUEST_ID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


def view(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": REQUEST_ID,
        "database": "main",
        "cidr": "8.8.8.8/32",
        "requester": "alice",
        "filed_by": None,
        "reason": "INC-1 restore a row",
        "duration": 7200,
        "status": "pending",
        "approvals": 0,
        "approvals_required": 1,
        "activated_at": None,
        "expires_at": None,
        "end_reason": None,
        "pending_extension": None,
    }
    base.update(overrides)
    return base


def buttons(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        element
        for block in message["blocks"]
        if block["type"] == "actions"
        for element in block["elements"]
        if element["type"] == "button"
    ]


def test_a_pending_request_message_carries_approve_and_deny_buttons_for_its_id() -> None:
    message = slack.request_message(view())

    assert [(b["action_id"], b["value"]) for b in buttons(message)] == [
        ("approve", REQUEST_ID),
        ("deny", REQUEST_ID),
    ]
    assert message["text"] == "alice asks for access to main from 8.8.8.8/32 for 2h: INC-1 restore a row"
    rendered = json.dumps(message["blocks"])
    assert "8.8.8.8/32" in rendered and "INC-1 restore a row" in rendered and "0 of 1 approvals" in rendered
    assert "/drawbridge approve 0f1e2d3c" in rendered


@pytest.mark.parametrize("status", ["approved", "active", "denied", "expired", "revoked"])
def test_a_decided_request_message_has_no_buttons(status: str) -> None:
    assert buttons(slack.request_message(view(status=status, expires_at="2026-01-05T11:00:00+00:00"))) == []


def test_an_extension_waiting_for_approvers_gets_buttons_and_says_how_much_more() -> None:
    message = slack.request_message(
        view(status="active", expires_at="2026-01-05T11:00:00+00:00", pending_extension=1800, approvals=0)
    )
    assert [b["action_id"] for b in buttons(message)] == ["approve", "deny"]
    assert message["text"].startswith("alice asks for 30m more access to main")


def test_user_text_cannot_ping_the_channel_or_smuggle_links() -> None:
    message = slack.request_message(view(reason="<!channel> see <https://evil.example|docs> & more"))
    rendered = json.dumps(message)
    assert "<!channel>" not in rendered and "<https://" not in rendered
    assert "&lt;!channel&gt; see &lt;https://evil.example|docs&gt; &amp; more" in message["text"]


def test_a_bot_filed_request_says_who_filed_it() -> None:
    message = slack.request_message(view(filed_by="deploybot"))
    assert "Filed by deploybot for alice" in json.dumps(message["blocks"])


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(60, "1m"), (5400, "1h30m"), (7200, "2h"), (86400, "1d"), (93600, "1d2h"), (45, "45s"), (0, "0m")],
)
def test_durations_read_as_the_shorthand_people_type(seconds: int, text: str) -> None:
    assert slack.human_duration(seconds) == text


def test_a_request_line_shows_the_short_id_and_the_approvals_still_needed() -> None:
    line = slack.request_line(view(approvals=1, approvals_required=2))
    assert line == "`0f1e2d3c` *main* from `8.8.8.8/32` for 2h, alice: pending (1 of 2 approvals)"


def test_help_lists_every_command() -> None:
    text = slack.help_text()
    for usage in slack.USAGE.values():
        assert f"/drawbridge {usage}" in text


def test_replies_are_ephemeral_unless_meant_for_the_channel() -> None:
    assert slack.ephemeral("hi") == {"response_type": "ephemeral", "text": "hi"}
    assert slack.in_channel("hi") == {"response_type": "in_channel", "text": "hi"}


def test_a_button_click_payload_yields_its_action_value_and_user() -> None:
    payload = {
        "type": "block_actions",
        "user": {"id": "U0BOB", "username": "bob"},
        "actions": [{"action_id": "approve", "value": REQUEST_ID, "type": "button"}],
    }
    assert slack.parse_interaction(payload) == slack.ButtonAction(
        action_id="approve", value=REQUEST_ID, slack_user_id="U0BOB"
    )
    assert slack.parse_interaction({"type": "view_submission"}) is None


@pytest.mark.parametrize(
    "payload",
    [
        [],
        "block_actions",
        {"type": "block_actions", "actions": [{"action_id": "approve", "value": REQUEST_ID}]},
        {"type": "block_actions", "user": {"id": ""}, "actions": [{"action_id": "approve", "value": "x"}]},
        {"type": "block_actions", "user": {"id": "U0BOB"}, "actions": []},
        {"type": "block_actions", "user": {"id": "U0BOB"}, "actions": ["approve"]},
        {"type": "block_actions", "user": {"id": "U0BOB"}, "actions": [{"action_id": "approve"}]},
    ],
)
def test_a_malformed_button_payload_is_refused(payload: Any) -> None:
    with pytest.raises(slack.PayloadError):
        slack.parse_interaction(payload)


def test_only_slacks_own_https_hooks_are_taken_as_response_urls() -> None:
    from app.slack import is_slack_response_url, parse_interaction

    assert is_slack_response_url("https://hooks.slack.com/actions/T1/123/abc")
    for url in (
        "http://hooks.slack.com/actions/T1/123/abc",
        "https://hooks.slack.com.evil.example/actions",
        "https://evil.example/?https://hooks.slack.com/",
        "https://hooks.slack.com:8443/actions",
        "file:///etc/passwd",
    ):
        assert not is_slack_response_url(url), url
    payload = {
        "type": "block_actions",
        "user": {"id": "U1"},
        "actions": [{"action_id": "approve", "value": "x"}],
        "response_url": "https://169.254.169.254/latest/meta-data",
    }
    assert parse_interaction(payload).response_url is None  # type: ignore[union-attr]
    payload["response_url"] = "https://hooks.slack.com/actions/T1/1/x"
    assert parse_interaction(payload).response_url == "https://hooks.slack.com/actions/T1/1/x"  # type: ignore[union-attr]
