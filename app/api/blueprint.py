"""The flask-smorest Blueprint every resource uses: guarded body parsing, documented errors, and callers
authenticated before anything else (a bearer token, unless a view is public or brings its own check)."""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus
from typing import Any, TypeVar

import flask_smorest
from flask import current_app, request

from app.api.context import principal
from app.api.problem import GuardedParser

F = TypeVar("F", bound=Callable[..., Any])

PUBLIC = "_drawbridge_public"
AUTHENTICATE = "_drawbridge_authenticate"


class Blueprint(flask_smorest.Blueprint):  # type: ignore[misc]
    ARGUMENTS_PARSER = GuardedParser()

    def public(self, func: F) -> F:
        """Let a view answer without a bearer token, and document it so (`security: []`). Every other view
        of these blueprints refuses a caller without a valid token before it parses anything."""
        setattr(func, PUBLIC, True)
        documented: F = self.doc(security=[])(func)
        return documented

    def authenticated_by(self, check: Callable[[], None]) -> Callable[[F], F]:
        """Let a view authenticate its caller with `check` instead of a bearer token (Slack signs its
        requests): `check` runs first, as the token check does for other views, and raises to refuse."""

        def decorator(func: F) -> F:
            setattr(func, AUTHENTICATE, check)
            return self.public(func)

        return decorator

    def errors(self, *codes: int) -> Callable[[F], F]:
        """Document the error responses (problem documents) a view can return."""

        def decorator(func: F) -> F:
            for code in codes:
                func = self.alt_response(code, response=HTTPStatus(code).name)(func)
            return func

        return decorator


def _handler(view: Callable[..., Any]) -> Any:
    """The function that answers this request's method: a MethodView's method (HEAD falls back to GET, as
    Flask dispatches it), or the view itself."""
    view_class = getattr(view, "view_class", None)
    if view_class is None:
        return view
    method = request.method.lower()
    if method == "head" and not hasattr(view_class, "head"):
        method = "get"
    return getattr(view_class, method, None)


def authenticate_first() -> None:
    """Before-request hook: a view of these blueprints not marked public answers 401 to a caller without a
    valid token (or, for a view with its own check, without what that check wants) before anything else
    looks at the request, so a stranger learns nothing from validation errors and every such operation
    refuses missing or bad credentials the same way."""
    if request.method == "OPTIONS" or request.endpoint is None:
        return
    if not isinstance(current_app.blueprints.get(request.blueprint or ""), Blueprint):
        return
    handler = _handler(current_app.view_functions[request.endpoint])
    if handler is None:
        return
    check = getattr(handler, AUTHENTICATE, None)
    if check is not None:
        check()
    elif not getattr(handler, PUBLIC, False):
        principal()
