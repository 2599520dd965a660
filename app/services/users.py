"""People: linking a Drawbridge user to their Slack account, and finding a user by Slack id."""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.clock import Clock
from app.models import User
from app.services import audit, tokens
from app.services.errors import Conflict, InvalidRequest
from app.services.identity import Principal

# Slack user ids are U… (or W… for Enterprise Grid), upper-case letters and digits.
_SLACK_USER_ID = re.compile(r"^[UW][A-Z0-9]{2,31}$")


class SlackIdTaken(Conflict):
    code = "slack_user_id_taken"


def check_slack_user_id(value: str) -> str:
    """Raise InvalidRequest unless `value` looks like a Slack user id (`U024BE7LH`)."""
    if not _SLACK_USER_ID.fullmatch(value):  # match() would let a trailing newline through
        raise InvalidRequest(
            f"{value!r} is not a Slack user id such as U024BE7LH (Slack: profile, more, Copy member ID)",
            field="slack_user_id",
        )
    return value


def by_slack_id(session: Session, *, slack_user_id: str) -> User | None:
    """The user linked to `slack_user_id`, or None."""
    return session.scalar(select(User).where(User.slack_user_id == slack_user_id))


def link_slack(
    session: Session,
    *,
    principal: Principal,
    user_name: str,
    slack_user_id: str,
    clock: Clock,
) -> User:
    """Map `slack_user_id` to `user_name` (created if new), replacing any earlier link of that user; commit
    together with a `user:link_slack` audit event. Linking a user to the id they already have changes nothing.

    Raises InvalidRequest for a malformed name or id, SlackIdTaken when another user holds the id.
    """
    check_slack_user_id(slack_user_id)
    holder = by_slack_id(session, slack_user_id=slack_user_id)
    if holder is not None and holder.name != user_name:
        raise SlackIdTaken(f"Slack user {slack_user_id} is already linked to {holder.name}")
    user = tokens.ensure_user(session, name=user_name, clock=clock)
    if user.slack_user_id == slack_user_id:
        return user
    previous = user.slack_user_id
    user.slack_user_id = slack_user_id
    try:
        session.flush()
    except IntegrityError:
        # Another link of the same Slack id committed between our check and our write.
        session.rollback()
        raise SlackIdTaken(f"Slack user {slack_user_id} is already linked to another user") from None
    audit.record(
        session,
        principal=principal,
        action="user:link_slack",
        at=clock.now(),
        details={"user": user.name, "slack_user_id": slack_user_id, "previous": previous},
    )
    session.commit()
    return user
