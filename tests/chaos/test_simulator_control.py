"""The simulator's control endpoints, which the fault campaign uses to steer a simulator in another process
and to read back everything it was asked."""

from __future__ import annotations

import httpx

from app.clock import ManualClock
from app.heroku.simulator import Simulator, SimulatorTransport

TOKEN = "control-token"


def client(sim: Simulator, token: str = TOKEN) -> httpx.Client:
    return httpx.Client(
        transport=SimulatorTransport(app=sim),
        base_url="http://sim.test",
        headers={"Authorization": f"Bearer {token}"},
    )


def test_the_control_endpoints_steer_the_simulator_and_are_neither_logged_nor_charged() -> None:
    sim = Simulator(clock=ManualClock(), token=TOKEN)
    http = client(sim)

    addon = http.post("/__simulator/addons", json={"app": "chaos-app", "name": "postgresql-c-1"})
    assert addon.status_code == 201
    foreign = http.post(
        "/__simulator/foreign-rules",
        json={"addon": addon.json()["id"], "cidr": "52.1.2.3/32", "description": "office vpn"},
    )
    assert foreign.status_code == 201
    changed = http.patch("/__simulator/settings", json={"fault_rate": 0.5, "fault_mix": ["503"], "seed": 3})
    assert changed.json()["fault_mix"] == ["503"] and sim.settings.fault_mix == ("503",)
    assert http.post("/__simulator/spend", json={"tokens": 500}).json() == {"remaining": 4000}

    listed = http.get(f"/postgres/v0/databases/{addon.json()['id']}/tls-endpoint/ip-rules")
    state = http.get("/__simulator/state").json()
    assert [c["operation"] for c in state["calls"]] == ["ip_rules_list"]
    assert state["calls"][0]["status"] == listed.status_code
    assert [r["id"] for r in state["rules"]] == [foreign.json()["id"]]
    assert state["bucket"] == 3999
    assert state["settings"]["fault_rate"] == 0.5


def test_the_control_endpoints_need_the_token_and_refuse_unknown_settings() -> None:
    sim = Simulator(clock=ManualClock(), token=TOKEN)
    assert client(sim, "wrong").get("/__simulator/state").status_code == 401
    refused = client(sim).patch("/__simulator/settings", json={"no_such_switch": 1})
    assert refused.status_code == 422
    assert client(sim).post("/__simulator/nothing", json={}).status_code == 404
