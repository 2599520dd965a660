"""Gunicorn settings for the API on Heroku and in containers: `gunicorn -c gunicorn.conf.py app.wsgi:app`.

Read from the environment: `PORT` (Heroku sets it; 8000 otherwise) and `WEB_CONCURRENCY` (worker processes;
Heroku's Python buildpack sets it by dyno size; otherwise one per usable core), and `PROMETHEUS_MULTIPROC_DIR`
when set (see the hooks at the end). Anything else can be changed without editing this file through
gunicorn's own `GUNICORN_CMD_ARGS`, e.g. `GUNICORN_CMD_ARGS="--threads 8"`.
"""

from __future__ import annotations

import os


def _cores() -> int:
    # The cores this process may run on (a container's CPU set), not every core of the host.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _positive(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"{name} must be a whole number of at least 1, got {value!r}")
    return int(value)


bind = f"0.0.0.0:{_positive('PORT', 8000)}"
workers = _positive("WEB_CONCURRENCY", _cores())
# Threads let one process overlap requests that wait on the database; the API does no Heroku calls except
# when a database is registered, so a few threads per process are enough.
worker_class = "gthread"
threads = 4
# Heroku's router gives up on a request after 30 s and a dyno 30 s after SIGTERM; stay inside both.
timeout = 30
graceful_timeout = 25
keepalive = 5
# Logs go to stdout and stderr, where Heroku and container runtimes collect them; %(M)s is the time in ms.
accesslog = "-"
errorlog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms "%(a)s"'
# The worker heartbeat file on a memory file system: a container's overlay disk can stall it.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
# No control socket (gunicorn 25.1+): nothing uses it, and its default path is in $HOME, which the image's
# user does not have and which two servers on one host would share.
control_socket_disable = True


# prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, for /metrics summed over the workers):
# the directory starts empty at each start of gunicorn, and a dead worker's live gauges are dropped.
def on_starting(server: object) -> None:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()
    if directory:
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):
            if name.endswith(".db"):
                os.remove(os.path.join(directory, name))


def child_exit(server: object, worker: object) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]
