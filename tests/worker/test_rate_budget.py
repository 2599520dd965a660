"""The account's Heroku API budget, counted in memory: creates stop at the reserve, reads at half of it,
deletes only at empty, so closing access never waits behind opening it; Heroku's readings correct the count.
The last tests run the worker against a small bucket."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import httpx
import pytest

from app.clock import ManualClock
from app.config import Config
from app.heroku.client import HerokuClient, Priority, RateBudget
from app.heroku.errors import HerokuBudgetReserved, HerokuTransientError
from app.heroku.simulator import Settings as SimSettings
from app.heroku.simulator import SimAddon, Simulator, SimulatorTransport
from app.models import RequestStatus, RuleStatus
from app.runtime import build_runtime
from tests.conftest import SIM_TOKEN, empty_tables
from tests.worker.conftest import World


def small_simulator(clock: ManualClock, capacity: int, refill: float = 0.0) -> tuple[Simulator, SimAddon]:
    sim = Simulator(
        clock=clock,
        token=SIM_TOKEN,
        settings=SimSettings(bucket_capacity=capacity, bucket_refill_per_minute=refill, authorize_after=0),
    )
    return sim, sim.add_addon(app="acme-api", name="postgresql-budget-1")


def client_for(sim: Simulator, budget: RateBudget, slept: list[float] | None = None) -> HerokuClient:
    record = slept if slept is not None else []
    return HerokuClient(
        token=SIM_TOKEN,
        api_url="http://api.heroku.test",
        data_api_url="http://data.heroku.test",
        transport=SimulatorTransport(app=sim),
        budget=budget,
        sleep=record.append,  # recorded, never slept
    )


def counted(
    clock: ManualClock, capacity: int, reserve: int = 0, refill: float = 0.0, **kw: Any
) -> RateBudget:
    """A budget counted in memory on the manual clock, mirroring a bucket of `capacity` calls."""
    return RateBudget(
        capacity=capacity, refill_per_minute=refill, reserve=reserve, slow_below=0, clock=clock, **kw
    )


def create(heroku: HerokuClient, addon: SimAddon, n: int) -> str:
    return heroku.create_ip_rule(db=addon.id, cidr=f"8.8.{n}.1/32", description=f"test {n}").id


# -- RateBudget on its own --------------------------------------------------------------------------------


def test_until_heroku_reports_the_count_assumes_a_full_bucket() -> None:
    budget = RateBudget(reserve=100, clock=ManualClock())
    assert budget.remaining == 4500
    assert all(budget.admits(p) for p in Priority)
    assert budget.pause() == 0.0
    assert budget.stale()


def test_creates_stop_at_the_reserve_reads_at_half_of_it_and_deletes_only_at_empty() -> None:
    budget = counted(ManualClock(), capacity=101, reserve=100)
    assert budget.acquire(Priority.CREATE) is not None
    assert budget.remaining == 100
    assert budget.acquire(Priority.CREATE) is None  # refused: nothing is spent
    assert budget.remaining == 100
    reads = 0
    while budget.acquire(Priority.READ) is not None:
        reads += 1
    assert reads == 50 and budget.remaining == 50
    deletes = 0
    while budget.acquire(Priority.DELETE) is not None:
        deletes += 1
    assert deletes == 50 and budget.remaining == 0
    assert not any(budget.admits(p) for p in Priority)


def test_the_count_refills_as_the_injected_clock_moves() -> None:
    clock = ManualClock()
    budget = counted(clock, capacity=10, refill=60)
    for _ in range(10):
        assert budget.acquire(Priority.DELETE) is not None
    assert budget.remaining == 0
    assert budget.wait_for(Priority.DELETE) == pytest.approx(1.0)
    clock.advance(5)
    assert budget.remaining == 5
    clock.advance(timedelta(hours=1))
    assert budget.remaining == 10  # never more than Heroku's bucket holds


def test_a_lower_reading_from_heroku_lowers_the_count_at_once() -> None:
    budget = counted(ManualClock(), capacity=100)
    budget.observe("7")
    assert budget.remaining == 7
    assert not budget.stale()


def test_a_higher_reading_raises_the_count_less_the_calls_still_in_flight() -> None:
    budget = counted(ManualClock(), capacity=100)
    budget.observe("10")
    first, second = budget.acquire(Priority.READ), budget.acquire(Priority.READ)
    assert first is not None and second is not None
    assert budget.remaining == 8

    budget.settle(first, "60")  # Heroku has more than counted; the second call may not have reached it
    assert budget.remaining == 58
    budget.settle(second, "59")
    assert budget.remaining == 58


def test_an_answer_that_arrives_after_a_newer_one_cannot_raise_the_count() -> None:
    budget = counted(ManualClock(), capacity=100)
    budget.observe("10")
    first, second = budget.acquire(Priority.READ), budget.acquire(Priority.READ)
    assert first is not None and second is not None
    budget.settle(second, "50")
    assert budget.remaining == 48  # the first call is still in flight
    budget.settle(first, "60")  # older news than the second's
    assert budget.remaining == 48


def test_a_malformed_rate_limit_header_leaves_the_count_alone() -> None:
    budget = counted(ManualClock(), capacity=100)
    budget.observe(" 7 ")
    assert budget.remaining == 7
    for header in (None, "", "abc", "-5", "1.5"):
        budget.observe(header)
        assert budget.remaining == 7


def test_a_429_without_a_reading_means_the_bucket_is_empty() -> None:
    budget = counted(ManualClock(), capacity=100)
    ticket = budget.acquire(Priority.DELETE)
    assert ticket is not None
    budget.settle(ticket, None, limited=True)
    assert budget.remaining == 0


def test_a_call_that_got_no_answer_counts_as_in_flight_until_the_window_passes() -> None:
    clock = ManualClock()
    budget = counted(clock, capacity=100, in_flight_window=60)
    assert budget.acquire(Priority.READ) is not None  # its answer never comes: the process died
    budget.observe("50")
    assert budget.remaining == 49
    clock.advance(61)
    budget.observe("50")
    assert budget.remaining == 50


def test_calls_are_paced_more_the_lower_the_budget_falls() -> None:
    budget = RateBudget(reserve=10, slow_below=1000, max_pause=2.0, clock=ManualClock())
    assert budget.pause(1000) == 0.0
    assert budget.pause(500) == pytest.approx(1.0)
    assert budget.pause(0) == pytest.approx(2.0)


# -- the client against a simulator with a small bucket -----------------------------------------------


def test_a_create_at_the_reserve_is_refused_unsent_and_deletes_go_on_to_the_last_call() -> None:
    clock = ManualClock()
    sim, addon = small_simulator(clock, capacity=12)
    heroku = client_for(sim, counted(clock, capacity=12, reserve=5))
    created = [create(heroku, addon, n) for n in range(7)]
    assert heroku.budget.remaining == 5

    with pytest.raises(HerokuBudgetReserved) as refused:
        create(heroku, addon, 99)
    assert isinstance(refused.value, HerokuTransientError) and not refused.value.permanent
    assert sim.count("ip_rule_create") == 7 and len(sim.rules(addon)) == 7

    for rule_id in created[:5]:
        assert heroku.delete_ip_rule(db=addon.id, rule_id=rule_id) is True
    assert heroku.budget.remaining == 0
    assert sorted(r.id for r in sim.rules(addon)) == sorted(created[5:])

    # The count says the bucket is empty: the delete waits for the refill instead of earning a 429.
    with pytest.raises(HerokuBudgetReserved):
        heroku.delete_ip_rule(db=addon.id, rule_id=created[5])
    assert sim.count("ip_rule_delete") == 5 and sim.count(status=429) == 0


def test_a_list_made_in_order_to_delete_is_admitted_where_a_plain_read_is_refused() -> None:
    clock = ManualClock()
    sim, addon = small_simulator(clock, capacity=10)
    heroku = client_for(sim, counted(clock, capacity=10, reserve=10))
    for _ in range(5):
        heroku.list_ip_rules(db=addon.id)
    assert heroku.budget.remaining == 5  # at half the reserve: plain reads stop here

    with pytest.raises(HerokuBudgetReserved):
        heroku.list_ip_rules(db=addon.id)
    assert sim.count("ip_rules_list") == 5
    assert heroku.list_ip_rules(db=addon.id, priority=Priority.DELETE) == []
    assert sim.count("ip_rules_list") == 6


def test_a_stale_low_count_is_checked_with_heroku_for_free_before_a_create_is_refused() -> None:
    clock = ManualClock()
    sim, addon = small_simulator(clock, capacity=12)
    heroku = client_for(sim, counted(clock, capacity=12, reserve=5, stale_after=10))
    heroku.budget.observe("3")
    with pytest.raises(HerokuBudgetReserved):
        create(heroku, addon, 0)  # a fresh reading is trusted
    assert sim.calls == []

    clock.advance(11)  # the same reading, now too old to trust
    create(heroku, addon, 1)
    assert sim.count("rate_limits") == 1 and sim.count("ip_rule_create") == 1
    assert heroku.budget.remaining == 11


def test_a_budget_refresh_sees_the_bucket_heroku_refilled_faster_than_counted() -> None:
    clock = ManualClock()
    sim, addon = small_simulator(clock, capacity=12, refill=60)
    heroku = client_for(sim, counted(clock, capacity=12, reserve=5, stale_after=10))  # counts no refill
    for n in range(7):
        create(heroku, addon, n)
    assert heroku.budget.remaining == 5
    clock.advance(5)  # Heroku refilled 5
    with pytest.raises(HerokuBudgetReserved):
        create(heroku, addon, 7)  # our reading is not stale yet
    assert sim.count("rate_limits") == 0

    clock.advance(6)
    create(heroku, addon, 8)
    assert sim.count("rate_limits") == 1
    assert sim.count("ip_rule_create") == 8
    assert heroku.budget.remaining == 11


def test_the_client_paces_its_calls_as_the_budget_drains() -> None:
    clock = ManualClock()
    sim, addon = small_simulator(clock, capacity=100)
    slept: list[float] = []
    heroku = client_for(sim, RateBudget(reserve=0, slow_below=200, max_pause=1.0, clock=clock), slept)
    heroku.list_ip_rules(db=addon.id)
    assert slept == []  # nothing was known before the first answer
    heroku.list_ip_rules(db=addon.id)
    heroku.list_ip_rules(db=addon.id)
    assert slept == [pytest.approx(1 - 99 / 200), pytest.approx(1 - 98 / 200)]


def test_an_injected_429_spends_nothing_and_says_what_is_left() -> None:
    clock = ManualClock()
    sim, addon = small_simulator(clock, capacity=12)
    heroku = client_for(sim, counted(clock, capacity=12))
    sim.script("ip_rules_list", "429")
    assert heroku.list_ip_rules(db=addon.id) == []  # retried
    assert [c.status for c in sim.calls] == [429, 200]
    assert sim.spend(0) == 11
    assert heroku.budget.remaining == 10  # both attempts were counted: within a call of Heroku, never above


# -- the worker against a small bucket ----------------------------------------------------------------------

CAPACITY = 40
RESERVE = 20


@pytest.fixture
def small_world(config: Config, clock: ManualClock) -> Iterator[World]:
    """The worker's world, with a Heroku account whose bucket holds only CAPACITY calls (no refill) and a
    client that keeps RESERVE of them for deletes. Rules authorize at once, so no polls spend the bucket."""
    sim, addon = small_simulator(clock, capacity=CAPACITY)
    runtime = build_runtime(
        config, clock=clock, heroku=client_for(sim, counted(clock, capacity=CAPACITY, reserve=RESERVE))
    )
    runtime.simulator = sim
    empty_tables(runtime)
    world = World(runtime, sim, addon, clock)
    world.settings = replace(world.settings, open_batch=100)  # one sweep may spend the whole budget
    yield world
    runtime.close()


def test_the_worker_deletes_an_expired_rule_while_creates_wait_for_the_budget(small_world: World) -> None:
    world = small_world
    assert world.runtime.heroku is not None
    budget = world.runtime.heroku.budget
    early = world.approved(cidr="8.8.8.8", duration="1h")
    world.sweep()
    assert world.request(early).status is RequestStatus.ACTIVE
    left = budget.remaining
    assert left is not None and left > RESERVE

    later = [
        world.approved(cidr=f"9.9.{n}.1", duration="8h", who=f"user{n}") for n in range(left - RESERVE + 3)
    ]
    report = world.sweep()
    assert budget.remaining == RESERVE
    held = [r for r in later if world.request(r).status is RequestStatus.PROVISIONING]
    assert len(held) == 3
    held_rules = [r for r in world.rules() if r.status is RuleStatus.CREATING]
    assert len(held_rules) == 3
    assert report.counts["create_waiting_for_budget"] == 1
    assert all(r.attempts == 0 and r.next_attempt_at is None for r in held_rules)  # never claimed: no backoff

    expires = world.request(early).expires_at
    assert expires is not None
    world.clock.set(expires)
    world.sweep()
    assert world.request(early).status is RequestStatus.EXPIRED
    assert "8.8.8.8/32" not in world.at_heroku()
    assert world.simulator.count("ip_rule_delete", status=200) == 1
    assert world.simulator.count(status=429) == 0


def test_creates_held_back_by_the_budget_spend_none_of_the_reserve(small_world: World) -> None:
    world = small_world
    assert world.runtime.heroku is not None
    budget = world.runtime.heroku.budget
    first = world.approved(cidr="8.8.8.8", duration="1h")
    world.sweep()
    left = budget.remaining
    assert left is not None
    for n in range(left - RESERVE + 3):
        world.approved(cidr=f"9.9.{n}.1", duration="8h", who=f"user{n}")
    world.sweep()
    assert budget.remaining == RESERVE
    calls = len(world.simulator.calls)

    world.run_for(10 * 60, step=5)
    assert {c.operation for c in world.simulator.calls[calls:]} == {"rate_limits"}  # free checks only
    assert budget.remaining == RESERVE

    expires = world.request(first).expires_at
    assert expires is not None
    world.clock.set(expires)
    world.sweep()
    assert "8.8.8.8/32" not in world.at_heroku()


def test_the_simulator_plays_heroku_s_bucket_4500_calls_refilled_at_75_a_minute() -> None:
    clock = ManualClock()
    sim = Simulator(clock=clock, token=SIM_TOKEN)
    addon = sim.add_addon(app="acme-api", name="postgresql-bucket-1")
    http = httpx.Client(
        transport=SimulatorTransport(app=sim), headers={"Authorization": f"Bearer {SIM_TOKEN}"}
    )
    rules = f"http://data.heroku.test/postgres/v0/databases/{addon.id}/tls-endpoint/ip-rules"
    limits = "http://api.heroku.test/account/rate-limits"

    assert http.get(limits).json() == {"remaining": 4500}  # asking costs nothing
    first = http.get(rules)
    assert first.status_code == 200 and first.headers["RateLimit-Remaining"] == "4499"
    sim.spend(4498)
    assert http.get(rules).headers["RateLimit-Remaining"] == "0"
    refused = http.get(rules)
    assert refused.status_code == 429 and refused.headers["RateLimit-Remaining"] == "0"
    assert refused.json()["id"] == "rate_limit"
    assert http.get(limits).json() == {"remaining": 0}  # a refusal spends nothing

    clock.advance(timedelta(minutes=1))
    assert http.get(limits).json() == {"remaining": 75}
    clock.advance(timedelta(hours=2))
    assert http.get(limits).json() == {"remaining": 4500}
    sim.settings.bucket_drain_per_minute = 100.0  # something else spends 100 a minute: 25 a minute net
    clock.advance(timedelta(minutes=4))
    assert http.get(limits).json() == {"remaining": 4400}
