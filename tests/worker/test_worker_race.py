"""Several worker processes sweeping the same rows at the same moments, on real PostgreSQL."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

from werkzeug.serving import make_server

from app.config import Config
from app.heroku.simulator import Simulator
from app.models import Role
from app.runtime import Runtime, build_runtime
from app.services import access, databases, grants, tokens
from app.services.identity import Principal
from tests.conftest import empty_tables
from tests.worker.racer import FileClock, work

WORKERS = 3
SETTINGS = grants.Settings(poll_interval=15, provisioning_timeout=1800, reconcile_interval=300, lease=60)


def test_racing_workers_create_each_rule_once_and_delete_it_once(postgres_url: str, tmp_path: Path) -> None:
    clock = FileClock(str(tmp_path / "clock"))
    clock.set(datetime(2026, 3, 2, 9, 0, tzinfo=UTC))
    sim = Simulator(clock=clock, token="race-token")
    sim.settings.authorize_after = 60
    sim.settings.slow_seconds = 0.03  # widens the window between a claim and its result
    addon = sim.add_addon(app="acme-api", name="postgresql-race-1")
    server = make_server("127.0.0.1", 0, sim, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"

    from app.heroku.client import HerokuClient

    parent_heroku = HerokuClient(token="race-token", api_url=base, data_api_url=base, sleep=lambda s: None)
    runtime: Runtime = build_runtime(Config(database_url=postgres_url), clock=clock, heroku=parent_heroku)
    empty_tables(runtime)
    with runtime.sessions() as session:
        admin = Principal(
            user_id=tokens.ensure_user(session, name="root", clock=clock).id,
            name="root",
            roles=frozenset({Role.ADMIN}),
        )
        approver = tokens.ensure_user(session, name="bob", clock=clock)
        session.commit()
        bob = Principal(user_id=approver.id, name="bob", roles=frozenset({Role.APPROVER}))
        databases.register_database(
            session,
            principal=admin,
            heroku=parent_heroku,
            name="main",
            app="acme-api",
            addon=addon.name,
            policy=databases.Policy(),
            min_duration=60,
            clock=clock,
        )

    def ask(n: int, cidr: str, duration: str) -> None:
        with runtime.sessions() as session:
            user = tokens.ensure_user(session, name=f"dev{n}", clock=clock)
            session.commit()
            who = Principal(user_id=user.id, name=user.name, roles=frozenset({Role.REQUESTER}))
            request = access.request_access(
                session,
                principal=who,
                database="main",
                cidr=cidr,
                duration=duration,
                reason="race",
                min_duration=60,
                clock=clock,
            )
            access.approve(session, principal=bob, request_id=request.id, comment=None, clock=clock)

    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(WORKERS + 1)
    stop = context.Value("b", 0)
    processes = [
        context.Process(
            target=work, args=(postgres_url, base, "race-token", clock.path, barrier, stop, SETTINGS)
        )
        for _ in range(WORKERS)
    ]
    for process in processes:
        process.start()
    try:
        for n in range(24):
            ask(n, f"8.8.{n % 3}.{n % 8 + 1}", f"{2 + n % 4}m")  # 24 requests over 24 CIDRs... with overlaps
        for round_number in range(80):
            barrier.wait(60)  # all workers sweep at once
            barrier.wait(60)
            clock.set(clock.now() + timedelta(seconds=10))
            if round_number == 10:
                for n in range(24, 30):
                    ask(n, f"8.8.{n % 3}.{n % 8 + 1}", "3m")  # joins rules that already exist
        stop.value = 1
        barrier.wait(60)
    finally:
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
        server.shutdown()

    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    with runtime.sessions() as session:
        from sqlalchemy import func, select

        from app.models import AccessRequest, IpRule

        statuses = Counter(session.scalars(select(AccessRequest.status)))
        rules = session.scalar(select(func.count()).select_from(IpRule))
    runtime.close()
    parent_heroku.close()
    assert statuses == {access.RequestStatus.EXPIRED: 30}, statuses
    created = Counter(r.description for r in sim.created)
    assert len(created) == rules and set(created.values()) == {1}  # every rule created once
    assert Counter(sim.deleted) == Counter(r.id for r in sim.created)  # and deleted once
    assert sim.count("ip_rule_delete", status=404) == 0  # no worker deleted what another already had
    assert sim.rules(addon) == []
