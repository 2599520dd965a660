"""Heroku calls per request and expiry lag, measured through the real worker, client and simulator.

    .venv/bin/python bench/heroku_cost.py [--requests 1 50] [--authorize-after 600] [--database-url URL]

Time is a manual clock moved from sweep to sweep, so the figures do not depend on the machine's speed: they
count what Drawbridge asks of Heroku, and how late after expiry (in clock time) the delete call goes out.
Sweeps fall at jittered moments (0.5 to 1.5 sweep intervals apart), as real timers do relative to expiry
times. Prints a JSON report.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import uuid
from collections import Counter
from typing import Any

from alembic import command
from sqlalchemy import select

from app.cli import alembic_config
from app.clock import ManualClock
from app.config import Config
from app.heroku.client import HerokuClient
from app.heroku.simulator import Simulator, SimulatorTransport
from app.models import AccessRequest, RequestStatus, Role
from app.runtime import build_runtime
from app.services import access, databases, grants, tokens
from app.services.identity import Principal


def run(
    requests: int, authorize_after: float, sweep_interval: float, poll_interval: float, url: str
) -> dict[str, Any]:
    command.upgrade(alembic_config(url), "head")
    clock = ManualClock()
    sim = Simulator(clock=clock, token="bench")
    sim.settings.authorize_after = authorize_after
    addon = sim.add_addon(app="bench-app", name=f"postgresql-bench-{uuid.uuid4().hex[:6]}")
    heroku = HerokuClient(
        token="bench",
        api_url="http://a",
        data_api_url="http://d",
        transport=SimulatorTransport(app=sim),
        sleep=lambda s: None,
    )
    runtime = build_runtime(Config(database_url=url), clock=clock, heroku=heroku)
    settings = grants.Settings(poll_interval=poll_interval)
    name = f"bench-{uuid.uuid4().hex[:6]}"
    with runtime.sessions() as session:
        admin = tokens.ensure_user(session, name="bench-admin", clock=clock)
        approver = tokens.ensure_user(session, name="bench-approver", clock=clock)
        session.commit()
        databases.register_database(
            session,
            principal=Principal(user_id=admin.id, name=admin.name, roles=frozenset({Role.ADMIN})),
            heroku=heroku,
            name=name,
            app="bench-app",
            addon=addon.name,
            policy=databases.Policy(),
            min_duration=60,
            clock=clock,
        )
        ids = []
        for n in range(requests):
            user = tokens.ensure_user(session, name=f"bench-{uuid.uuid4().hex[:8]}", clock=clock)
            session.commit()
            who = Principal(user_id=user.id, name=user.name, roles=frozenset({Role.REQUESTER}))
            request = access.request_access(
                session,
                principal=who,
                database=name,
                cidr=f"8.{8 + n // 250}.{n % 250}.1",
                duration="1h",
                reason="bench",
                min_duration=60,
                clock=clock,
            )
            access.approve(
                session,
                principal=Principal(
                    user_id=approver.id, name=approver.name, roles=frozenset({Role.APPROVER})
                ),
                request_id=request.id,
                comment=None,
                clock=clock,
            )
            ids.append(request.id)
    sim.reset_calls()
    jitter = random.Random(requests)
    sweeps = 0
    while True:
        grants.sweep(runtime.sessions, heroku=heroku, clock=clock, settings=settings)
        sweeps += 1
        with runtime.sessions() as session:
            rows = session.scalars(select(AccessRequest).where(AccessRequest.id.in_(ids))).all()
            done = all(r.status is RequestStatus.EXPIRED for r in rows)
        if done and not sim.rules(addon):
            break
        clock.advance(sweep_interval * jitter.uniform(0.5, 1.5))
        assert sweeps < 100_000
    deletes = {c.path.rsplit("/", 1)[-1]: c.at for c in sim.calls if c.operation == "ip_rule_delete"}
    with runtime.sessions() as session:
        rows = session.scalars(select(AccessRequest).where(AccessRequest.id.in_(ids))).all()
        lags = [
            (deletes[r.ip_rule.heroku_rule_id] - r.expires_at).total_seconds()  # type: ignore[union-attr,operator]
            for r in rows
        ]
    calls = Counter(c.operation for c in sim.calls)
    runtime.close()
    return {
        "requests": requests,
        "authorize_after_s": authorize_after,
        "poll_interval_s": poll_interval,
        "sweep_interval_s": sweep_interval,
        "heroku_calls": dict(calls),
        "heroku_calls_per_request": round(sum(calls.values()) / requests, 2),
        "expiry_lag_s": {
            "median": round(statistics.median(lags), 3),
            "p99": round(statistics.quantiles(lags, n=100)[98], 3) if len(lags) > 1 else round(lags[0], 3),
            "max": round(max(lags), 3),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--authorize-after", type=float, default=600.0)
    parser.add_argument("--sweep-interval", type=float, default=1.0)
    parser.add_argument("--poll-interval", type=float, default=15.0)
    parser.add_argument("--database-url", default=None, help="default: a temporary SQLite file")
    args = parser.parse_args()
    reports = []
    for n in args.requests:
        url = args.database_url or f"sqlite:///{tempfile.mkdtemp()}/bench.db"
        reports.append(run(n, args.authorize_after, args.sweep_interval, args.poll_interval, url))
    print(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
