"""The real httpx client against the simulator, in-process and over loopback."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from werkzeug.serving import make_server

from app.clock import ManualClock
from app.heroku.client import HerokuClient, parse_timestamp
from app.heroku.errors import (
    HerokuAuthError,
    HerokuNotFound,
    HerokuPermanentError,
    HerokuRateLimited,
    HerokuTransientError,
)
from app.heroku.simulator import SimAddon, Simulator, SimulatorTransport

TOKEN = "sim-secret"
pauses: list[float] = []


def no_sleep(seconds: float) -> None:
    """Backoff pauses are recorded, not slept: tests never wait on the wall clock."""
    pauses.append(seconds)


@pytest.fixture
def sim() -> Simulator:
    return Simulator(clock=ManualClock(), token=TOKEN)


@pytest.fixture
def pg(sim: Simulator) -> SimAddon:
    return sim.add_addon(app="acme-api", name="postgresql-shiny-42")


@pytest.fixture(params=["in-process", "loopback"])
def heroku(request: pytest.FixtureRequest, sim: Simulator) -> Iterator[HerokuClient]:
    if request.param == "in-process":
        client = HerokuClient(
            token=TOKEN,
            api_url="http://api.test",
            data_api_url="http://data.test",
            transport=SimulatorTransport(app=sim),
            sleep=no_sleep,
        )
        yield client
        client.close()
        return
    server = make_server("127.0.0.1", 0, sim, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    client = HerokuClient(token=TOKEN, api_url=base, data_api_url=base, timeout=5, sleep=no_sleep)
    yield client
    client.close()
    server.shutdown()
    thread.join(5)


def test_addon_lookup_and_mtls_status(heroku: HerokuClient, sim: Simulator, pg: SimAddon) -> None:
    addon = heroku.get_addon(app="acme-api", addon="postgresql-shiny-42")
    assert str(addon.id) == pg.id
    assert (addon.app_name, addon.service, addon.plan) == ("acme-api", "heroku-postgresql", pg.plan)
    by_id = heroku.get_tls_endpoint(db=pg.id)
    by_name = heroku.get_tls_endpoint(db=pg.name)
    assert by_id.status == by_name.status == "Operational"
    assert sim.count("addon_lookup") == 1 and sim.count("mtls_status") == 2


def test_every_call_carries_heroku_headers_and_its_own_request_id(
    heroku: HerokuClient, sim: Simulator, pg: SimAddon
) -> None:
    heroku.get_tls_endpoint(db=pg.id)
    heroku.get_tls_endpoint(db=pg.id)
    ids = [c.request_id for c in sim.calls]
    assert len(ids) == 2 and all(ids) and ids[0] != ids[1]


def test_not_found_and_not_enabled_are_typed(heroku: HerokuClient, sim: Simulator) -> None:
    off = sim.add_addon(app="acme-api", name="postgresql-off-1", mtls_status=None)
    with pytest.raises(HerokuNotFound):
        heroku.get_addon(app="acme-api", addon="postgresql-absent")
    with pytest.raises(HerokuNotFound):
        heroku.get_addon(app="other-app", addon=off.name)
    with pytest.raises(HerokuNotFound) as info:
        heroku.get_tls_endpoint(db=off.id)
    assert info.value.permanent and info.value.status == 404


def test_a_refused_token_is_a_permanent_auth_error(
    heroku: HerokuClient, sim: Simulator, pg: SimAddon
) -> None:
    sim.token = "rotated"
    with pytest.raises(HerokuAuthError) as info:
        heroku.get_addon(app="acme-api", addon=pg.name)
    assert info.value.permanent and info.value.error_id == "unauthorized"


@pytest.mark.parametrize(
    ("fault", "error"),
    [("500", HerokuTransientError), ("503", HerokuTransientError), ("429", HerokuRateLimited)],
)
def test_server_errors_and_rate_limits_are_transient_and_retried_within_a_budget(
    heroku: HerokuClient, sim: Simulator, pg: SimAddon, fault: str, error: type[Exception]
) -> None:
    sim.script("mtls_status", fault, fault)  # type: ignore[arg-type]
    assert heroku.get_tls_endpoint(db=pg.id).status == "Operational"
    assert sim.count("mtls_status") == 3

    sim.script("mtls_status", fault, fault, fault)  # type: ignore[arg-type]
    with pytest.raises(error) as info:
        heroku.get_tls_endpoint(db=pg.id)
    assert not info.value.permanent  # type: ignore[attr-defined]
    assert sim.count("mtls_status") == 6


def test_backoff_grows_exponentially_with_jitter(sim: Simulator, pg: SimAddon) -> None:
    waits: list[float] = []
    client = HerokuClient(
        token=TOKEN,
        api_url="http://a",
        data_api_url="http://d",
        transport=SimulatorTransport(app=sim),
        retries=4,
        backoff=0.2,
        sleep=waits.append,
    )
    sim.script("mtls_status", "503", "503", "503")
    client.get_tls_endpoint(db=pg.id)
    assert len(waits) == 3
    assert 0.2 <= waits[0] < 0.2 + 1.0 + 1e-9
    assert waits[1] >= 0.4 and waits[2] >= 0.8
    assert max(waits) <= 2.0 + 1.0


def test_a_create_is_never_retried_blindly(heroku: HerokuClient, sim: Simulator, pg: SimAddon) -> None:
    sim.script("ip_rule_create", "ambiguous_500")
    with pytest.raises(HerokuTransientError):
        heroku.create_ip_rule(db=pg.id, cidr="8.8.8.8/32", description="drawbridge test")
    assert sim.count("ip_rule_create") == 1
    assert [r.cidr for r in heroku.list_ip_rules(db=pg.id)] == ["8.8.8.8/32"]


def test_error_bodies_without_an_id_are_read(heroku: HerokuClient, sim: Simulator) -> None:
    sim.settings.errors_with_id = False
    with pytest.raises(HerokuNotFound) as info:
        heroku.get_addon(app="acme-api", addon="absent")
    assert info.value.error_id is None
    assert "Couldn't find that add-on" in info.value.message


def test_a_timeout_is_transient(sim: Simulator, pg: SimAddon) -> None:
    client = HerokuClient(
        token=TOKEN,
        api_url="http://api.test",
        data_api_url="http://data.test",
        transport=SimulatorTransport(app=sim),
        sleep=no_sleep,
    )
    sim.script("mtls_status", "timeout", "timeout", "timeout")
    with pytest.raises(HerokuTransientError, match="timed out"):
        client.get_tls_endpoint(db=pg.id)


def test_a_slow_heroku_over_loopback_times_out_as_transient(sim: Simulator, pg: SimAddon) -> None:
    server = make_server("127.0.0.1", 0, sim, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    sim.settings.slow_seconds = 0.5
    base = f"http://127.0.0.1:{server.server_port}"
    client = HerokuClient(token=TOKEN, api_url=base, data_api_url=base, timeout=0.1, retries=1)
    try:
        with pytest.raises(HerokuTransientError, match="timed out"):
            client.get_tls_endpoint(db=pg.id)
    finally:
        client.close()
        server.shutdown()
        thread.join(5)


def test_an_unreachable_heroku_is_transient() -> None:
    client = HerokuClient(
        token=TOKEN, api_url="http://127.0.0.1:9", data_api_url="http://127.0.0.1:9", timeout=1
    )
    with pytest.raises(HerokuTransientError, match="could not reach"):
        client.get_addon(app="a", addon="b")


def test_the_simulator_accepts_basic_auth_as_some_heroku_plugins_send(sim: Simulator, pg: SimAddon) -> None:
    basic = base64.b64encode(f":{TOKEN}".encode()).decode()
    with httpx.Client(transport=httpx.WSGITransport(app=sim), base_url="http://data.test") as raw:
        ok = raw.get(
            f"/postgres/v0/databases/{pg.id}/tls-endpoint", headers={"Authorization": f"Basic {basic}"}
        )
        refused = raw.get(f"/postgres/v0/databases/{pg.id}/tls-endpoint")
    assert ok.status_code == 200 and refused.status_code == 401


def test_a_non_json_success_body_is_transient_not_a_crash(pg: SimAddon) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>maintenance</html>")

    client = HerokuClient(
        token=TOKEN, api_url="http://a", data_api_url="http://d", transport=httpx.MockTransport(handler)
    )
    with pytest.raises(HerokuTransientError, match="not JSON"):
        client.get_tls_endpoint(db=pg.id)


def test_an_addon_without_an_id_is_refused(pg: SimAddon) -> None:
    client = HerokuClient(
        token=TOKEN,
        api_url="http://a",
        data_api_url="http://d",
        transport=httpx.MockTransport(lambda r: httpx.Response(200, json={"name": "x"})),
    )
    with pytest.raises(HerokuPermanentError):
        client.get_addon(app="a", addon="x")


@pytest.mark.parametrize(
    "text",
    [
        "2020-09-04T01:29:55.209+00:00",
        "2020-09-04 01:29:55 +0000",
        "2020-09-04T01:29:55Z",
        "2020-09-04T01:29:55",
    ],
)
def test_both_heroku_timestamp_formats_are_read(text: str) -> None:
    parsed = parse_timestamp(text)
    assert parsed is not None
    assert parsed.replace(microsecond=0) == datetime(2020, 9, 4, 1, 29, 55, tzinfo=UTC)


@pytest.mark.parametrize("text", [None, "", "yesterday", 12345, "2020-13-45 99:99:99 +0000"])
def test_unreadable_timestamps_are_none_never_an_error(text: object) -> None:
    assert parse_timestamp(text) is None
