"""Notifications: written to the outbox by every state change, the warning before access ends, and delivery
to real local HTTP receivers (signed webhooks, Slack) that fail, go down, hang and recover."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from werkzeug.serving import BaseWSGIServer, make_server
from werkzeug.wrappers import Request, Response

from app.config import Config
from app.models import AccessRequest, AuditEvent, Database, Notification, RequestStatus
from app.notifier import DeliverySettings, Notifier, slack_message, webhook_name
from app.services import access, notify
from app.services.grants import Report
from app.worker import Worker
from tests.worker.conftest import World

SECRET = "webhook-test-secret"


# -- a local HTTP receiver -------------------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1 that records every request and answers each path as told."""

    port: int = 0
    status: dict[str, int] = field(default_factory=dict)
    delay: dict[str, float] = field(default_factory=dict)
    hold: dict[str, threading.Event] = field(default_factory=dict)
    arrived: threading.Event = field(default_factory=threading.Event)
    received: list[Received] = field(default_factory=list)
    _server: BaseWSGIServer | None = None

    def start(self) -> Receiver:
        self._server = make_server("127.0.0.1", self.port, self._app, threaded=True)
        self.port = self._server.port
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    def _app(self, environ: Any, start_response: Any) -> Iterable[bytes]:
        request = Request(environ)
        status = self.status.get(request.path, 200)
        self.received.append(Received(request.path, dict(request.headers), request.get_data(), status))
        self.arrived.set()
        if request.path in self.hold:
            self.hold[request.path].wait(10)
        if request.path in self.delay:
            time.sleep(self.delay[request.path])  # the receiver is slow; the test itself never sleeps
        response = Response("ok" if status < 300 else "receiver is broken", status=status)
        return response(environ, start_response)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def notifiers(world: World) -> Iterator[list[Notifier]]:
    made: list[Notifier] = []
    yield made
    for notifier in made:
        notifier.close()


def make_notifier(
    world: World,
    made: list[Notifier],
    *,
    slack: str | None = None,
    webhooks: tuple[str, ...] = (),
    secret: str | None = SECRET,
    timeout: float = 0.2,
    **settings: Any,
) -> Notifier:
    config = Config(slack_webhook_url=slack, webhook_urls=webhooks, webhook_secret=secret)
    notifier = Notifier(
        config,
        sessions=world.runtime.sessions,
        clock=world.clock,
        settings=DeliverySettings(timeout=timeout, **settings),
    )
    made.append(notifier)
    return notifier


# -- helpers ---------------------------------------------------------------------------------------------


def ask(world: World, cidr: str = "9.9.9.9") -> uuid.UUID:
    with world.runtime.sessions() as session:
        request = access.request_access(
            session,
            principal=world.alice,
            database="main",
            cidr=cidr,
            duration="1h",
            reason="INC-1 <look> & see",
            min_duration=60,
            clock=world.clock,
        )
        return request.id


def outbox(world: World, request_id: uuid.UUID | None = None) -> list[Notification]:
    with world.runtime.sessions() as session:
        query = select(Notification)
        if request_id is not None:
            query = query.where(Notification.request_id == request_id)
        rows = session.scalars(query)
        # Rows written at the same (manual) instant keep the order of a request's life.
        return sorted(rows, key=lambda n: (n.created_at, notify.EVENTS.index(n.event)))


def events(world: World, request_id: uuid.UUID) -> list[str]:
    return [n.event for n in outbox(world, request_id)]


def one(world: World, notification_id: uuid.UUID) -> Notification:
    with world.runtime.sessions() as session:
        found = session.get(Notification, notification_id)
        assert found is not None
        return found


def audit_events(world: World, action: str) -> list[AuditEvent]:
    with world.runtime.sessions() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def active(world: World, cidr: str = "8.8.8.8") -> AccessRequest:
    world.simulator.settings.authorize_after = 0  # how long Heroku takes does not matter here
    request_id = world.approved(cidr=cidr)
    world.until_status(request_id, "active", step=5)
    return world.request(request_id)


# -- the outbox: one notification per state change -------------------------------------------------------


def test_asking_approving_activating_and_expiring_each_write_their_notification(world: World) -> None:
    request = active(world)
    world.clock.set(request.expires_at or world.clock.now())
    world.sweep()

    notes = outbox(world, request.id)
    assert [n.event for n in notes] == ["request_created", "request_decided", "access_ready", "access_ended"]
    created, decided, ready, ended = (n.payload for n in notes)
    assert created["request"]["id"] == str(request.id) and created["actor"] == "alice"
    assert created["request"]["reason"] == "INC-1" and created["request"]["cidr"] == "8.8.8.8/32"
    assert decided["decision"] == "approved" and decided["actor"] == "bob"
    assert ready["request"]["status"] == "active" and ready["actor"] == "worker"
    assert ended["request"]["status"] == "expired" and ended["actor"] == "worker"
    assert all(n.delivered_at is None and n.delivered_to == [] for n in notes)


def test_denying_cancelling_revoking_and_timing_out_each_write_their_notification(world: World) -> None:
    denied, cancelled, timed_out = ask(world, "1.1.1.1"), ask(world, "2.2.2.2"), ask(world, "3.3.3.3")
    with world.runtime.sessions() as session:
        access.deny(session, principal=world.bob, request_id=denied, reason="not today", clock=world.clock)
    with world.runtime.sessions() as session:
        access.cancel(session, principal=world.alice, request_id=cancelled, reason=None, clock=world.clock)
    revoked = active(world)
    with world.runtime.sessions() as session:
        access.revoke(session, principal=world.alice, request_id=revoked.id, reason="done", clock=world.clock)
    world.clock.advance(timedelta(hours=24))
    world.sweep()

    assert events(world, denied) == ["request_created", "request_decided"]
    assert outbox(world, denied)[1].payload["decision"] == "denied"
    assert outbox(world, denied)[1].payload["reason"] == "not today"
    assert events(world, cancelled) == ["request_created", "request_ended"]
    assert outbox(world, cancelled)[1].payload["request"]["status"] == "cancelled"
    assert events(world, revoked.id) == ["request_created", "request_decided", "access_ready", "access_ended"]
    assert outbox(world, revoked.id)[-1].payload["reason"] == "done"
    assert events(world, timed_out) == ["request_created", "request_ended"]
    assert outbox(world, timed_out)[1].payload["request"]["status"] == "timed_out"


# -- the warning before access ends ----------------------------------------------------------------------


def test_access_ending_is_announced_once_warn_before_the_end_with_how_to_extend(world: World) -> None:
    request = active(world)
    assert request.expires_at is not None and request.database.warn_before == 600
    world.clock.set(request.expires_at - timedelta(seconds=601))
    world.sweep()
    assert "access_ending" not in events(world, request.id)

    world.clock.advance(1)
    warned_at = world.clock.now()
    world.sweep()
    for _ in range(5):
        world.clock.advance(60)
        world.sweep()

    [ending] = [n for n in outbox(world, request.id) if n.event == "access_ending"]
    assert ending.created_at == warned_at and world.request(request.id).warned_at == warned_at
    assert ending.payload["ends_in"] == 600 and ending.payload["ends_at"] == request.expires_at.isoformat()
    extend = ending.payload["extend"]
    assert extend["api"] == f"POST /access-requests/{request.id}/extend"
    assert extend["body"] == {"duration": "1h"}
    assert extend["slack"] == f"/drawbridge extend {request.id} 1h"
    text = slack_message(ending.payload)["text"]
    assert f"/drawbridge extend {request.id} 1h" in text and "(in 10m)" in text

    world.clock.set(request.expires_at)
    world.sweep()
    assert events(world, request.id)[-2:] == ["access_ending", "access_ended"]


def test_the_warning_suggests_only_an_extension_the_policy_allows(world: World) -> None:
    def policy(**values: Any) -> None:
        with world.runtime.sessions() as session:
            session.execute(update(Database).where(Database.name == "main").values(**values))
            session.commit()

    def warning(request: AccessRequest) -> dict[str, Any]:
        assert request.expires_at is not None
        world.clock.set(request.expires_at - timedelta(minutes=5))
        world.sweep()
        [ending] = [n for n in outbox(world, request.id) if n.event == "access_ending"]
        return ending.payload

    policy(self_extension=1800)
    roomy = warning(active(world, "7.7.7.7"))
    assert roomy["extend"]["body"] == {"duration": "30m"}
    assert roomy["extend"]["without_approval"] == 1800 and roomy["extend"]["room"] == 7 * 3600

    policy(max_duration=3600)
    full = warning(active(world, "6.6.6.6"))
    assert full["extend"] == {"room": 0, "without_approval": 0}
    assert "cannot be extended" in slack_message(full)["text"]


def test_after_an_extension_clears_warned_at_the_warning_comes_again_before_the_new_end(world: World) -> None:
    request = active(world)
    assert request.expires_at is not None
    world.clock.set(request.expires_at - timedelta(minutes=5))
    world.sweep()
    new_end = request.expires_at + timedelta(hours=1)
    with world.runtime.sessions() as session:  # what an approved extension does to the row
        session.execute(
            update(AccessRequest)
            .where(AccessRequest.id == request.id)
            .values(expires_at=new_end, warned_at=None)
        )
        session.commit()

    world.clock.set(new_end - timedelta(seconds=601))
    world.sweep()
    assert events(world, request.id).count("access_ending") == 1
    world.clock.advance(1)
    world.sweep()
    world.sweep()
    endings = [n for n in outbox(world, request.id) if n.event == "access_ending"]
    assert [n.payload["ends_at"] for n in endings] == [request.expires_at.isoformat(), new_end.isoformat()]


def test_racing_sweeps_warn_only_once(world: World) -> None:
    request = active(world)
    assert request.expires_at is not None
    world.clock.set(request.expires_at - timedelta(minutes=1))
    start = threading.Barrier(4)

    def warn() -> None:
        start.wait()
        notify.warn_before_end(
            world.runtime.sessions, clock=world.clock, settings=world.settings, report=Report()
        )

    threads = [threading.Thread(target=warn) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert events(world, request.id).count("access_ending") == 1


# -- delivery --------------------------------------------------------------------------------------------


def test_webhooks_get_the_event_signed_and_slack_gets_approve_and_deny_buttons(
    world: World, receiver: Receiver, notifiers: list[Notifier]
) -> None:
    notifier = make_notifier(
        world, notifiers, slack=receiver.url("/slack"), webhooks=(receiver.url("/hook"),)
    )
    request_id = ask(world)
    [row] = outbox(world, request_id)

    report = notifier.deliver()

    assert report.counts == {"sent": 2, "delivered": 1}
    [hook] = receiver.at("/hook")
    timestamp = hook.headers["X-Drawbridge-Timestamp"]
    assert timestamp == str(int(world.clock.now().timestamp()))
    expected = hmac.new(SECRET.encode(), f"{timestamp}.".encode() + hook.body, hashlib.sha256).hexdigest()
    assert hook.headers["X-Drawbridge-Signature"] == f"v1={expected}"
    assert hook.headers["X-Drawbridge-Event"] == "request_created"
    assert hook.headers["X-Drawbridge-Delivery"] == str(row.id)
    assert hook.headers["Content-Type"] == "application/json"
    body = hook.json()
    assert body["id"] == str(row.id) and body["event"] == "request_created"
    assert body["request"]["id"] == str(request_id) and body["request"]["requester"] == "alice"

    [slack] = receiver.at("/slack")
    message = slack.json()
    buttons = [b for block in message["blocks"] if block["type"] == "actions" for b in block["elements"]]
    assert [(b["action_id"], b["value"]) for b in buttons] == [
        ("approve", str(request_id)),
        ("deny", str(request_id)),
    ]
    assert "alice asks for access to main from 9.9.9.9/32" in message["text"]
    assert "INC-1 &lt;look&gt; &amp; see" in json.dumps(message["blocks"])  # inert: no <!channel> smuggled in

    done = one(world, row.id)
    assert done.delivered_at == world.clock.now() and done.attempts == 1 and done.last_error is None
    assert done.delivered_to == ["slack", webhook_name(receiver.url("/hook"))]
    assert notifier.deliver().counts == {}
    assert len(receiver.received) == 2


def test_a_failing_receiver_is_retried_with_backoff_and_the_other_never_gets_it_twice(
    world: World, receiver: Receiver, notifiers: list[Notifier]
) -> None:
    hook_url = receiver.url("/hook")
    notifier = make_notifier(world, notifiers, slack=receiver.url("/slack"), webhooks=(hook_url,))
    receiver.status["/hook"] = 500
    request_id = ask(world)
    [row] = outbox(world, request_id)

    notifier.deliver()
    failed = one(world, row.id)
    assert failed.delivered_at is None and failed.delivered_to == ["slack"] and failed.attempts == 1
    assert failed.last_error is not None and "HTTP 500" in failed.last_error
    assert failed.next_attempt_at is not None
    wait = failed.next_attempt_at - world.clock.now()
    assert timedelta(seconds=1.6) <= wait <= timedelta(seconds=2)

    world.clock.advance(1)
    notifier.deliver()
    assert len(receiver.at("/hook")) == 1  # not due yet: the backoff holds

    world.clock.set(failed.next_attempt_at)
    notifier.deliver()  # still failing: the second wait is longer
    again = one(world, row.id)
    assert again.attempts == 2 and again.next_attempt_at is not None
    assert again.next_attempt_at - world.clock.now() >= timedelta(seconds=3.2)

    receiver.status["/hook"] = 200
    world.clock.set(again.next_attempt_at)
    notifier.deliver()

    done = one(world, row.id)
    assert done.delivered_at is not None and done.last_error is None and done.attempts == 3
    assert [r.status for r in receiver.at("/hook")] == [500, 500, 200]
    assert {r.json()["id"] for r in receiver.at("/hook")} == {str(row.id)}
    assert len(receiver.at("/slack")) == 1


def test_a_receiver_that_is_down_gets_every_notification_once_it_is_back(
    world: World, notifiers: list[Notifier]
) -> None:
    down = Receiver(port=free_port())
    notifier = make_notifier(world, notifiers, webhooks=(down.url("/hook"),))
    first, second = ask(world, "1.1.1.1"), ask(world, "2.2.2.2")

    report = notifier.deliver()
    assert report.counts == {"send_failed": 1}  # tried once; the second row is not tried again this run
    rows = outbox(world)
    assert all(r.delivered_at is None and r.attempts == 1 for r in rows)
    assert all(r.last_error and "ConnectError" in r.last_error for r in rows)

    down.start()
    try:
        world.clock.advance(5)
        notifier.deliver()
        world.clock.advance(5)
        notifier.deliver()
    finally:
        down.stop()

    assert all(r.delivered_at is not None for r in outbox(world))
    got = [r.json()["request"]["id"] for r in down.at("/hook")]
    assert sorted(got) == sorted([str(first), str(second)])


def test_a_slow_receiver_times_out_without_blocking_and_the_row_is_retried_later(
    world: World, receiver: Receiver, notifiers: list[Notifier]
) -> None:
    notifier = make_notifier(
        world, notifiers, slack=receiver.url("/slack"), webhooks=(receiver.url("/slow"),), timeout=0.2
    )
    receiver.delay["/slow"] = 0.6
    for n in range(5):
        ask(world, f"1.1.1.{n + 1}")

    started = time.monotonic()
    report = notifier.deliver()
    took = time.monotonic() - started

    assert len(receiver.at("/slow")) == 1  # one timeout per run, not one per row
    assert len(receiver.at("/slack")) == 5 and report.counts["sent"] == 5
    assert took < 0.6 * 2
    rows = outbox(world)
    assert all(
        r.delivered_at is None and r.last_error and "no answer within 0.2s" in r.last_error for r in rows
    )
    assert all(r.next_attempt_at is not None and r.next_attempt_at > world.clock.now() for r in rows)

    receiver.delay.pop("/slow")
    world.clock.advance(5)
    notifier.deliver()
    assert all(r.delivered_at is not None for r in outbox(world))
    assert len(receiver.at("/slack")) == 5
    first_try = receiver.at("/slow")[0]
    resent = [r for r in receiver.at("/slow") if r.json()["id"] == first_try.json()["id"]]
    assert len(resent) == 2  # it did arrive the first time: the same delivery id lets the receiver drop it
    assert {r.headers["X-Drawbridge-Delivery"] for r in resent} == {first_try.json()["id"]}


def test_a_stopping_worker_hands_back_the_rows_it_claimed_but_did_not_try(
    world: World, receiver: Receiver, notifiers: list[Notifier]
) -> None:
    notifier = make_notifier(world, notifiers, webhooks=(receiver.url("/hook"),))
    for n in range(3):
        ask(world, f"1.1.1.{n + 1}")

    notifier.deliver(stop=lambda: len(receiver.received) >= 1)
    rows = outbox(world)
    assert [r.delivered_at is not None for r in rows].count(True) == 1
    assert all(r.next_attempt_at is None for r in rows if r.delivered_at is None)

    notifier.deliver()  # at once: the lease does not hold them back
    assert all(r.delivered_at is not None for r in outbox(world)) and len(receiver.received) == 3


def test_a_notification_nobody_accepts_for_a_day_is_given_up_loudly(
    world: World, receiver: Receiver, notifiers: list[Notifier], caplog: pytest.LogCaptureFixture
) -> None:
    notifier = make_notifier(world, notifiers, webhooks=(receiver.url("/hook"),), max_backoff=3600)
    receiver.status["/hook"] = 503
    request_id = ask(world)
    [row] = outbox(world, request_id)
    deadline = row.created_at + timedelta(hours=24)

    tries = 0
    while one(world, row.id).delivered_at is None:
        pending = one(world, row.id)
        assert pending.next_attempt_at is None or pending.next_attempt_at <= deadline
        world.clock.set(pending.next_attempt_at or world.clock.now())
        with caplog.at_level(logging.ERROR, logger="app.notifier"):
            notifier.deliver()
        tries += 1
        assert tries < 100

    given_up = one(world, row.id)
    assert given_up.delivered_at == deadline and given_up.delivered_to == []
    assert given_up.last_error is not None and given_up.last_error.startswith("gave up after 1 day")
    assert len(receiver.at("/hook")) == given_up.attempts == tries
    [event] = audit_events(world, "notification:give_up")
    assert event.actor == "worker" and event.request_id == request_id and event.database == "main"
    assert event.details["notification_id"] == str(row.id) and event.details["event"] == "request_created"
    assert event.details["undelivered"] == [webhook_name(receiver.url("/hook"))]
    assert [r.levelname for r in caplog.records if "gave up notification" in r.getMessage()] == ["ERROR"]

    world.clock.advance(timedelta(days=1))
    notifier.deliver()
    assert len(receiver.at("/hook")) == tries


def test_without_receivers_notifications_are_finished_at_once(
    world: World, notifiers: list[Notifier]
) -> None:
    notifier = make_notifier(world, notifiers)
    ask(world)
    assert notifier.deliver().counts == {"no_receivers": 1}
    [row] = outbox(world)
    assert row.delivered_at == world.clock.now() and row.delivered_to == []


def test_without_a_secret_webhooks_go_unsigned_and_a_warning_says_so(
    world: World, receiver: Receiver, notifiers: list[Notifier], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="app.notifier"):
        notifier = make_notifier(world, notifiers, webhooks=(receiver.url("/hook"),), secret=None)
    ask(world)
    ask(world, "1.2.3.4")
    notifier.deliver()

    assert len(receiver.at("/hook")) == 2
    assert all("X-Drawbridge-Signature" not in r.headers for r in receiver.at("/hook"))
    warnings = [r for r in caplog.records if "DRAWBRIDGE_WEBHOOK_SECRET" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"


def test_slack_messages_read_well_for_every_event(world: World) -> None:
    request = active(world)
    with world.runtime.sessions() as session:
        access.revoke(session, principal=world.alice, request_id=request.id, reason="done", clock=world.clock)
    texts = {n.event: slack_message(n.payload) for n in outbox(world, request.id)}

    [actions] = [b for b in texts["request_created"]["blocks"] if b["type"] == "actions"]
    assert [b["value"] for b in actions["elements"]] == [str(request.id)] * 2
    assert "approved by bob" in texts["request_decided"]["text"]
    assert "can reach *main* from `8.8.8.8/32` now" in texts["access_ready"]["text"]
    assert texts["access_ended"]["text"].endswith("has ended (revoked: done)")
    assert all("blocks" not in message for event, message in texts.items() if event != "request_created")


# -- the worker ------------------------------------------------------------------------------------------


def test_the_worker_delivers_in_its_own_job_so_a_hanging_receiver_never_delays_a_sweep(
    world: World, receiver: Receiver
) -> None:
    config = dataclasses.replace(world.runtime.config, webhook_urls=(receiver.url("/hook"),))
    worker = Worker(dataclasses.replace(world.runtime, config=config))
    request = active(world)
    assert request.expires_at is not None
    release = receiver.hold["/hook"] = threading.Event()
    delivering = threading.Thread(target=worker.deliver_once)
    try:
        delivering.start()
        assert receiver.arrived.wait(10)

        world.clock.set(request.expires_at)
        report = worker.run_once()

        assert report.counts.get("expired") == 1 and delivering.is_alive()
        assert world.request(request.id).status is RequestStatus.EXPIRED
    finally:
        release.set()
        delivering.join()
        worker.notifier.close()
    worker.deliver_once()
    assert all(n.delivered_at is not None for n in outbox(world))


def test_the_worker_schedules_sweep_and_delivery_as_two_single_instance_jobs(world: World) -> None:
    worker = Worker(world.runtime)
    worker.start()
    try:
        scheduler = worker._scheduler
        assert scheduler is not None
        jobs = {job.id: job for job in scheduler.get_jobs()}
        assert set(jobs) == {"sweep", "deliver"}
        assert all(job.max_instances == 1 for job in jobs.values())
        assert jobs["deliver"].func == worker._safe_deliver
    finally:
        worker.stop()
