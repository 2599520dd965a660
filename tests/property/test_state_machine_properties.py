"""Stateful properties: random sequences of asking, deciding, cancelling, revoking, extending, time passing,
worker sweeps and Heroku faults, run against the real app on PostgreSQL (over the HTTP test client) and the
worker's real sweep against the Heroku simulator. After every step the invariants of DESIGN.md are checked;
at the end of each run Heroku recovers, time runs far ahead and the worker settles everything.

Each Hypothesis example empties the tables and builds its own clock, simulator, Heroku client and app over
one engine shared by the whole run.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from app import create_app
from app.clock import ManualClock
from app.config import Config
from app.db import make_engine, make_session_factory
from app.heroku.simulator import Settings as SimulatorSettings
from app.heroku.simulator import SimAddon, SimRule, Simulator
from app.models import AccessRequest, Approval, AuditEvent, IpRule, RequestStatus, RuleStatus
from app.runtime import Runtime
from app.services import grants, tokens
from app.validation import format_duration
from tests.conftest import SIM_TOKEN, empty_tables, sim_client

SWEEP_SETTINGS = grants.Settings(
    poll_interval=15, provisioning_timeout=1800, reconcile_interval=300, lease=60
)
MIN_DURATION = 60
MAX_DURATION = 4 * 3600
APPROVAL_WINDOW = 2 * 3600
PROBLEM_JSON = "application/problem+json"
EXAMPLES = 25
STEPS = 30

PEOPLE: dict[str, frozenset[str]] = {
    "alice": frozenset({"requester"}),
    "erin": frozenset({"requester"}),
    "pat": frozenset({"requester", "approver"}),  # may approve, but never their own requests
    "bob": frozenset({"approver"}),
    "carol": frozenset({"approver"}),
    "root": frozenset({"admin"}),
    "audrey": frozenset({"auditor"}),
    "chatbot": frozenset({"bot"}),
}
HUMANS = sorted(set(PEOPLE) - {"chatbot"})
REQUESTERS = sorted(name for name, roles in PEOPLE.items() if "requester" in roles)
REQUESTER = "the requester"  # stands for the request's own requester when drawn as an actor
# Anyone may try anything, but those an action is meant for try it more often.
DECIDERS = st.sampled_from(["bob", "carol", "pat", "bob", "carol", "pat", *HUMANS, REQUESTER])
OWNERS = st.sampled_from([REQUESTER, REQUESTER, REQUESTER, REQUESTER, "root", *HUMANS])

# What each CIDR a person may type becomes: its canonical form, or None when it must be refused.
CIDRS: dict[str, str | None] = {
    "8.8.8.8": "8.8.8.8/32",
    "8.8.8.8/32": "8.8.8.8/32",
    "8.8.4.4": "8.8.4.4/32",  # a foreign rule at Heroku already holds this one
    "1.1.1.0/28": "1.1.1.0/28",
    "9.9.9.9": "9.9.9.9/32",
    "10.0.0.1": None,
    "8.8.8.0/24": None,
    "8.8.8.9/28": None,
    "not-an-ip": None,
    "8.8.8.8/\u00b2": None,
}
# Seconds each duration asks for, or None when it is not a duration at all.
DURATIONS: dict[str, int | None] = {
    "1m": 60,
    "30m": 1800,
    "90m": 5400,
    "PT2H": 7200,
    "4h": 4 * 3600,
    "30s": 30,
    "5h": 5 * 3600,
    "2 hours": None,
    "P1M": None,
}
EXTENSIONS: dict[str, int | None] = {
    "5m": 300,
    "15m": 900,
    "30m": 1800,
    "PT1H": 3600,
    "3h": 3 * 3600,
    "soon": None,
}

SECONDS = st.one_of(
    st.integers(1, 120),
    st.integers(120, 1800),
    st.sampled_from(
        [
            SWEEP_SETTINGS.provisioning_timeout + 1,  # past the provisioning timeout
            APPROVAL_WINDOW + 1,  # past the approval window
            MAX_DURATION,  # past any grant's expiry
        ]
    ),
)
FAULT_MIXES = st.sampled_from(
    [
        ("500",),
        ("503",),
        ("429",),
        ("timeout",),
        ("ambiguous_500",),
        ("ambiguous_timeout",),
        ("500", "503", "429", "timeout", "ambiguous_500", "ambiguous_timeout"),
    ]
)

# The request state machine of DESIGN.md (README: cancel is for pending or approved requests, revoke for
# granted access, which begins at approval), written out rather than read from the code under test.
NEXT: dict[str, frozenset[str]] = {
    "pending": frozenset({"approved", "denied", "cancelled", "timed_out"}),
    "approved": frozenset({"provisioning", "cancelled", "revoked", "failed"}),
    "provisioning": frozenset({"active", "revoked", "failed"}),
    "active": frozenset({"expired", "revoked"}),
}
FINAL = frozenset({"expired", "revoked", "denied", "cancelled", "timed_out", "failed"})
# The status each audited action leaves a request in.
ACTION_STATUS: dict[str, frozenset[str]] = {
    "access_request:create": frozenset({"pending"}),
    "access_request:approve": frozenset({"pending", "approved"}),  # pending until the quorum is reached
    "access_request:auto_approve": frozenset({"approved"}),
    "access_request:deny": frozenset({"denied"}),
    "access_request:cancel": frozenset({"cancelled"}),
    "access_request:revoke": frozenset({"revoked"}),
    "access_request:time_out": frozenset({"timed_out"}),
    "access_request:provision": frozenset({"provisioning"}),
    "access_request:activate": frozenset({"active"}),
    "access_request:expire": frozenset({"expired"}),
    "access_request:fail": frozenset({"failed"}),
}


@dataclass(frozen=True)
class Shared:
    """What every example reuses: the configuration and one engine on the run's scratch database."""

    config: Config
    engine: Engine
    sessions: sessionmaker[Session]


@dataclass(frozen=True)
class Seen:
    """Drawbridge's records at one moment: requests (with their approvals), their audit events, rules."""

    requests: dict[uuid.UUID, AccessRequest]
    events: list[AuditEvent]
    rules: dict[uuid.UUID, IpRule]


@dataclass
class Snapshot:
    """A request as the database holds it just before an action, to say what the action must answer."""

    status: str
    requester: str
    duration: int
    pending_extension: int | None
    approval_round: int
    self_extended: int
    lapsed: bool
    """Past its approval window (pending) or its end (active), with no sweep since to record it."""
    approvers: dict[int, set[str]] = field(default_factory=dict)


class DrawbridgeMachine(RuleBasedStateMachine):
    requests = Bundle("requests")

    def __init__(self, shared: Shared) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.simulator = Simulator(clock=self.clock, token=SIM_TOKEN)
        self.addon: SimAddon = self.simulator.add_addon(app="acme-api", name="postgresql-curved-12345")
        self.heroku = sim_client(self.simulator)
        self.runtime = Runtime(
            config=shared.config,
            engine=shared.engine,
            sessions=shared.sessions,
            heroku=self.heroku,
            clock=self.clock,
            simulator=self.simulator,
        )
        empty_tables(self.runtime)
        app = create_app(runtime=self.runtime)
        app.config["TESTING"] = True
        self.client: FlaskClient = app.test_client()
        self.headers: dict[str, dict[str, str]] = {}
        with self.runtime.sessions() as session:
            for name, roles in PEOPLE.items():
                _, secret = tokens.create_token(
                    session, user_name=name, roles=sorted(roles), clock=self.clock
                )
                self.headers[name] = {"Authorization": f"Bearer {secret}"}
        self.foreign: dict[str, SimRule] = {}
        self.faulty = False
        self.approvals_required = 1
        self.self_extension = 0
        self.auto_approve_erin = False
        self.paths: dict[uuid.UUID, list[str]] = {}

    # -- helpers ------------------------------------------------------------------------------------------

    def _call(
        self, method: str, path: str, who: str, body: dict[str, Any] | None = None, **headers: str
    ) -> Any:
        response = self.client.open(path, method=method, json=body, headers={**self.headers[who], **headers})
        assert response.status_code < 500, (method, path, who, body, response.get_json())
        if response.status_code >= 400:
            assert response.mimetype == PROBLEM_JSON, (method, path, response.status_code, response.data)
            problem = response.get_json()
            assert problem["status"] == response.status_code and problem["title"], problem
        return response

    def _snapshot(self, request_id: uuid.UUID) -> Snapshot:
        with self.runtime.sessions() as session:
            request = session.get(AccessRequest, request_id)
            assert request is not None
            snap = Snapshot(
                status=request.status.value,
                requester=request.requester.name,
                duration=request.duration,
                pending_extension=request.pending_extension,
                approval_round=request.approval_round,
                self_extended=request.self_extended,
                lapsed=(
                    request.status is RequestStatus.PENDING
                    and request.created_at <= self.clock.now() - timedelta(seconds=APPROVAL_WINDOW)
                )
                or (
                    request.status is RequestStatus.ACTIVE
                    and request.expires_at is not None
                    and request.expires_at <= self.clock.now()
                ),
            )
            for approval in session.scalars(select(Approval).where(Approval.request_id == request_id)):
                snap.approvers.setdefault(approval.round, set()).add(approval.approver.name)
            return snap

    @staticmethod
    def _actor(who: str, snap: Snapshot) -> str:
        return snap.requester if who == REQUESTER else who

    def _expected_decision(self, who: str, snap: Snapshot, *, approving: bool) -> int:
        """What approve or deny by `who` must answer (the order of checks of the services). An approver
        may still deny what they approved while the quorum is not reached; they may not approve twice."""
        if "approver" not in PEOPLE[who] or who == snap.requester:
            return 403
        if snap.status == "pending":
            round_ = 0
        elif snap.status == "active" and snap.pending_extension:
            round_ = snap.approval_round
        else:
            return 409
        if approving and snap.lapsed:
            return 409  # too late to grant; the next sweep times it out or closes it
        return 409 if approving and who in snap.approvers.get(round_, set()) else 200

    @staticmethod
    def _expected_owner_action(who: str, snap: Snapshot, allowed: set[str]) -> int:
        """What cancel, revoke or extend by `who` must answer before the action's own checks."""
        roles = PEOPLE[who]
        if not roles & {"requester", "admin"}:
            return 403
        if not (who == snap.requester and "requester" in roles) and "admin" not in roles:
            return 403 if roles & {"approver", "auditor", "admin"} else 404
        return 200 if snap.status in allowed else 409

    def _live_count(self, who: str, cidr: str | None = None) -> int:
        with self.runtime.sessions() as session:
            return sum(
                1
                for r in session.scalars(select(AccessRequest))
                if r.requester.name == who and r.status.is_live and (cidr is None or r.cidr == cidr)
            )

    def _ours_at_heroku(self) -> list[tuple[SimRule, uuid.UUID]]:
        found = []
        for candidate in self.simulator.rules(self.addon):
            parsed = grants.parse_description(candidate.description)
            if parsed is not None:
                found.append((candidate, parsed[0]))
        return found

    def _sweep(self) -> grants.Report:
        report = grants.sweep(
            self.runtime.sessions,
            heroku=self.heroku,
            clock=self.clock,
            settings=SWEEP_SETTINGS,
            with_reconcile=True,
        )
        errors = {k: v for k, v in report.counts.items() if k.endswith("errors")}
        assert not errors, f"the sweep hit unexpected errors: {report.counts}"
        return report

    # -- setup --------------------------------------------------------------------------------------------

    @initialize(
        approvals=st.sampled_from([1, 2]),
        self_extension=st.sampled_from([0, 1800]),
        auto_approve_erin=st.booleans(),
        authorize_after=st.sampled_from([0.0, 20.0, 20.0, 600.0, 2400.0]),
        duplicate_cidr=st.sampled_from(["reject", "allow"]),
        seed=st.integers(0, 2**16),
    )
    def register(
        self,
        approvals: int,
        self_extension: int,
        auto_approve_erin: bool,
        authorize_after: float,
        duplicate_cidr: str,
        seed: int,
    ) -> None:
        self.simulator.settings = SimulatorSettings(
            authorize_after=authorize_after,
            duplicate_cidr=duplicate_cidr,  # type: ignore[arg-type]
            seed=seed,
        )
        self.simulator._rng.seed(seed)
        self.approvals_required = approvals
        self.self_extension = self_extension
        self.auto_approve_erin = auto_approve_erin
        policy: dict[str, Any] = {
            "max_duration": f"PT{MAX_DURATION}S",
            "approvals_required": approvals,
            "approval_window": f"PT{APPROVAL_WINDOW}S",
            "self_extension": f"PT{self_extension}S",
        }
        if auto_approve_erin:
            policy["auto_approve"] = [{"users": ["erin"], "max_duration": "PT30M"}]
        response = self._call(
            "POST",
            "/databases",
            "root",
            {"name": "main", "app": self.addon.app_name, "addon": self.addon.name, **policy},
        )
        assert response.status_code == 201, response.get_json()
        for cidr, description in (("52.1.2.3/32", "office vpn"), ("8.8.4.4/32", "")):
            seeded = self.simulator.add_foreign_rule(self.addon, cidr=cidr, description=description)
            self.foreign[seeded.id] = seeded

    # -- what people do -----------------------------------------------------------------------------------

    def _ask(self, who: str, cidr: str, duration: str, database: str = "main") -> uuid.UUID | None:
        """File a request as `who`; check the answer against what the input and the live requests allow."""
        network, seconds = CIDRS[cidr], DURATIONS[duration]
        if "requester" not in PEOPLE[who]:
            expected = 403
        elif database != "main" or network is None or seconds is None:
            expected = 422
        elif not MIN_DURATION <= seconds <= MAX_DURATION:
            expected = 422
        elif self._live_count(who, network) or self._live_count(who) >= 5:
            expected = 409
        else:
            expected = 201
        body = {"database": database, "cidr": cidr, "duration": duration, "reason": "INC-7 look at a row"}
        response = self._call("POST", "/access-requests", who, body)
        assert response.status_code == expected, (body, who, response.get_json())
        if expected != 201:
            return None
        created = response.get_json()
        auto = self.auto_approve_erin and who == "erin" and seconds is not None and seconds <= 1800
        assert created["status"] == ("approved" if auto else "pending"), created
        assert created["cidr"] == network
        return uuid.UUID(created["id"])

    @rule(
        target=requests,
        who=st.sampled_from([*REQUESTERS, *REQUESTERS, *HUMANS]),
        cidr=st.sampled_from(sorted(CIDRS)),
        duration=st.sampled_from(sorted(DURATIONS)),
        database=st.sampled_from(["main", "main", "main", "nope"]),
    )
    def ask(self, who: str, cidr: str, duration: str, database: str) -> Any:
        request_id = self._ask(who, cidr, duration, database)
        return multiple() if request_id is None else request_id

    @rule(
        target=requests,
        who=st.sampled_from(REQUESTERS),
        cidr=st.sampled_from(sorted(c for c, network in CIDRS.items() if network)),
        duration=st.sampled_from(
            sorted(d for d, s in DURATIONS.items() if s and MIN_DURATION <= s <= MAX_DURATION)
        ),
        approvers=st.permutations(["bob", "carol", "pat"]),
    )
    def ask_and_get_approved(self, who: str, cidr: str, duration: str, approvers: list[str]) -> Any:
        """The common path, asked and approved by as many others as the policy needs (through the same
        API calls as `ask` and `approve`), so that runs reach granted access often."""
        request_id = self._ask(who, cidr, duration)
        if request_id is None:
            return multiple()
        for approver in [a for a in approvers if a != who][: self.approvals_required]:
            if self._snapshot(request_id).status != "pending":
                break
            self.approve(request_id, approver, via_bot=False)
        return request_id

    @rule(request_id=requests, who=DECIDERS, via_bot=st.booleans())
    def approve(self, request_id: uuid.UUID, who: str, via_bot: bool) -> None:
        snap = self._snapshot(request_id)
        actor = self._actor(who, snap)
        expected = self._expected_decision(actor, snap, approving=True)
        path = f"/access-requests/{request_id}/approve"
        if via_bot:
            response = self._call("POST", path, "chatbot", {"comment": "ok"}, **{"X-On-Behalf-Of": actor})
        else:
            response = self._call("POST", path, actor, {"comment": "ok"})
        assert response.status_code == expected, (actor, snap, response.get_json())
        if expected == 200 and snap.status == "pending":
            approvers = snap.approvers.get(0, set()) | {actor}
            reached = len(approvers) >= self.approvals_required
            assert response.get_json()["status"] == ("approved" if reached else "pending")

    @rule(request_id=requests, who=DECIDERS)
    def deny(self, request_id: uuid.UUID, who: str) -> None:
        snap = self._snapshot(request_id)
        actor = self._actor(who, snap)
        expected = self._expected_decision(actor, snap, approving=False)
        response = self._call("POST", f"/access-requests/{request_id}/deny", actor, {"reason": "no ticket"})
        assert response.status_code == expected, (actor, snap, response.get_json())
        if expected == 200:
            assert response.get_json()["status"] == ("denied" if snap.status == "pending" else snap.status)
            assert response.get_json()["pending_extension"] is None

    @rule(request_id=requests, who=OWNERS)
    def cancel(self, request_id: uuid.UUID, who: str) -> None:
        snap = self._snapshot(request_id)
        actor = self._actor(who, snap)
        expected = self._expected_owner_action(actor, snap, {"pending", "approved"})
        response = self._call("POST", f"/access-requests/{request_id}/cancel", actor, {})
        assert response.status_code == expected, (actor, snap, response.get_json())
        if expected == 200:
            assert response.get_json()["status"] == "cancelled"

    @rule(request_id=requests, who=OWNERS)
    def revoke(self, request_id: uuid.UUID, who: str) -> None:
        snap = self._snapshot(request_id)
        actor = self._actor(who, snap)
        expected = self._expected_owner_action(actor, snap, {"approved", "provisioning", "active"})
        response = self._call("POST", f"/access-requests/{request_id}/revoke", actor, {"reason": "done"})
        assert response.status_code == expected, (actor, snap, response.get_json())
        if expected == 200:
            assert response.get_json()["status"] == "revoked"

    @rule(request_id=requests, who=OWNERS, duration=st.sampled_from(sorted(EXTENSIONS)))
    def extend(self, request_id: uuid.UUID, who: str, duration: str) -> None:
        snap = self._snapshot(request_id)
        actor = self._actor(who, snap)
        expected = self._expected_owner_action(actor, snap, {"active"})
        added = EXTENSIONS[duration]
        if expected == 200 and (snap.pending_extension or snap.lapsed):
            expected = 409
        elif expected == 200 and (added is None or snap.duration + added > MAX_DURATION):
            expected = 422
        response = self._call("POST", f"/access-requests/{request_id}/extend", actor, {"duration": duration})
        assert response.status_code == expected, (actor, snap, duration, response.get_json())
        if expected == 200:
            assert added is not None
            at_once = snap.self_extended + added <= self.self_extension
            body = response.get_json()
            assert body["pending_extension"] == (None if at_once else format_duration(added)), body
            assert body["duration"] == format_duration(snap.duration + (added if at_once else 0)), body

    def _in(self, *statuses: str) -> list[uuid.UUID]:
        """Requests whose status, as last checked, is one of `statuses`."""
        return sorted(request_id for request_id, path in self.paths.items() if path[-1] in statuses)

    @precondition(lambda self: self._in("active"))
    @rule(
        data=st.data(),
        duration=st.sampled_from(sorted(EXTENSIONS)),
        decision=st.sampled_from(["approve", "deny", None]),
        deciders=st.permutations(["bob", "carol", "pat"]),
    )
    def extend_active_access(
        self, data: st.DataObject, duration: str, decision: str | None, deciders: list[str]
    ) -> None:
        """Extensions only apply to active access, which a random pick from all requests seldom is; one
        that waits for approvers may then be decided."""
        request_id = data.draw(st.sampled_from(self._in("active")))
        self.extend(request_id, REQUESTER, duration)
        snap = self._snapshot(request_id)
        for decider in [d for d in deciders if d != snap.requester][: self.approvals_required]:
            if decision is None or not self._snapshot(request_id).pending_extension:
                break
            if decision == "approve":
                self.approve(request_id, decider, via_bot=False)
            else:
                self.deny(request_id, decider)

    @precondition(lambda self: self._in("pending", "approved", "provisioning", "active"))
    @rule(data=st.data(), how=st.sampled_from(["cancel", "revoke"]), who=st.sampled_from([REQUESTER, "root"]))
    def end_live_request(self, data: st.DataObject, how: str, who: str) -> None:
        """Cancelling and revoking by those who may, on requests still live."""
        request_id = data.draw(st.sampled_from(self._in("pending", "approved", "provisioning", "active")))
        (self.cancel if how == "cancel" else self.revoke)(request_id, who)

    @rule(request_id=requests, who=st.sampled_from(HUMANS))
    def read(self, request_id: uuid.UUID, who: str) -> None:
        snap = self._snapshot(request_id)
        sees_all = bool(PEOPLE[who] & {"approver", "auditor", "admin"})
        response = self._call("GET", f"/access-requests/{request_id}", who)
        assert response.status_code == (200 if sees_all or who == snap.requester else 404)
        if response.status_code == 200:
            assert response.get_json()["status"] == snap.status

    # -- time, the worker and Heroku ------------------------------------------------------------------

    @rule(seconds=SECONDS)
    def wait(self, seconds: int) -> None:
        self.clock.advance(seconds)

    @rule()
    def sweep(self) -> None:
        self._sweep()
        self._check_after_sweep()

    @rule(sweeps=st.integers(2, 4), every=st.sampled_from([15, 60, 300]))
    def run_worker(self, sweeps: int, every: int) -> None:
        """The worker's timer, coarsely: a few sweeps, `every` seconds of manual time apart."""
        for _ in range(sweeps):
            self._sweep()
            self._check_after_sweep()
            self.clock.advance(every)

    @rule(rate=st.sampled_from([0.2, 0.5, 1.0]), mix=FAULT_MIXES)
    def heroku_fails(self, rate: float, mix: tuple[Any, ...]) -> None:
        self.simulator.settings.fault_rate = rate
        self.simulator.settings.fault_mix = mix
        self.faulty = True

    @precondition(lambda self: self._in("provisioning", "active"))
    @rule(
        rate=st.sampled_from([0.5, 1.0, 1.0]),
        mix=FAULT_MIXES,
        sweeps=st.integers(1, 3),
        every=st.sampled_from([15, 60, 300, 1800]),
        data=st.data(),
    )
    def outage_while_access_ends(
        self, rate: float, mix: tuple[Any, ...], sweeps: int, every: int, data: st.DataObject
    ) -> None:
        """Heroku fails just as granted access is revoked, while the worker goes on and time passes."""
        self.heroku_fails(rate, mix)
        self.revoke(data.draw(st.sampled_from(self._in("provisioning", "active"))), "root")
        self.run_worker(sweeps, every)

    @rule(fault=st.sampled_from(["ambiguous_500", "ambiguous_timeout", "500", "timeout"]))
    def next_create_fails(self, fault: Any) -> None:
        """The next rule creation fails; the ambiguous faults make the rule at Heroku all the same."""
        self.simulator.script("ip_rule_create", fault)

    @precondition(lambda self: self.faulty)
    @rule()
    def heroku_recovers(self) -> None:
        self.simulator.settings.fault_rate = 0.0
        self.faulty = False

    # -- invariants ---------------------------------------------------------------------------------------

    def _load(self) -> Seen:
        with self.runtime.sessions() as session:
            return Seen(
                requests={r.id: r for r in session.scalars(select(AccessRequest))},
                events=list(
                    session.scalars(
                        select(AuditEvent).where(AuditEvent.request_id.is_not(None)).order_by(AuditEvent.seq)
                    )
                ),
                rules={r.id: r for r in session.scalars(select(IpRule))},
            )

    @invariant()
    def drawbridge_keeps_its_promises(self) -> None:
        seen = self._load()
        self._check_state_machine_and_audit(seen)
        self._check_four_eyes(seen)
        self._check_rules(seen)
        self._check_foreign_rules()
        response = self._call("GET", "/audit-events/verify", "audrey")
        assert response.status_code == 200 and response.get_json()["ok"] is True, response.get_json()

    def _check_state_machine_and_audit(self, seen: Seen) -> None:
        """Each request's audited statuses walk DESIGN.md's state machine from `pending` to its status now,
        one event per change, and what was audited before is never rewritten."""
        trail: dict[uuid.UUID, list[tuple[str, str]]] = {}
        for event in seen.events:
            status = (event.details or {}).get("status")
            if event.action not in ACTION_STATUS:
                assert status is None, f"{event.action} changed a status: {event.details}"
                continue
            assert status in ACTION_STATUS[event.action], (event.action, event.details)
            assert event.request_id is not None
            trail.setdefault(event.request_id, []).append((event.action, status))
        assert set(trail) == set(seen.requests), "requests and creation events differ"
        for request_id, steps in trail.items():
            assert steps[0] == ("access_request:create", "pending"), steps
            path = ["pending"]
            for action, status in steps[1:]:
                if status == path[-1]:
                    assert action == "access_request:approve", (request_id, steps)
                    continue
                assert status in NEXT.get(path[-1], frozenset()), f"{path[-1]} -> {status}: {steps}"
                path.append(status)
            request = seen.requests[request_id]
            assert path[-1] == request.status.value, (request_id, steps, request.status)
            before = self.paths.get(request_id, [])
            assert path[: len(before)] == before, f"history of {request_id} rewritten: {before} then {path}"
            self.paths[request_id] = path
            assert (request.ended_at is not None) == (request.status.value in FINAL), request_id
            if request.status.value == "active":
                assert request.activated_at is not None and request.expires_at is not None
                assert request.expires_at - request.activated_at == timedelta(seconds=request.duration)

    def _check_four_eyes(self, seen: Seen) -> None:
        """Nobody approves their own request; approvers are distinct people with the approver role; people
        approved a request only once enough of them did."""
        for request in seen.requests.values():
            by_round: dict[int, list[str]] = {}
            for approval in request.approvals:
                assert approval.approver_id != request.requester_id, (request.id, approval.approver.name)
                assert "approver" in PEOPLE[approval.approver.name], approval.approver.name
                by_round.setdefault(approval.round, []).append(approval.approver.name)
            for names in by_round.values():
                assert len(names) == len(set(names)), (request.id, by_round)
        for event in seen.events:
            if event.action == "access_request:approve" and event.details.get("status") == "approved":
                assert event.request_id is not None
                approvals = seen.requests[event.request_id].approvals
                approvers = {a.approver_id for a in approvals if a.round == 0}
                assert len(approvers) >= self.approvals_required, (event.request_id, approvals)

    def _check_rules(self, seen: Seen) -> None:
        """Every Drawbridge rule at Heroku is one Drawbridge tracks and has not deleted, one per CIDR; every
        rule Drawbridge believes is at Heroku is; active access stands on an authorized rule."""
        ours = self._ours_at_heroku()
        for found, rule_id in ours:
            row = seen.rules.get(rule_id)
            assert row is not None, f"untracked Drawbridge rule at Heroku: {found}"
            assert row.status is not RuleStatus.DELETED, f"rule believed deleted is at Heroku: {found}"
            assert row.cidr == found.cidr
        cidrs = [found.cidr for found, _ in ours]
        assert len(cidrs) == len(set(cidrs)), f"two Drawbridge rules for one CIDR: {cidrs}"
        present = {found.id for found, _ in ours}
        for row in seen.rules.values():
            if row.status in (RuleStatus.AUTHORIZING, RuleStatus.AUTHORIZED):
                assert row.heroku_rule_id in present, f"rule {row.id} ({row.status}) is not at Heroku"
        for request in seen.requests.values():
            if request.status.value == "active":
                assert request.ip_rule_id is not None
                assert seen.rules[request.ip_rule_id].status is RuleStatus.AUTHORIZED, request.id

    def _check_foreign_rules(self) -> None:
        """Rules Drawbridge did not create are never deleted nor changed, nor ever the target of a call
        that could change them."""
        at_heroku = {r.id: r for r in self.simulator.rules(self.addon)}
        for rule_id, seeded in self.foreign.items():
            assert rule_id in at_heroku, f"foreign rule {seeded.cidr} was deleted"
            now = at_heroku[rule_id]
            assert (now.cidr, now.description) == (seeded.cidr, seeded.description)
        touched = [
            c for c in self.simulator.calls if c.method != "GET" and any(f in c.path for f in self.foreign)
        ]
        assert not touched, touched

    def _check_after_sweep(self) -> None:
        """A sweep leaves no due work undone: nothing active past its end, nothing pending past the approval
        window, no rule without a request that uses it, and (when Heroku answered) no due delete left."""
        now = self.clock.now()
        seen = self._load()
        for request in seen.requests.values():
            if request.status.value == "active":
                assert request.expires_at is not None and request.expires_at > now, request.id
            if request.status.value == "pending":
                assert now - request.created_at < timedelta(seconds=APPROVAL_WINDOW), request.id
        for row in seen.rules.values():
            users = {r.status.value for r in seen.requests.values() if r.ip_rule_id == row.id}
            if row.status in (RuleStatus.CREATING, RuleStatus.AUTHORIZING, RuleStatus.AUTHORIZED):
                assert users & {"provisioning", "active"}, (row.cidr, row.status, users)
            if row.status is RuleStatus.DELETING and not self.faulty:
                # Heroku answered every call of this sweep: the delete was either done, or waits for the
                # backoff of an earlier failure, at most the backoff cap away.
                released_now = row.release_at == now and row.next_attempt_at is None
                waiting = row.next_attempt_at is not None and (
                    now < row.next_attempt_at <= now + timedelta(seconds=SWEEP_SETTINGS.max_backoff)
                )
                assert released_now or waiting, (row.cidr, row.release_at, row.next_attempt_at, now)

    def teardown(self) -> None:
        try:
            # Hypothesis tears down after a failed step too; settling then would only hide that failure.
            if sys.exc_info()[1] is None:
                self._settle()
        finally:
            self.heroku.close()

    def _settle(self) -> None:
        """Heroku recovers, time runs far ahead, and the worker sweeps until nothing is left to do."""
        self.simulator.settings.fault_rate = 0.0
        self.faulty = False
        for _ in range(12):
            self.clock.advance(timedelta(hours=6))
            self._sweep()
            self._check_after_sweep()
            with self.runtime.sessions() as session:
                live = [r for r in session.scalars(select(AccessRequest)) if r.status.value not in FINAL]
                rules = [r for r in session.scalars(select(IpRule)) if r.status is not RuleStatus.DELETED]
            if not live and not rules and not self._ours_at_heroku():
                break
        self.drawbridge_keeps_its_promises()
        with self.runtime.sessions() as session:
            requests = list(session.scalars(select(AccessRequest)))
            assert all(r.status.value in FINAL for r in requests), [(r.id, r.status) for r in requests]
            rules = list(session.scalars(select(IpRule)))
            assert all(r.status is RuleStatus.DELETED for r in rules), [(r.cidr, r.status) for r in rules]
        assert self._ours_at_heroku() == [], self._ours_at_heroku()


@pytest.fixture
def shared(postgres_url: str) -> Iterator[Shared]:
    engine = make_engine(postgres_url)
    yield Shared(
        config=Config(database_url=postgres_url, min_duration=MIN_DURATION),
        engine=engine,
        sessions=make_session_factory(engine),
    )
    engine.dispose()


def test_random_lives_of_requests_keep_drawbridges_promises(shared: Shared) -> None:
    started = time.monotonic()
    run_state_machine_as_test(
        lambda: DrawbridgeMachine(shared),
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            derandomize=True,
            database=None,
            # The explain phase traces every line of a failing run again; over PostgreSQL that takes minutes.
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    print(f"\n{EXAMPLES} random runs of up to {STEPS} steps took {time.monotonic() - started:.1f} s")
