"""Fixtures for the worker: requests approved through the services, sweeps run with the manual clock."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from app.clock import ManualClock
from app.heroku.client import HerokuClient
from app.heroku.simulator import SimAddon, Simulator
from app.models import AccessRequest, IpRule, Role
from app.runtime import Runtime
from app.services import access, databases, grants, tokens
from app.services.identity import Principal

SETTINGS = grants.Settings(poll_interval=15, provisioning_timeout=1800, reconcile_interval=300, lease=60)


class World:
    """A registered database, people to ask and approve, and a sweep that runs the worker once."""

    def __init__(self, runtime: Runtime, simulator: Simulator, addon: SimAddon, clock: ManualClock) -> None:
        self.runtime = runtime
        self.simulator = simulator
        self.addon = addon
        self.clock = clock
        self.settings = SETTINGS
        with runtime.sessions() as session:
            self.alice = self._person(session, "alice", Role.REQUESTER)
            self.bob = self._person(session, "bob", Role.APPROVER)
            self.admin = self._person(session, "root", Role.ADMIN)
            databases.register_database(
                session,
                principal=self.admin,
                heroku=runtime.heroku,
                name="main",
                app=addon.app_name,
                addon=addon.name,
                policy=databases.Policy(),
                min_duration=60,
                clock=clock,
            )
        simulator.reset_calls()

    def _person(self, session: Any, name: str, role: Role) -> Principal:
        user = tokens.ensure_user(session, name=name, clock=self.clock)
        session.commit()
        return Principal(user_id=user.id, name=name, roles=frozenset({role}))

    def approved(self, cidr: str = "8.8.8.8", duration: str = "1h", who: str = "alice") -> uuid.UUID:
        with self.runtime.sessions() as session:
            requester = self.alice
            if who != "alice":
                requester = self._person(session, who, Role.REQUESTER)
            request = access.request_access(
                session,
                principal=requester,
                database="main",
                cidr=cidr,
                duration=duration,
                reason="INC-1",
                min_duration=60,
                clock=self.clock,
            )
            access.approve(session, principal=self.bob, request_id=request.id, comment=None, clock=self.clock)
            return request.id

    def sweep(self, heroku: HerokuClient | None = None, **kwargs: Any) -> grants.Report:
        client = heroku or self.runtime.heroku
        assert client is not None
        return grants.sweep(
            self.runtime.sessions, heroku=client, clock=self.clock, settings=self.settings, **kwargs
        )

    def run_for(self, seconds: float, step: float = 1.0, **kwargs: Any) -> None:
        """Sweep every `step` seconds of manual time for `seconds`."""
        elapsed = 0.0
        while elapsed < seconds:
            self.sweep(**kwargs)
            self.clock.advance(step)
            elapsed += step

    def request(self, request_id: uuid.UUID) -> AccessRequest:
        with self.runtime.sessions() as session:
            found = session.get(AccessRequest, request_id)
            assert found is not None
            return found

    def rules(self) -> list[IpRule]:
        from sqlalchemy import select

        with self.runtime.sessions() as session:
            return list(session.scalars(select(IpRule).order_by(IpRule.created_at)))

    def at_heroku(self) -> list[str]:
        return sorted(r.cidr for r in self.simulator.rules(self.addon))

    def ours_at_heroku(self) -> list[str]:
        return sorted(
            r.cidr for r in self.simulator.rules(self.addon) if r.description.startswith("drawbridge ")
        )

    def until_status(
        self, request_id: uuid.UUID, status: str, limit: float = 3600, step: float = 1.0
    ) -> float:
        """Sweep until the request reaches `status`; return the manual seconds it took."""
        waited = 0.0
        while self.request(request_id).status.value != status:
            now = self.request(request_id)
            assert waited < limit, f"{request_id} stuck in {now.status} ({now.last_error})"
            self.sweep()
            if self.request(request_id).status.value == status:
                break
            self.clock.advance(step)
            waited += step
        return waited


@pytest.fixture
def world(runtime: Runtime, simulator: Simulator, addon: SimAddon, clock: ManualClock) -> World:
    simulator.settings.authorize_after = 600  # ten minutes Authorizing, as community reports describe
    return World(runtime, simulator, addon, clock)


Sweeper = Callable[..., grants.Report]
ONE_HOUR = timedelta(hours=1)
