"""What a process runs with: configuration, database engine and sessions, the Heroku client and the clock.

Built once per process by the web app factory, the worker and the CLI; it imports no Flask.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.clock import Clock, SystemClock
from app.config import Config
from app.db import make_engine, make_session_factory
from app.heroku.client import HerokuClient, RateBudget
from app.heroku.simulator import Settings as SimulatorSettings
from app.heroku.simulator import Simulator, SimulatorTransport

log = logging.getLogger(__name__)

SIMULATOR_TOKEN = "simulator-token"


@dataclass
class Runtime:
    config: Config
    engine: Engine
    sessions: sessionmaker[Session]
    heroku: HerokuClient | None
    clock: Clock
    simulator: Simulator | None = None

    def close(self) -> None:
        if self.heroku is not None:
            self.heroku.close()
        self.engine.dispose()


def build_runtime(
    config: Config,
    *,
    clock: Clock | None = None,
    heroku: HerokuClient | None = None,
    heroku_transport: httpx.BaseTransport | None = None,
) -> Runtime:
    """Wire a runtime. With `config.simulate`, Heroku is the built-in simulator, in this process. On
    PostgreSQL every process counts the Heroku API budget in one shared row; SQLite serves one process,
    which counts it in memory."""
    clock = clock or SystemClock()
    engine = make_engine(config.database_url)
    sessions = make_session_factory(engine)

    def budget(token: str) -> RateBudget:
        # A call unanswered for this long is over: answered, or given up by its timeout.
        window = max(60.0, 2 * config.heroku_timeout)
        if engine.dialect.name != "postgresql":
            return RateBudget(clock=clock, in_flight_window=window)
        from app.services.heroku_budget import shared_budget

        return shared_budget(sessions, token=token, clock=clock, in_flight_window=window)

    simulator = None
    if heroku is None and config.simulate:
        # Rules take a while to authorize, as at Heroku, so the walk-through shows every stage.
        simulator = Simulator(
            clock=clock, token=SIMULATOR_TOKEN, settings=SimulatorSettings(authorize_after=20.0)
        )
        simulator.seed_demo()
        log.warning(
            "SIMULATED HEROKU: Drawbridge talks to its built-in Heroku simulator; "
            "no real access to any database is granted or removed"
        )
        heroku = HerokuClient(
            token=SIMULATOR_TOKEN,
            api_url="http://heroku.simulator",
            data_api_url="http://data.heroku.simulator",
            transport=SimulatorTransport(app=simulator),
            timeout=config.heroku_timeout,
            budget=budget(SIMULATOR_TOKEN),
        )
    elif heroku is None and config.heroku_api_token:
        heroku = HerokuClient(
            token=config.heroku_api_token,
            api_url=config.heroku_api_url,
            data_api_url=config.heroku_data_api_url,
            transport=heroku_transport,
            timeout=config.heroku_timeout,
            budget=budget(config.heroku_api_token),
        )
    return Runtime(
        config=config,
        engine=engine,
        sessions=sessions,
        heroku=heroku,
        clock=clock,
        simulator=simulator,
    )
