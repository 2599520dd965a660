"""Make audit time windows cheap: mark where `occurred_at` starts following `seq`, index the commonest
filter pairs, and on PostgreSQL give the planner joint statistics for the filter columns.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 07:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = {
    "ix_audit_events_actor_action_seq": ["actor", "action", "seq"],
    "ix_audit_events_database_action_seq": ["database", "action", "seq"],
}
STATISTICS = "st_audit_events_filters"


def upgrade() -> None:
    op.create_table(
        "audit_marks",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_audit_marks")),
    )
    # From here on the application never lets occurred_at go backwards along the chain. Rows already
    # chained keep their times (they are append-only), so the mark starts after the last row that is
    # earlier than one before it.
    bind = op.get_bind()
    last_out_of_order = bind.execute(
        sa.text(
            "SELECT max(seq) FROM ("
            " SELECT seq, occurred_at < max(occurred_at) OVER ("
            "  ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS early"
            " FROM audit_events) AS ordered WHERE early"
        )
    ).scalar()
    bind.execute(
        sa.text("INSERT INTO audit_marks (name, seq) VALUES ('time_ordered_from', :seq)"),
        {"seq": (last_out_of_order or 0) + 1},
    )
    for name, columns in INDEXES.items():
        op.create_index(name, "audit_events", columns)
    if bind.dialect.name == "postgresql":
        op.execute(
            f"CREATE STATISTICS {STATISTICS} (dependencies, ndistinct) ON actor, action, database FROM audit_events"
        )
        op.execute("ANALYZE audit_events")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP STATISTICS IF EXISTS {STATISTICS}")
    for name in INDEXES:
        op.drop_index(name, table_name="audit_events")
    op.drop_table("audit_marks")
