"""Logging: one line per event (JSON in production, plain text to read), each carrying the id of the HTTP
request or worker run it belongs to, and never a token or a Heroku credential.

The id lives in a context variable, so it follows the work across the API, the services and the Heroku
client without being passed around; the Heroku client sends it on as `Request-Id`.
"""

from __future__ import annotations

import logging
import re
import sys
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import TextIO
from urllib.parse import urlsplit

from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

from app.config import Config

FORMATS = ("json", "text")
REDACTED = "[redacted]"

_request_id: ContextVar[str | None] = ContextVar("drawbridge_request_id", default=None)

# What a caller may choose as its request id: long enough not to collide by accident, short enough for a
# log line, and nothing that could break a log line or a header.
_SANE_ID = re.compile(r"^[A-Za-z0-9+/=_.:-]{8,200}$")

# Secrets that must not reach a log even when someone logs a header or an exception by mistake: Drawbridge
# API tokens, anything after "Bearer", and Heroku API keys in their current form.
_SECRET_PATTERNS = (
    (re.compile(r"dbt_[0-9A-Za-z]+_[0-9A-Za-z_-]+"), "dbt_" + REDACTED),
    (re.compile(r"(?i)\b(bearer\s+)[^\s\"',]+"), r"\1" + REDACTED),
    (re.compile(r"HRKU-[0-9A-Za-z_-]+"), "HRKU-" + REDACTED),
)
_MIN_SECRET_LENGTH = 8


def current_request_id() -> str | None:
    """The id of the HTTP request or worker run in progress in this context, if any."""
    return _request_id.get()


def new_request_id() -> str:
    return str(uuid.uuid4())


def accept_request_id(presented: str | None) -> str:
    """The caller's `X-Request-Id` when it is sane (8 to 200 letters, digits or `+/=_.:-`), else a new id."""
    if presented is not None and _SANE_ID.match(presented):
        return presented
    return new_request_id()


def bind_request_id(request_id: str) -> Token[str | None]:
    return _request_id.set(request_id)


def unbind_request_id(token: Token[str | None]) -> None:
    _request_id.reset(token)


@contextmanager
def request_scope(request_id: str | None = None) -> Iterator[str]:
    """Run a unit of work (a worker sweep, a delivery run) under its own request id."""
    chosen = request_id or new_request_id()
    token = bind_request_id(chosen)
    try:
        yield chosen
    finally:
        unbind_request_id(token)


class RequestIdFilter(logging.Filter):
    """Puts the context's request id on every record passing through the handler it is attached to."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id()
        return True


class Redactor:
    """Masks tokens and the configured secrets in a formatted log line."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        self._secrets = sorted(
            {s for s in secrets if s and len(s) >= _MIN_SECRET_LENGTH}, key=len, reverse=True
        )

    def __call__(self, line: str) -> str:
        for secret in self._secrets:
            line = line.replace(secret, REDACTED)
        for pattern, replacement in _SECRET_PATTERNS:
            line = pattern.sub(replacement, line)
        return line


class JsonFormatter(_JsonFormatter):
    """One JSON object per line: timestamp, level, logger, message, request_id and any `extra` fields."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s %(request_id)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp=True,
        )
        self._redact = redactor

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(super().format(record))


class TextFormatter(logging.Formatter):
    """The same events for people: time, level, logger, request id, message."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        self._redact = redactor

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "request_id", None) is None:
            record.request_id = "-"
        return self._redact(super().format(record))


def make_handler(
    fmt: str = "json", *, stream: TextIO | None = None, secrets: Iterable[str | None] = ()
) -> logging.Handler:
    """A handler that writes `fmt` ("json" or "text") lines with request ids, secrets masked."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    redactor = Redactor(secrets)
    formatter: logging.Formatter = JsonFormatter(redactor) if fmt == "json" else TextFormatter(redactor)
    handler.setFormatter(formatter)
    handler.addFilter(RequestIdFilter())
    return handler


def configure(fmt: str = "json", *, secrets: Iterable[str | None] = (), level: int = logging.INFO) -> None:
    """Send the process's logs to stderr as `fmt` lines, replacing any handler configured before."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(make_handler(fmt, secrets=secrets))
    root.setLevel(level)
    # One line per job run would drown the worker's own report of what each sweep did.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def secrets_of(config: Config) -> tuple[str | None, ...]:
    """The configured values no log line may show: credentials, signing secrets, the Slack webhook (its
    URL is its secret) and the database password."""
    return (
        config.heroku_api_token,
        config.slack_signing_secret,
        config.slack_webhook_url,
        config.webhook_secret,
        urlsplit(config.database_url).password,
    )


def configure_for(config: Config) -> None:
    """Configure the process's logging as `config` says (DRAWBRIDGE_LOG_FORMAT), masking its secrets."""
    configure(config.log_format, secrets=secrets_of(config))
