"""IP rules Drawbridge owns at Heroku, and the worker's retry bookkeeping on requests and databases.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 15:20:15.319030
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ip_rules",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("database_id", sa.Integer(), nullable=False),
        sa.Column("cidr", sa.String(length=18), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "creating",
                "authorizing",
                "authorized",
                "deleting",
                "deleted",
                name="status",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("heroku_rule_id", sa.String(length=64), nullable=True),
        sa.Column("description", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("authorized_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("release_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "status <> 'authorized' OR authorized_at IS NOT NULL",
            name=op.f("ck_ip_rules_authorized_has_time"),
        ),
        sa.CheckConstraint(
            "status <> 'deleted' OR deleted_at IS NOT NULL", name=op.f("ck_ip_rules_deleted_has_time")
        ),
        sa.CheckConstraint(
            "status NOT IN ('authorizing', 'authorized') OR heroku_rule_id IS NOT NULL",
            name=op.f("ck_ip_rules_known_at_heroku"),
        ),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_ip_rules_attempts_not_negative")),
        sa.ForeignKeyConstraint(
            ["database_id"], ["databases.id"], name=op.f("fk_ip_rules_database_id_databases")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ip_rules")),
        sa.UniqueConstraint("heroku_rule_id", name=op.f("uq_ip_rules_heroku_rule_id")),
    )
    with op.batch_alter_table("ip_rules", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ip_rules_database_id"), ["database_id"], unique=False)
        batch_op.create_index("ix_ip_rules_status_next_attempt", ["status", "next_attempt_at"], unique=False)
        batch_op.create_index(
            "uq_ip_rules_live_cidr",
            ["database_id", "cidr"],
            unique=True,
            postgresql_where=sa.text("status IN ('authorized', 'authorizing', 'creating', 'deleting')"),
            sqlite_where=sa.text("status IN ('authorized', 'authorizing', 'creating', 'deleting')"),
        )

    with op.batch_alter_table("access_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ip_rule_id", sa.Uuid(), nullable=True))
        batch_op.add_column(sa.Column("attempts", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("last_error", sa.Text(), nullable=True))
        batch_op.create_index(batch_op.f("ix_access_requests_ip_rule_id"), ["ip_rule_id"], unique=False)
        batch_op.create_index(
            "ix_access_requests_status_next_attempt", ["status", "next_attempt_at"], unique=False
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_access_requests_ip_rule_id_ip_rules"), "ip_rules", ["ip_rule_id"], ["id"]
        )
        batch_op.create_check_constraint(
            op.f("ck_access_requests_granted_has_rule"),
            "status NOT IN ('provisioning', 'active') OR ip_rule_id IS NOT NULL",
        )
        batch_op.create_check_constraint(op.f("ck_access_requests_attempts_not_negative"), "attempts >= 0")

    with op.batch_alter_table("databases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rules_polled_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("reconciled_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("foreign_rule_count", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("databases", schema=None) as batch_op:
        batch_op.drop_column("foreign_rule_count")
        batch_op.drop_column("reconciled_at")
        batch_op.drop_column("rules_polled_at")

    with op.batch_alter_table("access_requests", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_access_requests_attempts_not_negative"), type_="check")
        batch_op.drop_constraint(op.f("ck_access_requests_granted_has_rule"), type_="check")
        batch_op.drop_constraint(batch_op.f("fk_access_requests_ip_rule_id_ip_rules"), type_="foreignkey")
        batch_op.drop_index("ix_access_requests_status_next_attempt")
        batch_op.drop_index(batch_op.f("ix_access_requests_ip_rule_id"))
        batch_op.drop_column("last_error")
        batch_op.drop_column("next_attempt_at")
        batch_op.drop_column("attempts")
        batch_op.drop_column("ip_rule_id")

    with op.batch_alter_table("ip_rules", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_ip_rules_live_cidr",
            postgresql_where=sa.text("status IN ('authorized', 'authorizing', 'creating', 'deleting')"),
            sqlite_where=sa.text("status IN ('authorized', 'authorizing', 'creating', 'deleting')"),
        )
        batch_op.drop_index("ix_ip_rules_status_next_attempt")
        batch_op.drop_index(batch_op.f("ix_ip_rules_database_id"))

    op.drop_table("ip_rules")
