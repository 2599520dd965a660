"""`/slack`: the `/drawbridge` slash command and the Approve/Deny buttons, for requests signed by Slack.

Every request's signature is checked on the raw body before anything is parsed. The acting person is the
Drawbridge user linked to the Slack user, with that user's own permissions, and the audit says "slack".
Nothing here calls Heroku, so Slack gets its answer well within its three seconds.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any
from urllib.parse import parse_qsl

import marshmallow as ma
from flask import request
from sqlalchemy.orm import Session
from werkzeug.exceptions import BadRequest, Unauthorized

from app import slack
from app.api.blueprint import Blueprint
from app.api.context import runtime, session
from app.api.problem import load_json_guarded
from app.models import AccessRequest, Role
from app.services import access, lookup, notify, tokens, users
from app.services.errors import DomainError
from app.services.identity import Principal

log = logging.getLogger(__name__)

blp = Blueprint(
    "slack",
    __name__,
    url_prefix="/slack",
    description=(
        "Slack's `/drawbridge` slash command and message buttons. Authenticated by Slack's request "
        "signature (X-Slack-Signature, X-Slack-Request-Timestamp), not by a Bearer token."
    ),
)

FORM = "application/x-www-form-urlencoded"
LIST_LIMIT = 15
MAX_FORM_FIELDS = 50


class SlackCommandFormSchema(ma.Schema):
    """The form Slack posts for a slash command (documentation only; the raw body is parsed after the
    signature is checked). Slack sends more fields than these; they are ignored."""

    class Meta:
        unknown = ma.INCLUDE

    team_id = ma.fields.String()
    channel_id = ma.fields.String()
    user_id = ma.fields.String(
        metadata={"description": "The Slack user; must be linked to a Drawbridge user"}
    )
    user_name = ma.fields.String()
    command = ma.fields.String(metadata={"example": "/drawbridge"})
    text = ma.fields.String(metadata={"example": "request main 8.8.8.8 2h INC-1 restore a row"})
    response_url = ma.fields.String()
    trigger_id = ma.fields.String()


class SlackInteractionFormSchema(ma.Schema):
    """The form Slack posts when a button is clicked (documentation only)."""

    class Meta:
        unknown = ma.INCLUDE

    payload = ma.fields.String(
        required=True,
        metadata={
            "description": "JSON of a block_actions interaction; action_id approve or deny, value the id"
        },
    )


class SlackReplySchema(ma.Schema):
    response_type = ma.fields.String(
        metadata={"description": "ephemeral (only the caller sees it) or in_channel"}
    )
    replace_original = ma.fields.Boolean(
        metadata={"description": "Replace the message whose button was used"}
    )
    text = ma.fields.String(metadata={"description": "The answer, in Slack mrkdwn"})
    blocks = ma.fields.List(ma.fields.Dict(), metadata={"description": "Block Kit blocks"})


SIGNATURE_HEADERS = [
    {
        "name": "X-Slack-Request-Timestamp",
        "in": "header",
        "required": True,
        "description": "Unix time Slack signed the request at; refused when more than five minutes off",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
    {
        "name": "X-Slack-Signature",
        "in": "header",
        "required": True,
        "description": "v0= and the HMAC-SHA256 of v0:{timestamp}:{body} keyed by SLACK_SIGNING_SECRET",
        "schema": {"type": "string", "pattern": "^v0=[0-9a-f]{64}$"},
    },
]


class NotSignedBySlack(Unauthorized):
    """401 for a request Slack did not sign, or signed too long ago."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        # A 401 names the way to authenticate (RFC 9110): here Slack's request signature, not a token.
        self.data = {"headers": {"WWW-Authenticate": 'Slack-Signature realm="drawbridge"'}}


def _signed_form(schema: type[ma.Schema]) -> dict[str, Any]:
    """The OpenAPI of an operation Slack calls: signed headers and a form body (`blp.authenticated_by`
    marks it as needing no bearer token)."""
    return {
        "parameters": SIGNATURE_HEADERS,
        "requestBody": {"required": True, "content": {FORM: {"schema": schema}}},
    }


def require_signature() -> None:
    """Return if Slack signed this request's raw body; else 401, before anything parses the body."""
    body = request.get_data(cache=True)
    rt = runtime()
    try:
        slack.verify_signature(
            secret=rt.config.slack_signing_secret,
            timestamp=request.headers.get("X-Slack-Request-Timestamp"),
            signature=request.headers.get("X-Slack-Signature"),
            body=body,
            now=rt.clock.now(),
        )
    except slack.SignatureError as exc:
        log.warning("refused a Slack request: %s", exc)
        raise NotSignedBySlack(str(exc)) from None


def _verified_form() -> dict[str, str]:
    """The form fields of a request Slack signed; 401 when the signature does not check out."""
    require_signature()
    body = request.get_data(cache=True)
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest(f"the body is not a UTF-8 form ({FORM})") from None
    return dict(pairs)


def _acting_as(db: Session, slack_user_id: str) -> Principal | None:
    """The Drawbridge user linked to `slack_user_id`, with their own permissions, or None."""
    user = users.by_slack_id(db, slack_user_id=slack_user_id) if slack_user_id else None
    who = tokens.acting_for(db, user_name=user.name, bot=None, source="slack") if user else None
    db.rollback()  # end the read transaction; services start their own
    return who


def _not_linked(slack_user_id: str) -> str:
    return (
        f"Your Slack account ({slack.escape(slack_user_id) or 'unknown'}) is not linked to a Drawbridge "
        "user, so nothing was done. Ask a Drawbridge admin to run "
        f"`drawbridge users link-slack --user <your name> --slack-user-id {slack.escape(slack_user_id)}`."
    )


def _explain(error: DomainError) -> str:
    text = f":warning: {slack.escape(error.message)}"
    existing = error.extra.get("existing_id")
    if existing:
        text += f" (see `/drawbridge status {slack.short_id(str(existing))}`)"
    return text


def _line(request_row: AccessRequest) -> str:
    return slack.request_line(notify.request_view(request_row))


@blp.route("/commands", methods=["POST"])
@blp.authenticated_by(require_signature)
@blp.doc(**_signed_form(SlackCommandFormSchema))
@blp.response(200, SlackReplySchema)
@blp.errors(400, 401, 413, 422)
def commands() -> dict[str, Any]:
    """The `/drawbridge` slash command, signed by Slack.

    Problems with the command itself are answered with a 200 and an ephemeral message, as Slack expects;
    a bad or missing signature is a 401.
    """
    form = _verified_form()
    try:
        command: slack.Command | None = slack.parse_command(form.get("text", ""))
        usage = None
    except slack.UsageError as exc:
        command, usage = None, str(exc)
    if isinstance(command, slack.HelpCommand):
        return slack.ephemeral(slack.help_text())
    db = session()
    slack_user_id = form.get("user_id", "")
    who = _acting_as(db, slack_user_id)
    if who is None:
        return slack.ephemeral(_not_linked(slack_user_id))
    if command is None:
        return slack.ephemeral(f":warning: {usage}")
    try:
        return _run(db, who, command)
    except DomainError as exc:
        db.rollback()
        return slack.ephemeral(_explain(exc))


def _run(db: Session, who: Principal, command: slack.Command) -> dict[str, Any]:
    rt = runtime()
    match command:
        case slack.RequestCommand():
            created = access.request_access(
                db,
                principal=who,
                database=command.database,
                cidr=command.cidr,
                duration=command.duration,
                reason=command.reason,
                min_duration=rt.config.min_duration,
                clock=rt.clock,
            )
            return slack.ephemeral(f"Filed {_line(created)}")
        case slack.ApproveCommand():
            who.require(Role.APPROVER)  # as over REST: a missing role is said before a prefix is looked up
            request_id = lookup.resolve_request_id(db, principal=who, prefix=command.request_id)
            approved = access.approve(
                db, principal=who, request_id=request_id, comment=command.comment, clock=rt.clock
            )
            return slack.in_channel(f"{slack.escape(who.name)} approved {_line(approved)}")
        case slack.DenyCommand():
            who.require(Role.APPROVER)
            request_id = lookup.resolve_request_id(db, principal=who, prefix=command.request_id)
            denied = access.deny(
                db, principal=who, request_id=request_id, reason=command.reason, clock=rt.clock
            )
            return slack.in_channel(
                f"{slack.escape(who.name)} denied {_line(denied)} ({slack.escape(command.reason)})"
            )
        case slack.RevokeCommand():
            request_id = lookup.resolve_request_id(db, principal=who, prefix=command.request_id)
            revoked = access.revoke(db, principal=who, request_id=request_id, reason=None, clock=rt.clock)
            return slack.in_channel(f"{slack.escape(who.name)} revoked {_line(revoked)}")
        case slack.ExtendCommand():
            return _extend(db, who, command)
        case slack.ListCommand():
            page = access.list_requests(
                db,
                principal=who,
                status=None,
                database=None,
                requester=None,
                cursor=None,
                limit=LIST_LIMIT,
            )
            if not page.items:
                return slack.ephemeral("No access requests to show.")
            lines = [_line(item) for item in page.items]
            if page.next_cursor:
                lines.append(f"…showing the newest {LIST_LIMIT}; the REST API lists the rest.")
            return slack.ephemeral("\n".join(lines))
        case slack.StatusCommand():
            request_id = lookup.resolve_request_id(db, principal=who, prefix=command.request_id)
            found = access.get_request(db, principal=who, request_id=request_id)
            return slack.ephemeral(slack.request_details(notify.request_view(found)))
    return slack.ephemeral(slack.help_text())


def _extend(db: Session, who: Principal, command: slack.ExtendCommand) -> dict[str, Any]:
    request_id = lookup.resolve_request_id(db, principal=who, prefix=command.request_id)
    extended = access.extend(
        db, principal=who, request_id=request_id, duration=command.duration, clock=runtime().clock
    )
    view = notify.request_view(extended)
    if view.get("pending_extension"):
        return slack.in_channel(
            f"{slack.escape(who.name)} asked to extend {slack.request_line(view)} by "
            f"{slack.human_duration(int(view['pending_extension']))}; it needs approval"
        )
    return slack.in_channel(f"{slack.escape(who.name)} extended {slack.request_line(view)}")


@blp.route("/interactions", methods=["POST"])
@blp.authenticated_by(require_signature)
@blp.doc(**_signed_form(SlackInteractionFormSchema))
@blp.response(200, SlackReplySchema)
@blp.errors(400, 401, 413, 422)
def interactions() -> dict[str, Any]:
    """The Approve and Deny buttons of request messages, signed by Slack.

    Success replaces the message with the outcome; a refusal (such as approving your own request) is an
    ephemeral message. A bad or missing signature is a 401.
    """
    form = _verified_form()
    raw = form.get("payload")
    if raw is None:
        raise BadRequest("an interaction carries a `payload` form field")
    try:
        action = slack.parse_interaction(load_json_guarded(raw.encode()))
    except slack.PayloadError as exc:
        raise BadRequest(str(exc)) from None
    if action is None or action.action_id not in ("approve", "deny"):
        return _refusal("Drawbridge does not handle this action.")
    try:
        request_id = uuid.UUID(action.value)
    except ValueError:
        return _refusal("This button does not name an access request.")
    db = session()
    who = _acting_as(db, action.slack_user_id)
    if who is None:
        return _refusal(_not_linked(action.slack_user_id))
    rt = runtime()
    try:
        if action.action_id == "approve":
            decided = access.approve(db, principal=who, request_id=request_id, comment=None, clock=rt.clock)
        else:
            decided = access.deny(
                db,
                principal=who,
                request_id=request_id,
                reason=f"denied in Slack by {who.name}",
                clock=rt.clock,
            )
    except DomainError as exc:
        db.rollback()
        return _refusal(_explain(exc))
    view = notify.request_view(decided)
    if slack.awaits_decision(view):
        # More approvals are needed: keep the buttons for the next approver, with the new count.
        reply = {"replace_original": True, **slack.request_message(view)}
    else:
        mark = ":white_check_mark:" if action.action_id == "approve" else ":no_entry:"
        verb = "approved" if action.action_id == "approve" else "denied"
        what = "more time for " if view["status"] == "active" else ""
        reply = {
            "replace_original": True,
            "text": f"{mark} {slack.escape(who.name)} {verb} {what}{slack.request_line(view)}",
        }
    if action.response_url:
        # Slack updates a message after a block action only through its response_url.
        slack.post_response(action.response_url, reply)
    return reply


def _refusal(text: str) -> dict[str, Any]:
    return {"response_type": "ephemeral", "replace_original": False, "text": text}
