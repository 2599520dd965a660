"""A worker process for the race test: sweeps in lock-step with its siblings, on a clock read from a file."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from multiprocessing.synchronize import Barrier
from typing import Any

from app.config import Config
from app.heroku.client import HerokuClient
from app.runtime import build_runtime
from app.services import grants


class FileClock:
    """An injected clock that several processes share: the test writes the time, every process reads it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def now(self) -> datetime:
        with open(self.path) as handle:
            return datetime.fromtimestamp(float(handle.read()), UTC)

    def set(self, moment: datetime) -> None:
        temporary = f"{self.path}.tmp"
        with open(temporary, "w") as handle:
            handle.write(repr(moment.timestamp()))
        os.replace(temporary, self.path)


def work(
    database_url: str,
    heroku_base: str,
    token: str,
    clock_path: str,
    barrier: Barrier,
    stop: Any,
    settings: grants.Settings,
) -> None:
    clock = FileClock(clock_path)
    heroku = HerokuClient(token=token, api_url=heroku_base, data_api_url=heroku_base, sleep=lambda s: None)
    runtime = build_runtime(Config(database_url=database_url), clock=clock, heroku=heroku)
    try:
        while True:
            barrier.wait()
            if stop.value:
                return
            grants.sweep(runtime.sessions, heroku=heroku, clock=clock, settings=settings, with_reconcile=True)
            barrier.wait()
    finally:
        runtime.close()
