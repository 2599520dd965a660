"""Drawbridge as a service, each figure measured in one run next to its baseline.

    .venv/bin/python bench/service.py [--quick] [--requests 1000] [--rounds 3] [--grants 1000]

1. API under gunicorn (gunicorn.conf.py, WEB_CONCURRENCY=2) on a scratch PostgreSQL database: requests/s
   and client-side p50/p99 latency of create, get, list and approve at a fixed concurrency (8 client threads,
   one keep-alive connection each), next to the floor: bench/floor_app.py, a bare Flask + SQLAlchemy
   endpoint that inserts one row, under the same gunicorn settings on the same database, measured in the
   same rounds. Server-side latency comes from gunicorn's access log; CPU per request from /proc for the
   gunicorn workers and the PostgreSQL backends serving them. Targets: create >= 60 % of the floor's
   requests/s, create p99 < 50 ms. The per-token rate limit is raised for the run.
2. Expiry precision: N active grants (1,000; 50 per database, under Heroku's 60 rules) provisioned through
   the real services and a Heroku simulator served over HTTP from this process (no latency, rules
   authorize at once), then set to expire within one second; two `drawbridge worker` processes share the
   work. Lag is expiry to the delete call, from the simulator's call log; target p99 < 2 s.
3. Heroku cost: bench/heroku_cost.py for 1 and 50 requests pending on one database (simulated time), next
   to what polling each rule on its own would cost.
4. Memory: peak RSS (VmHWM) of the web processes (Drawbridge and the floor) after 1, of each worker after
   2, and of the heroku_cost process (worker, client and simulator in one) in 3.

Writes bench/results/service.json and service.md; `--quick` runs small sizes and only prints. Scratch
databases are dropped at the end, also on failure.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import math
import os
import platform
import random
import re
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
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import psycopg
import waitress
from alembic import command
from floor_app import Base as FloorBase
from sqlalchemy import create_engine, select, update
from sqlalchemy.engine import make_url

from app.cli import alembic_config
from app.clock import SystemClock
from app.config import Config, normalize_database_url
from app.heroku.simulator import Settings as SimulatorSettings
from app.heroku.simulator import Simulator
from app.models import AccessRequest, IpRule, RequestStatus, Role
from app.runtime import build_runtime
from app.services import access, databases, grants, tokens
from app.services.identity import Principal

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
BIN = Path(sys.executable).parent
SIM_TOKEN = "bench-simulator-token"
TARGET_CREATE_SHARE = 0.60
TARGET_P99_MS = 50.0
TARGET_EXPIRY_P99_S = 2.0
RULES_PER_DATABASE = 50
TICKS = os.sysconf("SC_CLK_TCK")


# -- small helpers ---------------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summary_ms(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {}
    ms = [s * 1000 for s in seconds]
    return {
        "p50_ms": round(percentile(ms, 50), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(max(ms), 2),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def proc_status_kb(pid: int, key: str) -> int:
    """A `kB` field of /proc/<pid>/status, such as VmHWM (peak resident set) or VmRSS."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def proc_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of one process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


# -- scratch databases -----------------------------------------------------------------------------------


def create_database(admin_url: str, label: str) -> str:
    name = f"drawbridge_bench_{label}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(libpq(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    command.upgrade(alembic_config(url), "head")
    return url


def drop_database(admin_url: str, url: str) -> None:
    with psycopg.connect(libpq(admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')


def backend_pids(admin_url: str, url: str) -> list[int]:
    """PostgreSQL backends connected to the database of `url` (other than the one asking)."""
    with psycopg.connect(libpq(admin_url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (make_url(url).database,),
        ).fetchall()
    return [int(row[0]) for row in rows]


def server_version(admin_url: str) -> str:
    with psycopg.connect(libpq(admin_url), autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


# -- processes ---------------------------------------------------------------------------------------------


class SimulatorServer:
    """The Heroku simulator served over HTTP on loopback from a thread of this process."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.server: Any = waitress.create_server(sim, host="127.0.0.1", port=0, threads=8, ident="sim")
        self.url = f"http://127.0.0.1:{self.server.effective_port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> SimulatorServer:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.close()


@dataclass
class Service:
    """A child process (gunicorn or a worker) with its logs in files."""

    name: str
    proc: subprocess.Popen[bytes]
    out_path: Path
    err_path: Path
    port: int | None = None
    files: list[IO[bytes]] = field(default_factory=list)

    def pids(self) -> list[int]:
        return [self.proc.pid, *children(self.proc.pid)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in self.files:
            f.close()

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.err_path.read_text(errors="replace").splitlines()[-lines:])


def start(name: str, argv: list[str], env: dict[str, str], logs: Path, port: int | None = None) -> Service:
    out_path, err_path = logs / f"{name}.out.log", logs / f"{name}.err.log"
    out, err = out_path.open("wb"), err_path.open("wb")
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env={**os.environ, **env, "PYTHONPATH": path},
        stdout=out,
        stderr=err,
        stdin=subprocess.DEVNULL,
    )
    return Service(name, proc, out_path, err_path, port, [out, err])


def wait_healthy(service: Service, timeout: float = 60) -> None:
    assert service.port is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            raise RuntimeError(f"{service.name} exited:\n{service.tail()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{service.name} did not become healthy:\n{service.tail()}")


def gunicorn(name: str, app_path: str, env: dict[str, str], logs: Path, *extra: str) -> Service:
    port = free_port()
    argv = [str(BIN / "gunicorn"), "-c", str(ROOT / "gunicorn.conf.py"), *extra, app_path]
    return start(name, argv, {**env, "PORT": str(port)}, logs, port)


# -- load generation ---------------------------------------------------------------------------------------

RequestMaker = Callable[[int], tuple[str, str, bytes | None, dict[str, str]]]
SWEEP_LINE = re.compile(r"sweep took ([\d.]+)s: (\{[^}]*\})")
ACCESS_LINE = re.compile(r'"(\w+) (\S+) HTTP/[\d.]+" (\d{3}) \S+ (\d+)ms')


@dataclass
class LoadResult:
    op: str
    count: int
    seconds: float
    latencies: list[float]
    errors: Counter[int]
    first_error: str | None
    client_cpu_s: float
    web_cpu_s: float
    db_cpu_s: float
    server_ms: list[float]
    bodies: list[bytes | None]

    @property
    def rps(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0


def run_load(
    op: str,
    *,
    port: int,
    make: RequestMaker,
    count: int,
    concurrency: int,
    expect: int,
    web: Service,
    db_pids: Callable[[], list[int]],
    keep_bodies: bool = False,
) -> LoadResult:
    """`count` requests from `concurrency` threads, each on its own keep-alive connection."""
    counter = itertools.count()
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    bodies: list[bytes | None] = [None] * count if keep_bodies else []
    errors: Counter[int] = Counter()
    first_error: list[str] = []
    barrier = threading.Barrier(concurrency + 1)

    def client(slot: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        barrier.wait()
        while (i := next(counter)) < count:
            method, path, body, headers = make(i)
            started = time.perf_counter()
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                status = response.status
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                status, data = 0, repr(exc).encode()
            latencies[slot].append(time.perf_counter() - started)
            if status != expect:
                errors[status] += 1
                if not first_error:
                    first_error.append(f"{method} {path} -> {status}: {data[:300]!r}")
            if keep_bodies:
                bodies[i] = data
        conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(concurrency)]
    for t in threads:
        t.start()
    web_pids = web.pids()
    log_offset = web.out_path.stat().st_size
    web_cpu = sum(proc_cpu_seconds(p) for p in web_pids)
    before_db = {p: proc_cpu_seconds(p) for p in db_pids()}
    cpu = time.process_time()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    client_cpu = time.process_time() - cpu
    web_cpu = sum(proc_cpu_seconds(p) for p in web.pids()) - web_cpu
    db_cpu = sum(proc_cpu_seconds(p) - before_db.get(p, 0.0) for p in db_pids())
    time.sleep(0.3)  # let gunicorn flush the access log
    with web.out_path.open("rb") as log:
        log.seek(log_offset)
        server_ms = [float(m.group(4)) for m in ACCESS_LINE.finditer(log.read().decode(errors="replace"))]
    return LoadResult(
        op=op,
        count=count,
        seconds=seconds,
        latencies=[x for per in latencies for x in per],
        errors=errors,
        first_error=first_error[0] if first_error else None,
        client_cpu_s=client_cpu,
        web_cpu_s=web_cpu,
        db_cpu_s=db_cpu,
        server_ms=server_ms,
        bodies=bodies,
    )


def cidr(n: int) -> str:
    """A distinct public /32 for request n (inside 8.0.0.0/8, which is globally routable)."""
    return f"8.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}/32"


# -- 1. the API next to the floor ---------------------------------------------------------------------------


def api_phase(args: argparse.Namespace, admin_url: str, logs: Path) -> dict[str, Any]:
    url = create_database(admin_url, "api")
    services: list[Service] = []
    sim = Simulator(clock=SystemClock(), token=SIM_TOKEN, settings=SimulatorSettings())
    addon = sim.seed_demo()
    try:
        with SimulatorServer(sim) as heroku:
            runtime = build_runtime(Config(database_url=url))
            total = args.warmup + args.rounds * args.requests
            users = max(1, math.ceil(total / 90))
            with runtime.sessions() as session:

                def issue(user: str, role: str) -> str:
                    return tokens.create_token(session, user_name=user, roles=[role], clock=runtime.clock)[1]

                admin = issue("bench-admin", "admin")
                approver = issue("bench-approver", "approver")
                requesters = [issue(f"bench-user-{n:03d}", "requester") for n in range(users)]
            runtime.close()
            # The floor's table, made here so its gunicorn workers do not race to create it.
            floor_engine = create_engine(normalize_database_url(url))
            FloorBase.metadata.create_all(floor_engine)
            floor_engine.dispose()

            common = {"DATABASE_URL": url, "WEB_CONCURRENCY": str(args.web_workers)}
            drawbridge_env = {
                **common,
                "DRAWBRIDGE_RATE_LIMIT": "1000000/minute",
                "HEROKU_API_TOKEN": SIM_TOKEN,
                "HEROKU_API_URL": heroku.url,
                "HEROKU_DATA_API_URL": heroku.url,
            }
            web = gunicorn("drawbridge-web", "app.wsgi:app", drawbridge_env, logs)
            services.append(web)
            floor = gunicorn("floor-web", "floor_app:app", common, logs, "--pythonpath", str(BENCH))
            services.append(floor)
            wait_healthy(web)
            wait_healthy(floor)

            def auth(secret: str) -> dict[str, str]:
                return {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}

            conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=30)
            body = {"name": "bench", "app": addon.app_name, "addon": addon.name, "max_live_per_user": 100}
            conn.request("POST", "/databases", body=json.dumps(body), headers=auth(admin))
            answer = conn.getresponse()
            registered = answer.read()
            if answer.status != 201:
                raise RuntimeError(f"registering the database failed: {answer.status} {registered!r}")
            conn.close()

            created = itertools.count()

            def create(_i: int) -> tuple[str, str, bytes | None, dict[str, str]]:
                n = next(created)
                payload = {"database": "bench", "cidr": cidr(n), "duration": "1h", "reason": "INC-1 bench"}
                return "POST", "/access-requests", json.dumps(payload).encode(), auth(requesters[n % users])

            def insert(i: int) -> tuple[str, str, bytes | None, dict[str, str]]:
                payload = {"database": "bench", "cidr": cidr(i), "duration": "1h", "reason": "INC-1 bench"}
                return "POST", "/rows", json.dumps(payload).encode(), {"Content-Type": "application/json"}

            def db_pids() -> list[int]:
                return backend_pids(admin_url, url)

            def load(
                op: str, service: Service, make: RequestMaker, count: int, expect: int, keep: bool = False
            ) -> LoadResult:
                assert service.port is not None
                return run_load(
                    op,
                    port=service.port,
                    make=make,
                    count=count,
                    concurrency=args.concurrency,
                    expect=expect,
                    web=service,
                    db_pids=db_pids,
                    keep_bodies=keep,
                )

            def ids_of(result: LoadResult) -> list[str]:
                return [json.loads(b)["id"] for b in result.bodies if b and b.startswith(b"{")]

            load("warmup_floor", floor, insert, args.warmup, 201)
            warm_create = load("warmup_create", web, create, args.warmup, 201, keep=True)
            warm_ids = ids_of(warm_create)
            load(
                "warmup_get",
                web,
                lambda i: ("GET", f"/access-requests/{warm_ids[i]}", None, auth(approver)),
                len(warm_ids),
                200,
            )
            results: dict[str, list[LoadResult]] = {
                op: [] for op in ("floor", "create", "get", "list", "approve")
            }
            load_before = {}
            for round_no in range(args.rounds):
                load_before[f"round_{round_no + 1}"] = load_average()
                results["floor"].append(load("floor", floor, insert, args.requests, 201))
                made = load("create", web, create, args.requests, 201, keep=True)
                results["create"].append(made)
                ids = ids_of(made)
                results["get"].append(
                    load(
                        "get",
                        web,
                        lambda i, ids=ids: ("GET", f"/access-requests/{ids[i]}", None, auth(approver)),
                        len(ids),
                        200,
                    )
                )
                results["list"].append(
                    load(
                        "list",
                        web,
                        lambda i: ("GET", "/access-requests?status=pending&limit=50", None, auth(approver)),
                        args.list_requests,
                        200,
                    )
                )
                results["approve"].append(
                    load(
                        "approve",
                        web,
                        lambda i, ids=ids: (
                            "POST",
                            f"/access-requests/{ids[i]}/approve",
                            b'{"comment": "bench"}',
                            auth(approver),
                        ),
                        len(ids),
                        200,
                    )
                )
            memory = {
                "drawbridge_web": web_memory(web),
                "floor_web": web_memory(floor),
            }
    finally:
        for service in services:
            service.stop()
        drop_database(admin_url, url)
    return {"results": results, "memory": memory, "load_before": load_before}


def web_memory(service: Service) -> dict[str, Any]:
    workers = children(service.proc.pid)
    return {
        "master_peak_mb": round(proc_status_kb(service.proc.pid, "VmHWM") / 1024, 1),
        "worker_peak_mb": [round(proc_status_kb(p, "VmHWM") / 1024, 1) for p in workers],
        "worker_now_mb": [round(proc_status_kb(p, "VmRSS") / 1024, 1) for p in workers],
    }


def summarize_api(phase: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    ops: dict[str, Any] = {}
    for op, runs in phase["results"].items():
        latencies = [x for r in runs for x in r.latencies]
        server = [x / 1000 for r in runs for x in r.server_ms]
        count = sum(r.count for r in runs)
        errors: Counter[int] = Counter()
        for r in runs:
            errors.update(r.errors)
        ops[op] = {
            "requests": count,
            "rounds_rps": [round(r.rps, 1) for r in runs],
            "rps": round(statistics.median(r.rps for r in runs), 1),
            "client": summary_ms(latencies),
            "server": summary_ms(server),
            "errors": {str(k): v for k, v in errors.items()},
            "first_error": next((r.first_error for r in runs if r.first_error), None),
            "web_cpu_ms_per_request": round(sum(r.web_cpu_s for r in runs) / count * 1000, 3),
            "db_cpu_ms_per_request": round(sum(r.db_cpu_s for r in runs) / count * 1000, 3),
            "client_cpu_ms_per_request": round(sum(r.client_cpu_s for r in runs) / count * 1000, 3),
        }
    floor, create = ops["floor"], ops["create"]
    share = create["rps"] / floor["rps"] if floor["rps"] else 0.0
    return {
        "settings": {
            "concurrency": args.concurrency,
            "web_concurrency": args.web_workers,
            "threads_per_worker": 4,
            "requests_per_round": args.requests,
            "list_requests_per_round": args.list_requests,
            "rounds": args.rounds,
            "warmup": args.warmup,
        },
        "ops": ops,
        "create_share_of_floor": round(share, 3),
        "targets": {
            "create_share_of_floor": {
                "target": f">= {TARGET_CREATE_SHARE}",
                "met": share >= TARGET_CREATE_SHARE,
            },
            "create_p99_ms": {
                "target": f"< {TARGET_P99_MS}",
                "met": create["client"].get("p99_ms", math.inf) < TARGET_P99_MS,
            },
        },
        "memory": phase["memory"],
        "load_average_before": phase["load_before"],
    }


# -- 2. expiry precision -----------------------------------------------------------------------------------


def expiry_phase(args: argparse.Namespace, admin_url: str, logs: Path) -> dict[str, Any]:
    url = create_database(admin_url, "expiry")
    # Set-up spends Heroku's budget much faster than real use would: the bucket refills at once until the
    # grants are active, so the expiry starts with a full bucket and Heroku's refill rate.
    settings = SimulatorSettings(authorize_after=0.0, bucket_refill_per_minute=1e9)
    sim = Simulator(clock=SystemClock(), token=SIM_TOKEN, settings=settings)
    workers: list[Service] = []
    try:
        with SimulatorServer(sim) as heroku:
            config = Config(
                database_url=url,
                heroku_api_token=SIM_TOKEN,
                heroku_api_url=heroku.url,
                heroku_data_api_url=heroku.url,
            )
            runtime = build_runtime(config)
            clock = runtime.clock
            assert runtime.heroku is not None
            setup_started = time.perf_counter()
            ids: list[uuid.UUID] = []
            with runtime.sessions() as session:
                admin = tokens.ensure_user(session, name="bench-admin", clock=clock)
                approver = tokens.ensure_user(session, name="bench-approver", clock=clock)
                session.commit()
                as_admin = Principal(user_id=admin.id, name=admin.name, roles=frozenset({Role.ADMIN}))
                as_approver = Principal(
                    user_id=approver.id, name=approver.name, roles=frozenset({Role.APPROVER})
                )
                for k in range(math.ceil(args.grants / RULES_PER_DATABASE)):
                    addon = sim.add_addon(app=f"bench-app-{k}", name=f"postgresql-bench-{k}")
                    databases.register_database(
                        session,
                        principal=as_admin,
                        heroku=runtime.heroku,
                        name=f"bench-{k}",
                        app=addon.app_name,
                        addon=addon.name,
                        policy=databases.Policy(max_live_per_user=100),
                        min_duration=config.min_duration,
                        clock=clock,
                    )
                    user = tokens.ensure_user(session, name=f"bench-user-{k:03d}", clock=clock)
                    session.commit()
                    as_user = Principal(user_id=user.id, name=user.name, roles=frozenset({Role.REQUESTER}))
                    for j in range(min(RULES_PER_DATABASE, args.grants - k * RULES_PER_DATABASE)):
                        request = access.request_access(
                            session,
                            principal=as_user,
                            database=f"bench-{k}",
                            cidr=cidr(k * 256 + j),
                            duration="1h",
                            reason="bench",
                            min_duration=config.min_duration,
                            clock=clock,
                        )
                        access.approve(
                            session, principal=as_approver, request_id=request.id, comment=None, clock=clock
                        )
                        ids.append(request.id)
            quick_polls = grants.Settings(poll_interval=0.05)
            for _ in range(1000):
                grants.sweep(runtime.sessions, heroku=runtime.heroku, clock=clock, settings=quick_polls)
                if active_count(runtime, ids) == len(ids):
                    break
                time.sleep(0.06)
            else:
                raise RuntimeError("the grants did not all become active")
            setup_seconds = time.perf_counter() - setup_started

            due = clock.now() + timedelta(seconds=args.expiry_lead)
            jitter = random.Random(7)
            with runtime.sessions() as session:
                for request_id in ids:
                    session.execute(
                        update(AccessRequest)
                        .where(AccessRequest.id == request_id)
                        .values(expires_at=due + timedelta(seconds=jitter.random()), warned_at=clock.now())
                    )
                session.commit()
            runtime.heroku.refresh_budget()
            settings.bucket_refill_per_minute = SimulatorSettings().bucket_refill_per_minute
            budget_before = runtime.heroku.budget.remaining
            sim.reset_calls()

            env = {
                "DATABASE_URL": url,
                "HEROKU_API_TOKEN": SIM_TOKEN,
                "HEROKU_API_URL": heroku.url,
                "HEROKU_DATA_API_URL": heroku.url,
            }
            for n in range(args.expiry_workers):
                argv = [sys.executable, "-m", "app.cli", "worker"]
                workers.append(start(f"worker-{n + 1}", argv, env, logs))
            load_before = load_average()
            deadline = due + timedelta(seconds=args.expiry_timeout)
            cpu_at_due: dict[int, float] | None = None
            while clock.now() < deadline and len(sim.deleted) < len(ids):
                for worker in workers:
                    if worker.proc.poll() is not None:
                        raise RuntimeError(f"{worker.name} exited:\n{worker.tail()}")
                if cpu_at_due is None and clock.now() >= due:
                    pids = [w.proc.pid for w in workers] + backend_pids(admin_url, url)
                    cpu_at_due = {pid: proc_cpu_seconds(pid) for pid in pids}
                time.sleep(0.1)
            worker_pids = [w.proc.pid for w in workers]
            worker_cpu = sum(proc_cpu_seconds(p) - (cpu_at_due or {}).get(p, 0.0) for p in worker_pids)
            db_cpu = sum(
                proc_cpu_seconds(p) - (cpu_at_due or {}).get(p, 0.0) for p in backend_pids(admin_url, url)
            )
            memory = {
                w.name: {
                    "peak_mb": round(proc_status_kb(w.proc.pid, "VmHWM") / 1024, 1),
                    "now_mb": round(proc_status_kb(w.proc.pid, "VmRSS") / 1024, 1),
                }
                for w in workers
            }
            for worker in workers:
                worker.stop()
            sweeps = [
                {"worker": w.name, "took_s": float(m.group(1)), "counts": m.group(2)}
                for w in workers
                for m in SWEEP_LINE.finditer(w.err_path.read_text(errors="replace"))
            ]
            workers.clear()
            runtime.heroku.refresh_budget()
            budget_after = runtime.heroku.budget.remaining

            deletes = {
                c.path.rsplit("/", 1)[-1]: c.at
                for c in sim.calls
                if c.operation == "ip_rule_delete" and c.status < 300
            }
            with runtime.sessions() as session:
                rows = session.execute(
                    select(AccessRequest.expires_at, AccessRequest.ended_at, IpRule.heroku_rule_id)
                    .join(IpRule, AccessRequest.ip_rule_id == IpRule.id)
                    .where(AccessRequest.id.in_(ids))
                ).all()
            runtime.close()
            delete_lags = [
                (deletes[rule] - expires).total_seconds() for expires, _, rule in rows if rule in deletes
            ]
            expire_lags = [(ended - expires).total_seconds() for expires, ended, _ in rows if ended]
            calls = Counter(c.operation for c in sim.calls)
    finally:
        for worker in workers:
            worker.stop()
        drop_database(admin_url, url)

    def lag(values: list[float]) -> dict[str, float]:
        if not values:
            return {}
        return {
            "p50_s": round(percentile(values, 50), 3),
            "p99_s": round(percentile(values, 99), 3),
            "max_s": round(max(values), 3),
        }

    delete_p99 = percentile(delete_lags, 99) if delete_lags else math.inf
    return {
        "grants": len(ids),
        "databases": math.ceil(len(ids) / RULES_PER_DATABASE),
        "workers": args.expiry_workers,
        "sweep_interval_s": Config().sweep_interval,
        "setup_seconds": round(setup_seconds, 1),
        "deleted": len(delete_lags),
        "expired": len(expire_lags),
        "delete_lag": lag(delete_lags),
        "expire_lag": lag(expire_lags),
        "heroku_calls": dict(calls),
        "heroku_budget": {"before": budget_before, "after": budget_after},
        "worker_cpu_ms_per_grant": round(worker_cpu / max(1, len(ids)) * 1000, 2),
        "db_cpu_ms_per_grant": round(db_cpu / max(1, len(ids)) * 1000, 2),
        "worker_sweeps": sweeps,
        "target": {"delete_lag_p99_s": f"< {TARGET_EXPIRY_P99_S}", "met": delete_p99 < TARGET_EXPIRY_P99_S},
        "memory": memory,
        "load_average_before": load_before,
    }


def active_count(runtime: Any, ids: list[uuid.UUID]) -> int:
    with runtime.sessions() as session:
        return len(
            session.scalars(
                select(AccessRequest.id).where(
                    AccessRequest.id.in_(ids), AccessRequest.status == RequestStatus.ACTIVE
                )
            ).all()
        )


# -- 3. Heroku cost ----------------------------------------------------------------------------------------


def cost_phase(args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, str(BENCH / "heroku_cost.py"), "--requests", *map(str, args.cost_requests)]
    argv += ["--authorize-after", str(args.authorize_after)]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": path}, stdout=out, stderr=err
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"heroku_cost.py failed:\n{err.read().decode(errors='replace')[-2000:]}")
        reports = json.loads(out.read())
    polls_alone = math.ceil(args.authorize_after / 15.0)
    return {
        "command": " ".join(["bench/heroku_cost.py", *argv[2:]]),
        "reports": reports,
        "per_rule_polling_calls_per_request": 1 + polls_alone + 1,
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
    }


# -- report ------------------------------------------------------------------------------------------------


def peak_memory(report: dict[str, Any]) -> dict[str, list[float]]:
    """Peak RSS in MB of each process, by role."""
    peaks: dict[str, list[float]] = {}
    if "api" in report:
        for label, key in (("Drawbridge", "drawbridge_web"), ("floor", "floor_web")):
            web = report["api"]["memory"][key]
            peaks[f"gunicorn master ({label})"] = [web["master_peak_mb"]]
            peaks[f"gunicorn workers ({label}), after the API runs"] = web["worker_peak_mb"]
    if "expiry" in report:
        peaks["drawbridge worker processes, after the expiry run"] = [
            w["peak_mb"] for w in report["expiry"]["memory"].values()
        ]
    if "cost" in report:
        peaks["heroku_cost.py (worker, client, simulator)"] = [report["cost"]["peak_rss_mb"]]
    return peaks


def machine(admin_url: str) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "postgresql": server_version(admin_url),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_at_start": load_average(),
    }


def markdown(report: dict[str, Any], command_line: str) -> str:
    m = report["machine"]
    lines = [
        "# Drawbridge as a service",
        "",
        f"`{command_line}`",
        "",
        f"{m['when']}; {m['cpus']} CPUs shared with other work (load average {m['load_average_at_start']} "
        f"at the start), Python {m['python']}, PostgreSQL {m['postgresql']}.",
    ]
    api = report.get("api")
    if api:
        s = api["settings"]
        lines += [
            "",
            f"## 1. API under gunicorn ({s['web_concurrency']} workers x {s['threads_per_worker']} threads), "
            f"{s['concurrency']} client connections",
            "",
            f"{s['rounds']} rounds of {s['requests_per_round']:,} requests per operation "
            f"({s['list_requests_per_round']:,} for list) after {s['warmup']} of warm-up; requests/s is the "
            "median of the rounds; latencies over all rounds. Client latency includes the load generator "
            "(Python threads on the same 2 cores).",
            "",
            "| operation | req/s (rounds) | client p50 / p99 ms | server p50 / p99 ms | web CPU ms/req "
            "| PostgreSQL CPU ms/req | errors |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        names = {"floor": "floor: bare insert", "create": "create", "get": "get", "list": "list (50)"}
        for op, o in api["ops"].items():
            c, sv = o["client"], o["server"]
            lines.append(
                f"| {names.get(op, op)} | {o['rps']:,} ({', '.join(f'{x:,}' for x in o['rounds_rps'])}) "
                f"| {c.get('p50_ms')} / {c.get('p99_ms')} | {sv.get('p50_ms')} / {sv.get('p99_ms')} "
                f"| {o['web_cpu_ms_per_request']} | {o['db_cpu_ms_per_request']} | {o['errors'] or 'none'} |"
            )
        t = api["targets"]
        lines += [
            "",
            f"- create at {api['create_share_of_floor']:.0%} of the floor's requests/s (target >= 60 %: "
            f"{'met' if t['create_share_of_floor']['met'] else '**missed**'}); create p99 "
            f"{api['ops']['create']['client'].get('p99_ms')} ms (target < 50 ms: "
            f"{'met' if t['create_p99_ms']['met'] else '**missed**'}).",
        ]
    expiry = report.get("expiry")
    if expiry:
        d, e = expiry["delete_lag"], expiry["expire_lag"]
        busy = [b for b in expiry["worker_sweeps"] if "deleted" in b["counts"] or "expired" in b["counts"]]
        took = [b["took_s"] for b in busy]
        lines += [
            "",
            f"## 2. Expiry precision: {expiry['grants']:,} grants on {expiry['databases']} databases "
            f"expiring within one second, {expiry['workers']} worker processes",
            "",
            "| lag after expires_at | p50 s | p99 s | max s |",
            "|---|---:|---:|---:|",
            f"| request marked expired | {e.get('p50_s')} | {e.get('p99_s')} | {e.get('max_s')} |",
            f"| delete call at Heroku (simulator) | {d.get('p50_s')} | {d.get('p99_s')} | {d.get('max_s')} |",
            "",
            f"- {expiry['deleted']:,} of {expiry['grants']:,} rules deleted; sweep interval "
            f"{expiry['sweep_interval_s']} s; target p99 < 2 s: "
            f"{'met' if expiry['target']['met'] else '**missed**'}. Heroku calls: {expiry['heroku_calls']}.",
            f"- CPU from expiry to the last delete: {expiry['worker_cpu_ms_per_grant']} ms per grant in the "
            f"workers, {expiry['db_cpu_ms_per_grant']} ms in PostgreSQL.",
            f"- Worker sweeps that did something: {len(busy)}, each {min(took, default=0):g} to "
            f"{max(took, default=0):g} s; the busiest: {max(busy, key=lambda b: b['took_s'])['counts']}."
            if busy
            else "- No worker sweep reported any work.",
        ]
    cost = report.get("cost")
    if cost:
        lines += [
            "",
            f"## 3. Heroku cost (`{cost['command']}`)",
            "",
            "| requests pending at once on one database | calls per request, approval to deletion "
            "| polling each rule alone | expiry lag p50 / p99 s |",
            "|---|---:|---:|---:|",
        ]
        for r in cost["reports"]:
            calls = r["heroku_calls"]
            parts = ", ".join(f"{v / r['requests']:g} {k}" for k, v in sorted(calls.items()))
            lines.append(
                f"| {r['requests']} | {r['heroku_calls_per_request']} ({parts}) "
                f"| {cost['per_rule_polling_calls_per_request']} "
                f"| {r['expiry_lag_s']['median']} / {r['expiry_lag_s']['p99']} |"
            )
    memory = report.get("memory")
    if memory:
        lines += ["", "## 4. Memory", "", "| process | peak RSS (VmHWM), MB |", "|---|---:|"]
        for name, values in memory.items():
            lines.append(f"| {name} | {', '.join(str(v) for v in values)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes; print, write no results")
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--requests", type=int, default=1000, help="requests per operation per round")
    parser.add_argument("--list-requests", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--grants", type=int, default=1000)
    parser.add_argument("--expiry-workers", type=int, default=2)
    parser.add_argument("--expiry-lead", type=float, default=15.0, help="seconds from set-up to expiry")
    parser.add_argument("--expiry-timeout", type=float, default=120.0)
    parser.add_argument("--cost-requests", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--authorize-after", type=float, default=600.0)
    parser.add_argument(
        "--only", nargs="+", choices=["api", "expiry", "cost"], default=["api", "expiry", "cost"]
    )
    args = parser.parse_args()
    if args.quick:
        args.requests, args.list_requests, args.rounds, args.warmup = 200, 100, 1, 50
        args.grants, args.cost_requests = 100, [1, 5]
    admin_url = normalize_database_url(args.admin_url)
    command_line = ".venv/bin/python bench/service.py " + " ".join(sys.argv[1:])
    report: dict[str, Any] = {"machine": machine(admin_url), "command": command_line.strip()}
    with tempfile.TemporaryDirectory(prefix="drawbridge-bench-") as tmp:
        logs = Path(tmp)
        if "api" in args.only:
            report["api"] = summarize_api(api_phase(args, admin_url, logs), args)
        if "expiry" in args.only:
            report["expiry"] = expiry_phase(args, admin_url, logs)
        if "cost" in args.only:
            report["cost"] = cost_phase(args)
    report["memory"] = peak_memory(report)
    text = markdown(report, command_line.strip())
    print(json.dumps(report, indent=2))
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "service.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / "service.md").write_text(text)


if __name__ == "__main__":
    main()
