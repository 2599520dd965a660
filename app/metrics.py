"""Prometheus metrics (prometheus-client): what the web process measures, what each worker measures, and
what the database says at scrape time.

The state of access (live grants, rules per database, rows waiting for retry, rules that could not be
deleted, the expiry lag) is read from the database when `/metrics` is scraped, so every web process tells
the same truth whichever worker did the work. A worker's own measurements (its Heroku calls, how long its
jobs take, the rate-limit budget it sees) travel with its heartbeat row and are re-exported under a
`process` label: worker processes need no port of their own, which a Heroku worker dyno could not offer.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, case, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from app.heroku.client import HerokuClient, Priority
from app.models import (
    LIVE_RULE_STATUSES,
    LIVE_STATUSES,
    AccessRequest,
    Database,
    IpRule,
    Notification,
    RequestStatus,
    RuleStatus,
)
from app.services import heartbeats

if TYPE_CHECKING:
    from app.clock import Clock
    from app.runtime import Runtime

HEROKU_RULE_LIMIT = 60
WEB_PROCESS = "web"
JOB_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
LAG_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
GRANT_STATUSES = (RequestStatus.APPROVED, RequestStatus.PROVISIONING, RequestStatus.ACTIVE)
_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# The families a web process writes; in multiprocess mode only these are read from the shared directory.
# A worker that shares it is still shown once: its Heroku calls carry its own `process` label, and a sample
# the directory already gave is not repeated from the worker's heartbeat (see _Merged).
WEB_FAMILIES = frozenset(
    {"drawbridge_http_requests", "drawbridge_http_request_duration_seconds", "drawbridge_heroku_calls"}
)


def _budget(heroku: HerokuClient | None, process: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "drawbridge_heroku_ratelimit_remaining",
        "Heroku API calls left to the account as Drawbridge counts them: Heroku's RateLimit-Remaining "
        "less the calls sent since, plus the refill (a full bucket until Heroku first reports)",
        labels=["process"],
    )
    if heroku is not None:
        family.add_metric([process], float(heroku.budget.remaining))
    return family


def _budget_floors(heroku: HerokuClient | None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "drawbridge_heroku_ratelimit_floor",
        "Calls a Heroku call of each priority must leave in the budget: creates stop first, then reads; "
        "deletes go on to the last call",
        labels=["priority"],
    )
    if heroku is not None:
        for priority in Priority:
            family.add_metric([priority.name.lower()], float(heroku.budget.floor(priority)))
    return family


# -- the worker's own measurements -------------------------------------------------------------------------


class _BudgetCollector:
    def __init__(self, heroku: HerokuClient | None, process: str) -> None:
        self._heroku = heroku
        self._process = process

    def collect(self) -> Iterator[Metric]:
        yield _budget(self._heroku, self._process)


class WorkerMetrics:
    """A worker process's Heroku calls, job durations and rate-limit budget, in a registry of its own and
    snapshotted into its heartbeat after each sweep."""

    def __init__(
        self, *, process: str, heroku: HerokuClient | None, multiproc_dir: str | None = None
    ) -> None:
        _prepare(multiproc_dir)
        self.process = process
        self.registry = CollectorRegistry()
        self._calls = Counter(
            "drawbridge_heroku_calls",
            "Heroku API calls by process, operation and outcome (HTTP status, timeout or unreachable)",
            ["process", "operation", "status"],
            registry=self.registry,
        )
        self._jobs = Histogram(
            "drawbridge_worker_job_duration_seconds",
            "How long each worker job run took: sweep (the Heroku side of access) or deliver (notifications)",
            ["process", "job"],
            buckets=JOB_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_BudgetCollector(heroku, process))

    def count_heroku_call(self, operation: str, outcome: str) -> None:
        self._calls.labels(self.process, operation, outcome).inc()

    def observe_job(self, job: str, seconds: float) -> None:
        self._jobs.labels(self.process, job).observe(seconds)

    def snapshot(self) -> list[dict[str, Any]]:
        """Every sample of the registry as plain JSON (the `_created` timestamps left out)."""
        families = []
        for family in self.registry.collect():
            samples = [
                [sample.name, dict(sample.labels), sample.value]
                for sample in family.samples
                if not sample.name.endswith("_created") and math.isfinite(sample.value)
            ]
            families.append(
                {"name": family.name, "type": family.type, "help": family.documentation, "samples": samples}
            )
        return families


def _prepare(multiproc_dir: str | None) -> str | None:
    """With PROMETHEUS_MULTIPROC_DIR set, prometheus-client writes every value to a file there: make sure
    the directory exists (gunicorn.conf.py empties it when gunicorn starts)."""
    if multiproc_dir:
        os.makedirs(multiproc_dir, exist_ok=True)
    return multiproc_dir


def _from_snapshot(snapshot: object) -> Iterator[Metric]:
    """Rebuild metric families from a heartbeat's snapshot; anything malformed is skipped, not fatal."""
    if not isinstance(snapshot, list):
        return
    for entry in snapshot:
        try:
            family = Metric(str(entry["name"]), str(entry["help"]), str(entry["type"]))
            for name, labels, value in entry["samples"]:
                family.add_sample(str(name), {str(k): str(v) for k, v in labels.items()}, float(value))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
        yield family


# -- the database, read at scrape time ---------------------------------------------------------------------


def _seconds_between(session: Session, later: Any, earlier: Any) -> ColumnElement[Any]:
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", later - earlier)
    return (func.julianday(later) - func.julianday(earlier)) * 86400.0


class StateCollector:
    """Gauges and the expiry-lag histogram computed from the database at each scrape, plus the
    measurements of every worker that is alive."""

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        clock: Clock,
        heroku: HerokuClient | None,
        heartbeat_stale: float,
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._heroku = heroku
        self._stale = heartbeat_stale

    def collect(self) -> Iterator[Metric]:
        now = self._clock.now()
        with self._sessions() as session:
            families = [
                *self._grants_and_rules(session, now),
                *self._retries(session),
                self._expiry_lag(session),
                *self._workers(session, now),
            ]
            session.rollback()
        yield from families
        yield _budget(self._heroku, WEB_PROCESS)
        yield _budget_floors(self._heroku)

    def _grants_and_rules(self, session: Session, now: datetime) -> Iterator[Metric]:
        databases = session.execute(
            select(Database.id, Database.name, Database.rule_headroom, Database.foreign_rule_count).order_by(
                Database.name
            )
        ).all()
        grants = {
            (database_id, status): count
            for database_id, status, count in session.execute(
                select(AccessRequest.database_id, AccessRequest.status, func.count())
                .where(AccessRequest.status.in_(GRANT_STATUSES))
                .group_by(AccessRequest.database_id, AccessRequest.status)
            )
        }
        ours = dict(
            session.execute(
                select(IpRule.database_id, func.count())
                .where(IpRule.status.in_(LIVE_RULE_STATUSES))
                .group_by(IpRule.database_id)
            ).all()
        )
        # Release resets `attempts`, which from then on counts delete attempts; a failure records its error.
        failed_delete = IpRule.last_error.is_not(None) & (IpRule.attempts >= 1)
        deleting = {
            database_id: (count, failed or 0, oldest)
            for database_id, count, failed, oldest in session.execute(
                select(
                    IpRule.database_id,
                    func.count(),
                    func.sum(case((failed_delete, 1), else_=0)),
                    func.min(IpRule.release_at),
                )
                .where(IpRule.status == RuleStatus.DELETING)
                .group_by(IpRule.database_id)
            )
        }

        live = GaugeMetricFamily(
            "drawbridge_live_grants",
            "Approved requests not yet ended, per database and status (approved: waiting for its rule; "
            "provisioning: Heroku is authorizing it; active: access works)",
            labels=["database", "status"],
        )
        rules = GaugeMetricFamily(
            "drawbridge_heroku_rules",
            "mTLS IP rules per database: Drawbridge's (including those being created or deleted) and others' "
            "(as last counted by reconciliation)",
            labels=["database", "owner"],
        )
        headroom = GaugeMetricFamily(
            "drawbridge_heroku_rule_headroom",
            "Rule slots Drawbridge leaves free on each database (its policy's rule_headroom)",
            labels=["database"],
        )
        awaiting = GaugeMetricFamily(
            "drawbridge_rules_awaiting_deletion",
            "Rules no live request needs that are not yet deleted at Heroku",
            labels=["database"],
        )
        undeletable = GaugeMetricFamily(
            "drawbridge_undeletable_rules",
            "Rules whose delete at Heroku failed and that are still not deleted (retried with backoff)",
            labels=["database"],
        )
        oldest = GaugeMetricFamily(
            "drawbridge_oldest_rule_awaiting_deletion_seconds",
            "How long the longest-waiting rule of each database has been waiting to be deleted (0: none)",
            labels=["database"],
        )
        for database_id, name, rule_headroom, foreign in databases:
            for status in GRANT_STATUSES:
                live.add_metric([name, status.value], grants.get((database_id, status), 0))
            rules.add_metric([name, "drawbridge"], ours.get(database_id, 0))
            if foreign is not None:
                rules.add_metric([name, "others"], foreign)
            headroom.add_metric([name], rule_headroom)
            count, failed, since = deleting.get(database_id, (0, 0, None))
            awaiting.add_metric([name], count)
            undeletable.add_metric([name], failed)
            oldest.add_metric([name], max(0.0, (now - since).total_seconds()) if since else 0.0)
        limit = GaugeMetricFamily(
            "drawbridge_heroku_rule_limit", "IP rules Heroku allows on one database", value=HEROKU_RULE_LIMIT
        )
        return iter((live, rules, headroom, limit, awaiting, undeletable, oldest))

    def _retries(self, session: Session) -> Iterator[Metric]:
        waiting = GaugeMetricFamily(
            "drawbridge_rows_waiting_for_retry",
            "Work that failed and waits for its next attempt: rules (create, delete), requests "
            "(provisioning) and notifications (delivery)",
            labels=["kind"],
        )
        counts = {
            "ip_rule": select(func.count()).where(
                IpRule.status.in_(LIVE_RULE_STATUSES),
                IpRule.last_error.is_not(None),
                IpRule.next_attempt_at.is_not(None),
            ),
            "access_request": select(func.count()).where(
                AccessRequest.status.in_(LIVE_STATUSES),
                AccessRequest.last_error.is_not(None),
                AccessRequest.next_attempt_at.is_not(None),
            ),
            "notification": select(func.count()).where(
                Notification.delivered_at.is_(None),
                Notification.last_error.is_not(None),
                Notification.next_attempt_at.is_not(None),
            ),
        }
        for kind, query in counts.items():
            waiting.add_metric([kind], session.scalar(query) or 0)
        yield waiting

    def _expiry_lag(self, session: Session) -> Metric:
        """Seconds from a request's expiry to the deletion of its rule, for each deleted rule whose last
        request ended by expiring (a rule shared with a request that lasted longer is that request's)."""
        expired_until = func.max(
            case((AccessRequest.status == RequestStatus.EXPIRED, AccessRequest.expires_at))
        )
        other_until = func.max(case((AccessRequest.status != RequestStatus.EXPIRED, AccessRequest.ended_at)))
        per_rule = (
            select(
                IpRule.deleted_at.label("deleted_at"),
                expired_until.label("expired_until"),
                other_until.label("other_until"),
            )
            .join(AccessRequest, AccessRequest.ip_rule_id == IpRule.id)
            .where(IpRule.status == RuleStatus.DELETED)
            .group_by(IpRule.id, IpRule.deleted_at)
            .subquery()
        )
        lags = (
            select(_seconds_between(session, per_rule.c.deleted_at, per_rule.c.expired_until).label("lag"))
            .where(
                per_rule.c.expired_until.is_not(None),
                or_(per_rule.c.other_until.is_(None), per_rule.c.other_until <= per_rule.c.expired_until),
            )
            .subquery()
        )
        row = session.execute(
            select(
                func.count(),
                func.coalesce(func.sum(lags.c.lag), 0),
                *(
                    func.coalesce(func.sum(case((lags.c.lag <= bound, 1), else_=0)), 0)
                    for bound in LAG_BUCKETS
                ),
            )
        ).one()
        count, total, *cumulative = (float(value) for value in row)
        buckets = [(str(bound), n) for bound, n in zip(LAG_BUCKETS, cumulative, strict=True)]
        return HistogramMetricFamily(
            "drawbridge_expiry_lag_seconds",
            "From a request's expiry to the deletion of its rule at Heroku, per rule deleted after expiry",
            buckets=[*buckets, ("+Inf", count)],
            sum_value=total,
        )

    def _workers(self, session: Session, now: datetime) -> Iterator[Metric]:
        newest = heartbeats.last_beat(session)
        alive = heartbeats.alive(session, now=now, stale=self._stale)
        yield GaugeMetricFamily(
            "drawbridge_workers_alive",
            "Worker processes that finished a sweep within DRAWBRIDGE_HEARTBEAT_STALE seconds",
            value=len(alive),
        )
        age = GaugeMetricFamily(
            "drawbridge_worker_last_sweep_age_seconds",
            "Seconds since any worker last finished a sweep (absent: none ever has)",
        )
        if newest is not None:
            age.add_metric([], max(0.0, (now - newest).total_seconds()))
        yield age
        for worker in alive:
            yield from _from_snapshot(worker.metrics)


# -- the web process ---------------------------------------------------------------------------------------


class _Only:
    """The families of `source` named in `names`."""

    def __init__(self, source: Collector, names: frozenset[str]) -> None:
        self._source = source
        self._names = names

    def collect(self) -> Iterable[Metric]:
        return (family for family in self._source.collect() if family.name in self._names)


class _Merged:
    """Families of several sources as one: same-named families are joined, and a sample already given by
    an earlier source is not repeated."""

    def __init__(self, sources: Iterable[Collector]) -> None:
        self._sources = list(sources)

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
        for source in self._sources:
            for family in source.collect():
                target = merged.setdefault(family.name, family)
                fresh = []
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    if key not in seen:
                        seen.add(key)
                        fresh.append(sample)
                if target is family:
                    family.samples = fresh
                else:
                    target.samples.extend(fresh)
        return merged.values()


class WebMetrics:
    """The web process's registry (HTTP requests, their latency, its own Heroku calls) and the exposition
    of everything `/metrics` serves. With PROMETHEUS_MULTIPROC_DIR set (gunicorn with several workers), the
    web families are read from that directory, summed over the processes that wrote them."""

    def __init__(self, runtime: Runtime) -> None:
        self.registry = CollectorRegistry()
        self._multiproc_dir = _prepare(runtime.config.metrics_multiproc_dir)
        self._requests = Counter(
            "drawbridge_http_requests",
            "HTTP requests answered, by method, route (the URL rule, not the path) and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "drawbridge_http_request_duration_seconds",
            "Time to answer an HTTP request, by method and route",
            ["method", "route"],
            registry=self.registry,
        )
        self._heroku_calls = Counter(
            "drawbridge_heroku_calls",
            "Heroku API calls by process, operation and outcome (HTTP status, timeout or unreachable)",
            ["process", "operation", "status"],
            registry=self.registry,
        )
        self.state = StateCollector(
            sessions=runtime.sessions,
            clock=runtime.clock,
            heroku=runtime.heroku,
            heartbeat_stale=runtime.config.heartbeat_stale,
        )

    def observe_request(self, *, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in _HTTP_METHODS else "other"
        self._requests.labels(method, route, str(status)).inc()
        self._latency.labels(method, route).observe(seconds)

    def count_heroku_call(self, operation: str, outcome: str) -> None:
        self._heroku_calls.labels(WEB_PROCESS, operation, outcome).inc()

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """Everything, in the exposition format `accept` asks for (Prometheus text unless OpenMetrics
        is asked for); returns the body and its content type."""
        own: Collector = self.registry
        if self._multiproc_dir:
            reader = MultiProcessCollector(None, path=self._multiproc_dir)  # type: ignore[no-untyped-call]
            own = _Only(reader, WEB_FAMILIES)
        encode, content_type = choose_encoder(accept)
        return encode(_Merged([own, self.state])), content_type
