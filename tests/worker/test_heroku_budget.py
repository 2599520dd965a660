"""Heroku's API budget counted in the database, shared by every Drawbridge process: several runtimes and
worker processes spend one count, Heroku's readings correct it for all of them, and under a storm of requests
no call earns a 429 while deletes keep their reserve."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from werkzeug.serving import make_server

from app.clock import ManualClock
from app.config import Config
from app.heroku.client import MemoryBudgetStore, Priority, RateBudget
from app.heroku.simulator import Settings as SimSettings
from app.heroku.simulator import Simulator
from app.models import AccessRequest, HerokuRateBudget, IpRule, RequestStatus, Role
from app.runtime import Runtime, build_runtime
from app.services import access, databases, grants, tokens
from app.services.heroku_budget import DatabaseBudgetStore, shared_budget
from app.services.identity import Principal
from tests.conftest import SIM_TOKEN, empty_tables, sim_client
from tests.worker.budget_racer import shared_runtime, work
from tests.worker.racer import FileClock


@pytest.fixture
def runtimes(postgres_url: str, clock: ManualClock) -> Iterator[tuple[Runtime, Runtime]]:
    """Two runtimes on one PostgreSQL database, each with its own engine, as two processes would have."""
    first = build_runtime(Config(database_url=postgres_url), clock=clock)
    second = build_runtime(Config(database_url=postgres_url), clock=clock)
    empty_tables(first)
    yield first, second
    first.close()
    second.close()


def counted(runtime: Runtime, clock: ManualClock, **policy: Any) -> RateBudget:
    settings: dict[str, Any] = {"refill_per_minute": 0.0, "reserve": 0, "slow_below": 0, **policy}
    return shared_budget(runtime.sessions, token=SIM_TOKEN, clock=clock, **settings)


def test_two_runtimes_on_one_database_spend_one_count(
    runtimes: tuple[Runtime, Runtime], clock: ManualClock
) -> None:
    a = counted(runtimes[0], clock, capacity=10, reserve=4)
    b = counted(runtimes[1], clock, capacity=10, reserve=4)
    for _ in range(3):
        assert a.acquire(Priority.CREATE) is not None
    assert b.remaining == 7
    for _ in range(3):
        assert b.acquire(Priority.CREATE) is not None
    assert b.acquire(Priority.CREATE) is None  # the reserve is reached, whoever spent it
    assert a.acquire(Priority.CREATE) is None
    assert a.acquire(Priority.DELETE) is not None
    assert b.remaining == 3 and a.remaining == 3


def test_heroku_s_reading_through_one_runtime_corrects_the_count_of_all(
    runtimes: tuple[Runtime, Runtime], clock: ManualClock
) -> None:
    sim = Simulator(clock=clock, token=SIM_TOKEN, settings=SimSettings(bucket_capacity=100))
    addon = sim.add_addon(app="acme-api", name="postgresql-budget-1")
    heroku = sim_client(sim)
    heroku.budget = counted(runtimes[0], clock, capacity=100)
    other = counted(runtimes[1], clock, capacity=100)

    heroku.list_ip_rules(db=addon.id)
    assert other.remaining == 99
    sim.spend(60)  # the Heroku CLI, say, on the same account
    heroku.list_ip_rules(db=addon.id)
    assert other.remaining == 38
    assert not other.stale()
    assert sim.count(status=429) == 0


def test_the_count_refills_with_the_injected_clock_for_every_runtime(
    runtimes: tuple[Runtime, Runtime], clock: ManualClock
) -> None:
    a = counted(runtimes[0], clock, capacity=100, refill_per_minute=75.0)
    b = counted(runtimes[1], clock, capacity=100, refill_per_minute=75.0)
    a.observe("10")
    clock.advance(timedelta(seconds=48))  # 60 calls at 75 a minute
    assert b.remaining == 70
    clock.advance(timedelta(hours=1))
    assert a.remaining == 100


def test_a_call_whose_process_died_counts_as_in_flight_until_the_window_passes(
    runtimes: tuple[Runtime, Runtime], clock: ManualClock
) -> None:
    dead = counted(runtimes[0], clock, capacity=100, in_flight_window=60)
    alive = counted(runtimes[1], clock, capacity=100, in_flight_window=60)
    assert dead.acquire(Priority.CREATE) is not None  # and its process is killed before the answer
    alive.observe("50")
    assert alive.remaining == 49
    clock.advance(61)
    alive.observe("50")
    assert alive.remaining == 50
    with runtimes[0].sessions() as session:
        row = session.scalar(select(HerokuRateBudget))
        assert row is not None and row.in_flight == {} and row.issued == 1


def test_threads_racing_for_the_last_calls_never_spend_more_than_the_bucket(
    runtimes: tuple[Runtime, Runtime], clock: ManualClock
) -> None:
    spent: list[int] = []
    start = threading.Barrier(8)

    def spend(runtime: Runtime) -> None:
        budget = counted(runtime, clock, capacity=60)
        start.wait()  # all at once, before the account's row exists
        mine = 0
        while budget.acquire(Priority.DELETE) is not None:
            mine += 1
        spent.append(mine)

    threads = [threading.Thread(target=spend, args=(runtimes[n % 2],)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sum(spent) == 60
    with runtimes[0].sessions() as session:
        assert session.scalar(select(func.count()).select_from(HerokuRateBudget)) == 1


def test_postgresql_runtimes_share_the_count_and_a_sqlite_one_keeps_it_in_memory(
    postgres_url: str, sqlite_url: str
) -> None:
    for url, store in ((postgres_url, DatabaseBudgetStore), (sqlite_url, MemoryBudgetStore)):
        runtime = build_runtime(Config(database_url=url, heroku_api_token="t0ken"))
        try:
            assert runtime.heroku is not None
            assert isinstance(runtime.heroku.budget.store, store)
        finally:
            runtime.close()


# -- a storm of requests from several worker processes ------------------------------------------------------

WORKERS = 2
CAPACITY = 80
RESERVE = 20
STEP = 10.0
# Each worker may create the whole burst in its first sweep, so the bucket reaches the reserve at once.
SETTINGS = grants.Settings(
    poll_interval=15, provisioning_timeout=1800, reconcile_interval=300, lease=60, open_batch=100
)
POLICY: dict[str, Any] = {
    "capacity": CAPACITY,
    "refill_per_minute": 75.0,
    "reserve": RESERVE,
    "slow_below": 0,
}


def test_a_storm_from_several_worker_processes_earns_no_429_and_deletes_keep_their_reserve(
    postgres_url: str, tmp_path: Path
) -> None:
    """Two worker processes and this one share a bucket of 80 calls refilled at 75 a minute. 66 requests on
    three databases arrive at once and 14 more soon after, each wanting a create, polls and a delete: creates
    go down to the reserve at once and then wait on the refill, while rules expire and must go."""
    clock = FileClock(str(tmp_path / "clock"))
    clock.set(datetime(2026, 3, 2, 9, 0, tzinfo=UTC))
    sim = Simulator(
        clock=clock,
        token=SIM_TOKEN,
        settings=SimSettings(authorize_after=20, bucket_capacity=CAPACITY, bucket_refill_per_minute=75.0),
    )
    addons = [sim.add_addon(app="acme-api", name=f"postgresql-storm-{n}") for n in range(3)]
    server = make_server("127.0.0.1", 0, sim, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    runtime = shared_runtime(postgres_url, base, SIM_TOKEN, clock, **POLICY)
    assert runtime.heroku is not None
    empty_tables(runtime)

    with runtime.sessions() as session:
        root = tokens.ensure_user(session, name="root", clock=clock)
        approver = tokens.ensure_user(session, name="bob", clock=clock)
        session.commit()
        admin = Principal(user_id=root.id, name="root", roles=frozenset({Role.ADMIN}))
        bob = Principal(user_id=approver.id, name="bob", roles=frozenset({Role.APPROVER}))
        for n, addon in enumerate(addons):
            databases.register_database(
                session,
                principal=admin,
                heroku=runtime.heroku,
                name=f"db{n}",
                app="acme-api",
                addon=addon.name,
                policy=databases.Policy(),
                min_duration=60,
                clock=clock,
            )

    filed = 0

    def ask() -> None:
        nonlocal filed
        with runtime.sessions() as session:
            user = tokens.ensure_user(session, name=f"dev{filed}", clock=clock)
            session.commit()
            who = Principal(user_id=user.id, name=user.name, roles=frozenset({Role.REQUESTER}))
            request = access.request_access(
                session,
                principal=who,
                database=f"db{filed % 3}",
                cidr=f"8.8.{filed // 250}.{filed % 250 + 1}",
                duration=f"{60 + (filed // 3 % 8) * 10}s",
                reason="storm",
                min_duration=60,
                clock=clock,
            )
            access.approve(session, principal=bob, request_id=request.id, comment=None, clock=clock)
        filed += 1

    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(WORKERS + 1)
    stop = context.Value("b", 0)
    reports = context.Queue()
    processes = [
        context.Process(
            target=work,
            args=(postgres_url, base, SIM_TOKEN, clock.path, barrier, stop, SETTINGS, POLICY, reports),
        )
        for _ in range(WORKERS)
    ]
    for process in processes:
        process.start()
    counts: Counter[str] = Counter()
    lowest = float(CAPACITY)
    try:
        for _ in range(66):
            ask()
        for round_number in range(100):
            barrier.wait(120)  # every worker sweeps at this moment
            barrier.wait(120)
            while not reports.empty():
                counts.update(reports.get())
            lowest = min(lowest, runtime.heroku.budget.snapshot().tokens)
            if round_number < 7:
                for _ in range(2):
                    ask()
            with runtime.sessions() as session:
                live = session.scalar(
                    select(func.count())
                    .select_from(AccessRequest)
                    .where(AccessRequest.status.not_in([RequestStatus.EXPIRED]))
                )
            if round_number > 7 and live == 0 and not any(sim.rules(a) for a in addons):
                break
            clock.set(clock.now() + timedelta(seconds=STEP))
        stop.value = 1
        barrier.wait(120)
    finally:
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
        server.shutdown()
    while not reports.empty():
        counts.update(reports.get())

    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    assert sim.count(status=429) == 0, Counter(c.operation for c in sim.calls if c.status == 429)
    waited = counts["create_failed"] + counts["create_waiting_for_budget"]
    assert waited > 0 and lowest < RESERVE + 1  # creates really did wait at the reserve
    with runtime.sessions() as session:
        requests = session.scalars(select(AccessRequest)).all()
        assert Counter(r.status for r in requests) == {RequestStatus.EXPIRED: 80}
        ended = {r.ip_rule_id: r.expires_at for r in requests}
        rules = {r.heroku_rule_id: ended[r.id] for r in session.scalars(select(IpRule))}
    runtime.close()
    assert not any(sim.rules(a) for a in addons)
    assert Counter(r.description for r in sim.created).most_common(1)[0][1] == 1
    deleted_at = {
        c.path.rsplit("/", 1)[-1]: c.at
        for c in sim.calls
        if c.operation == "ip_rule_delete" and c.status < 300
    }
    lags = [(deleted_at[rule] - expired).total_seconds() for rule, expired in rules.items() if expired]
    assert len(lags) == 80
    assert max(lags) <= 2 * STEP, sorted(lags)[-10:]  # deleted by the first or second sweep after expiry
