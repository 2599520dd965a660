"""Approver and auto-approval policies, extensions, idempotency keys and the notification outbox.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 15:55:14.733894
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "idempotency_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_id", sa.String(length=16), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("path", sa.String(length=500), nullable=False),
        sa.Column("body_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("response_body", sa.Text(), nullable=True),
        sa.Column("content_type", sa.String(length=100), nullable=True),
        sa.CheckConstraint("length(key) BETWEEN 1 AND 255", name=op.f("ck_idempotency_keys_key_length")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_idempotency_keys")),
        sa.UniqueConstraint("token_id", "key", name=op.f("uq_idempotency_keys_token_id_key")),
    )
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.create_index("ix_idempotency_keys_created_at", ["created_at"], unique=False)

    op.create_table(
        "notifications",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("event", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.Uuid(), nullable=True),
        sa.Column(
            "payload",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "delivered_to",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_notifications_attempts_not_negative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notifications")),
    )
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.create_index("ix_notifications_pending", ["delivered_at", "next_attempt_at"], unique=False)

    with op.batch_alter_table("access_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("approval_round", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("pending_extension", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("self_extended", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("warned_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_check_constraint(
            op.f("ck_access_requests_extension_positive"),
            "pending_extension IS NULL OR pending_extension > 0",
        )

    with op.batch_alter_table("approvals", schema=None) as batch_op:
        batch_op.add_column(sa.Column("round", sa.Integer(), server_default="0", nullable=False))
        batch_op.drop_constraint(batch_op.f("uq_approvals_request_id_approver_id"), type_="unique")
        batch_op.create_unique_constraint(
            batch_op.f("uq_approvals_request_id_round_approver_id"), ["request_id", "round", "approver_id"]
        )

    with op.batch_alter_table("databases", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "approvers",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
                nullable=True,
            )
        )
        batch_op.add_column(
            sa.Column(
                "auto_approve",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
                nullable=True,
            )
        )
        batch_op.add_column(sa.Column("self_extension", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("warn_before", sa.Integer(), server_default="600", nullable=False))
        batch_op.create_check_constraint(
            op.f("ck_databases_self_extension_not_negative"), "self_extension >= 0"
        )
        batch_op.create_check_constraint(op.f("ck_databases_warn_before_not_negative"), "warn_before >= 0")


def downgrade() -> None:
    with op.batch_alter_table("databases", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_databases_warn_before_not_negative"), type_="check")
        batch_op.drop_constraint(op.f("ck_databases_self_extension_not_negative"), type_="check")
        batch_op.drop_column("warn_before")
        batch_op.drop_column("self_extension")
        batch_op.drop_column("auto_approve")
        batch_op.drop_column("approvers")

    # Approvals of extensions have no place in the older schema.
    op.execute("DELETE FROM approvals WHERE round > 0")
    with op.batch_alter_table("approvals", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_approvals_request_id_round_approver_id"), type_="unique")
        batch_op.create_unique_constraint(
            batch_op.f("uq_approvals_request_id_approver_id"), ["request_id", "approver_id"]
        )
        batch_op.drop_column("round")

    with op.batch_alter_table("access_requests", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_access_requests_extension_positive"), type_="check")
        batch_op.drop_column("warned_at")
        batch_op.drop_column("self_extended")
        batch_op.drop_column("pending_extension")
        batch_op.drop_column("approval_round")

    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.drop_index("ix_notifications_pending")

    op.drop_table("notifications")
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.drop_index("ix_idempotency_keys_created_at")

    op.drop_table("idempotency_keys")
