"""The fault campaign, `drawbridge-chaos`: real Drawbridge processes against a hostile Heroku, then a check
of every promise Drawbridge makes, from the simulator's own record of what it was asked.

It starts the Heroku simulator as its own server with faults switched on (5xx, 429s, slow answers, timeouts,
ambiguous creates, the re-add error window, another client emptying the account's bucket), the API and
several `drawbridge worker` processes on a scratch PostgreSQL database, seeds rules Drawbridge did not
create, files requests with short durations (approved by a second person or by an auto-approval policy;
some denied, cancelled or revoked), sends SIGKILL to random workers at random moments and restarts them.
Then faults go off, everything settles, and it reports (JSON on stdout, a summary on stderr):

- rules left at Heroku after their request ended, requests not in a final state, requests or rules whose
  audit trail misses a step, rules created more than once for one need, deletes of foreign rules: all 0;
- expiry lag (expiry to the rule gone at Heroku): median, p99 and worst; the fault mix; the kills.

The exit status is 1 when an invariant is broken, 2 when the campaign itself could not run. Real processes
run in real time here, so durations are seconds, and the simulator's bucket refills in compressed time.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import click
import httpx
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from app.clock import SystemClock
from app.config import normalize_database_url
from app.db import make_engine, make_session_factory
from app.models import LIVE_RULE_STATUSES, LIVE_STATUSES, AccessRequest, AuditEvent, IpRule, RequestStatus
from app.services import audit, tokens
from app.services.grants import parse_description

log = logging.getLogger("drawbridge.chaos")

SIM_TOKEN = "simulator-token"
FAULT_MIX = ("500", "502", "503", "429", "timeout", "slow", "ambiguous_500", "ambiguous_timeout")
FINAL_ACTION = {
    RequestStatus.EXPIRED: "access_request:expire",
    RequestStatus.REVOKED: "access_request:revoke",
    RequestStatus.FAILED: "access_request:fail",
    RequestStatus.CANCELLED: "access_request:cancel",
    RequestStatus.DENIED: "access_request:deny",
    RequestStatus.TIMED_OUT: "access_request:time_out",
}


@dataclass(frozen=True)
class Plan:
    """What the campaign does. Times are real seconds."""

    requests: int = 30
    kills: int = 10
    workers: int = 2
    seed: int = 1
    concurrency: int = 4
    spread: float = 15.0
    """Seconds over which the requests are filed."""
    min_duration: int = 3
    max_duration: int = 8
    databases: int = 2
    cidrs: int = 8
    """CIDRs per database: few, so requests share rules and re-add CIDRs just deleted."""
    users: int = 12
    fault_rate: float = 0.2
    fault_mix: tuple[str, ...] = FAULT_MIX
    heroku_timeout: float = 1.5
    slow_seconds: float = 0.4
    readd_window: float = 2.0
    authorize_after: float = 1.0
    bucket_capacity: int = 1500
    bucket_refill_per_minute: float = 1500.0
    bursts: int = 2
    """Moments at which another client of the account empties its bucket and keeps it empty a while."""
    burst_seconds: float = 3.0
    revoke_share: float = 0.1
    cancel_share: float = 0.05
    deny_share: float = 0.03
    sweep_interval: float = 0.2
    poll_interval: float = 0.5
    reconcile_interval: float = 3.0
    settle_timeout: float = 120.0
    foreign_rules: int = 3
    """Rules somebody else created, per database; one of them holds a CIDR Drawbridge is asked for."""


@dataclass
class Tally:
    """What happened while the campaign ran, counted by the threads that made it happen."""

    filed: int = 0
    refused: Counter[int] = field(default_factory=Counter)
    api_errors: Counter[str] = field(default_factory=Counter)
    kills: int = 0
    restarts: int = 0
    bursts: int = 0
    revoked: int = 0
    cancelled: int = 0
    denied: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)


class CampaignError(Exception):
    """The campaign could not run (a process would not start, PostgreSQL is unreachable…)."""


# -- processes --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Process:
    """One child process, its output appended to a log file; it is ready once `ready_line` shows there."""

    def __init__(
        self, name: str, args: list[str], env: dict[str, str], logs: Path, *, ready_line: str = ""
    ) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.ready_line = ready_line
        self.log_path = logs / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self._log: TextIO | None = None
        self._offset = 0
        self._ready = False
        self.ready_at = 0.0

    def start(self) -> None:
        self._log = self.log_path.open("a")
        self._log.write(f"--- start {datetime.now().isoformat()}\n")
        self._log.flush()
        self._offset = self._log.tell()
        self._ready = False
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "app.cli", *self.args],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()
        self._close_log()

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._close_log()
        return self.popen.returncode

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def ready(self) -> bool:
        """Whether this run of the process has said it is at work."""
        if not self._ready and self.alive():
            with self.log_path.open() as output:
                output.seek(self._offset)
                self._ready = self.ready_line in output.read()
            self.ready_at = time.monotonic()
        return self._ready and self.alive()

    def at_work_for(self) -> float:
        """Seconds since this run of the process said it is at work (0 if it has not)."""
        return time.monotonic() - self.ready_at if self.ready() else 0.0

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def wait_until(check: Callable[[], bool], *, timeout: float, what: str, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise CampaignError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


# -- the scratch database --------------------------------------------------------------------------------


@contextmanager
def scratch_database(admin_url: str, *, keep: bool) -> Iterator[str]:
    """A new PostgreSQL database beside `admin_url`'s, migrated to the newest revision; dropped at the end
    unless `keep`."""
    from alembic import command

    from app.cli import alembic_config

    admin = normalize_database_url(admin_url)
    name = f"drawbridge_chaos_{uuid.uuid4().hex[:10]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
            conn.execute(text(f'ALTER DATABASE "{name}" SET synchronous_commit = off'))
    except Exception as exc:  # noqa: BLE001 - any failure here means the campaign cannot run
        raise CampaignError(f"cannot create a scratch database: {exc}") from exc
    finally:
        engine.dispose()
    url = make_url(admin).set(database=name).render_as_string(hide_password=False)
    try:
        command.upgrade(alembic_config(url), "head")
        yield url
    finally:
        if keep:
            log.warning("kept the scratch database %s", name)
        else:
            engine = create_engine(admin, isolation_level="AUTOCOMMIT")
            with engine.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            engine.dispose()


# -- the simulator's control API -------------------------------------------------------------------------


class SimulatorControl:
    def __init__(self, base: str) -> None:
        self.http = httpx.Client(
            base_url=f"{base}/__simulator", headers={"Authorization": f"Bearer {SIM_TOKEN}"}, timeout=30
        )

    def state(self) -> dict[str, Any]:
        response = self.http.get("/state")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def settings(self, **changes: Any) -> None:
        self.http.patch("/settings", json=changes).raise_for_status()

    def addon(self, app: str, name: str) -> dict[str, Any]:
        response = self.http.post("/addons", json={"app": app, "name": name})
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def foreign_rule(self, addon: str, cidr: str, description: str) -> str:
        response = self.http.post(
            "/foreign-rules", json={"addon": addon, "cidr": cidr, "description": description}
        )
        response.raise_for_status()
        rule_id: str = response.json()["id"]
        return rule_id

    def spend(self, tokens: float) -> None:
        self.http.post("/spend", json={"tokens": tokens}).raise_for_status()

    def close(self) -> None:
        self.http.close()


# -- the campaign ----------------------------------------------------------------------------------------


class Campaign:
    def __init__(self, plan: Plan, *, database_url: str, logs: Path) -> None:
        self.plan = plan
        self.database_url = database_url
        self.logs = logs
        self.rng = random.Random(plan.seed)
        self.tally = Tally()
        self.sim_port = free_port()
        self.api_port = free_port()
        self.sim_base = f"http://127.0.0.1:{self.sim_port}"
        self.api_base = f"http://127.0.0.1:{self.api_port}"
        self.env = self._env()
        self.simulator = Process(
            "simulator",
            [
                "simulator",
                "--port",
                str(self.sim_port),
                "--authorize-after",
                str(plan.authorize_after),
                "--seed",
                str(plan.seed),
            ],
            self.env,
            logs,
        )
        self.api = Process("api", ["serve", "--port", str(self.api_port), "--threads", "16"], self.env, logs)
        self.workers = [
            Process(f"worker-{n}", ["worker"], self.env, logs, ready_line="worker sweeping every")
            for n in range(plan.workers)
        ]
        self.workers_lock = threading.Lock()
        self.control = SimulatorControl(self.sim_base)
        self.engine = make_engine(normalize_database_url(database_url))
        self.sessions = make_session_factory(self.engine)
        self.headers: dict[str, dict[str, str]] = {}
        self.auto_users: set[str] = set()
        self.databases: list[str] = []
        self.cidrs: dict[str, list[str]] = {}
        self.foreign: set[str] = set()
        self.started = time.monotonic()

    def _env(self) -> dict[str, str]:
        plan = self.plan
        return {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "HEROKU_API_TOKEN": SIM_TOKEN,
            "HEROKU_API_URL": self.sim_base,
            "HEROKU_DATA_API_URL": self.sim_base,
            "DRAWBRIDGE_SWEEP_INTERVAL": str(plan.sweep_interval),
            "DRAWBRIDGE_POLL_INTERVAL": str(plan.poll_interval),
            "DRAWBRIDGE_RECONCILE_INTERVAL": str(plan.reconcile_interval),
            "DRAWBRIDGE_MIN_DURATION": str(plan.min_duration),
            "DRAWBRIDGE_HEROKU_TIMEOUT": str(plan.heroku_timeout),
            "DRAWBRIDGE_RATE_LIMIT": "1000000/minute",
            "DRAWBRIDGE_LOG_FORMAT": "text",
            "PYTHONUNBUFFERED": "1",
        }

    # -- setting up -----------------------------------------------------------------------------------

    def start(self) -> None:
        self.simulator.start()
        wait_until(self._simulator_up, timeout=60, what="the simulator")
        self.control.settings(
            bucket_capacity=self.plan.bucket_capacity,
            bucket_refill_per_minute=self.plan.bucket_refill_per_minute,
        )
        self._people()
        self.api.start()
        wait_until(self._api_up, timeout=60, what="the API")
        self._register()
        for worker in self.workers:
            worker.start()
        wait_until(lambda: all(w.ready() for w in self.workers), timeout=120, what="the workers")

    def _simulator_up(self) -> bool:
        try:
            self.control.state()
        except httpx.HTTPError:
            return False
        return True

    def _api_up(self) -> bool:
        try:
            return httpx.get(f"{self.api_base}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _people(self) -> None:
        clock = SystemClock()
        with self.sessions() as session:
            for name, roles in (("root", ("admin", "auditor")), ("bob", ("approver",))):
                _, secret = tokens.create_token(session, user_name=name, roles=roles, clock=clock)
                self.headers[name] = {"Authorization": f"Bearer {secret}"}
            for n in range(self.plan.users):
                name = f"dev{n}"
                _, secret = tokens.create_token(session, user_name=name, roles=("requester",), clock=clock)
                self.headers[name] = {"Authorization": f"Bearer {secret}"}
                if n % 2:
                    self.auto_users.add(name)

    def _register(self) -> None:
        """Two add-ons, each with rules somebody else created; databases registered through the API."""
        for n in range(self.plan.databases):
            addon = self.control.addon("chaos-app", f"postgresql-chaos-{n}")
            name = f"db{n}"
            self.cidrs[name] = [f"52.{10 + n}.{k // 200}.{k % 200 + 1}/32" for k in range(self.plan.cidrs)]
            for k in range(self.plan.foreign_rules):
                # The first one holds a CIDR Drawbridge will be asked for: that request must fail, untouched.
                cidr = self.cidrs[name][0] if k == 0 else f"203.0.{n}.{k}/32"
                description = ("office vpn", "", "drawbridge-like but not ours")[k % 3]
                self.foreign.add(self.control.foreign_rule(addon["id"], cidr, description))
            response = self._api(
                "POST",
                "/databases",
                "root",
                json={
                    "name": name,
                    "app": "chaos-app",
                    "addon": addon["name"],
                    "max_live_per_user": 100,
                    "rule_headroom": 0,
                    "auto_approve": [{"users": sorted(self.auto_users), "max_duration": "PT1H"}],
                },
            )
            if response is None or response.status_code != 201:
                raise CampaignError(f"could not register {name}: {response and response.text}")
            self.databases.append(name)

    # -- talking to the API ------------------------------------------------------------------------------

    def _api(
        self, method: str, path: str, who: str, *, json: dict[str, Any] | None = None
    ) -> httpx.Response | None:
        for attempt in range(5):
            try:
                response = httpx.request(
                    method, f"{self.api_base}{path}", headers=self.headers[who], json=json, timeout=30
                )
            except httpx.HTTPError as exc:
                self.tally.api_errors[type(exc).__name__] += 1
                time.sleep(0.2 * (attempt + 1))
                continue
            if response.status_code >= 500:
                self.tally.api_errors[f"{method} {path.split('/')[1]} {response.status_code}"] += 1
            return response
        return None

    # -- the run -----------------------------------------------------------------------------------------

    def run(self) -> None:
        plan = self.plan
        self.control.settings(
            fault_rate=plan.fault_rate,
            fault_mix=list(plan.fault_mix),
            slow_fault_seconds=plan.slow_seconds,
            timeout_seconds=plan.heroku_timeout + 0.5,
            readd_window=plan.readd_window,
            seed=plan.seed,
        )
        horizon = plan.spread + plan.max_duration
        burst_times = sorted(self.rng.uniform(1.0, horizon) for _ in range(plan.bursts))
        killer = threading.Thread(target=self._kill, args=(plan.kills, horizon), name="killer", daemon=True)
        burster = threading.Thread(target=self._burst_at, args=(burst_times,), name="burster", daemon=True)
        begun = time.monotonic()
        killer.start()
        burster.start()
        with ThreadPoolExecutor(max_workers=plan.concurrency) as pool:
            for n in range(plan.requests):
                delay = begun + plan.spread * n / max(1, plan.requests) - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(self._one_request, n, random.Random(plan.seed * 1_000_003 + n))
        killer.join()
        burster.join()

    def _kill(self, kills: int, horizon: float) -> None:
        """SIGKILL `kills` workers at random moments spread over `horizon` seconds, and start each again a
        moment later. The victim is one at work (a worker still starting has nothing in hand) for a random
        while, and never the last one at work: on a machine slow to start processes the campaign would
        otherwise measure how long nothing runs at all, not how Drawbridge copes."""
        gap = horizon / max(1, kills)
        for _ in range(kills):
            time.sleep(self.rng.uniform(0.2 * gap, gap))
            uptime = self.rng.uniform(1.0, 5.0)
            while True:
                with self.workers_lock:
                    busy = [w for w in self.workers if w.ready()]
                    working = [w for w in busy if w.at_work_for() >= uptime]
                    if working and (len(busy) > 1 or len(self.workers) == 1):
                        victim = self.rng.choice(working)
                        victim.kill()
                        self.tally.add("kills")
                        log.info("killed %s", victim.name)
                        break
                time.sleep(0.05)
            time.sleep(self.rng.uniform(0.0, 1.0))
            with self.workers_lock:
                victim.start()
                self.tally.add("restarts")

    def _burst_at(self, moments: list[float]) -> None:
        begun = time.monotonic()
        for moment in moments:
            time.sleep(max(0.0, begun + moment - time.monotonic()))
            self.control.spend(float(self.plan.bucket_capacity))
            self.control.settings(bucket_drain_per_minute=2 * self.plan.bucket_refill_per_minute)
            self.tally.add("bursts")
            log.info("another client empties the account's bucket for %g s", self.plan.burst_seconds)
            time.sleep(self.plan.burst_seconds)
            self.control.settings(bucket_drain_per_minute=0.0)

    def _one_request(self, n: int, rng: random.Random) -> None:
        try:
            self._file(n, rng)
        except Exception:  # noqa: BLE001 - one request's trouble is counted, the campaign goes on
            log.exception("request %d", n)
            self.tally.api_errors["campaign"] += 1

    def _file(self, n: int, rng: random.Random) -> None:
        plan = self.plan
        user = f"dev{n % plan.users}"
        database = self.databases[n % len(self.databases)]
        duration = rng.randint(plan.min_duration, plan.max_duration)
        response = None
        for _ in range(5):
            cidr = rng.choice(self.cidrs[database])
            body = {"database": database, "cidr": cidr, "duration": f"{duration}s", "reason": f"chaos {n}"}
            response = self._api("POST", "/access-requests", user, json=body)
            if response is None or response.status_code != 409:
                break
        if response is None or response.status_code != 201:
            self.tally.refused[response.status_code if response is not None else 0] += 1
            return
        self.tally.add("filed")
        request_id = response.json()["id"]
        dice = rng.random()
        if user not in self.auto_users:
            time.sleep(rng.uniform(0.0, 0.5))
            if dice < plan.cancel_share:
                self._api("POST", f"/access-requests/{request_id}/cancel", user, json={})
                self.tally.add("cancelled")
                return
            if dice < plan.cancel_share + plan.deny_share:
                self._api("POST", f"/access-requests/{request_id}/deny", "bob", json={"reason": "no"})
                self.tally.add("denied")
                return
            self._api("POST", f"/access-requests/{request_id}/approve", "bob", json={"comment": "ok"})
        if rng.random() < plan.revoke_share:
            time.sleep(rng.uniform(0.5, plan.authorize_after + duration))
            self._api("POST", f"/access-requests/{request_id}/revoke", user, json={})
            self.tally.add("revoked")

    # -- settling ------------------------------------------------------------------------------------

    def settle(self) -> bool:
        """Let the requests run their course with faults still on (up to `settle_timeout`), then switch
        faults off and wait until every request is final and every rule Drawbridge recorded is gone."""
        try:
            wait_until(self._settled, timeout=self.plan.settle_timeout, what="the requests to end", step=0.5)
        except CampaignError:
            log.info("still busy after %g s; switching faults off", self.plan.settle_timeout)
        self.control.settings(fault_rate=0.0, readd_window=0.0, bucket_drain_per_minute=0.0)
        try:
            wait_until(self._settled, timeout=self.plan.settle_timeout, what="the dust to settle", step=0.5)
        except CampaignError as exc:
            log.error("%s", exc)
            return False
        return True

    def _settled(self) -> bool:
        with self.workers_lock:
            for worker in self.workers:
                if not worker.alive():
                    worker.start()  # the killer may have been between a kill and its restart
        with self.sessions() as session:
            live = session.scalar(
                select(func.count()).select_from(AccessRequest).where(AccessRequest.status.in_(LIVE_STATUSES))
            )
            rules = session.scalar(
                select(func.count()).select_from(IpRule).where(IpRule.status.in_(LIVE_RULE_STATUSES))
            )
        return live == 0 and rules == 0

    def stop(self) -> dict[str, int | None]:
        codes = {}
        with self.workers_lock:
            for worker in self.workers:
                codes[worker.name] = worker.stop()
        codes["api"] = self.api.stop()
        codes["simulator"] = self.simulator.stop()
        self.control.close()
        self.engine.dispose()
        return codes


# -- checking ---------------------------------------------------------------------------------------------


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(share * (len(ordered) - 1)))))
    return ordered[index]


def _spread(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0, "median": None, "p99": None, "max": None}
    return {
        "count": len(values),
        "median": round(statistics.median(values), 3),
        "p99": round(_percentile(values, 0.99), 3),
        "max": round(max(values), 3),
    }


def _rule_id_of(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def check(campaign: Campaign, state: dict[str, Any]) -> dict[str, Any]:
    """Every invariant, from our database and the simulator's record of every call and rule."""
    foreign = campaign.foreign
    calls = state["calls"]
    ours_left = [r for r in state["rules"] if parse_description(r["description"]) is not None]
    foreign_left = {r["id"] for r in state["rules"] if r["id"] in foreign}
    deletes = [c for c in calls if c["operation"] == "ip_rule_delete"]
    foreign_deletes = [c for c in deletes if _rule_id_of(c["path"]) in foreign]
    created_for = Counter(
        str(parsed[0])
        for r in state["created"]
        if (parsed := parse_description(r["description"])) is not None
    )
    twice = {rule: n for rule, n in created_for.items() if n > 1}
    gone_at: dict[str, datetime] = {}
    for c in deletes:
        if c["status"] < 300 or c["status"] == 404:
            gone_at.setdefault(_rule_id_of(c["path"]), datetime.fromisoformat(c["at"]))

    with campaign.sessions() as session:
        requests = session.scalars(select(AccessRequest)).all()
        rules = session.scalars(select(IpRule)).all()
        events = session.execute(select(AuditEvent.request_id, AuditEvent.action, AuditEvent.details)).all()
        chain = audit.verify(session)
    by_request: dict[uuid.UUID, set[str]] = {}
    by_rule: dict[str, set[str]] = {}
    for request_id, action, details in events:
        if request_id is not None:
            by_request.setdefault(request_id, set()).add(action)
        if action.startswith("ip_rule:") and isinstance(details, dict) and details.get("rule_id"):
            by_rule.setdefault(str(details["rule_id"]), set()).add(action)

    gaps: list[dict[str, Any]] = []
    for request in requests:
        missing = _missing_request_steps(request, by_request.get(request.id, set()))
        if missing:
            gaps.append({"request": str(request.id), "status": request.status.value, "missing": missing})
    for rule in rules:
        missing = _missing_rule_steps(rule, by_rule.get(str(rule.id), set()))
        if missing:
            gaps.append({"rule": str(rule.id), "status": rule.status.value, "missing": missing})

    expiry_lags: list[float] = []
    end_lags: list[float] = []
    slowest: list[dict[str, Any]] = []
    users: dict[uuid.UUID, list[AccessRequest]] = {}
    for request in requests:
        if request.ip_rule_id is not None:
            users.setdefault(request.ip_rule_id, []).append(request)
    for rule in rules:
        ended = [_end_of(r) for r in users.get(rule.id, [])]
        gone = gone_at.get(rule.heroku_rule_id or "")
        if not ended or any(e is None for e in ended) or gone is None:
            continue
        last = max(e for e in ended if e is not None)
        lag = (gone - last[0]).total_seconds()
        end_lags.append(lag)
        if last[1]:
            expiry_lags.append(lag)
        slowest.append(
            {
                "lag_s": round(lag, 3),
                "rule": str(rule.id),
                "heroku_rule": rule.heroku_rule_id,
                "cidr": rule.cidr,
                "ended": last[0].isoformat(),
                "expired": last[1],
                "released": rule.release_at.isoformat() if rule.release_at else None,
                "delete_calls": [
                    (c["at"], c["status"], c["fault"])
                    for c in deletes
                    if _rule_id_of(c["path"]) == rule.heroku_rule_id
                ],
            }
        )
    slowest.sort(key=lambda item: -float(item["lag_s"]))

    statuses = Counter(r.status.value for r in requests)
    invariants = {
        "rules_left_at_heroku": len(ours_left),
        "requests_not_final": sum(1 for r in requests if r.status in LIVE_STATUSES),
        "audit_gaps": len(gaps),
        "audit_chain_broken": 0 if chain.ok else 1,
        "rules_created_twice": len(twice),
        "foreign_rule_deletes": len(foreign_deletes),
        "foreign_rules_missing": len(foreign - foreign_left),
        # The simulator never loses a rule by itself: each rule taken for missing is a false alarm.
        "rules_taken_for_missing": sum(1 for _, action, _ in events if action == "ip_rule:missing"),
    }
    faults = Counter(c["fault"] for c in calls if c["fault"])
    return {
        "ok": not any(invariants.values()),
        "invariants": invariants,
        "requests": {"filed": len(requests), "by_status": dict(sorted(statuses.items()))},
        "expiry_lag_s": _spread(expiry_lags),
        "end_lag_s": _spread(end_lags),
        "heroku_calls": dict(sorted(Counter(c["operation"] for c in calls).items())),
        "faults_injected": dict(sorted(faults.items())),
        "rate_limited_by_empty_bucket": sum(1 for c in calls if c["status"] == 429 and not c["fault"]),
        "examples": {
            "audit_gaps": gaps[:10],
            "created_twice": dict(list(twice.items())[:10]),
            "left_at_heroku": ours_left[:10],
            "foreign_deletes": foreign_deletes[:10],
            "slowest_deletes": slowest[:5],
        },
    }


def _end_of(request: AccessRequest) -> tuple[datetime, bool] | None:
    """When the request stopped needing its rule, and whether that was its expiry."""
    if request.status is RequestStatus.EXPIRED and request.expires_at is not None:
        return request.expires_at, True
    if request.ended_at is not None:
        return request.ended_at, False
    return None


def _missing_request_steps(request: AccessRequest, actions: set[str]) -> list[str]:
    need: list[set[str]] = [{"access_request:create"}]
    if request.decided_at is not None and request.status is not RequestStatus.DENIED:
        need.append({"access_request:approve", "access_request:auto_approve"})
    if request.ip_rule_id is not None:
        need.append({"access_request:provision"})
    if request.activated_at is not None:
        need.append({"access_request:activate"})
    final = FINAL_ACTION.get(request.status)
    if final is not None:
        need.append({final})
    return [" or ".join(sorted(options)) for options in need if not options & actions]


def _missing_rule_steps(rule: IpRule, actions: set[str]) -> list[str]:
    need: list[set[str]] = []
    if rule.authorized_at is not None:
        need.append({"ip_rule:create", "ip_rule:adopt"})
        need.append({"ip_rule:authorize"})
    if rule.release_at is not None:
        need.append({"ip_rule:release"})
    if rule.deleted_at is not None:
        need.append({"ip_rule:delete", "ip_rule:refused"})
    return [" or ".join(sorted(options)) for options in need if not options & actions]


# -- the command ------------------------------------------------------------------------------------------


def run_campaign(
    plan: Plan, *, admin_url: str, keep: bool = False, logs: Path | None = None
) -> dict[str, Any]:
    """Run the whole campaign and return its report (see the module docstring)."""
    began = time.monotonic()
    log_dir = logs or Path(tempfile.mkdtemp(prefix="drawbridge-chaos-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    with scratch_database(admin_url, keep=keep) as url:
        campaign = Campaign(plan, database_url=url, logs=log_dir)
        settled = False
        try:
            campaign.start()
            campaign.run()
            settled = campaign.settle()
            state = campaign.control.state()
        finally:
            exits = campaign.stop()
        report = check(campaign, state)
    report["settled"] = settled
    report["ok"] = report["ok"] and settled
    report["kills"] = {"sigkill": campaign.tally.kills, "restarts": campaign.tally.restarts}
    report["campaign"] = {
        "plan": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(plan).items()},
        "filed": campaign.tally.filed,
        "refused_at_filing": dict(campaign.tally.refused),
        "cancelled": campaign.tally.cancelled,
        "denied": campaign.tally.denied,
        "revoked": campaign.tally.revoked,
        "bucket_emptied": campaign.tally.bursts,
        "api_errors": dict(campaign.tally.api_errors),
        "exit_codes": exits,
        "logs": str(log_dir),
    }
    report["wall_time_s"] = round(time.monotonic() - began, 1)
    return report


def summary(report: dict[str, Any]) -> str:
    inv = report["invariants"]
    lag = report["expiry_lag_s"]
    plan = report["campaign"]["plan"]
    lines = [
        f"fault campaign: {'PASSED' if report['ok'] else 'FAILED'} in {report['wall_time_s']} s "
        f"({plan['requests']} requests, {plan['workers']} workers, seed {plan['seed']})",
        f"  rules left at Heroku after their request ended: {inv['rules_left_at_heroku']}",
        f"  requests not in a final state: {inv['requests_not_final']}",
        f"  requests or rules whose audit trail misses a step: {inv['audit_gaps']}"
        f" (hash chain {'broken' if inv['audit_chain_broken'] else 'intact'})",
        f"  rules created more than once for one need: {inv['rules_created_twice']}",
        f"  deletes of foreign rules: {inv['foreign_rule_deletes']}"
        f" (foreign rules gone: {inv['foreign_rules_missing']})",
        f"  rules wrongly taken for missing at Heroku: {inv['rules_taken_for_missing']}",
        f"  expiry lag (expiry to rule gone at Heroku): median {lag['median']} s, p99 {lag['p99']} s, "
        f"worst {lag['max']} s over {lag['count']} rules",
        f"  kills: {report['kills']['sigkill']} SIGKILLs, {report['kills']['restarts']} restarts; "
        f"bucket emptied by another client {report['campaign']['bucket_emptied']} times",
        f"  faults injected: {report['faults_injected']} at rate {plan['fault_rate']}; "
        f"429s from an empty bucket: {report['rate_limited_by_empty_bucket']}",
        f"  requests: {report['requests']['by_status']}; "
        f"Heroku calls: {sum(report['heroku_calls'].values())}",
    ]
    if not report["settled"]:
        lines.append("  the run did not settle within the timeout")
    if report["campaign"]["api_errors"]:
        lines.append(f"  API errors: {report['campaign']['api_errors']}")
    lines.append(f"  logs: {report['campaign']['logs']}")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--requests", default=Plan.requests, show_default=True, type=click.IntRange(1))
@click.option("--kills", default=Plan.kills, show_default=True, type=click.IntRange(0))
@click.option("--workers", default=Plan.workers, show_default=True, type=click.IntRange(1, 16))
@click.option("--seed", default=Plan.seed, show_default=True, type=int)
@click.option("--concurrency", default=Plan.concurrency, show_default=True, type=click.IntRange(1, 64))
@click.option(
    "--spread", default=Plan.spread, show_default=True, help="Seconds over which requests are filed."
)
@click.option("--max-duration", default=Plan.max_duration, show_default=True, type=click.IntRange(3))
@click.option("--fault-rate", default=Plan.fault_rate, show_default=True, type=click.FloatRange(0, 1))
@click.option("--bursts", default=Plan.bursts, show_default=True, type=click.IntRange(0))
@click.option("--databases", default=Plan.databases, show_default=True, type=click.IntRange(1, 50))
@click.option("--settle-timeout", default=Plan.settle_timeout, show_default=True)
@click.option(
    "--database-url",
    envvar="DRAWBRIDGE_CHAOS_DATABASE_URL",
    default="postgresql://postgres@127.0.0.1:5432/postgres",
    show_default=True,
    help="A PostgreSQL server to create the scratch database on (this database itself is left alone).",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write here.")
@click.option("--logs", type=click.Path(file_okay=False, path_type=Path), help="Directory for process logs.")
@click.option("--keep", is_flag=True, help="Keep the scratch database.")
def main(
    requests: int,
    kills: int,
    workers: int,
    seed: int,
    concurrency: int,
    spread: float,
    max_duration: int,
    fault_rate: float,
    bursts: int,
    databases: int,
    settle_timeout: float,
    database_url: str,
    json_path: Path | None,
    logs: Path | None,
    keep: bool,
) -> None:
    """Run the fault campaign; exit 1 if any invariant is broken, 2 if the campaign could not run."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    plan = Plan(
        requests=requests,
        kills=kills,
        workers=workers,
        seed=seed,
        concurrency=concurrency,
        spread=spread,
        max_duration=max_duration,
        fault_rate=fault_rate,
        bursts=bursts,
        databases=databases,
        cidrs=max(Plan.cidrs, requests // (2 * databases)),
        users=max(Plan.users, requests // 8),
        settle_timeout=settle_timeout,
    )
    try:
        report = run_campaign(plan, admin_url=database_url, keep=keep, logs=logs)
    except CampaignError as exc:
        click.echo(f"the campaign could not run: {exc}", err=True)
        raise SystemExit(2) from None
    text_report = json.dumps(report, indent=2, default=str)
    click.echo(text_report)
    if json_path is not None:
        json_path.write_text(text_report + "\n")
    click.echo(summary(report), err=True)
    raise SystemExit(0 if report["ok"] else 1)


if __name__ == "__main__":  # pragma: no cover
    main()
