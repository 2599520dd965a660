"""The flask-smorest Blueprint every resource uses, with guarded body parsing and documented errors."""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus
from typing import Any, TypeVar

import flask_smorest

from app.api.problem import GuardedParser

F = TypeVar("F", bound=Callable[..., Any])


class Blueprint(flask_smorest.Blueprint):  # type: ignore[misc]
    ARGUMENTS_PARSER = GuardedParser()

    def errors(self, *codes: int) -> Callable[[F], F]:
        """Document the error responses (problem documents) a view can return."""

        def decorator(func: F) -> F:
            for code in codes:
                func = self.alt_response(code, response=HTTPStatus(code).name)(func)
            return func

        return decorator
