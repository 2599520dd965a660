"""Idempotency keys: the first answer to a POST carrying `Idempotency-Key` is kept for 24 hours, per token,
and replayed for retries, so a retried POST never repeats its effect."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.models import IdempotencyKey
from app.services.errors import Conflict, InvalidRequest

KEEP = timedelta(hours=24)


class KeyReused(InvalidRequest):
    code = "idempotency_key_reused"


class KeyInFlight(Conflict):
    code = "idempotency_key_in_flight"


@dataclass(frozen=True)
class Replay:
    status: int
    body: str
    content_type: str


def begin(
    sessions: sessionmaker[Session],
    *,
    token_id: str,
    key: str,
    method: str,
    path: str,
    body_hash: str,
    now: datetime,
) -> int | Replay:
    """Claim `key` for this request (commits), returning the claim's id; or the first answer to replay.

    Raises KeyReused (422) when the key came with a different request, KeyInFlight (409) while the first
    request with this key is still being answered.
    """
    with sessions() as session:
        claim = IdempotencyKey(
            token_id=token_id, key=key, method=method, path=path, body_hash=body_hash, created_at=now
        )
        session.add(claim)
        try:
            session.commit()
            return claim.id
        except IntegrityError:
            session.rollback()
        existing = session.scalar(
            select(IdempotencyKey).where(IdempotencyKey.token_id == token_id, IdempotencyKey.key == key)
        )
        if existing is None:  # forgotten in between: the first request failed; this one may go ahead
            return begin(
                sessions, token_id=token_id, key=key, method=method, path=path, body_hash=body_hash, now=now
            )
        if existing.created_at <= now - KEEP:
            session.delete(existing)
            session.commit()
            return begin(
                sessions, token_id=token_id, key=key, method=method, path=path, body_hash=body_hash, now=now
            )
        if (existing.method, existing.path, existing.body_hash) != (method, path, body_hash):
            raise KeyReused(
                "this Idempotency-Key was already used for a different request; use a new key",
                field="Idempotency-Key",
            )
        if existing.status is None or existing.response_body is None:
            raise KeyInFlight("a request with this Idempotency-Key is still being answered; retry shortly")
        return Replay(
            status=existing.status,
            body=existing.response_body,
            content_type=existing.content_type or "application/json",
        )


def complete(
    sessions: sessionmaker[Session], *, claim_id: int, status: int, body: str, content_type: str
) -> None:
    """Keep the answer for replays."""
    with sessions() as session:
        claim = session.get(IdempotencyKey, claim_id)
        if claim is not None:
            claim.status = status
            claim.response_body = body
            claim.content_type = content_type
            session.commit()


def forget(sessions: sessionmaker[Session], *, claim_id: int) -> None:
    """Drop a claim whose request failed unexpectedly, so a retry may run it."""
    with sessions() as session:
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.id == claim_id))
        session.commit()


def purge_expired(sessions: sessionmaker[Session], *, now: datetime) -> int:
    """Delete keys older than 24 hours; returns how many."""
    with sessions() as session:
        result = session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at <= now - KEEP))
        session.commit()
        return int(result.rowcount)  # type: ignore[attr-defined]
