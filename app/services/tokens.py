"""API tokens: issuing, revoking and authenticating bearer tokens of the form `dbt_<id>_<secret>`.

Only the SHA-256 of the secret is stored (the secret is 256 random bits, so a slow hash adds nothing). The
public id selects the row; the secret is then compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.clock import Clock
from app.models import ApiToken, ApiTokenRole, Role, User
from app.services import audit
from app.services.errors import InvalidRequest, TokenNotFound
from app.services.identity import Principal
from app.validation import InvalidInput, check_user_name

PREFIX = "dbt"
CLI = Principal(user_id=0, name="cli", roles=frozenset(), source="cli")


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def ensure_user(session: Session, *, name: str, clock: Clock) -> User:
    """Return the user called `name`, adding it to the session if it does not exist yet."""
    try:
        check_user_name(name)
    except InvalidInput as exc:
        raise InvalidRequest(str(exc), field="user") from None
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        user = User(name=name, created_at=clock.now())
        session.add(user)
        session.flush()
    return user


def create_token(
    session: Session, *, user_name: str, roles: Iterable[str], clock: Clock
) -> tuple[ApiToken, str]:
    """Issue a token for `user_name` (created if new) with `roles`; commit; return the row and the secret.

    Raises InvalidRequest for an unknown role or a malformed user name. The secret is never stored.
    """
    try:
        role_set = sorted({Role(r) for r in roles})
    except ValueError as exc:
        valid = ", ".join(r.value for r in Role)
        raise InvalidRequest(f"{exc}; valid roles are {valid}", field="role") from None
    if not role_set:
        raise InvalidRequest("a token needs at least one role", field="role")
    user = ensure_user(session, name=user_name, clock=clock)
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    token = ApiToken(
        id=token_id,
        user_id=user.id,
        secret_hash=_hash(secret),
        created_at=clock.now(),
        role_rows=[ApiTokenRole(role=r) for r in role_set],
    )
    session.add(token)
    audit.record(
        session,
        principal=CLI,
        action="api_token:create",
        at=clock.now(),
        details={"token_id": token_id, "user": user.name, "roles": [r.value for r in role_set]},
    )
    session.commit()
    return token, f"{PREFIX}_{token_id}_{secret}"


def revoke_token(session: Session, *, token: str, clock: Clock) -> ApiToken:
    """Revoke a token given its id or the whole token string; commit. Raises TokenNotFound."""
    token_id = token.split("_")[1] if token.startswith(f"{PREFIX}_") and token.count("_") >= 2 else token
    row = session.get(ApiToken, token_id)
    if row is None:
        raise TokenNotFound(f"no token with id {token_id!r}")
    if row.revoked_at is None:
        row.revoked_at = clock.now()
        audit.record(
            session,
            principal=CLI,
            action="api_token:revoke",
            at=clock.now(),
            details={"token_id": row.id, "user": row.user.name},
        )
        session.commit()
    return row


def roles_of(session: Session, user_id: int) -> frozenset[Role]:
    """A user's own permissions: the roles of their live tokens, the bot role excepted."""
    rows = session.scalars(
        select(ApiTokenRole.role)
        .join(ApiToken, ApiToken.id == ApiTokenRole.token_id)
        .where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None))
    )
    return frozenset(role for role in rows if role is not Role.BOT)


def acting_for(session: Session, *, user_name: str, bot: Principal | None, source: str) -> Principal | None:
    """The principal of `user_name` with that user's own permissions, acting through `bot` (if any) and
    `source` ("api", "slack"). None when no such user exists."""
    user = session.scalar(select(User).where(User.name == user_name))
    if user is None:
        return None
    return Principal(
        user_id=user.id,
        name=user.name,
        roles=roles_of(session, user.id),
        token_id=bot.token_id if bot else None,
        bot_id=bot.user_id if bot else None,
        bot_name=bot.name if bot else None,
        source=source,
    )


def authenticate(session: Session, *, presented: str) -> Principal | None:
    """The principal for a presented bearer token, or None if it is malformed, unknown or revoked."""
    parts = presented.split("_", 2)
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1] or not parts[2] or len(presented) > 200:
        return None
    if not (parts[1].isascii() and parts[1].isalnum()):
        return None  # ids are hex; anything else (a NUL byte, say) must not reach the database
    row = session.get(ApiToken, parts[1])
    expected = row.secret_hash if row is not None else _hash("")
    matches = hmac.compare_digest(expected, _hash(parts[2]))
    if row is None or not matches or row.revoked_at is not None:
        return None
    return Principal(user_id=row.user_id, name=row.user.name, roles=row.roles, token_id=row.id)
