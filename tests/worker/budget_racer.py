"""A worker process for the budget storm: sweeps in lock-step with its siblings, on a clock read from a file,
counting Heroku's API budget in the database it shares with them."""

from __future__ import annotations

from multiprocessing.synchronize import Barrier
from typing import Any

from app.config import Config
from app.heroku.client import HerokuClient, RateBudget
from app.runtime import Runtime, build_runtime
from app.services import grants
from app.services.heroku_budget import shared_budget
from tests.worker.racer import FileClock


def shared_runtime(database_url: str, heroku_base: str, token: str, clock: Any, **policy: Any) -> Runtime:
    """A runtime whose Heroku client counts the budget in the database, as `build_runtime` wires it."""
    runtime = build_runtime(Config(database_url=database_url), clock=clock)
    budget: RateBudget = shared_budget(runtime.sessions, token=token, clock=clock, **policy)
    runtime.heroku = HerokuClient(
        token=token, api_url=heroku_base, data_api_url=heroku_base, budget=budget, sleep=lambda s: None
    )
    return runtime


def work(
    database_url: str,
    heroku_base: str,
    token: str,
    clock_path: str,
    barrier: Barrier,
    stop: Any,
    settings: grants.Settings,
    policy: dict[str, Any],
    reports: Any,
) -> None:
    clock = FileClock(clock_path)
    runtime = shared_runtime(database_url, heroku_base, token, clock, **policy)
    assert runtime.heroku is not None
    try:
        while True:
            barrier.wait()
            if stop.value:
                return
            report = grants.sweep(
                runtime.sessions, heroku=runtime.heroku, clock=clock, settings=settings, with_reconcile=True
            )
            reports.put(report.counts)
            barrier.wait()
    finally:
        runtime.close()
