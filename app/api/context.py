"""Per-request access to the process runtime, a database session, and the authenticated principal."""

from __future__ import annotations

from flask import current_app, g, request
from sqlalchemy.orm import Session
from werkzeug.exceptions import Unauthorized

from app.runtime import Runtime
from app.services import tokens
from app.services.identity import Principal


def runtime() -> Runtime:
    rt: Runtime = current_app.extensions["drawbridge"]
    return rt


def session() -> Session:
    """The request's session, opened on first use and closed (rolled back if uncommitted) at teardown."""
    if "db_session" not in g:
        g.db_session = runtime().sessions()
    db: Session = g.db_session
    return db


def close_session(_exc: BaseException | None = None) -> None:
    db = g.pop("db_session", None)
    if db is not None:
        db.close()


class NotAuthenticated(Unauthorized):
    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.data = {"headers": {"WWW-Authenticate": 'Bearer realm="drawbridge"'}}


def principal() -> Principal:
    """The caller, from `Authorization: Bearer <token>`; raises 401 for a missing, bad or revoked token."""
    if "principal" in g:
        found: Principal = g.principal
        return found
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if not header:
        raise NotAuthenticated("send an API token as Authorization: Bearer <token>")
    if scheme.lower() != "bearer" or not presented.strip():
        raise NotAuthenticated("the Authorization header must be Bearer <token>")
    db = session()
    found_principal = tokens.authenticate(db, presented=presented.strip())
    db.rollback()  # end the read transaction; services start their own
    if found_principal is None:
        raise NotAuthenticated("the API token is not valid or has been revoked")
    g.principal = found_principal
    return found_principal
