"""Slack as a front door: request signature verification, the `/drawbridge` command grammar, and the
messages Drawbridge answers with (plain functions over plain data; no Flask, no database).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

SIGNATURE_VERSION = "v0"
MAX_CLOCK_SKEW = 300
"""Slack's rule: a request whose timestamp is more than five minutes from now may be a replay."""

MIN_PREFIX = 4
SHORT_ID = 8

_SIGNATURE = re.compile(r"^v0=[0-9a-f]{64}$")
_TIMESTAMP = re.compile(r"^[0-9]{1,12}$")
_ID = re.compile(r"^[0-9a-f-]{1,36}$")

log = logging.getLogger(__name__)


class SignatureError(Exception):
    """The request cannot be shown to come from Slack; the message says why (safe to show the caller)."""


def sign(*, secret: str, timestamp: str, body: bytes) -> str:
    """The `X-Slack-Signature` Slack sends: `v0=` + HMAC-SHA256 of `v0:{timestamp}:{body}`."""
    base = f"{SIGNATURE_VERSION}:{timestamp}:".encode() + body
    return f"{SIGNATURE_VERSION}=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()


def verify_signature(
    *,
    secret: str | None,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    now: datetime,
    max_skew: int = MAX_CLOCK_SKEW,
) -> None:
    """Return if `body` was signed by Slack with `secret` within `max_skew` seconds of `now`.

    Raises SignatureError when no secret is configured, a header is missing or garbled, the timestamp is
    too far from `now` (either way), or the signature does not match (compared in constant time).
    """
    if not secret:
        raise SignatureError("Slack requests are not accepted: SLACK_SIGNING_SECRET is not configured")
    if not timestamp or not signature:
        raise SignatureError("the X-Slack-Request-Timestamp and X-Slack-Signature headers are required")
    if not _TIMESTAMP.match(timestamp):
        raise SignatureError("X-Slack-Request-Timestamp is not a Unix time")
    if abs(now.timestamp() - int(timestamp)) > max_skew:
        raise SignatureError("X-Slack-Request-Timestamp is more than five minutes from now")
    if not _SIGNATURE.match(signature):
        raise SignatureError("X-Slack-Signature is not a v0 signature")
    expected = sign(secret=secret, timestamp=timestamp, body=body)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise SignatureError("X-Slack-Signature does not match the request")


# -- the /drawbridge command ---------------------------------------------------------------------------------


class UsageError(ValueError):
    """The command text does not parse; the message says what was expected."""


@dataclass(frozen=True)
class RequestCommand:
    database: str
    cidr: str
    duration: str
    reason: str


@dataclass(frozen=True)
class ApproveCommand:
    request_id: str
    comment: str | None


@dataclass(frozen=True)
class DenyCommand:
    request_id: str
    reason: str


@dataclass(frozen=True)
class RevokeCommand:
    request_id: str


@dataclass(frozen=True)
class ExtendCommand:
    request_id: str
    duration: str


@dataclass(frozen=True)
class ListCommand:
    pass


@dataclass(frozen=True)
class StatusCommand:
    request_id: str


@dataclass(frozen=True)
class HelpCommand:
    pass


Command = (
    RequestCommand
    | ApproveCommand
    | DenyCommand
    | RevokeCommand
    | ExtendCommand
    | ListCommand
    | StatusCommand
    | HelpCommand
)

USAGE = {
    "request": "request <database> <cidr> <duration> <reason…>",
    "approve": "approve <id> [comment]",
    "deny": "deny <id> <reason…>",
    "revoke": "revoke <id>",
    "extend": "extend <id> <duration>",
    "list": "list",
    "status": "status <id>",
    "help": "help",
}


def unescape(text: str) -> str:
    """Undo the only escaping Slack applies to command text (`&`, `<`, `>`)."""
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def escape(text: str) -> str:
    """Make user-supplied text inert in Slack mrkdwn (no `<!channel>`, mentions or links smuggled in)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def parse_request_id(value: str) -> str:
    """A request id as typed: a whole UUID or a prefix of at least MIN_PREFIX hex digits; lowercased.

    Raises UsageError for anything else.
    """
    text = value.strip().lower()
    digits = text.replace("-", "")
    if not _ID.match(text):
        raise UsageError(f"`{escape(value)}` is not a request id; give the id or its first few characters")
    if len(digits) < MIN_PREFIX:
        raise UsageError(f"give at least {MIN_PREFIX} characters of the request id")
    if len(digits) > 32:
        raise UsageError(f"`{escape(value)}` is longer than a request id")
    return text


def _usage(verb: str) -> UsageError:
    return UsageError(f"usage: `/drawbridge {USAGE[verb]}`")


def parse_command(text: str) -> Command:
    """Parse the text after `/drawbridge`. Empty text means help; raises UsageError for anything else
    that does not fit the grammar in USAGE. Values are checked by the services, not here."""
    words = unescape(text).split(maxsplit=1)
    if not words:
        return HelpCommand()
    verb = words[0].lower()
    rest = words[1] if len(words) > 1 else ""
    if verb == "request":
        parts = rest.split(maxsplit=3)
        if len(parts) < 4:
            raise _usage(verb)
        database, cidr, duration, reason = parts
        return RequestCommand(database=database, cidr=cidr, duration=duration, reason=reason.strip())
    if verb in ("list", "help"):
        if rest.strip():
            raise _usage(verb)
        return ListCommand() if verb == "list" else HelpCommand()
    if verb not in USAGE:
        raise UsageError(f"there is no `{escape(verb)}` command; try `/drawbridge help`")
    id_text, _, tail = rest.strip().partition(" ")
    if not id_text:
        raise _usage(verb)
    request_id = parse_request_id(id_text)
    tail = tail.strip()
    if verb == "approve":
        return ApproveCommand(request_id=request_id, comment=tail or None)
    if verb == "deny":
        if not tail:
            raise _usage(verb)
        return DenyCommand(request_id=request_id, reason=tail)
    if verb == "extend":
        if not tail or len(tail.split()) != 1:
            raise _usage(verb)
        return ExtendCommand(request_id=request_id, duration=tail)
    if tail:
        raise _usage(verb)
    if verb == "revoke":
        return RevokeCommand(request_id=request_id)
    return StatusCommand(request_id=request_id)


# -- interaction payloads ------------------------------------------------------------------------------------


class PayloadError(ValueError):
    """An interaction payload is not of the shape Slack documents."""


@dataclass(frozen=True)
class ButtonAction:
    action_id: str
    value: str
    slack_user_id: str
    response_url: str | None = None
    """Where Slack takes the updated message: the only way to change it after a button click."""


def parse_interaction(payload: Any) -> ButtonAction | None:
    """The first action of a `block_actions` payload, or None for other interaction types.

    Raises PayloadError when the payload lacks what every `block_actions` payload carries.
    """
    if not isinstance(payload, dict):
        raise PayloadError("the payload is not a JSON object")
    if payload.get("type") != "block_actions":
        return None
    user = payload.get("user")
    actions = payload.get("actions")
    if not isinstance(user, dict) or not isinstance(user.get("id"), str) or not user["id"]:
        raise PayloadError("the payload names no user")
    if not isinstance(actions, list) or not actions or not isinstance(actions[0], dict):
        raise PayloadError("the payload carries no action")
    action = actions[0]
    action_id, value = action.get("action_id"), action.get("value")
    if not isinstance(action_id, str) or not isinstance(value, str):
        raise PayloadError("the action has no action_id or value")
    url = payload.get("response_url")
    return ButtonAction(
        action_id=action_id,
        value=value,
        slack_user_id=user["id"],
        response_url=url if isinstance(url, str) and is_slack_response_url(url) else None,
    )


def is_slack_response_url(url: str) -> bool:
    """Only Slack's own https hooks are ever posted to, whatever a payload says."""
    parts = urlsplit(url)
    return parts.scheme == "https" and parts.hostname == "hooks.slack.com" and parts.port is None


def post_response(url: str, message: dict[str, Any], *, timeout: float = 3.0) -> None:
    """Update the clicked message through its response_url, in the background so Slack's three-second
    answer is never held up. Best effort: the decision is already committed, audited and announced."""

    def send() -> None:
        try:
            httpx.post(url, json=message, timeout=timeout).raise_for_status()
        except httpx.HTTPError as exc:
            log.warning("could not update the Slack message: %s", type(exc).__name__)

    threading.Thread(target=send, name="slack-response", daemon=True).start()


# -- replies -------------------------------------------------------------------------------------------------


def ephemeral(text: str) -> dict[str, Any]:
    """A reply only the person who typed the command sees."""
    return {"response_type": "ephemeral", "text": text}


def in_channel(text: str) -> dict[str, Any]:
    """A reply everyone in the channel sees."""
    return {"response_type": "in_channel", "text": text}


def short_id(request_id: str) -> str:
    return request_id[:SHORT_ID]


def human_duration(seconds: int) -> str:
    """`2h`, `1h30m`, `1d4h`, `45s`: the shorthand people type back into `/drawbridge`."""
    if seconds <= 0:
        return "0m"
    days, rem = divmod(seconds, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    return "".join(f"{n}{unit}" for n, unit in parts if n)


def request_line(view: dict[str, Any]) -> str:
    """One line of mrkdwn describing a request (for `list` and confirmations)."""
    return (
        f"`{short_id(view['id'])}` *{escape(view['database'])}* from `{view['cidr']}` "
        f"for {human_duration(int(view['duration']))}, {escape(view['requester'])}: {_status(view)}"
    )


def _status(view: dict[str, Any]) -> str:
    status = str(view["status"])
    approvals = f"{view['approvals']} of {view['approvals_required']} approvals"
    if status == "pending":
        return f"pending ({approvals})"
    if status == "active" and view.get("expires_at"):
        text = f"active until {view['expires_at']}"
        if view.get("pending_extension"):
            text += f"; {human_duration(int(view['pending_extension']))} more asked ({approvals})"
        return text
    return status


def awaits_decision(view: dict[str, Any]) -> bool:
    """Whether approvers have something to decide: the request itself, or an extension of live access."""
    return view["status"] == "pending" or (view["status"] == "active" and bool(view.get("pending_extension")))


def request_details(view: dict[str, Any]) -> str:
    """Several lines of mrkdwn describing one request in full (for `status`)."""
    lines = [
        f"*Request* `{view['id']}`",
        f"*Database* {escape(view['database'])}  *From* `{view['cidr']}`  "
        f"*For* {human_duration(int(view['duration']))}",
        f"*Requester* {escape(view['requester'])}"
        + (f" (filed by {escape(view['filed_by'])})" if view.get("filed_by") else ""),
        f"*Reason* {escape(view['reason'])}",
        f"*Status* {_status(view)}",
    ]
    if view.get("end_reason"):
        lines.append(f"*Ended* {escape(view['end_reason'])}")
    return "\n".join(lines)


def request_message(view: dict[str, Any]) -> dict[str, Any]:
    """The Block Kit message announcing a request (or an extension of live access) to approvers; while
    there is something to decide it carries Approve and Deny buttons (action_id `approve`/`deny`, value the
    request id) that `/slack/interactions` handles.

    `view` is `app.services.notify.request_view(request)`. Returns `{"text": fallback, "blocks": [...]}`.
    """
    request_id = str(view["id"])
    who = escape(view["requester"])
    database = escape(view["database"])
    duration = human_duration(int(view["duration"]))
    if view["status"] == "active" and view.get("pending_extension"):
        more = human_duration(int(view["pending_extension"]))
        headline = f"*{who}* asks for {more} more access to *{database}*"
        fallback = f"{who} asks for {more} more access to {database} from {view['cidr']}"
    else:
        headline = f"*{who}* asks for access to *{database}*"
        fallback = f"{who} asks for access to {database} from {view['cidr']} for {duration}"
    fallback += f": {escape(view['reason'])}"
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": headline}},
        {
            "type": "section",
            "fields": [
                {"type": "mrkdwn", "text": f"*From*\n`{view['cidr']}`"},
                {"type": "mrkdwn", "text": f"*For*\n{duration}"},
                {"type": "mrkdwn", "text": f"*Status*\n{_status(view)}"},
                {"type": "mrkdwn", "text": f"*Request*\n`{short_id(request_id)}`"},
            ],
        },
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*Reason*\n{escape(view['reason'])}"}},
    ]
    if awaits_decision(view):
        blocks.append(
            {
                "type": "actions",
                "block_id": f"decide:{request_id}",
                "elements": [
                    {
                        "type": "button",
                        "action_id": "approve",
                        "text": {"type": "plain_text", "text": "Approve"},
                        "style": "primary",
                        "value": request_id,
                    },
                    {
                        "type": "button",
                        "action_id": "deny",
                        "text": {"type": "plain_text", "text": "Deny"},
                        "style": "danger",
                        "value": request_id,
                        "confirm": {
                            "title": {"type": "plain_text", "text": "Deny this request?"},
                            "text": {"type": "plain_text", "text": "The requester will have to ask again."},
                            "confirm": {"type": "plain_text", "text": "Deny"},
                            "deny": {"type": "plain_text", "text": "Keep it"},
                        },
                    },
                ],
            }
        )
    context = f"Or type `/drawbridge approve {short_id(request_id)}`"
    if view.get("filed_by"):
        context = f"Filed by {escape(view['filed_by'])} for {who}. " + context
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": context}]})
    return {"text": fallback, "blocks": blocks}


def help_text() -> str:
    lines = ["*Drawbridge*: temporary access to Heroku Postgres. Commands:"]
    lines += [f"• `/drawbridge {usage}`" for usage in USAGE.values()]
    lines.append(
        "Durations look like `90m`, `2h`, `1d` or `PT2H`; a bare address means /32. "
        f"An id may be shortened to its first {MIN_PREFIX}+ characters."
    )
    return "\n".join(lines)
