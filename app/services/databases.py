"""Registering databases (resolved at Heroku) and changing their access policy."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.clock import Clock
from app.heroku.client import HerokuClient
from app.heroku.errors import (
    HerokuAuthError,
    HerokuError,
    HerokuNotFound,
    HerokuTransientError,
)
from app.models import Database, Role
from app.services import audit
from app.services.errors import (
    Conflict,
    DatabaseExists,
    DatabaseNotFound,
    HerokuRejected,
    HerokuUnavailable,
    InvalidRequest,
)
from app.services.identity import Principal
from app.validation import InvalidInput, check_database_name, check_heroku_name, check_user_name

POSTGRES_SERVICE = "heroku-postgresql"


@dataclass(frozen=True)
class Policy:
    """Policy fields as given by an admin; None means 'leave as is' (or the default, on registration)."""

    default_duration: int | None = None
    max_duration: int | None = None
    approvals_required: int | None = None
    max_live_per_user: int | None = None
    max_prefix: int | None = None
    approval_window: int | None = None
    reason_pattern: str | None = None
    rule_headroom: int | None = None
    approvers: dict[str, Any] | None = None
    """{"users": [...], "roles": [...]}; {} clears it (anyone with the approver role)."""
    auto_approve: list[dict[str, Any]] | None = None
    """[{"users": [...], "max_duration": seconds}, ...]; [] clears it (people decide everything)."""
    self_extension: int | None = None
    warn_before: int | None = None

    def given(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


POLICY_FIELDS = tuple(f.name for f in fields(Policy))


def _check_policy(db: Database, *, min_duration: int) -> None:
    """Raise InvalidRequest, naming the field, when the resulting policy is not coherent."""
    if db.default_duration < min_duration:
        raise InvalidRequest(
            f"default_duration must be at least the minimum duration of {min_duration} seconds",
            field="default_duration",
        )
    if db.max_duration < db.default_duration:
        raise InvalidRequest("max_duration must be at least default_duration", field="max_duration")
    if not 1 <= db.approvals_required <= 10:
        raise InvalidRequest("approvals_required must be between 1 and 10", field="approvals_required")
    if not 1 <= db.max_live_per_user <= 100:
        raise InvalidRequest("max_live_per_user must be between 1 and 100", field="max_live_per_user")
    if not 16 <= db.max_prefix <= 32:
        raise InvalidRequest(
            "max_prefix must be between 16 and 32 (the widest network a request may open)",
            field="max_prefix",
        )
    if not 0 <= db.rule_headroom <= 59:
        raise InvalidRequest("rule_headroom must be between 0 and 59", field="rule_headroom")
    if db.reason_pattern is not None:
        try:
            re.compile(db.reason_pattern)
        except re.error as exc:
            raise InvalidRequest(
                f"reason_pattern is not a valid regular expression: {exc}", field="reason_pattern"
            ) from None
    _check_access_rules(db)


_CLEARED: dict[str, Any] = {"reason_pattern": "", "approvers": {}, "auto_approve": []}


def _check_access_rules(db: Database) -> None:
    """Who may approve, and which requests policy approves: names, roles and durations must make sense."""
    if db.approvers is not None:
        unknown = set(db.approvers) - {"users", "roles"}
        if unknown or not (db.approvers.get("users") or db.approvers.get("roles")):
            raise InvalidRequest(
                'approvers must be {"users": [...], "roles": [...]} with at least one entry',
                field="approvers",
            )
        for name in db.approvers.get("users") or []:
            try:
                check_user_name(name)
            except InvalidInput as exc:
                raise InvalidRequest(str(exc), field="approvers") from None
        for role in db.approvers.get("roles") or []:
            if role not in {r.value for r in Role} - {Role.BOT.value}:
                raise InvalidRequest(f"{role!r} is not a role that can approve", field="approvers")
    for index, rule in enumerate(db.auto_approve or []):
        if not rule or set(rule) - {"users", "max_duration"}:
            raise InvalidRequest(
                f"auto_approve rule {index} must name users, a max_duration, or both", field="auto_approve"
            )
        for name in rule.get("users") or []:
            try:
                check_user_name(name)
            except InvalidInput as exc:
                raise InvalidRequest(str(exc), field="auto_approve") from None
        limit = rule.get("max_duration")
        if limit is not None and not 0 < limit <= db.max_duration:
            raise InvalidRequest(
                f"auto_approve rule {index}: max_duration must be within the database's max_duration",
                field="auto_approve",
            )
    if not 0 <= db.self_extension <= db.max_duration:
        raise InvalidRequest("self_extension must be between 0 and max_duration", field="self_extension")
    if not 0 <= db.warn_before <= 24 * 3600:
        raise InvalidRequest("warn_before must be between 0 and 24 hours", field="warn_before")


def _apply(db: Database, policy: Policy) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for key, value in policy.given().items():
        if key in _CLEARED and value == _CLEARED[key]:
            value = None
        if getattr(db, key) != value:
            changes[key] = {"from": getattr(db, key), "to": value}
            setattr(db, key, value)
    return changes


class MtlsNotOperational(Conflict):
    code = "mtls_not_operational"


def _unavailable(exc: HerokuError) -> HerokuRejected | HerokuUnavailable:
    if isinstance(exc, HerokuAuthError):
        return HerokuRejected(f"Heroku refused Drawbridge's API token ({exc})")
    if isinstance(exc, HerokuTransientError):
        return HerokuUnavailable(f"Heroku is not answering right now ({exc}); try again later")
    return HerokuRejected(f"Heroku answered unexpectedly ({exc})")


def get_database(session: Session, *, name: str) -> Database:
    db = session.scalar(select(Database).where(Database.name == name))
    if db is None:
        raise DatabaseNotFound(f"no database named {name!r} is registered")
    return db


def list_databases(session: Session, *, principal: Principal) -> Sequence[Database]:
    principal.require_any_human_role()
    return list(session.scalars(select(Database).order_by(Database.name)))


def show_database(session: Session, *, principal: Principal, name: str) -> Database:
    principal.require_any_human_role()
    return get_database(session, name=name)


def register_database(
    session: Session,
    *,
    principal: Principal,
    heroku: HerokuClient | None,
    name: str,
    app: str,
    addon: str,
    policy: Policy,
    min_duration: int,
    clock: Clock,
) -> Database:
    """Resolve `addon` of `app` at Heroku, check mTLS is Operational, and register it as `name`; commit.

    No transaction is open during the Heroku calls. Raises InvalidRequest (unknown add-on, not Postgres,
    mTLS not enabled, bad policy), Conflict (name or add-on already registered, mTLS not yet Operational),
    HerokuUnavailable or HerokuRejected.
    """
    principal.require(Role.ADMIN)
    try:
        check_database_name(name)
        check_heroku_name(app, "app")
        check_heroku_name(addon, "addon")
    except InvalidInput as exc:
        raise InvalidRequest(str(exc)) from None
    candidate = Database(
        name=name,
        app=app,
        addon=addon,
        default_duration=3600,
        max_duration=8 * 3600,
        approvals_required=1,
        max_live_per_user=5,
        max_prefix=28,
        approval_window=24 * 3600,
        reason_pattern=None,
        rule_headroom=5,
        approvers=None,
        auto_approve=None,
        self_extension=0,
        warn_before=600,
    )
    _apply(candidate, policy)
    _check_policy(candidate, min_duration=min_duration)
    if session.scalar(select(Database.id).where(Database.name == name)) is not None:
        raise DatabaseExists(f"a database named {name!r} is already registered")
    session.rollback()  # end the read transaction before talking to Heroku

    if heroku is None:
        raise HerokuUnavailable(
            "Drawbridge has no Heroku credentials: set HEROKU_API_TOKEN, or run with --simulate"
        )
    try:
        found = heroku.get_addon(app=app, addon=addon)
    except HerokuNotFound:
        raise InvalidRequest(
            f"Heroku has no add-on {addon!r} on app {app!r} (or the API token cannot see it)",
            field="addon",
        ) from None
    except HerokuError as exc:
        raise _unavailable(exc) from None
    if found.service not in (None, POSTGRES_SERVICE):
        raise InvalidRequest(f"{addon!r} is a {found.service} add-on, not Heroku Postgres", field="addon")
    try:
        endpoint = heroku.get_tls_endpoint(db=str(found.id))
    except HerokuNotFound:
        raise InvalidRequest(
            f"mTLS is not enabled on {addon!r}; enable it with "
            f"`heroku data:mtls:create {found.name} --app {app}`, then register it once Operational",
            field="addon",
        ) from None
    except HerokuError as exc:
        raise _unavailable(exc) from None
    if endpoint.status != "Operational":
        raise MtlsNotOperational(
            f"mTLS on {addon!r} is {endpoint.status}, not Operational yet; try again when it is"
        )

    now = clock.now()
    candidate.addon = found.name
    candidate.addon_id = found.id
    candidate.plan = found.plan or "unknown"
    candidate.created_at = now
    candidate.updated_at = now
    session.add(candidate)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise DatabaseExists(f"{name!r} or add-on {found.name!r} is already registered") from None
    audit.record(
        session,
        principal=principal,
        action="database:register",
        at=now,
        database=name,
        details={
            "app": app,
            "addon": found.name,
            "addon_id": str(found.id),
            "plan": candidate.plan,
            "policy": {key: getattr(candidate, key) for key in POLICY_FIELDS},
        },
    )
    session.commit()
    return candidate


def update_policy(
    session: Session,
    *,
    principal: Principal,
    name: str,
    policy: Policy,
    min_duration: int,
    clock: Clock,
) -> Database:
    """Change a database's policy; commit with an audit event listing each changed field."""
    principal.require(Role.ADMIN)
    db = session.scalar(select(Database).where(Database.name == name).with_for_update())
    if db is None:
        raise DatabaseNotFound(f"no database named {name!r} is registered")
    changes = _apply(db, policy)
    _check_policy(db, min_duration=min_duration)
    if changes:
        db.updated_at = clock.now()
        audit.record(
            session,
            principal=principal,
            action="database:update_policy",
            at=db.updated_at,
            database=name,
            details={"changes": changes},
        )
    session.commit()
    return db
