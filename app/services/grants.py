"""The Heroku side of access, run by the worker's sweeps: give each approved request an IP rule, watch the
rule authorize, end requests on time, and delete every rule no live request needs any more.

The database is the truth. Each step records its intent and commits before calling Heroku, then commits the
result; no transaction is open during a Heroku call. Rows are claimed with `FOR UPDATE SKIP LOCKED` plus a
lease (`next_attempt_at` pushed past the longest call), so any number of workers can sweep at once, and a
worker that dies mid-call leaves a lease that simply runs out. A rule's Heroku `description` carries our rule
id and a delete-after time, which is how a crash between a create and its commit is healed: the next attempt
lists the database's rules and adopts the one that carries its id.
"""

from __future__ import annotations

import logging
import random
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Select, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.clock import Clock
from app.heroku.client import HerokuClient, Priority
from app.heroku.client import IpRule as HerokuRule
from app.heroku.errors import (
    HerokuAuthError,
    HerokuBudgetReserved,
    HerokuError,
    HerokuPermanentError,
    HerokuRateLimited,
)
from app.models import (
    LIVE_RULE_STATUSES,
    AccessRequest,
    Database,
    IpRule,
    RequestStatus,
    RuleStatus,
)
from app.services import audit, notify
from app.services.access import transition
from app.services.errors import InvalidTransition
from app.services.identity import Principal

log = logging.getLogger(__name__)

WORKER = Principal(user_id=0, name="worker", roles=frozenset(), source="worker")
HEROKU_RULE_LIMIT = 60
GRANTED = (RequestStatus.PROVISIONING, RequestStatus.ACTIVE)
USING_RULE = (RequestStatus.APPROVED, RequestStatus.PROVISIONING, RequestStatus.ACTIVE)
_DESCRIPTION = re.compile(r"^drawbridge rule=([0-9a-f-]{36}) until=(\S+)$")

Row = TypeVar("Row", AccessRequest, IpRule)


@dataclass(frozen=True)
class Settings:
    poll_interval: float = 15.0
    provisioning_timeout: float = 1800.0
    reconcile_interval: float = 300.0
    lease: float = 60.0
    """How long a claimed row is left alone by other workers: longer than the slowest Heroku call."""
    batch: int = 100
    open_batch: int = 10
    """Rules created per sweep at most: the sweep then comes back to closing access, so a slow Heroku and a
    long queue of creates cannot hold an expiry back for more than a few calls."""
    max_backoff: float = 60.0
    close_rounds: int = 50
    """Rounds of expire, release and delete a sweep runs while each round still fills a batch: a burst
    of expiries is closed in one sweep rather than a batch per sweep interval."""


@dataclass
class Report:
    """What one sweep did, for logs and tests."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, n: int = 1) -> None:
        if n:
            self.counts[key] = self.counts.get(key, 0) + n


# -- descriptions ------------------------------------------------------------------------------------------


def describe(rule_id: uuid.UUID, until: datetime) -> str:
    """The Heroku description of a rule we own: our id and the time after which it may be deleted on sight."""
    return f"drawbridge rule={rule_id} until={until.strftime('%Y-%m-%dT%H:%M:%SZ')}"


def parse_description(text: str) -> tuple[uuid.UUID, datetime] | None:
    match = _DESCRIPTION.match(text.strip())
    if not match:
        return None
    try:
        return uuid.UUID(match.group(1)), datetime.fromisoformat(match.group(2).replace("Z", "+00:00"))
    except ValueError:
        return None


def backoff(attempts: int, cap: float) -> timedelta:
    """Exponential backoff with jitter for a row's next attempt: 2 s, 4 s, 8 s … up to `cap`."""
    seconds = min(cap, 2.0 * 2 ** max(0, attempts - 1))
    return timedelta(seconds=seconds * random.uniform(0.8, 1.0))


def _due(column: Any, now: datetime) -> Any:
    return or_(column.is_(None), column <= now)


def _lock_batch(session: Session, query: Select[Row], batch: int) -> Sequence[Row]:
    """Rows matching `query`, locked for this transaction; rows other workers hold are skipped."""
    entity = query.column_descriptions[0]["entity"]
    return session.scalars(query.limit(batch).with_for_update(skip_locked=True, of=entity)).unique().all()


def _locked(session: Session, model: type[Row], row_id: Any) -> Row | None:
    """Lock one row (not the rows its eager loads join) and return it freshly loaded."""
    return session.scalar(
        select(model)
        .where(model.id == row_id)
        .with_for_update(of=model)
        .execution_options(populate_existing=True)
    )


def _claim(session: Session, row: IpRule, *, now: datetime, lease: float) -> int:
    """Take a lease on a locked rule row: bump `attempts` (the claim's token) and push `next_attempt_at`."""
    row.attempts += 1
    row.next_attempt_at = now + timedelta(seconds=lease)
    return row.attempts


def _claim_next(
    sessions: sessionmaker[Session],
    status: RuleStatus,
    order: Any,
    *,
    clock: Clock,
    settings: Settings,
    report: Report,
) -> tuple[IpRule, int, int] | None:
    """Claim the next due rule in `status`, right before its Heroku call: the row (detached, its database
    loaded), the claim's token and the attempts made before; None when no row is due. One row at a time, so
    a lease covers only the call in hand: a worker that dies strands one row, not a batch, and a batch can
    never outlast its leases while other workers take the rows meanwhile and call Heroku for them too. A
    rule Heroku did not create within the provisioning timeout is given up on instead."""
    while True:
        now = clock.now()
        with sessions() as session:
            rows = _lock_batch(
                session,
                select(IpRule)
                .where(IpRule.status == status, _due(IpRule.next_attempt_at, now))
                .order_by(order),
                1,
            )
            if not rows:
                return None
            rule = rows[0]
            if (
                status is RuleStatus.CREATING
                and (now - rule.created_at).total_seconds() > settings.provisioning_timeout
            ):
                limit = timedelta(seconds=settings.provisioning_timeout)
                _give_up(session, rule, now, f"Heroku did not create the rule within {limit}", report)
                session.commit()
                continue
            previous = rule.attempts
            token = _claim(session, rule, now=now, lease=settings.lease)
            session.commit()
            return rule, token, previous


def _live_users(session: Session, rule_id: uuid.UUID) -> Sequence[AccessRequest]:
    return session.scalars(
        select(AccessRequest).where(AccessRequest.ip_rule_id == rule_id, AccessRequest.status.in_(USING_RULE))
    ).all()


def _rule_event(session: Session, rule: IpRule, action: str, now: datetime, **details: Any) -> None:
    audit.record(
        session,
        principal=WORKER,
        action=action,
        at=now,
        database=rule.database.name,
        details={
            "rule_id": str(rule.id),
            "heroku_rule_id": rule.heroku_rule_id,
            "cidr": rule.cidr,
            **details,
        },
    )


def _activate(session: Session, rule: IpRule, now: datetime, report: Report) -> None:
    """Every request waiting on an authorized rule becomes active; its clock starts now."""
    waiting = session.scalars(
        select(AccessRequest)
        .where(AccessRequest.ip_rule_id == rule.id, AccessRequest.status == RequestStatus.PROVISIONING)
        .with_for_update(of=AccessRequest)
    ).all()
    for request in waiting:
        expires = now + timedelta(seconds=request.duration)
        transition(
            session,
            request,
            expected={RequestStatus.PROVISIONING},
            to=RequestStatus.ACTIVE,
            activated_at=now,
            expires_at=expires,
            last_error=None,
        )
        audit.record(
            session,
            principal=WORKER,
            action="access_request:activate",
            at=now,
            request=request,
            details={
                "rule_id": str(rule.id),
                "heroku_rule_id": rule.heroku_rule_id,
                "expires_at": expires.isoformat(),
                "status": "active",
            },
        )
        notify.enqueue(session, event="access_ready", request=request, at=now, actor=WORKER.actor)
        report.add("activated")


def _fail_users(session: Session, rule: IpRule, now: datetime, reason: str, report: Report) -> None:
    for request in session.scalars(
        select(AccessRequest)
        .where(AccessRequest.ip_rule_id == rule.id, AccessRequest.status.in_(GRANTED))
        .with_for_update(of=AccessRequest)
    ).all():
        transition(
            session,
            request,
            expected=set(GRANTED),
            to=RequestStatus.FAILED,
            ended_at=now,
            end_reason=reason,
            last_error=reason,
        )
        audit.record(
            session,
            principal=WORKER,
            action="access_request:fail",
            at=now,
            request=request,
            details={"reason": reason, "rule_id": str(rule.id), "status": "failed"},
        )
        notify.enqueue(session, event="access_ended", request=request, at=now, actor=WORKER.actor)
        report.add("failed")


def _push_back(
    sessions: sessionmaker[Session],
    model: type[Row],
    row_id: uuid.UUID,
    *,
    clock: Clock,
    settings: Settings,
    report: Report,
    error: BaseException,
) -> None:
    """After an unexpected error on one row, push that row's next attempt back, so one bad row can never
    stop a sweep nor be retried in a tight loop."""
    log.exception("unexpected error on %s %s; it will be retried later", model.__tablename__, row_id)
    report.add("row_errors")
    try:
        with sessions() as session:
            row = _locked(session, model, row_id)
            if row is None:
                return
            row.next_attempt_at = clock.now() + backoff(row.attempts + 1, settings.max_backoff)
            row.last_error = f"internal error: {type(error).__name__}"
            session.commit()
    except Exception:  # noqa: BLE001 - the database itself may be what failed; the next sweep retries
        log.exception("could not record the error on %s %s", model.__tablename__, row_id)


# -- step 1: end what is due ---------------------------------------------------------------------------


def expire_requests(
    sessions: sessionmaker[Session], *, clock: Clock, settings: Settings, report: Report
) -> None:
    """Active requests whose time is up become expired (their rule is released by `release_rules`)."""
    now = clock.now()
    with sessions() as session:
        due = _lock_batch(
            session,
            select(AccessRequest).where(
                AccessRequest.status == RequestStatus.ACTIVE, AccessRequest.expires_at <= now
            ),
            settings.batch,
        )
        for request in due:
            transition(
                session,
                request,
                expected={RequestStatus.ACTIVE},
                to=RequestStatus.EXPIRED,
                ended_at=now,
                end_reason="expired",
            )
            audit.record(
                session,
                principal=WORKER,
                action="access_request:expire",
                at=now,
                request=request,
                details={
                    "expires_at": request.expires_at.isoformat() if request.expires_at else None,
                    "status": "expired",
                },
            )
            notify.enqueue(session, event="access_ended", request=request, at=now, actor=WORKER.actor)
            report.add("expired")
        session.commit()


def time_out_pending(
    sessions: sessionmaker[Session], *, clock: Clock, settings: Settings, report: Report
) -> None:
    """Pending requests nobody decided within their database's approval window become timed_out."""
    now = clock.now()
    with sessions() as session:
        windows = session.execute(select(Database.id, Database.approval_window)).all()
        for database_id, window in windows:
            due = _lock_batch(
                session,
                select(AccessRequest).where(
                    AccessRequest.status == RequestStatus.PENDING,
                    AccessRequest.database_id == database_id,
                    AccessRequest.created_at <= now - timedelta(seconds=window),
                ),
                settings.batch,
            )
            for request in due:
                reason = f"no decision within {timedelta(seconds=window)}"
                transition(
                    session,
                    request,
                    expected={RequestStatus.PENDING},
                    to=RequestStatus.TIMED_OUT,
                    ended_at=now,
                    end_reason=reason,
                )
                audit.record(
                    session,
                    principal=WORKER,
                    action="access_request:time_out",
                    at=now,
                    request=request,
                    details={"reason": reason, "status": "timed_out"},
                )
                notify.enqueue(session, event="request_ended", request=request, at=now, actor=WORKER.actor)
                report.add("timed_out")
        session.commit()


def release_rules(
    sessions: sessionmaker[Session], *, clock: Clock, settings: Settings, report: Report
) -> None:
    """A rule no live request uses any more is marked for deletion."""
    now = clock.now()
    with sessions() as session:
        unused = select(IpRule.id).where(
            IpRule.status.in_((RuleStatus.CREATING, RuleStatus.AUTHORIZING, RuleStatus.AUTHORIZED)),
            ~select(AccessRequest.id)
            .where(AccessRequest.ip_rule_id == IpRule.id, AccessRequest.status.in_(USING_RULE))
            .exists(),
        )
        candidates = session.scalars(unused.limit(settings.batch)).all()
        session.rollback()
    for rule_id in candidates:
        with sessions() as session:
            rule = session.scalar(
                select(IpRule).where(IpRule.id == rule_id).with_for_update(skip_locked=True, of=IpRule)
            )
            # Checked again under the rule's lock, in a fresh statement: a request attached a moment ago
            # (provisioning holds this same lock to attach) keeps the rule.
            if rule is None or rule.status not in LIVE_RULE_STATUSES or rule.status is RuleStatus.DELETING:
                continue
            if _live_users(session, rule.id):
                continue
            previous = rule.status
            rule.status = RuleStatus.DELETING
            rule.release_at = now
            rule.attempts = 0  # from here on, attempts count deletes
            _rule_event(session, rule, "ip_rule:release", now, previous_status=previous.value)
            session.commit()
            report.add("released")


def delete_rules(
    sessions: sessionmaker[Session],
    *,
    heroku: HerokuClient,
    clock: Clock,
    settings: Settings,
    report: Report,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Delete rules marked for deletion at Heroku, up to a batch of them, each claimed just before its call.
    A failure is retried with backoff, for ever, loudly."""
    for _ in range(settings.batch):
        if stop():
            return
        if not heroku.can_send(Priority.DELETE):
            # Nothing is claimed that cannot be sent: the rule stays due, and is taken as soon as the
            # budget allows, with no backoff earned for a call that was never made.
            report.add("delete_waiting_for_budget")
            return
        claimed = _claim_next(
            sessions, RuleStatus.DELETING, IpRule.release_at, clock=clock, settings=settings, report=report
        )
        if claimed is None:
            return
        rule, token, _ = claimed
        try:
            _delete_one(
                sessions,
                heroku=heroku,
                clock=clock,
                settings=settings,
                report=report,
                claimed=rule,
                token=token,
            )
        except Exception as exc:  # noqa: BLE001 - see _push_back
            _push_back(sessions, IpRule, rule.id, clock=clock, settings=settings, report=report, error=exc)


def _delete_one(
    sessions: sessionmaker[Session],
    *,
    heroku: HerokuClient,
    clock: Clock,
    settings: Settings,
    report: Report,
    claimed: IpRule,
    token: int,
) -> None:
    rule_id = claimed.id
    addon_id, heroku_rule_id, cidr = str(claimed.database.addon_id), claimed.heroku_rule_id, claimed.cidr
    deleted: list[str] = []
    try:
        if heroku_rule_id is not None:
            if heroku.delete_ip_rule(db=addon_id, rule_id=heroku_rule_id):
                deleted.append(heroku_rule_id)
        else:
            # Never confirmed created: a create may still have happened. Find it by its description.
            for found in heroku.list_ip_rules(db=addon_id, priority=Priority.DELETE):
                parsed = parse_description(found.description)
                if parsed and parsed[0] == rule_id and heroku.delete_ip_rule(db=addon_id, rule_id=found.id):
                    deleted.append(found.id)
    except HerokuError as exc:
        retry_in = None
        if isinstance(exc, (HerokuRateLimited, HerokuBudgetReserved)):
            # The account's budget is spent: the shared count paces every call already, so the rule is
            # tried again as soon as it allows, not after a backoff that grows with each refusal.
            retry_in = min(settings.max_backoff, max(1.0, heroku.budget.wait_for(Priority.DELETE)))
        _record_delete_failure(
            sessions,
            clock=clock,
            settings=settings,
            rule_id=rule_id,
            token=token,
            error=exc,
            retry_in=retry_in,
        )
        report.add("delete_failed")
        return
    now = clock.now()
    with sessions() as session:
        rule = _locked(session, IpRule, rule_id)
        assert rule is not None
        if rule.attempts != token or rule.status is not RuleStatus.DELETING:
            session.rollback()  # another worker took over after our lease ran out; it records the result
            return
        rule.status = RuleStatus.DELETED
        rule.deleted_at = now
        rule.next_attempt_at = None
        rule.last_error = None
        if heroku_rule_id is None and deleted:
            rule.heroku_rule_id = deleted[0]
        _rule_event(
            session,
            rule,
            "ip_rule:delete",
            now,
            deleted_at_heroku=deleted,
            already_gone=not deleted,
            cidr=cidr,
            attempts=rule.attempts,
        )
        session.commit()
        report.add("deleted")


def _record_delete_failure(
    sessions: sessionmaker[Session],
    *,
    clock: Clock,
    settings: Settings,
    rule_id: uuid.UUID,
    token: int,
    error: HerokuError,
    retry_in: float | None = None,
) -> None:
    now = clock.now()
    with sessions() as session:
        rule = _locked(session, IpRule, rule_id)
        assert rule is not None
        if rule.attempts != token:
            return
        delay = (
            backoff(rule.attempts, settings.max_backoff) if retry_in is None else timedelta(seconds=retry_in)
        )
        rule.next_attempt_at = now + delay
        rule.last_error = str(error)
        log.error(
            "could not delete Heroku IP rule %s (%s) of %s, attempt %d; retrying at %s: %s",
            rule.heroku_rule_id or "(unconfirmed)",
            rule.cidr,
            rule.database.name,
            rule.attempts,
            rule.next_attempt_at.isoformat(),
            error,
        )
        if rule.attempts == 1 or rule.attempts % 10 == 0:
            _rule_event(session, rule, "ip_rule:delete_failed", now, error=str(error), attempts=rule.attempts)
        session.commit()


# -- step 2: open what was approved ---------------------------------------------------------------------


def provision_requests(
    sessions: sessionmaker[Session],
    *,
    clock: Clock,
    settings: Settings,
    report: Report,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Give each approved request a rule: share the live rule of its (database, CIDR), or record a new one
    to be created. The request becomes provisioning (or active at once, when the shared rule works)."""
    now = clock.now()
    with sessions() as session:
        ids = session.scalars(
            select(AccessRequest.id)
            .where(AccessRequest.status == RequestStatus.APPROVED, _due(AccessRequest.next_attempt_at, now))
            .order_by(AccessRequest.decided_at)
            .limit(settings.batch)
        ).all()
        session.rollback()
    for request_id in ids:
        if stop():
            return
        try:
            _provision_one(sessions, clock=clock, settings=settings, report=report, request_id=request_id)
        except InvalidTransition:
            continue  # cancelled or revoked meanwhile, or another worker got it
        except Exception as exc:  # noqa: BLE001 - see _push_back
            _push_back(
                sessions, AccessRequest, request_id, clock=clock, settings=settings, report=report, error=exc
            )


def _provision_one(
    sessions: sessionmaker[Session],
    *,
    clock: Clock,
    settings: Settings,
    report: Report,
    request_id: uuid.UUID,
) -> None:
    now = clock.now()
    with sessions() as session:
        request = session.scalar(
            select(AccessRequest)
            .where(AccessRequest.id == request_id, AccessRequest.status == RequestStatus.APPROVED)
            .with_for_update(skip_locked=True, of=AccessRequest)
        )
        if request is None:
            return
        db = request.database
        rule = session.scalar(
            select(IpRule)
            .where(
                IpRule.database_id == db.id,
                IpRule.cidr == request.cidr,
                IpRule.status.in_(LIVE_RULE_STATUSES),
            )
            .with_for_update(of=IpRule)
        )
        shared = rule is not None
        if rule is not None and rule.status is RuleStatus.DELETING:
            request.next_attempt_at = now + timedelta(seconds=max(2.0, settings.poll_interval / 3))
            request.last_error = "waiting for the previous rule for this CIDR to be removed at Heroku"
            session.commit()
            report.add("waiting")
            return
        if rule is None:
            refusal = _capacity_refusal(session, db, now=now, settings=settings, request=request)
            if refusal is not None:
                final, message = refusal
                if final:
                    transition(
                        session,
                        request,
                        expected={RequestStatus.APPROVED},
                        to=RequestStatus.FAILED,
                        ended_at=now,
                        end_reason=message,
                        last_error=message,
                    )
                    audit.record(
                        session,
                        principal=WORKER,
                        action="access_request:fail",
                        at=now,
                        request=request,
                        details={"reason": message, "status": "failed"},
                    )
                    notify.enqueue(session, event="access_ended", request=request, at=now, actor=WORKER.actor)
                    report.add("failed")
                else:
                    request.next_attempt_at = now + timedelta(seconds=30)
                    request.last_error = message
                    report.add("waiting")
                session.commit()
                return
            rule_id = uuid.uuid4()
            until = now + timedelta(seconds=settings.provisioning_timeout + db.max_duration)
            rule = IpRule(
                id=rule_id,
                database_id=db.id,
                cidr=request.cidr,
                status=RuleStatus.CREATING,
                description=describe(rule_id, until),
                created_at=now,
                attempts=0,
            )
            session.add(rule)
            try:
                session.flush()
            except IntegrityError:
                # Another worker recorded the rule for this CIDR first; attach to it on the next sweep.
                session.rollback()
                return
            report.add("rules_recorded")
        session.refresh(rule)
        transition(
            session,
            request,
            expected={RequestStatus.APPROVED},
            to=RequestStatus.PROVISIONING,
            ip_rule_id=rule.id,
            next_attempt_at=None,
            last_error=None,
        )
        audit.record(
            session,
            principal=WORKER,
            action="access_request:provision",
            at=now,
            request=request,
            details={"rule_id": str(rule.id), "shared": shared, "status": "provisioning"},
        )
        report.add("provisioned")
        if rule.status is RuleStatus.AUTHORIZED:
            _activate(session, rule, now, report)
        session.commit()


def _capacity_refusal(
    session: Session, db: Database, *, now: datetime, settings: Settings, request: AccessRequest
) -> tuple[bool, str] | None:
    """None when a new rule fits under Heroku's limit less the headroom; else (final?, message)."""
    ours = (
        session.scalar(
            select(func.count())
            .select_from(IpRule)
            .where(IpRule.database_id == db.id, IpRule.status.in_(LIVE_RULE_STATUSES))
        )
        or 0
    )
    foreign = db.foreign_rule_count or 0
    usable = HEROKU_RULE_LIMIT - db.rule_headroom
    if foreign >= usable:
        return True, (
            f"{db.name} cannot take another rule: {foreign} rules not managed by Drawbridge already fill "
            f"Heroku's limit of {HEROKU_RULE_LIMIT} less the {db.rule_headroom} kept free"
        )
    if ours + foreign >= usable:
        waited = (now - (request.decided_at or now)).total_seconds()
        if waited > settings.provisioning_timeout:
            return True, f"{db.name} had no free rule slot for {timedelta(seconds=int(waited))}"
        return False, (
            f"waiting for a free rule slot: {db.name} has {ours + foreign} of the {usable} rules "
            f"Drawbridge may use (Heroku's limit {HEROKU_RULE_LIMIT}, {db.rule_headroom} kept free)"
        )
    return None


def create_rules(
    sessions: sessionmaker[Session],
    *,
    heroku: HerokuClient,
    clock: Clock,
    settings: Settings,
    report: Report,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Create at Heroku the rules recorded as `creating`, up to `open_batch` of them, each claimed just
    before its call. A retry lists first and adopts a rule that an earlier, ambiguous attempt created, so a
    need never gets two rules."""
    for _ in range(settings.open_batch):
        if stop():
            return
        if not heroku.can_send(Priority.CREATE):
            report.add("create_waiting_for_budget")
            return
        claimed = _claim_next(
            sessions, RuleStatus.CREATING, IpRule.created_at, clock=clock, settings=settings, report=report
        )
        if claimed is None:
            return
        rule, token, previous_attempts = claimed
        try:
            _create_one(
                sessions,
                heroku=heroku,
                clock=clock,
                settings=settings,
                report=report,
                claimed=rule,
                token=token,
                look_first=previous_attempts > 0,
            )
        except Exception as exc:  # noqa: BLE001 - see _push_back
            _push_back(sessions, IpRule, rule.id, clock=clock, settings=settings, report=report, error=exc)


def _give_up(session: Session, rule: IpRule, now: datetime, reason: str, report: Report) -> None:
    """Fail the requests of a rule that will not become usable, and mark it for deletion."""
    _fail_users(session, rule, now, reason, report)
    rule.status = RuleStatus.DELETING
    rule.release_at = now
    rule.attempts = 0  # from here on, attempts count deletes
    rule.last_error = reason
    rule.next_attempt_at = None
    _rule_event(session, rule, "ip_rule:release", now, reason=reason)


def _create_one(
    sessions: sessionmaker[Session],
    *,
    heroku: HerokuClient,
    clock: Clock,
    settings: Settings,
    report: Report,
    claimed: IpRule,
    token: int,
    look_first: bool,
) -> None:
    rule_id = claimed.id
    addon_id, cidr, description = str(claimed.database.addon_id), claimed.cidr, claimed.description
    found: HerokuRule | None = None
    adopted = False
    try:
        if look_first:
            # Only needed to open access, so it spends no more of the budget than a create would.
            found = _find_ours(heroku.list_ip_rules(db=addon_id, priority=Priority.CREATE), rule_id)
            adopted = found is not None
        if found is None:
            found = heroku.create_ip_rule(db=addon_id, cidr=cidr, description=description)
    except HerokuPermanentError as exc:
        if isinstance(exc, HerokuAuthError):
            _create_failed(sessions, clock=clock, settings=settings, rule_id=rule_id, token=token, error=exc)
            report.add("create_failed")
            return
        _explain_refusal(
            sessions,
            heroku=heroku,
            clock=clock,
            settings=settings,
            report=report,
            rule_id=rule_id,
            token=token,
            error=exc,
            addon_id=addon_id,
            cidr=cidr,
        )
        return
    except HerokuError as exc:
        _create_failed(sessions, clock=clock, settings=settings, rule_id=rule_id, token=token, error=exc)
        report.add("create_failed")
        return
    _record_created(
        sessions,
        heroku=heroku,
        clock=clock,
        report=report,
        rule_id=rule_id,
        token=token,
        found=found,
        adopted=adopted,
        addon_id=addon_id,
    )


def _find_ours(rules: Iterable[HerokuRule], rule_id: uuid.UUID) -> HerokuRule | None:
    for candidate in rules:
        parsed = parse_description(candidate.description)
        if parsed and parsed[0] == rule_id:
            return candidate
    return None


def _record_created(
    sessions: sessionmaker[Session],
    *,
    heroku: HerokuClient,
    clock: Clock,
    report: Report,
    rule_id: uuid.UUID,
    token: int,
    found: HerokuRule,
    adopted: bool,
    addon_id: str,
) -> None:
    now = clock.now()
    with sessions() as session:
        rule = _locked(session, IpRule, rule_id)
        assert rule is not None
        if rule.status is RuleStatus.CREATING and rule.attempts == token:
            rule.heroku_rule_id = found.id
            rule.status = RuleStatus.AUTHORIZING
            rule.next_attempt_at = None
            rule.last_error = None
            _rule_event(
                session,
                rule,
                "ip_rule:adopt" if adopted else "ip_rule:create",
                now,
                heroku_status=found.status,
                attempts=rule.attempts,
            )
            if found.authorized:
                _authorize(session, rule, now, report)
            session.commit()
            report.add("adopted" if adopted else "created")
            return
        if rule.status is RuleStatus.DELETING and rule.heroku_rule_id is None:
            # Released while the create was in flight: record what to delete, the delete sweep does it.
            rule.heroku_rule_id = found.id
            rule.next_attempt_at = None
            session.commit()
            return
        recorded = rule.heroku_rule_id
        session.rollback()
    if recorded != found.id:
        # Our lease ran out and the row moved on without this rule: it is a stray copy, remove it now.
        log.warning("deleting stray rule %s created for %s after its lease ran out", found.id, rule_id)
        try:
            heroku.delete_ip_rule(db=addon_id, rule_id=found.id)
        except HerokuError:
            log.error("stray rule %s stays at Heroku until reconciliation removes it", found.id)
        report.add("strays_deleted")


def _create_failed(
    sessions: sessionmaker[Session],
    *,
    clock: Clock,
    settings: Settings,
    rule_id: uuid.UUID,
    token: int,
    error: HerokuError,
) -> None:
    now = clock.now()
    with sessions() as session:
        rule = _locked(session, IpRule, rule_id)
        assert rule is not None
        if rule.attempts != token or rule.status is not RuleStatus.CREATING:
            return
        rule.next_attempt_at = now + backoff(rule.attempts, settings.max_backoff)
        rule.last_error = str(error)
        log.warning("creating rule %s (%s) failed, attempt %d: %s", rule.id, rule.cidr, rule.attempts, error)
        session.commit()


def _explain_refusal(
    sessions: sessionmaker[Session],
    *,
    heroku: HerokuClient,
    clock: Clock,
    settings: Settings,
    report: Report,
    rule_id: uuid.UUID,
    token: int,
    error: HerokuError,
    addon_id: str,
    cidr: str,
) -> None:
    """Heroku refused the create (4xx). Look at the rules to tell our own rule (adopt it), the rule limit
    (wait) and somebody else's rule for the same CIDR (fail, and never touch it) apart."""
    try:
        rules = heroku.list_ip_rules(db=addon_id)
    except HerokuError as exc:
        _create_failed(sessions, clock=clock, settings=settings, rule_id=rule_id, token=token, error=exc)
        report.add("create_failed")
        return
    ours = _find_ours(rules, rule_id)
    if ours is not None:
        _record_created(
            sessions,
            heroku=heroku,
            clock=clock,
            report=report,
            rule_id=rule_id,
            token=token,
            found=ours,
            adopted=True,
            addon_id=addon_id,
        )
        return
    if len(rules) >= HEROKU_RULE_LIMIT:
        _create_failed(
            sessions,
            clock=clock,
            settings=settings,
            rule_id=rule_id,
            token=token,
            error=HerokuError(
                f"Heroku's limit of {HEROKU_RULE_LIMIT} rules is reached; waiting for a free slot"
            ),
        )
        report.add("create_failed")
        return
    holder = next((r for r in rules if r.cidr == cidr and parse_description(r.description) is None), None)
    if holder is not None:
        reason = (
            f"Heroku already has a rule for {cidr} that Drawbridge did not create (id {holder.id}); "
            "Drawbridge will not adopt or change it"
        )
    else:
        reason = f"Heroku refused to create the rule: {error}"
    now = clock.now()
    with sessions() as session:
        rule = _locked(session, IpRule, rule_id)
        assert rule is not None
        if rule.attempts != token or rule.status is not RuleStatus.CREATING:
            return
        _fail_users(session, rule, now, reason, report)
        rule.status = RuleStatus.DELETED
        rule.deleted_at = now
        rule.next_attempt_at = None
        rule.last_error = reason
        _rule_event(session, rule, "ip_rule:refused", now, reason=reason)
        session.commit()


# -- step 3: watch rules authorize ------------------------------------------------------------------------


def _authorize(session: Session, rule: IpRule, now: datetime, report: Report) -> None:
    rule.status = RuleStatus.AUTHORIZED
    rule.authorized_at = now
    _rule_event(session, rule, "ip_rule:authorize", now)
    report.add("authorized")
    for request in _live_users(session, rule.id):
        if request.status is RequestStatus.ACTIVE and request.last_error:
            request.last_error = None  # a recreated rule works again
    _activate(session, rule, now, report)


def poll_rules(
    sessions: sessionmaker[Session],
    *,
    heroku: HerokuClient,
    clock: Clock,
    settings: Settings,
    report: Report,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """For each database with rules still authorizing, one list call at most every poll interval answers
    for all of them (never one GET per rule)."""
    now = clock.now()
    cutoff = now - timedelta(seconds=settings.poll_interval)
    with sessions() as session:
        claimed = session.scalars(
            update(Database)
            .where(
                _due(Database.rules_polled_at, cutoff),
                select(IpRule.id)
                .where(IpRule.database_id == Database.id, IpRule.status == RuleStatus.AUTHORIZING)
                .exists(),
            )
            .values(rules_polled_at=now)
            .returning(Database.id)
        ).all()
        session.commit()
    for database_id in claimed:
        if stop():
            return
        try:
            _poll_one(
                sessions,
                heroku=heroku,
                clock=clock,
                settings=settings,
                report=report,
                database_id=database_id,
            )
        except Exception:  # noqa: BLE001 - the database was claimed for this interval; the next poll retries
            log.exception("polling database %s failed", database_id)
            report.add("row_errors")


def _poll_one(
    sessions: sessionmaker[Session],
    *,
    heroku: HerokuClient,
    clock: Clock,
    settings: Settings,
    report: Report,
    database_id: int,
) -> None:
    with sessions() as session:
        db = session.get(Database, database_id)
        assert db is not None
        addon_id = str(db.addon_id)
        known = _known_at_heroku(session, database_id)
        session.rollback()
    try:
        rules = heroku.list_ip_rules(db=addon_id)
    except HerokuError as exc:
        log.warning("polling rules of database %s failed: %s", database_id, exc)
        report.add("poll_failed")
        return
    report.add("polled")
    at_heroku = {r.id: r for r in rules}
    now = clock.now()
    with sessions() as session:
        db = session.get(Database, database_id)
        assert db is not None
        db.foreign_rule_count = sum(1 for r in rules if parse_description(r.description) is None)
        pending = session.scalars(
            select(IpRule)
            .where(IpRule.database_id == database_id, IpRule.status == RuleStatus.AUTHORIZING)
            .with_for_update(skip_locked=True, of=IpRule)
        ).all()
        for rule in pending:
            seen = at_heroku.get(rule.heroku_rule_id or "")
            if seen is None:
                if known.get(rule.id) == rule.heroku_rule_id:
                    _recreate(session, rule, now, report)
            elif seen.authorized:
                _authorize(session, rule, now, report)
            elif (now - rule.created_at).total_seconds() > settings.provisioning_timeout:
                limit = timedelta(seconds=settings.provisioning_timeout)
                reason = f"Heroku did not authorize the rule within {limit}"
                _give_up(session, rule, now, reason, report)
        session.commit()


def _known_at_heroku(session: Session, database_id: int) -> dict[uuid.UUID, str | None]:
    """Our rules of a database and the Heroku rule each had, read before asking Heroku for its list. Only
    these may be judged missing from the answer: a rule another worker recorded while the list was being
    answered may be absent from it and still be there."""
    rows = session.execute(
        select(IpRule.id, IpRule.heroku_rule_id).where(
            IpRule.database_id == database_id, IpRule.status.in_(LIVE_RULE_STATUSES)
        )
    ).all()
    return {rule_id: heroku_rule_id for rule_id, heroku_rule_id in rows}


def _recreate(session: Session, rule: IpRule, now: datetime, report: Report) -> None:
    """A rule we rely on is missing at Heroku (deleted by hand?): create it again."""
    log.warning("rule %s (%s) is missing at Heroku; creating it again", rule.heroku_rule_id, rule.cidr)
    _rule_event(session, rule, "ip_rule:missing", now)
    rule.status = RuleStatus.CREATING
    rule.heroku_rule_id = None
    rule.authorized_at = None
    rule.next_attempt_at = None
    rule.created_at = now
    for request in _live_users(session, rule.id):
        if request.status is RequestStatus.ACTIVE:
            request.last_error = "the rule vanished at Heroku and is being created again"
    report.add("recreated")


# -- step 4: reconcile with Heroku ------------------------------------------------------------------------


def reconcile(
    sessions: sessionmaker[Session],
    *,
    heroku: HerokuClient,
    clock: Clock,
    settings: Settings,
    report: Report,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Compare each database's rules at Heroku with ours, every reconcile interval: delete our rules that
    our database no longer tracks once their recorded time has passed, delete rules we believe deleted,
    recreate rules we rely on that Heroku lacks, and count (never touch) rules we do not own."""
    now = clock.now()
    cutoff = now - timedelta(seconds=settings.reconcile_interval)
    with sessions() as session:
        claimed = session.scalars(
            update(Database)
            .where(_due(Database.reconciled_at, cutoff))
            .values(reconciled_at=now)
            .returning(Database.id)
        ).all()
        session.commit()
    for database_id in claimed:
        if stop():
            return
        try:
            _reconcile_one(sessions, heroku=heroku, clock=clock, report=report, database_id=database_id)
        except Exception:  # noqa: BLE001 - retried at the next reconcile interval
            log.exception("reconciling database %s failed", database_id)
            report.add("row_errors")


def _reconcile_one(
    sessions: sessionmaker[Session], *, heroku: HerokuClient, clock: Clock, report: Report, database_id: int
) -> None:
    with sessions() as session:
        db = session.get(Database, database_id)
        assert db is not None
        addon_id, name = str(db.addon_id), db.name
        known = _known_at_heroku(session, database_id)
        session.rollback()
    try:
        rules = heroku.list_ip_rules(db=addon_id, priority=Priority.DELETE)
    except HerokuError as exc:
        log.warning("reconciling %s failed: %s", name, exc)
        report.add("reconcile_failed")
        return
    report.add("reconciled")
    now = clock.now()
    doomed: list[tuple[HerokuRule, str]] = []
    foreign = [r for r in rules if parse_description(r.description) is None]
    with sessions() as session:
        db = session.get(Database, database_id)
        assert db is not None
        db.foreign_rule_count = len(foreign)
        tracked = {r.id: r for r in session.scalars(select(IpRule).where(IpRule.database_id == database_id))}
        for found in rules:
            parsed = parse_description(found.description)
            if parsed is None:
                continue
            ours = tracked.get(parsed[0])
            if ours is None:
                if parsed[1] <= now:
                    doomed.append((found, "untracked"))
                else:
                    log.warning(
                        "untracked Drawbridge rule %s (%s) at %s stays until %s",
                        found.id,
                        found.cidr,
                        name,
                        parsed[1].isoformat(),
                    )
                    report.add("untracked_waiting")
            elif ours.status is RuleStatus.DELETED:
                if ours.id not in known:  # deleted before the list was asked for, and still there
                    doomed.append((found, "believed_deleted"))
            elif ours.heroku_rule_id not in (None, found.id) and known.get(ours.id) == ours.heroku_rule_id:
                doomed.append((found, "duplicate"))
        present = {r.id for r in rules}
        for rule in tracked.values():
            if (
                rule.status in (RuleStatus.AUTHORIZING, RuleStatus.AUTHORIZED)
                and rule.heroku_rule_id not in present
                and known.get(rule.id) == rule.heroku_rule_id
            ):
                locked = _locked(session, IpRule, rule.id)
                if locked is not None and locked.status in (RuleStatus.AUTHORIZING, RuleStatus.AUTHORIZED):
                    _recreate(session, locked, now, report)
        session.commit()
    if foreign:
        log.info(
            "%s has %d rules Drawbridge does not own (left alone): %s",
            name,
            len(foreign),
            ", ".join(f"{r.cidr} ({r.id})" for r in foreign),
        )
    for found, why in doomed:
        try:
            gone = heroku.delete_ip_rule(db=addon_id, rule_id=found.id)
        except HerokuError as exc:
            log.error("could not delete %s rule %s at %s: %s", why, found.id, name, exc)
            report.add("delete_failed")
            continue
        with sessions() as session:
            audit.record(
                session,
                principal=WORKER,
                action="ip_rule:reconcile_delete",
                at=clock.now(),
                database=name,
                details={
                    "heroku_rule_id": found.id,
                    "cidr": found.cidr,
                    "why": why,
                    "deleted": gone,
                    "description": found.description,
                },
            )
            session.commit()
        report.add(f"reconcile_deleted_{why}")


# -- one sweep -------------------------------------------------------------------------------------------


def sweep(
    sessions: sessionmaker[Session],
    *,
    heroku: HerokuClient,
    clock: Clock,
    settings: Settings,
    stop: Callable[[], bool] = lambda: False,
    with_reconcile: bool = False,
) -> Report:
    """One pass of every step, closing access before opening any; reconciliation (when asked for) runs
    before provisioning so a new rule is counted against what Heroku really holds. A failing step is
    logged and the others still run; failing rows carry their own backoff."""
    report = Report()
    common: dict[str, Any] = {"clock": clock, "settings": settings, "report": report}
    remote: dict[str, Any] = {**common, "heroku": heroku, "stop": stop}
    closing: list[tuple[str, Callable[..., None], dict[str, Any]]] = [
        ("expire", expire_requests, common),
        ("release", release_rules, common),
        ("delete", delete_rules, remote),
    ]
    for _ in range(settings.close_rounds):
        before = dict(report.counts)
        _run(closing, sessions, report, stop)
        done = {key: report.counts.get(key, 0) - before.get(key, 0) for key in _CLOSING_COUNTS}
        if stop() or all(n < settings.batch for n in done.values()):
            break
    steps: list[tuple[str, Callable[..., None], dict[str, Any]]] = [
        ("warn", notify.warn_before_end, common),
        ("time_out", time_out_pending, common),
        *([("reconcile", reconcile, remote)] if with_reconcile else []),
        ("provision", provision_requests, {**common, "stop": stop}),
        ("create", create_rules, remote),
        ("poll", poll_rules, remote),
    ]
    _run(steps, sessions, report, stop)
    return report


_CLOSING_COUNTS = ("expired", "released", "deleted", "delete_failed")


def _run(
    steps: list[tuple[str, Callable[..., None], dict[str, Any]]],
    sessions: sessionmaker[Session],
    report: Report,
    stop: Callable[[], bool],
) -> None:
    for name, step, kwargs in steps:
        if stop():
            break
        try:
            step(sessions, **kwargs)
        except Exception:  # noqa: BLE001 - one broken step must not stop the others
            log.exception("sweep step %s failed", name)
            report.add(f"{name}_errors")
