"""The worker: APScheduler timers that run the sweeps of `app.services.grants` and, in a job of its own,
the delivery of notifications (`app.notifier`), so a slow receiver never delays the closing of access.

APScheduler is only the timer. The database holds every piece of state, so the scheduler keeps no job store,
any number of workers may run at once on PostgreSQL, and a restarted worker simply carries on.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from datetime import UTC, datetime
from types import FrameType

from apscheduler.schedulers.background import BackgroundScheduler

from app import logs
from app.metrics import WorkerMetrics
from app.notifier import Notifier
from app.runtime import Runtime
from app.services import grants, heartbeats, idempotency
from app.telemetry import counting_heroku_calls

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, runtime: Runtime) -> None:
        if runtime.heroku is None:
            raise RuntimeError("the worker needs Heroku credentials: set HEROKU_API_TOKEN, or use --simulate")
        self.runtime = runtime
        self.heroku = runtime.heroku
        config = runtime.config
        self.settings = grants.Settings(
            poll_interval=config.poll_interval,
            provisioning_timeout=config.provisioning_timeout,
            reconcile_interval=config.reconcile_interval,
            # Longer than a Heroku call with its retries and pauses (60 s at the default 10 s timeout).
            lease=max(15.0, 6 * config.heroku_timeout),
        )
        self.notifier = Notifier(config, sessions=runtime.sessions, clock=runtime.clock)
        self.identity = heartbeats.WorkerIdentity.of_this_process(started_at=runtime.clock.now())
        self.metrics = WorkerMetrics(
            process=self.identity.label, heroku=self.heroku, multiproc_dir=config.metrics_multiproc_dir
        )
        self._stopping = threading.Event()
        self._purged_at = 0.0
        self._scheduler: BackgroundScheduler | None = None

    def run_once(self) -> grants.Report:
        """One sweep (reconciliation included; each database is reconciled at most once per interval),
        under a request id of its own; when it finishes, the worker's heartbeat is recorded."""
        with logs.request_scope(), counting_heroku_calls(self.metrics.count_heroku_call):
            started = time.monotonic()
            report = grants.sweep(
                self.runtime.sessions,
                heroku=self.heroku,
                clock=self.runtime.clock,
                settings=self.settings,
                stop=self._stopping.is_set,
                with_reconcile=True,
            )
            elapsed = time.monotonic() - started
            self.metrics.observe_job("sweep", elapsed)
            if report.counts:
                log.info("sweep took %.3fs: %s", elapsed, report.counts)
            self.beat()
        return report

    def beat(self) -> None:
        """Record this worker's heartbeat, with a snapshot of its metrics. Commits."""
        with self.runtime.sessions() as session:
            heartbeats.beat(
                session, worker=self.identity, now=self.runtime.clock.now(), metrics=self.metrics.snapshot()
            )

    def deliver_once(self) -> grants.Report:
        """Deliver the notifications that are due (see `Notifier.deliver`), under a request id of its own."""
        with logs.request_scope():
            started = time.monotonic()
            report = self.notifier.deliver(stop=self._stopping.is_set)
            if time.monotonic() - self._purged_at > 60:
                self._purged_at = time.monotonic()
                report.add(
                    "idempotency_keys_purged",
                    idempotency.purge_expired(self.runtime.sessions, now=self.runtime.clock.now()),
                )
            elapsed = time.monotonic() - started
            self.metrics.observe_job("deliver", elapsed)
            if report.counts:
                log.info("delivery took %.3fs: %s", elapsed, report.counts)
        return report

    def _safe_run(self) -> None:
        try:
            self.run_once()
        except Exception:  # noqa: BLE001 - the timer must keep firing whatever one sweep hit
            log.exception("sweep failed")

    def _safe_deliver(self) -> None:
        try:
            self.deliver_once()
        except Exception:  # noqa: BLE001 - as for sweeps
            log.exception("notification delivery failed")

    def start(self) -> None:
        """Start sweeping, and delivering notifications, every DRAWBRIDGE_SWEEP_INTERVAL seconds in
        background threads: two jobs, each at most one run at a time, so neither waits for the other."""
        scheduler = BackgroundScheduler(timezone=UTC)
        for job, name in ((self._safe_run, "sweep"), (self._safe_deliver, "deliver")):
            scheduler.add_job(
                job,
                "interval",
                seconds=self.runtime.config.sweep_interval,
                id=name,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=None,
                next_run_time=datetime.now(UTC),
            )
        scheduler.start()
        self._scheduler = scheduler
        log.info("worker sweeping every %ss", self.runtime.config.sweep_interval)
        receivers = ", ".join(r.name for r in self.notifier.receivers) or "none configured"
        log.info("notifications go to: %s", receivers)

    def stop(self) -> None:
        """Finish the row in hand, skip the rest of the sweep, and stop the timer."""
        self._stopping.set()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None
        self.notifier.close()
        log.info("worker stopped")


def run_until_signalled(worker: Worker) -> None:
    """Run the worker in this process until SIGTERM or SIGINT; the sweep in progress finishes first."""
    done = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; finishing the work in hand", signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.start()
    done.wait()
    worker.stop()
