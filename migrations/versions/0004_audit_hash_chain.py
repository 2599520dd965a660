"""Hash-chain the audit log (seq, prev_hash, hash), index it by seq, and on PostgreSQL refuse UPDATE and
DELETE of audit rows with a trigger.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 16:45:00
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GENESIS = "0" * 64
OLD_INDEXES = {
    "ix_audit_events_occurred_at": ["occurred_at"],
    "ix_audit_events_actor_id": ["actor", "id"],
    "ix_audit_events_database_id": ["database", "id"],
    "ix_audit_events_action_id": ["action", "id"],
    "ix_audit_events_request_id_id": ["request_id", "id"],
}
NEW_INDEXES = {
    "ix_audit_events_occurred_at_seq": ["occurred_at", "seq"],
    "ix_audit_events_actor_seq": ["actor", "seq"],
    "ix_audit_events_on_behalf_of_seq": ["on_behalf_of", "seq"],
    "ix_audit_events_database_seq": ["database", "seq"],
    "ix_audit_events_action_seq": ["action", "seq"],
    "ix_audit_events_request_id_seq": ["request_id", "seq"],
}


def _utc(value: Any) -> str:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    moment = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return str(moment.isoformat())


def _request_id(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).replace("-", "")
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def _chain_existing() -> None:
    """Link the rows written before the chain existed, in id order (a frozen copy of the rule in
    app/services/audit.py, so this revision keeps working whatever that module becomes)."""
    bind = op.get_bind()
    rows = bind.execute(
        sa.text(
            "SELECT id, occurred_at, actor, on_behalf_of, source, action, request_id, database, details "
            "FROM audit_events ORDER BY id"
        )
    ).all()
    previous = GENESIS
    for seq, row in enumerate(rows, start=1):
        details = row.details if not isinstance(row.details, str) else json.loads(row.details)
        content = {
            "seq": seq,
            "occurred_at": _utc(row.occurred_at),
            "actor": row.actor,
            "on_behalf_of": row.on_behalf_of,
            "source": row.source,
            "action": row.action,
            "request_id": _request_id(row.request_id),
            "database": row.database,
            "details": details,
        }
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        digest = hashlib.sha256(previous.encode() + b"\n" + canonical.encode()).hexdigest()
        bind.execute(
            sa.text("UPDATE audit_events SET seq = :seq, prev_hash = :prev, hash = :hash WHERE id = :id"),
            {"seq": seq, "prev": previous, "hash": digest, "id": row.id},
        )
        previous = digest


def upgrade() -> None:
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("seq", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("hash", sa.String(length=64), nullable=True))
    _chain_existing()
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.alter_column("seq", existing_type=sa.BigInteger(), nullable=False)
        batch_op.alter_column("prev_hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.alter_column("hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.create_unique_constraint(batch_op.f("uq_audit_events_seq"), ["seq"])
        batch_op.create_check_constraint(op.f("ck_audit_events_seq_positive"), "seq >= 1")
        batch_op.create_check_constraint(
            op.f("ck_audit_events_hash_lengths"), "length(hash) = 64 AND length(prev_hash) = 64"
        )
        for name in OLD_INDEXES:
            batch_op.drop_index(name)
        for name, columns in NEW_INDEXES.items():
            batch_op.create_index(name, columns, unique=False)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION audit_events_append_only() RETURNS trigger AS $$
            BEGIN
                RAISE EXCEPTION 'audit_events is append-only: % refused', TG_OP
                    USING ERRCODE = 'insufficient_privilege';
            END
            $$ LANGUAGE plpgsql
            """
        )
        op.execute(
            "CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events "
            "FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER audit_events_append_only ON audit_events")
        op.execute("DROP FUNCTION audit_events_append_only()")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        for name in NEW_INDEXES:
            batch_op.drop_index(name)
        for name, columns in OLD_INDEXES.items():
            batch_op.create_index(name, columns, unique=False)
        batch_op.drop_constraint(op.f("ck_audit_events_hash_lengths"), type_="check")
        batch_op.drop_constraint(op.f("ck_audit_events_seq_positive"), type_="check")
        batch_op.drop_constraint(batch_op.f("uq_audit_events_seq"), type_="unique")
        batch_op.drop_column("hash")
        batch_op.drop_column("prev_hash")
        batch_op.drop_column("seq")
