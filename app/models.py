"""Typed models of Drawbridge's own database; invariants that can live in the schema are CHECK constraints."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Enum,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db import Base, UTCDateTime


class Role(enum.StrEnum):
    REQUESTER = "requester"
    APPROVER = "approver"
    AUDITOR = "auditor"
    ADMIN = "admin"
    BOT = "bot"


class RequestStatus(enum.StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    PROVISIONING = "provisioning"
    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"
    DENIED = "denied"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    FAILED = "failed"

    @property
    def is_live(self) -> bool:
        return self in LIVE_STATUSES


class RuleStatus(enum.StrEnum):
    """Drawbridge's record of one Heroku IP rule it owns."""

    CREATING = "creating"  # intent committed; Heroku may or may not have it yet
    AUTHORIZING = "authorizing"  # Heroku has it and is still authorizing it
    AUTHORIZED = "authorized"  # access works
    DELETING = "deleting"  # no live request needs it; it must go
    DELETED = "deleted"  # gone at Heroku


LIVE_RULE_STATUSES = frozenset(
    {RuleStatus.CREATING, RuleStatus.AUTHORIZING, RuleStatus.AUTHORIZED, RuleStatus.DELETING}
)

LIVE_STATUSES = frozenset(
    {
        RequestStatus.PENDING,
        RequestStatus.APPROVED,
        RequestStatus.PROVISIONING,
        RequestStatus.ACTIVE,
    }
)
DECIDED_STATUSES = frozenset(
    {
        RequestStatus.APPROVED,
        RequestStatus.PROVISIONING,
        RequestStatus.ACTIVE,
        RequestStatus.EXPIRED,
        RequestStatus.FAILED,
        RequestStatus.DENIED,
        RequestStatus.REVOKED,
    }
)

# The state machine of DESIGN.md: every transition a request may make. Final states have none.
ALLOWED_TRANSITIONS: dict[RequestStatus, frozenset[RequestStatus]] = {
    RequestStatus.PENDING: frozenset(
        {RequestStatus.APPROVED, RequestStatus.DENIED, RequestStatus.CANCELLED, RequestStatus.TIMED_OUT}
    ),
    RequestStatus.APPROVED: frozenset(
        {RequestStatus.PROVISIONING, RequestStatus.CANCELLED, RequestStatus.REVOKED, RequestStatus.FAILED}
    ),
    RequestStatus.PROVISIONING: frozenset(
        {RequestStatus.ACTIVE, RequestStatus.REVOKED, RequestStatus.FAILED}
    ),
    RequestStatus.ACTIVE: frozenset({RequestStatus.EXPIRED, RequestStatus.REVOKED}),
    **{status: frozenset() for status in RequestStatus if status not in LIVE_STATUSES},
}

_LIVE_RULE_SQL = ", ".join(f"'{s.value}'" for s in sorted(LIVE_RULE_STATUSES))
_LIVE_SQL = ", ".join(f"'{s.value}'" for s in sorted(LIVE_STATUSES))
_DECIDED_SQL = ", ".join(f"'{s.value}'" for s in sorted(DECIDED_STATUSES))


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


_Json = JSON().with_variant(JSONB(), "postgresql")
_BigId = BigInteger().with_variant(Integer(), "sqlite")


class User(Base):
    __tablename__ = "users"
    __table_args__ = (CheckConstraint("length(name) BETWEEN 1 AND 64", name="name_length"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    slack_user_id: Mapped[str | None] = mapped_column(String(32), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ApiToken(Base):
    """A bearer token, `dbt_<id>_<secret>`; only the SHA-256 of the secret is kept."""

    __tablename__ = "api_tokens"
    __table_args__ = (CheckConstraint("length(secret_hash) = 64", name="secret_hash_length"),)

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    user: Mapped[User] = relationship(lazy="joined", innerjoin=True)
    role_rows: Mapped[list[ApiTokenRole]] = relationship(lazy="selectin", cascade="all, delete-orphan")

    @property
    def roles(self) -> frozenset[Role]:
        return frozenset(row.role for row in self.role_rows)


class ApiTokenRole(Base):
    __tablename__ = "api_token_roles"

    token_id: Mapped[str] = mapped_column(ForeignKey("api_tokens.id"), primary_key=True)
    role: Mapped[Role] = mapped_column(_enum(Role, "role"), primary_key=True)


class Database(Base):
    """A registered Heroku Postgres add-on and the policy that governs access to it."""

    __tablename__ = "databases"
    __table_args__ = (
        CheckConstraint("default_duration > 0", name="default_duration_positive"),
        CheckConstraint("max_duration >= default_duration", name="max_covers_default"),
        CheckConstraint("approvals_required BETWEEN 1 AND 10", name="approvals_required_range"),
        CheckConstraint("max_live_per_user BETWEEN 1 AND 100", name="max_live_per_user_range"),
        CheckConstraint("max_prefix BETWEEN 16 AND 32", name="max_prefix_range"),
        CheckConstraint("approval_window > 0", name="approval_window_positive"),
        CheckConstraint("rule_headroom BETWEEN 0 AND 59", name="rule_headroom_range"),
        CheckConstraint("self_extension >= 0", name="self_extension_not_negative"),
        CheckConstraint("warn_before >= 0", name="warn_before_not_negative"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    app: Mapped[str] = mapped_column(String(100))
    addon: Mapped[str] = mapped_column(String(100))
    addon_id: Mapped[uuid.UUID] = mapped_column(Uuid(), unique=True)
    plan: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    default_duration: Mapped[int] = mapped_column(Integer, default=3600)
    max_duration: Mapped[int] = mapped_column(Integer, default=8 * 3600)
    approvals_required: Mapped[int] = mapped_column(Integer, default=1)
    max_live_per_user: Mapped[int] = mapped_column(Integer, default=5)
    max_prefix: Mapped[int] = mapped_column(Integer, default=28)
    approval_window: Mapped[int] = mapped_column(Integer, default=24 * 3600)
    reason_pattern: Mapped[str | None] = mapped_column(String(200))
    rule_headroom: Mapped[int] = mapped_column(Integer, default=5)
    approvers: Mapped[dict[str, Any] | None] = mapped_column(_Json)
    """None: anyone with the approver role. Else {"users": [...], "roles": [...]} narrows who may approve."""
    auto_approve: Mapped[list[dict[str, Any]] | None] = mapped_column(_Json)
    """None: every request needs people. Else rules [{"users": [...], "max_duration": seconds}]; a request
    matching any rule is approved by policy, and the audit says so."""
    self_extension: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Seconds a requester may add to live access in total without a new approval."""
    warn_before: Mapped[int] = mapped_column(Integer, default=600, server_default="600")
    """Seconds before access ends when its holder is warned."""

    # What the worker last saw at Heroku; it paces polling and counts toward the 60-rule limit.
    rules_polled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    reconciled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    foreign_rule_count: Mapped[int | None] = mapped_column(Integer)


class AccessRequest(Base):
    __tablename__ = "access_requests"
    __table_args__ = (
        CheckConstraint("duration > 0", name="duration_positive"),
        CheckConstraint("length(reason) BETWEEN 1 AND 1000", name="reason_length"),
        CheckConstraint(
            f"(status IN ({_LIVE_SQL}) AND ended_at IS NULL) "
            f"OR (status NOT IN ({_LIVE_SQL}) AND ended_at IS NOT NULL)",
            name="ended_iff_final",
        ),
        CheckConstraint(f"status NOT IN ({_DECIDED_SQL}) OR decided_at IS NOT NULL", name="decided_has_time"),
        CheckConstraint(
            "status <> 'active' OR (activated_at IS NOT NULL AND expires_at IS NOT NULL)",
            name="active_has_window",
        ),
        CheckConstraint(
            "status NOT IN ('provisioning', 'active') OR ip_rule_id IS NOT NULL", name="granted_has_rule"
        ),
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
        CheckConstraint("pending_extension IS NULL OR pending_extension > 0", name="extension_positive"),
        UniqueConstraint("id", "requester_id"),
        Index("ix_access_requests_status_next_attempt", "status", "next_attempt_at"),
        Index(
            "uq_access_requests_live_grant",
            "requester_id",
            "database_id",
            "cidr",
            unique=True,
            postgresql_where=text(f"status IN ({_LIVE_SQL})"),
            sqlite_where=text(f"status IN ({_LIVE_SQL})"),
        ),
        Index("ix_access_requests_status_created", "status", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    database_id: Mapped[int] = mapped_column(ForeignKey("databases.id"), index=True)
    requester_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    filed_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    cidr: Mapped[str] = mapped_column(String(18))
    duration: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    status: Mapped[RequestStatus] = mapped_column(_enum(RequestStatus, "status"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    end_reason: Mapped[str | None] = mapped_column(Text)
    ip_rule_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("ip_rules.id"), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    approval_round: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """0 while the request itself is decided; k while its k-th extension is."""
    pending_extension: Mapped[int | None] = mapped_column(Integer)
    """Seconds asked to be added to active access, waiting for approval."""
    self_extended: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Seconds added without approval so far (bounded by the policy's self_extension)."""
    warned_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    database: Mapped[Database] = relationship(lazy="joined", innerjoin=True)
    requester: Mapped[User] = relationship(foreign_keys=[requester_id], lazy="joined", innerjoin=True)
    filed_by: Mapped[User | None] = relationship(foreign_keys=[filed_by_id], lazy="joined")
    ip_rule: Mapped[IpRule | None] = relationship(lazy="selectin")
    approvals: Mapped[list[Approval]] = relationship(
        lazy="selectin",
        order_by="Approval.id",
        primaryjoin="AccessRequest.id == foreign(Approval.request_id)",
        viewonly=True,
    )


class IpRule(Base):
    """One Heroku mTLS IP rule Drawbridge owns for a (database, CIDR); requests for that CIDR share it."""

    __tablename__ = "ip_rules"
    __table_args__ = (
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
        CheckConstraint(
            "status NOT IN ('authorizing', 'authorized') OR heroku_rule_id IS NOT NULL",
            name="known_at_heroku",
        ),
        CheckConstraint("status <> 'authorized' OR authorized_at IS NOT NULL", name="authorized_has_time"),
        CheckConstraint("status <> 'deleted' OR deleted_at IS NOT NULL", name="deleted_has_time"),
        Index(
            "uq_ip_rules_live_cidr",
            "database_id",
            "cidr",
            unique=True,
            postgresql_where=text(f"status IN ({_LIVE_RULE_SQL})"),
            sqlite_where=text(f"status IN ({_LIVE_RULE_SQL})"),
        ),
        Index("ix_ip_rules_status_next_attempt", "status", "next_attempt_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    database_id: Mapped[int] = mapped_column(ForeignKey("databases.id"), index=True)
    cidr: Mapped[str] = mapped_column(String(18))
    status: Mapped[RuleStatus] = mapped_column(_enum(RuleStatus, "status"))
    heroku_rule_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    authorized_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    release_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)

    database: Mapped[Database] = relationship(lazy="joined", innerjoin=True)


class Approval(Base):
    """One approver's approval. The requester is repeated so the database itself refuses self-approval."""

    __tablename__ = "approvals"
    __table_args__ = (
        UniqueConstraint("request_id", "round", "approver_id"),
        CheckConstraint("approver_id <> requester_id", name="not_self"),
        ForeignKeyConstraint(
            ["request_id", "requester_id"],
            ["access_requests.id", "access_requests.requester_id"],
            name="fk_approvals_request_requester",
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[uuid.UUID] = mapped_column(Uuid())
    requester_id: Mapped[int] = mapped_column(Integer)
    approver_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    round: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """0 approves the request; k approves its k-th extension."""
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    approver: Mapped[User] = relationship(lazy="joined", innerjoin=True)


class AuditEvent(Base):
    """Append-only record of one state change, written in the transaction of the change itself.

    Events form a hash chain in `seq` order: each `hash` covers the event's content and the previous
    event's hash, so an edited, deleted or reordered row breaks every link after it.
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        CheckConstraint("action LIKE '%:%'", name="action_is_tagged"),
        CheckConstraint("seq >= 1", name="seq_positive"),
        CheckConstraint("length(hash) = 64 AND length(prev_hash) = 64", name="hash_lengths"),
        UniqueConstraint("seq"),
        Index("ix_audit_events_occurred_at_seq", "occurred_at", "seq"),
        Index("ix_audit_events_actor_seq", "actor", "seq"),
        Index("ix_audit_events_on_behalf_of_seq", "on_behalf_of", "seq"),
        Index("ix_audit_events_database_seq", "database", "seq"),
        Index("ix_audit_events_action_seq", "action", "seq"),
        Index("ix_audit_events_request_id_seq", "request_id", "seq"),
        # The commonest pairs of filters auditors combine, so their first page is an index range scan.
        Index("ix_audit_events_actor_action_seq", "actor", "action", "seq"),
        Index("ix_audit_events_database_action_seq", "database", "action", "seq"),
    )

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    """Position in the chain: consecutive, and in commit order (writers take turns to append)."""
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime())
    """From `AuditMark.TIME_ORDERED_FROM` on, never earlier than the previous event's: `seq` order is
    time order, so a time window is a `seq` range."""
    actor: Mapped[str] = mapped_column(String(64))
    on_behalf_of: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[uuid.UUID | None] = mapped_column(Uuid())
    database: Mapped[str | None] = mapped_column(String(63))
    details: Mapped[dict[str, Any]] = mapped_column(_Json)


class AuditMark(Base):
    """Named positions in the audit chain, written by migrations.

    `time_ordered_from` is the first `seq` from which every event's `occurred_at` is at least the
    previous event's; rows chained before that rule existed may be out of time order."""

    __tablename__ = "audit_marks"

    TIME_ORDERED_FROM = "time_ordered_from"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)


class IdempotencyKey(Base):
    """The first answer to a POST that carried an `Idempotency-Key`, replayed for retries (24 hours)."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        UniqueConstraint("token_id", "key"),
        CheckConstraint("length(key) BETWEEN 1 AND 255", name="key_length"),
        Index("ix_idempotency_keys_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    token_id: Mapped[str] = mapped_column(String(16))
    key: Mapped[str] = mapped_column(String(255))
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(500))
    body_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    status: Mapped[int | None] = mapped_column(Integer)
    """None while the first request is still being answered."""
    response_body: Mapped[str | None] = mapped_column(Text)
    content_type: Mapped[str | None] = mapped_column(String(100))


class Notification(Base):
    """Outbox: one event to announce, written in the transaction of the change it announces, and
    delivered by the worker to every configured receiver with retries."""

    __tablename__ = "notifications"
    __table_args__ = (
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
        Index("ix_notifications_pending", "delivered_at", "next_attempt_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    event: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[uuid.UUID | None] = mapped_column(Uuid())
    payload: Mapped[dict[str, Any]] = mapped_column(_Json)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    delivered_to: Mapped[list[str]] = mapped_column(_Json, default=list)
    """Receivers (by name) that already accepted it, so a retry never sends it to them twice."""
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)


class HerokuRateBudget(Base):
    """The count of a Heroku account's API budget that every Drawbridge process shares (see
    `app.heroku.client.RateBudget`); its row is locked for each update."""

    __tablename__ = "heroku_rate_budgets"
    __table_args__ = (
        CheckConstraint("tokens >= 0", name="tokens_not_negative"),
        CheckConstraint("reported <= issued", name="reported_was_issued"),
    )

    account: Mapped[str] = mapped_column(String(64), primary_key=True)
    """A fingerprint of the API token: Heroku keeps one bucket per account."""
    tokens: Mapped[float] = mapped_column(Float)
    counted_at: Mapped[datetime] = mapped_column(UTCDateTime())
    synced_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    issued: Mapped[int] = mapped_column(BigInteger)
    reported: Mapped[int] = mapped_column(BigInteger)
    in_flight: Mapped[dict[str, str]] = mapped_column(_Json)
    """Calls sent and not answered yet: their number → when they were sent (ISO 8601)."""


class WorkerHeartbeat(Base):
    """One worker process's sign of life: written after each sweep it finishes, with a snapshot of its own
    metrics. Readiness reads the newest; rows silent for a day are deleted by the workers."""

    __tablename__ = "worker_heartbeats"

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    beat_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    metrics: Mapped[list[dict[str, Any]] | None] = mapped_column(_Json)
