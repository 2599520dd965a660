"""Worker heartbeats: each worker process records in the database when it last finished a sweep, so the
API's readiness can tell a stopped worker from a quiet one, and `/metrics` can show each worker's counters.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.models import WorkerHeartbeat
from app.services.errors import DomainError, Kind

FORGET_AFTER = timedelta(days=1)
"""A worker silent this long is gone for good (restarted under another pid, scaled down): its row goes."""


class WorkerNotRunning(DomainError):
    """No worker has ever finished a sweep against this database."""

    kind = Kind.UNAVAILABLE
    code = "worker_not_running"


class WorkerStale(DomainError):
    """The newest heartbeat is older than the staleness threshold: no worker is sweeping."""

    kind = Kind.UNAVAILABLE
    code = "worker_stale"


@dataclass(frozen=True)
class WorkerIdentity:
    """One worker process: a fresh id per start, and where it runs."""

    id: uuid.UUID
    host: str
    pid: int
    started_at: datetime

    @classmethod
    def of_this_process(cls, *, started_at: datetime) -> WorkerIdentity:
        return cls(id=uuid.uuid4(), host=socket.gethostname(), pid=os.getpid(), started_at=started_at)

    @property
    def label(self) -> str:
        """How metrics name this worker: `worker@<host>:<pid>`."""
        return f"worker@{self.host}:{self.pid}"


def beat(
    session: Session, *, worker: WorkerIdentity, now: datetime, metrics: list[dict[str, Any]] | None = None
) -> None:
    """Record that `worker` finished a sweep at `now`, with a snapshot of its own metrics, and forget
    workers silent for longer than FORGET_AFTER. Commits."""
    row = session.get(WorkerHeartbeat, worker.id)
    if row is None:
        session.add(
            WorkerHeartbeat(
                id=worker.id,
                host=worker.host[:255],
                pid=worker.pid,
                started_at=worker.started_at,
                beat_at=now,
                metrics=metrics,
            )
        )
    else:
        row.beat_at = now
        row.metrics = metrics
    session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.beat_at < now - FORGET_AFTER))
    session.commit()


def last_beat(session: Session) -> datetime | None:
    """When any worker last finished a sweep, or None if none ever has."""
    return session.scalar(select(func.max(WorkerHeartbeat.beat_at)))


def alive(session: Session, *, now: datetime, stale: float) -> Sequence[WorkerHeartbeat]:
    """Workers that finished a sweep within the last `stale` seconds, by host and pid."""
    return session.scalars(
        select(WorkerHeartbeat)
        .where(WorkerHeartbeat.beat_at >= now - timedelta(seconds=stale))
        .order_by(WorkerHeartbeat.host, WorkerHeartbeat.pid)
    ).all()


def require_fresh(session: Session, *, now: datetime, stale: float) -> datetime:
    """The newest heartbeat; raise WorkerNotRunning if there is none, WorkerStale if it is older than
    `stale` seconds. Reads only."""
    newest = last_beat(session)
    if newest is None:
        raise WorkerNotRunning("no worker has swept yet: start `drawbridge worker`")
    age = (now - newest).total_seconds()
    if age > stale:
        raise WorkerStale(
            f"the worker last finished a sweep {age:.0f} s ago (more than {stale:g} s): "
            "expired access may not be closed"
        )
    return newest
