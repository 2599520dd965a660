"""Per-request access to the process runtime, a database session, and the authenticated principal."""

from __future__ import annotations

from dataclasses import replace

from flask import current_app, g, request
from sqlalchemy.orm import Session
from werkzeug.exceptions import Unauthorized

from app.models import Role
from app.runtime import Runtime
from app.services import tokens
from app.services.errors import InvalidRequest, PermissionDenied
from app.services.identity import Principal
from app.validation import InvalidInput, check_user_name

ON_BEHALF_OF = "X-On-Behalf-Of"


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


def _presented_token() -> str | None:
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return None
    return presented.strip()


def token_principal() -> Principal | None:
    """Whose valid bearer token the request carries (before any X-On-Behalf-Of), or None; looked up once
    per request, for the rate limiter and then for `principal()`."""
    if "token_principal" not in g:
        presented = _presented_token()
        found = None
        if presented is not None:
            db = session()
            found = tokens.authenticate(db, presented=presented)
            db.rollback()  # end the read transaction; services start their own
        g.token_principal = found
    cached: Principal | None = g.token_principal
    return cached


def principal() -> Principal:
    """The caller, from `Authorization: Bearer <token>`; raises 401 for a missing, bad or revoked token."""
    if "principal" in g:
        found: Principal = g.principal
        return found
    if not request.headers.get("Authorization"):
        raise NotAuthenticated("send an API token as Authorization: Bearer <token>")
    if _presented_token() is None:
        raise NotAuthenticated("the Authorization header must be Bearer <token>")
    caller = token_principal()
    if caller is None:
        raise NotAuthenticated("the API token is not valid or has been revoked")
    db = session()
    found_principal = _on_behalf(db, caller)
    db.rollback()
    g.principal = found_principal
    return found_principal


def _on_behalf(db: Session, caller: Principal) -> Principal:
    """A bot token acts for the user named in X-On-Behalf-Of, with that user's own permissions; without
    the header it can do nothing. Other tokens may not send the header at all."""
    target = request.headers.get(ON_BEHALF_OF)
    is_bot = caller.has(Role.BOT)
    if target is None:
        if is_bot:
            return replace(caller, roles=frozenset({Role.BOT}))
        return caller
    if not is_bot:
        raise PermissionDenied(f"only bot tokens may send {ON_BEHALF_OF}")
    try:
        check_user_name(target)
    except InvalidInput as exc:
        raise InvalidRequest(str(exc), field=ON_BEHALF_OF) from None
    acting = tokens.acting_for(db, user_name=target, bot=caller, source=caller.source)
    if acting is None:
        raise PermissionDenied(f"{ON_BEHALF_OF} names no Drawbridge user")
    if acting.user_id == caller.user_id:
        raise PermissionDenied("a bot cannot act on behalf of itself")
    return acting


def caller_address(who: Principal) -> str:
    """The caller's address as seen through DRAWBRIDGE_TRUSTED_PROXIES proxy hops, for `"cidr": "auto"`.
    Refused for bots, whose own address says nothing about the person they act for."""
    if who.bot_name is not None or who.has(Role.BOT):
        raise InvalidRequest("a bot must send an explicit CIDR, not auto", field="cidr")
    address = request.remote_addr
    if not address:
        raise InvalidRequest("the caller's address is unknown; send an explicit CIDR", field="cidr")
    return address
