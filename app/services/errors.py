"""Domain errors: named for the condition, each with a kind that front doors (HTTP, Slack) map to answers."""

from __future__ import annotations

import enum
from typing import Any


class Kind(enum.Enum):
    INVALID = "invalid"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    CONFLICT = "conflict"
    UPSTREAM = "upstream"
    UNAVAILABLE = "unavailable"


class DomainError(Exception):
    kind: Kind = Kind.INVALID
    code: str = "invalid_input"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


class InvalidRequest(DomainError):
    """Input is well-formed but breaks a rule (policy, validation)."""

    def __init__(self, message: str, *, field: str | None = None, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.field = field


class PolicyViolation(InvalidRequest):
    code = "policy_violation"


class NotFound(DomainError):
    kind = Kind.NOT_FOUND
    code = "not_found"


class RequestNotFound(NotFound):
    code = "request_not_found"


class DatabaseNotFound(NotFound):
    code = "database_not_found"


class TokenNotFound(NotFound):
    code = "token_not_found"


class PermissionDenied(DomainError):
    kind = Kind.FORBIDDEN
    code = "permission_denied"


class SelfApprovalForbidden(PermissionDenied):
    code = "self_approval_forbidden"


class Conflict(DomainError):
    kind = Kind.CONFLICT
    code = "conflict"


class InvalidTransition(Conflict):
    code = "invalid_transition"


class AlreadyApproved(Conflict):
    code = "already_approved"


class DuplicateLiveRequest(Conflict):
    code = "duplicate_live_request"


class DatabaseExists(Conflict):
    code = "database_exists"


class HerokuUnavailable(DomainError):
    """Heroku could not be reached or answered with a transient error; trying again later may work."""

    kind = Kind.UNAVAILABLE
    code = "heroku_unavailable"


class HerokuRejected(DomainError):
    """Heroku refused Drawbridge's own call (credentials, permissions): an operator must act."""

    kind = Kind.UPSTREAM
    code = "heroku_rejected"
