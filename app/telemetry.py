"""Who counts a Heroku call: the HTTP request or worker run in progress names a sink in a context variable,
and the Heroku client reports each call to it without knowing about metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token

HerokuCallSink = Callable[[str, str], None]
_heroku_sink: ContextVar[HerokuCallSink | None] = ContextVar("drawbridge_heroku_sink", default=None)


def record_heroku_call(operation: str, outcome: str) -> None:
    """Count one Heroku call (`outcome`: the HTTP status, `timeout` or `unreachable`) with the sink of the
    HTTP request or worker run in progress; outside both, nobody counts it."""
    sink = _heroku_sink.get()
    if sink is not None:
        sink(operation, outcome)


def bind_heroku_sink(sink: HerokuCallSink) -> Token[HerokuCallSink | None]:
    return _heroku_sink.set(sink)


def unbind_heroku_sink(token: Token[HerokuCallSink | None]) -> None:
    _heroku_sink.reset(token)


@contextmanager
def counting_heroku_calls(sink: HerokuCallSink) -> Iterator[None]:
    """Count the Heroku calls made inside the block with `sink` (a worker run)."""
    token = bind_heroku_sink(sink)
    try:
        yield
    finally:
        unbind_heroku_sink(token)
