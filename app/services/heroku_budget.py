"""The Heroku API budget shared by every Drawbridge process through the database: one row per account,
locked (`SELECT … FOR UPDATE`) for the moment each call is counted or its answer recorded."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from app.clock import Clock
from app.heroku.client import BudgetState, RateBudget
from app.models import HerokuRateBudget

Result = TypeVar("Result")


def account_key(token: str) -> str:
    """The row of an API token's account: a fingerprint, never the token."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


class DatabaseBudgetStore:
    """A `BudgetStore` in the `heroku_rate_budgets` table. Each update is its own short transaction, never
    the caller's, and is never open during a Heroku call."""

    def __init__(self, sessions: sessionmaker[Session], *, account: str) -> None:
        self._sessions = sessions
        self.account = account

    def update(
        self, initial: BudgetState, change: Callable[[BudgetState], tuple[BudgetState, Result]]
    ) -> Result:
        with self._sessions() as session:
            row = self._lock(session)
            if row is None:
                # Two processes may start at once: the first insert wins, the other waits on its lock.
                postgresql = session.get_bind().dialect.name == "postgresql"
                insert = postgresql_insert if postgresql else sqlite_insert
                session.execute(
                    insert(HerokuRateBudget)
                    .values(account=self.account, **_columns(initial))
                    .on_conflict_do_nothing(index_elements=["account"])
                )
                row = self._lock(session)
                assert row is not None
            state, result = change(_state(row))
            for name, value in _columns(state).items():
                setattr(row, name, value)
            session.commit()
            return result

    def _lock(self, session: Session) -> HerokuRateBudget | None:
        return session.scalar(
            select(HerokuRateBudget)
            .where(HerokuRateBudget.account == self.account)
            .with_for_update()
            .execution_options(populate_existing=True)
        )


def _columns(state: BudgetState) -> dict[str, Any]:
    return {
        "tokens": max(0.0, state.tokens),
        "counted_at": state.at,
        "synced_at": state.synced_at,
        "issued": state.issued,
        "reported": state.reported,
        "in_flight": {str(number): sent.isoformat() for number, sent in state.in_flight.items()},
    }


def _state(row: HerokuRateBudget) -> BudgetState:
    return BudgetState(
        tokens=row.tokens,
        at=row.counted_at,
        synced_at=row.synced_at,
        issued=row.issued,
        reported=row.reported,
        in_flight={int(number): datetime.fromisoformat(sent) for number, sent in row.in_flight.items()},
    )


def shared_budget(sessions: sessionmaker[Session], *, token: str, clock: Clock, **policy: Any) -> RateBudget:
    """A RateBudget whose count every process using this database shares."""
    return RateBudget(store=DatabaseBudgetStore(sessions, account=account_key(token)), clock=clock, **policy)
