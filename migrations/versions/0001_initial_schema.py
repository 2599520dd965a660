"""Initial schema: users and API tokens, databases with policy, access requests, approvals, audit events.

Revision ID: 0001
Revises:
Create Date: 2026-11-28 15:10:32.487328
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("on_behalf_of", sa.String(length=64), nullable=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.Uuid(), nullable=True),
        sa.Column("database", sa.String(length=63), nullable=True),
        sa.Column(
            "details",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.CheckConstraint("action LIKE '%:%'", name=op.f("ck_audit_events_action_is_tagged")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index("ix_audit_events_action_id", ["action", "id"], unique=False)
        batch_op.create_index("ix_audit_events_actor_id", ["actor", "id"], unique=False)
        batch_op.create_index("ix_audit_events_database_id", ["database", "id"], unique=False)
        batch_op.create_index("ix_audit_events_occurred_at", ["occurred_at"], unique=False)
        batch_op.create_index("ix_audit_events_request_id_id", ["request_id", "id"], unique=False)

    op.create_table(
        "databases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("app", sa.String(length=100), nullable=False),
        sa.Column("addon", sa.String(length=100), nullable=False),
        sa.Column("addon_id", sa.Uuid(), nullable=False),
        sa.Column("plan", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("default_duration", sa.Integer(), nullable=False),
        sa.Column("max_duration", sa.Integer(), nullable=False),
        sa.Column("approvals_required", sa.Integer(), nullable=False),
        sa.Column("max_live_per_user", sa.Integer(), nullable=False),
        sa.Column("max_prefix", sa.Integer(), nullable=False),
        sa.Column("approval_window", sa.Integer(), nullable=False),
        sa.Column("reason_pattern", sa.String(length=200), nullable=True),
        sa.Column("rule_headroom", sa.Integer(), nullable=False),
        sa.CheckConstraint("approval_window > 0", name=op.f("ck_databases_approval_window_positive")),
        sa.CheckConstraint(
            "approvals_required BETWEEN 1 AND 10",
            name=op.f("ck_databases_approvals_required_range"),
        ),
        sa.CheckConstraint("default_duration > 0", name=op.f("ck_databases_default_duration_positive")),
        sa.CheckConstraint("max_duration >= default_duration", name=op.f("ck_databases_max_covers_default")),
        sa.CheckConstraint(
            "max_live_per_user BETWEEN 1 AND 100", name=op.f("ck_databases_max_live_per_user_range")
        ),
        sa.CheckConstraint("max_prefix BETWEEN 16 AND 32", name=op.f("ck_databases_max_prefix_range")),
        sa.CheckConstraint("rule_headroom BETWEEN 0 AND 59", name=op.f("ck_databases_rule_headroom_range")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_databases")),
        sa.UniqueConstraint("addon_id", name=op.f("uq_databases_addon_id")),
        sa.UniqueConstraint("name", name=op.f("uq_databases_name")),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("slack_user_id", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("length(name) BETWEEN 1 AND 64", name=op.f("ck_users_name_length")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("name", name=op.f("uq_users_name")),
        sa.UniqueConstraint("slack_user_id", name=op.f("uq_users_slack_user_id")),
    )
    op.create_table(
        "access_requests",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("database_id", sa.Integer(), nullable=False),
        sa.Column("requester_id", sa.Integer(), nullable=False),
        sa.Column("filed_by_id", sa.Integer(), nullable=True),
        sa.Column("cidr", sa.String(length=18), nullable=False),
        sa.Column("duration", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "pending",
                "approved",
                "provisioning",
                "active",
                "expired",
                "revoked",
                "denied",
                "cancelled",
                "timed_out",
                "failed",
                name="status",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_reason", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "(status IN ('active', 'approved', 'pending', 'provisioning') AND ended_at IS NULL) OR (status NOT IN ('active', 'approved', 'pending', 'provisioning') AND ended_at IS NOT NULL)",
            name=op.f("ck_access_requests_ended_iff_final"),
        ),
        sa.CheckConstraint(
            "status <> 'active' OR (activated_at IS NOT NULL AND expires_at IS NOT NULL)",
            name=op.f("ck_access_requests_active_has_window"),
        ),
        sa.CheckConstraint(
            "status NOT IN ('active', 'approved', 'denied', 'expired', 'failed', 'provisioning', 'revoked') OR decided_at IS NOT NULL",
            name=op.f("ck_access_requests_decided_has_time"),
        ),
        sa.CheckConstraint("duration > 0", name=op.f("ck_access_requests_duration_positive")),
        sa.CheckConstraint(
            "length(reason) BETWEEN 1 AND 1000", name=op.f("ck_access_requests_reason_length")
        ),
        sa.ForeignKeyConstraint(
            ["database_id"], ["databases.id"], name=op.f("fk_access_requests_database_id_databases")
        ),
        sa.ForeignKeyConstraint(
            ["filed_by_id"], ["users.id"], name=op.f("fk_access_requests_filed_by_id_users")
        ),
        sa.ForeignKeyConstraint(
            ["requester_id"], ["users.id"], name=op.f("fk_access_requests_requester_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_access_requests")),
        sa.UniqueConstraint("id", "requester_id", name=op.f("uq_access_requests_id_requester_id")),
    )
    with op.batch_alter_table("access_requests", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_access_requests_database_id"), ["database_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_access_requests_requester_id"), ["requester_id"], unique=False)
        batch_op.create_index("ix_access_requests_status_created", ["status", "created_at"], unique=False)
        batch_op.create_index(
            "uq_access_requests_live_grant",
            ["requester_id", "database_id", "cidr"],
            unique=True,
            postgresql_where=sa.text("status IN ('active', 'approved', 'pending', 'provisioning')"),
            sqlite_where=sa.text("status IN ('active', 'approved', 'pending', 'provisioning')"),
        )

    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(length=16), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("length(secret_hash) = 64", name=op.f("ck_api_tokens_secret_hash_length")),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_api_tokens_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
    )
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_tokens_user_id"), ["user_id"], unique=False)

    op.create_table(
        "api_token_roles",
        sa.Column("token_id", sa.String(length=16), nullable=False),
        sa.Column(
            "role",
            sa.Enum(
                "requester",
                "approver",
                "auditor",
                "admin",
                "bot",
                name="role",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["token_id"], ["api_tokens.id"], name=op.f("fk_api_token_roles_token_id_api_tokens")
        ),
        sa.PrimaryKeyConstraint("token_id", "role", name=op.f("pk_api_token_roles")),
    )
    op.create_table(
        "approvals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.Uuid(), nullable=False),
        sa.Column("requester_id", sa.Integer(), nullable=False),
        sa.Column("approver_id", sa.Integer(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("approver_id <> requester_id", name=op.f("ck_approvals_not_self")),
        sa.ForeignKeyConstraint(["approver_id"], ["users.id"], name=op.f("fk_approvals_approver_id_users")),
        sa.ForeignKeyConstraint(
            ["request_id", "requester_id"],
            ["access_requests.id", "access_requests.requester_id"],
            name="fk_approvals_request_requester",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_approvals")),
        sa.UniqueConstraint("request_id", "approver_id", name=op.f("uq_approvals_request_id_approver_id")),
    )


def downgrade() -> None:
    op.drop_table("approvals")
    op.drop_table("api_token_roles")
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_tokens_user_id"))

    op.drop_table("api_tokens")
    with op.batch_alter_table("access_requests", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_access_requests_live_grant",
            postgresql_where=sa.text("status IN ('active', 'approved', 'pending', 'provisioning')"),
            sqlite_where=sa.text("status IN ('active', 'approved', 'pending', 'provisioning')"),
        )
        batch_op.drop_index("ix_access_requests_status_created")
        batch_op.drop_index(batch_op.f("ix_access_requests_requester_id"))
        batch_op.drop_index(batch_op.f("ix_access_requests_database_id"))

    op.drop_table("access_requests")
    op.drop_table("users")
    op.drop_table("databases")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_events_request_id_id")
        batch_op.drop_index("ix_audit_events_occurred_at")
        batch_op.drop_index("ix_audit_events_database_id")
        batch_op.drop_index("ix_audit_events_actor_id")
        batch_op.drop_index("ix_audit_events_action_id")

    op.drop_table("audit_events")
