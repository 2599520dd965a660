"""The `drawbridge` command: serve the API, migrate, manage tokens and users, run the Heroku simulator."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from app.config import Config, ConfigError

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
log = logging.getLogger("drawbridge")


def _setup_logging(config: Config) -> None:
    """One line per event on stderr: JSON unless DRAWBRIDGE_LOG_FORMAT=text, secrets masked."""
    from app import logs

    logs.configure_for(config)


def _config(**overrides: Any) -> Config:
    try:
        config = Config.from_env()
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None
    if overrides:
        from dataclasses import replace

        config = replace(config, **overrides)
    return config


@click.group()
def main() -> None:
    """Drawbridge: temporary, approved, audited access to Heroku Postgres over mTLS."""


SIMULATE = click.option(
    "--simulate", is_flag=True, help="Talk to the built-in Heroku simulator instead of Heroku."
)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--threads", default=8, show_default=True, type=click.IntRange(1, 64))
@click.option("--with-worker", is_flag=True, help="Also run the worker in this process.")
@SIMULATE
def serve(host: str, port: int, threads: int, with_worker: bool, simulate: bool) -> None:
    """Serve the REST API with a production WSGI server (waitress), for single-node deployments."""
    import signal

    import waitress

    from app import create_app
    from app.runtime import build_runtime
    from app.worker import Worker

    config = _config(simulate=simulate)
    _setup_logging(config)
    runtime = build_runtime(config)
    app = create_app(runtime=runtime)
    try:
        background = Worker(runtime) if with_worker else None
    except RuntimeError as exc:
        runtime.close()
        raise click.ClickException(str(exc)) from None

    def on_term(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    if background is not None:
        background.start()
    log.info("Drawbridge API on http://%s:%s", host, port)
    try:
        waitress.serve(app, host=host, port=port, threads=threads, ident="drawbridge")
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        if background is not None:
            background.stop()
        runtime.close()


@main.command()
@SIMULATE
def worker(simulate: bool) -> None:
    """Run the worker: create, watch and delete Heroku IP rules and end requests on time.

    SIGTERM finishes the work in hand, then exits."""
    from app.runtime import build_runtime
    from app.worker import Worker, run_until_signalled

    config = _config(simulate=simulate)
    _setup_logging(config)
    runtime = build_runtime(config)
    try:
        run_until_signalled(Worker(runtime))
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        runtime.close()


@main.group()
def db() -> None:
    """Database schema management."""


def alembic_config(url: str) -> Any:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig(str(MIGRATIONS.parent / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["url"] = url
    return cfg


@db.command()
def upgrade() -> None:
    """Apply Alembic migrations up to the newest revision."""
    from alembic import command

    config = _config()
    _setup_logging(config)
    command.upgrade(alembic_config(config.database_url), "head")
    click.echo("database is at the newest revision", err=True)


@main.group()
def tokens() -> None:
    """API tokens."""


@tokens.command("create")
@click.option("--user", "user_name", required=True, help="User the token authenticates as.")
@click.option(
    "--role",
    "roles",
    required=True,
    multiple=True,
    type=click.Choice(["requester", "approver", "auditor", "admin", "bot"]),
    help="Role granted to the token; repeat for several.",
)
def tokens_create(user_name: str, roles: tuple[str, ...]) -> None:
    """Create a token and print its secret, alone, on stdout. It is shown only once."""
    from app.runtime import build_runtime
    from app.services import tokens as token_service
    from app.services.errors import DomainError

    rt = build_runtime(_config())
    try:
        with rt.sessions() as session:
            row, secret = token_service.create_token(
                session, user_name=user_name, roles=roles, clock=rt.clock
            )
    except DomainError as exc:
        raise click.ClickException(exc.message) from None
    finally:
        rt.close()
    click.echo(f"created token {row.id} for {user_name}", err=True)
    click.echo(secret)


@tokens.command("revoke")
@click.argument("token")
def tokens_revoke(token: str) -> None:
    """Revoke a token, given its id (the part after `dbt_`) or the whole token."""
    from app.runtime import build_runtime
    from app.services import tokens as token_service
    from app.services.errors import DomainError

    rt = build_runtime(_config())
    try:
        with rt.sessions() as session:
            row = token_service.revoke_token(session, token=token, clock=rt.clock)
    except DomainError as exc:
        raise click.ClickException(exc.message) from None
    finally:
        rt.close()
    click.echo(f"token {row.id} is revoked", err=True)


@main.group()
def users() -> None:
    """Drawbridge users."""


@users.command("link-slack")
@click.option("--user", "user_name", required=True, help="Drawbridge user (created if new).")
@click.option("--slack-user-id", required=True, help="The Slack member id, such as U024BE7LH.")
def users_link_slack(user_name: str, slack_user_id: str) -> None:
    """Map a Slack user to a Drawbridge user, so `/drawbridge` and the Slack buttons act as them."""
    from app.runtime import build_runtime
    from app.services import tokens as token_service
    from app.services import users as user_service
    from app.services.errors import DomainError

    rt = build_runtime(_config())
    try:
        with rt.sessions() as session:
            user_service.link_slack(
                session,
                principal=token_service.CLI,
                user_name=user_name,
                slack_user_id=slack_user_id,
                clock=rt.clock,
            )
    except DomainError as exc:
        raise click.ClickException(exc.message) from None
    finally:
        rt.close()
    click.echo(f"Slack user {slack_user_id} is linked to {user_name}", err=True)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5099, show_default=True, type=click.IntRange(0, 65535))
@click.option("--token", default="simulator-token", show_default=True, help="API token it accepts.")
@click.option(
    "--authorize-after", default=20.0, show_default=True, help="Seconds a new rule stays Authorizing."
)
@click.option("--rule-limit", default=60, show_default=True, type=click.IntRange(1, 1000))
@click.option("--duplicate-cidr", type=click.Choice(["reject", "allow"]), default="reject", show_default=True)
@click.option("--readd-window", default=0.0, show_default=True, help="Seconds a deleted CIDR answers 500.")
@click.option("--timestamp-format", type=click.Choice(["iso", "heroku"]), default="iso", show_default=True)
@click.option("--delete-answer", type=click.Choice(["200", "204"]), default="200", show_default=True)
@click.option("--fault-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1))
@click.option("--slow-seconds", default=0.0, show_default=True, help="Delay added to every answer.")
@click.option("--seed", type=int, default=None, help="Seed for the fault dice.")
def simulator(
    host: str,
    port: int,
    token: str,
    authorize_after: float,
    rule_limit: int,
    duplicate_cidr: str,
    readd_window: float,
    timestamp_format: str,
    delete_answer: str,
    fault_rate: float,
    slow_seconds: float,
    seed: int | None,
) -> None:
    """Serve the Heroku API simulator (with the demo add-on `postgresql-demo` of app `demo-app`)."""
    import waitress

    from app.clock import SystemClock
    from app.heroku.simulator import Settings, Simulator

    _setup_logging(_config())
    settings = Settings(
        authorize_after=authorize_after,
        rule_limit=rule_limit,
        duplicate_cidr=duplicate_cidr,  # type: ignore[arg-type]
        readd_window=readd_window,
        timestamp_format=timestamp_format,  # type: ignore[arg-type]
        delete_answer=int(delete_answer),  # type: ignore[arg-type]
        fault_rate=fault_rate,
        slow_seconds=slow_seconds,
        seed=seed,
    )
    sim = Simulator(clock=SystemClock(), token=token, settings=settings)
    addon = sim.seed_demo()
    log.warning(
        "Heroku simulator on http://%s:%s (demo add-on %s of app %s): no real access is granted",
        host,
        port,
        addon.name,
        addon.app_name,
    )
    waitress.serve(sim, host=host, port=port, threads=8, ident="heroku-simulator")


@main.group()
def audit() -> None:
    """The audit log: verify its hash chain, export it."""


@audit.command("verify")
def audit_verify() -> None:
    """Check the audit log's hash chain; exit 0 when intact, 1 with the first broken link otherwise."""
    import json

    from app.runtime import build_runtime
    from app.services import audit as audit_service

    rt = build_runtime(_config())
    try:
        with rt.sessions() as session:
            result = audit_service.verify(session)
    finally:
        rt.close()
    click.echo(
        json.dumps(
            {"ok": result.ok, "count": result.count, "head": result.head, "first_broken": result.first_broken}
        )
    )
    if not result.ok:
        raise SystemExit(1)


def _moment(value: str | None) -> Any:
    from datetime import UTC, datetime

    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 time such as 2026-03-01T00:00:00Z") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


@audit.command("export")
@click.option("--format", "fmt", type=click.Choice(["csv", "ndjson"]), required=True)
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--since", help="Events at or after this time (ISO 8601; UTC when no offset is given).")
@click.option("--until", help="Events before this time.")
def audit_export(fmt: str, output: Path, since: str | None, until: str | None) -> None:
    """Export audit events to a file, with the chain head in OUTPUT.chain.json so it can be checked later."""
    import json

    from app.runtime import build_runtime
    from app.services import export
    from app.services.audit import EventFilter

    filters = EventFilter(since=_moment(since), until=_moment(until))
    rt = build_runtime(_config())
    try:
        with rt.sessions() as session, output.open("wb") as out:
            if sys.stderr.isatty():
                total = export.count(session, filters)
                with click.progressbar(length=total, label="exporting", file=sys.stderr) as bar:
                    summary = export.write(session, out, fmt=fmt, filters=filters, progress=bar.update)
            else:
                summary = export.write(session, out, fmt=fmt, filters=filters)
    finally:
        rt.close()
    sidecar = output.with_name(output.name + ".chain.json")
    sidecar.write_text(json.dumps(summary, indent=2) + "\n")
    click.echo(f"wrote {summary['count']} events to {output} (chain head in {sidecar})", err=True)


@main.command()
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to a file.")
def openapi(output: Path | None) -> None:
    """Print (or write) the OpenAPI document that the API serves."""
    text = render_openapi()
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)


def render_openapi() -> str:
    from app import create_app

    app = create_app(Config(database_url="sqlite://"))
    spec = app.extensions["drawbridge_api"].spec.to_dict()
    return yaml.safe_dump(spec, sort_keys=True, allow_unicode=True, width=100)


if __name__ == "__main__":  # pragma: no cover
    main()
