"""A count of the Heroku account's API budget shared by every Drawbridge process (heroku_rate_budgets).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "heroku_rate_budgets",
        sa.Column("account", sa.String(length=64), nullable=False),
        sa.Column("tokens", sa.Float(), nullable=False),
        sa.Column("counted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("synced_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("issued", sa.BigInteger(), nullable=False),
        sa.Column("reported", sa.BigInteger(), nullable=False),
        sa.Column(
            "in_flight",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.CheckConstraint("tokens >= 0", name=op.f("ck_heroku_rate_budgets_tokens_not_negative")),
        sa.CheckConstraint("reported <= issued", name=op.f("ck_heroku_rate_budgets_reported_was_issued")),
        sa.PrimaryKeyConstraint("account", name=op.f("pk_heroku_rate_budgets")),
    )


def downgrade() -> None:
    op.drop_table("heroku_rate_budgets")
