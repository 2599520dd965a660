"""Typed Heroku failures: transient ones are worth retrying later, permanent ones are not."""

from __future__ import annotations


class HerokuError(Exception):
    """A call to Heroku failed. `permanent` says whether repeating the same call can help."""

    permanent: bool = True

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_id: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_id = error_id
        self.request_id = request_id

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status is not None else "no response"
        ident = f" {self.error_id}" if self.error_id else ""
        return f"{where}{ident}: {self.message}"


class HerokuTransientError(HerokuError):
    """5xx, 429, timeouts and connection errors."""

    permanent = False


class HerokuRateLimited(HerokuTransientError):
    """429: the account's request budget is spent for now."""


class HerokuBudgetReserved(HerokuTransientError):
    """Not sent: the account's remaining API budget is kept for deletes. Try again later."""


class HerokuPermanentError(HerokuError):
    """A 4xx other than 429: the call as made will not succeed."""


class HerokuNotFound(HerokuPermanentError):
    """404: the add-on, endpoint or rule does not exist (or is not visible to this token)."""


class HerokuAuthError(HerokuPermanentError):
    """401 or 403: Drawbridge's token was refused or lacks the rights for this call."""
