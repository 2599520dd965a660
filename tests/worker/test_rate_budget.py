"""The account's Heroku API budget: creates stop at the reserve, reads at half of it, deletes never, so
closing access never waits behind opening it. The last tests run the worker against a small bucket."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

import pytest

from app.clock import ManualClock
from app.config import Config
from app.heroku.client import HerokuClient, Priority, RateBudget
from app.heroku.errors import HerokuBudgetReserved, HerokuRateLimited, HerokuTransientError
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


def create(heroku: HerokuClient, addon: SimAddon, n: int) -> str:
    return heroku.create_ip_rule(db=addon.id, cidr=f"8.8.{n}.1/32", description=f"test {n}").id


# -- RateBudget on its own --------------------------------------------------------------------------------


def test_before_heroku_reports_a_budget_every_call_is_admitted() -> None:
    budget = RateBudget(reserve=100)
    assert budget.remaining is None
    assert all(budget.admits(p) for p in Priority)
    assert budget.pause() == 0.0


def test_creates_stop_at_the_reserve_reads_at_half_of_it_and_deletes_never() -> None:
    budget = RateBudget(reserve=100)
    budget.observe("101")
    assert budget.admits(Priority.CREATE)
    budget.observe("100")
    assert not budget.admits(Priority.CREATE)
    assert budget.admits(Priority.READ) and budget.admits(Priority.DELETE)
    budget.observe("51")
    assert budget.admits(Priority.READ)
    budget.observe("50")
    assert not budget.admits(Priority.READ) and not budget.admits(Priority.CREATE)
    budget.observe("0")
    assert budget.admits(Priority.DELETE)


def test_a_malformed_rate_limit_header_leaves_the_known_budget_alone() -> None:
    budget = RateBudget(reserve=10)
    budget.observe(" 7 ")
    assert budget.remaining == 7
    for header in (None, "", "abc", "-5", "1.5"):
        budget.observe(header)
        assert budget.remaining == 7


def test_calls_are_paced_more_the_lower_the_budget_falls() -> None:
    budget = RateBudget(reserve=10, slow_below=1000, max_pause=2.0)
    budget.observe("1000")
    assert budget.pause() == 0.0
    budget.observe("500")
    assert budget.pause() == pytest.approx(1.0)
    budget.observe("0")
    assert budget.pause() == pytest.approx(2.0)


# -- the client against a simulator with a small bucket -----------------------------------------------


def test_a_create_at_the_reserve_is_refused_without_calling_heroku_and_deletes_still_go_through() -> None:
    sim, addon = small_simulator(ManualClock(), capacity=12)
    heroku = client_for(sim, RateBudget(reserve=5, slow_below=0))
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
    assert sim.count("ip_rule_delete", status=200) == 5 and sim.count(status=429) == 0

    # Below the reserve, only Heroku's own 429 stops a delete.
    with pytest.raises(HerokuRateLimited):
        heroku.delete_ip_rule(db=addon.id, rule_id=created[5])
    assert sim.count("ip_rule_delete", status=429) == 3  # the client's own retries


def test_a_list_made_in_order_to_delete_is_admitted_where_a_plain_read_is_refused() -> None:
    sim, addon = small_simulator(ManualClock(), capacity=10)
    heroku = client_for(sim, RateBudget(reserve=10, slow_below=0))
    for _ in range(5):
        heroku.list_ip_rules(db=addon.id)
    assert heroku.budget.remaining == 5  # at half the reserve: plain reads stop here

    with pytest.raises(HerokuBudgetReserved):
        heroku.list_ip_rules(db=addon.id)
    assert sim.count("ip_rules_list") == 5
    assert heroku.list_ip_rules(db=addon.id, priority=Priority.DELETE) == []
    assert sim.count("ip_rules_list") == 6


def test_a_stale_low_reading_is_checked_with_heroku_for_free_before_a_create_is_refused() -> None:
    sim, addon = small_simulator(ManualClock(), capacity=12)
    heroku = client_for(sim, RateBudget(reserve=5, slow_below=0))
    heroku.budget.observe("3")
    with pytest.raises(HerokuBudgetReserved):
        create(heroku, addon, 0)  # a fresh reading is trusted
    assert sim.calls == []

    heroku.budget.observed_at = time.monotonic() - 31  # the same reading, now too old to trust
    create(heroku, addon, 1)
    assert sim.count("rate_limits") == 1 and sim.count("ip_rule_create") == 1
    assert heroku.budget.remaining == 11


def test_a_budget_refresh_sees_the_bucket_heroku_refilled_while_we_were_quiet() -> None:
    clock = ManualClock()
    sim, addon = small_simulator(clock, capacity=12, refill=60)
    heroku = client_for(sim, RateBudget(reserve=5, slow_below=0))
    for n in range(7):
        create(heroku, addon, n)
    assert heroku.budget.remaining == 5
    clock.advance(timedelta(minutes=1))  # 60 tokens refilled: Heroku's bucket is full again
    with pytest.raises(HerokuBudgetReserved):
        create(heroku, addon, 7)  # our reading is not stale yet
    assert sim.count("rate_limits") == 0

    heroku.budget.observed_at = time.monotonic() - 31
    create(heroku, addon, 8)
    assert sim.count("rate_limits") == 1
    assert sim.count("ip_rule_create") == 8
    assert heroku.budget.remaining == 11


def test_the_client_paces_its_calls_as_the_budget_drains() -> None:
    sim, addon = small_simulator(ManualClock(), capacity=100)
    slept: list[float] = []
    heroku = client_for(sim, RateBudget(reserve=0, slow_below=200, max_pause=1.0), slept)
    heroku.list_ip_rules(db=addon.id)
    assert slept == []  # nothing was known before the first answer
    heroku.list_ip_rules(db=addon.id)
    heroku.list_ip_rules(db=addon.id)
    assert slept == [pytest.approx(1 - 99 / 200), pytest.approx(1 - 98 / 200)]


# -- the worker against a small bucket ----------------------------------------------------------------------

CAPACITY = 40
RESERVE = 20


@pytest.fixture
def small_world(config: Config, clock: ManualClock) -> Iterator[World]:
    """The worker's world, with a Heroku account whose bucket holds only CAPACITY calls (no refill) and a
    client that keeps RESERVE of them for deletes. Rules authorize at once, so no polls spend the bucket."""
    sim, addon = small_simulator(clock, capacity=CAPACITY)
    runtime = build_runtime(
        config, clock=clock, heroku=client_for(sim, RateBudget(reserve=RESERVE, slow_below=0))
    )
    runtime.simulator = sim
    empty_tables(runtime)
    yield World(runtime, sim, addon, clock)
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
    world.sweep()
    assert budget.remaining == RESERVE
    held = [r for r in later if world.request(r).status is RequestStatus.PROVISIONING]
    assert len(held) == 3
    held_rules = [r for r in world.rules() if r.status is RuleStatus.CREATING]
    assert len(held_rules) == 3
    assert all("kept for deleting rules" in (r.last_error or "") for r in held_rules)

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
    assert world.simulator.calls[calls:] == []
    assert budget.remaining == RESERVE

    expires = world.request(first).expires_at
    assert expires is not None
    world.clock.set(expires)
    world.sweep()
    assert "8.8.8.8/32" not in world.at_heroku()
