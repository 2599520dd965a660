"""The deploy files name only what exists: the commands of the Dockerfile, Procfile and app.json resolve to
console scripts, `drawbridge` subcommands and an importable WSGI app; app.json's config vars are the ones
Drawbridge reads; the image runs as a non-root user with a health check; gunicorn really serves on $PORT."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import click
import pytest

from app.cli import main as drawbridge_cli
from app.config import Config

ROOT = Path(__file__).resolve().parents[2]
DESIGN = ROOT.parent / "shared" / "DESIGN.md"
BIN = Path(sys.executable).parent
# Set by the platform or read by gunicorn.conf.py, not by Drawbridge itself.
PLATFORM_VARS = {"PORT", "WEB_CONCURRENCY"}


# -- parsing the deploy files ---------------------------------------------------------------------------


def procfile() -> dict[str, str]:
    entries: dict[str, str] = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, command = line.partition(":")
            entries[name.strip()] = command.strip()
    return entries


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, arguments = line.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def docker_argv(form: str) -> list[str]:
    """A CMD, ENTRYPOINT or HEALTHCHECK CMD as an argv: exec form (JSON) or shell form."""
    if form.startswith("["):
        argv: list[str] = json.loads(form)
        return argv
    return ["/bin/sh", "-c", form]


def healthcheck_argv() -> list[str]:
    checks = [args for keyword, args in dockerfile() if keyword == "HEALTHCHECK"]
    assert checks, "the Dockerfile has no HEALTHCHECK"
    options, _, command = checks[-1].partition("CMD ")
    assert command, f"HEALTHCHECK without CMD: {checks[-1]!r}"
    assert all(option.startswith("--") for option in options.split()), options
    return docker_argv(command.strip())


def app_json() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ROOT / "app.json").read_text())
    return data


def config_vars_read() -> set[str]:
    """Every environment variable `Config.from_env` looks at, recorded while it reads an empty environment."""

    class Recorder(dict[str, str]):
        def __init__(self) -> None:
            super().__init__()
            self.names: set[str] = set()

        def get(self, key: str, default: Any = None) -> Any:
            self.names.add(key)
            return super().get(key, default)

        def __getitem__(self, key: str) -> str:
            self.names.add(key)
            return super().__getitem__(key)

        def __contains__(self, key: object) -> bool:
            self.names.add(str(key))
            return super().__contains__(key)

    recorder = Recorder()
    Config.from_env(recorder)
    return set(recorder.names)


# -- resolving the commands they name ------------------------------------------------------------------


def shell_commands(script: str) -> Iterator[list[str]]:
    """The simple commands of a `sh -c` script joined by && or ;, without `exec` and the `:` builtin."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    command: list[str] = []
    for token in [*lexer, ";"]:
        if token in ("&&", ";", "||"):
            if command and command[0] == "exec":
                command = command[1:]
            if command and command[0] != ":":
                yield command
            command = []
        else:
            command.append(token)


def check_drawbridge(argv: list[str]) -> None:
    """Walk click's command tree, then parse the leaf command's options exactly as click would."""
    command: click.Command = drawbridge_cli
    args = argv[1:]
    path = ["drawbridge"]
    while isinstance(command, click.Group):
        assert args and not args[0].startswith("-"), f"{shlex.join(argv)}: no subcommand of {path}"
        name = args.pop(0)
        sub = command.get_command(click.Context(command), name)
        assert sub is not None, f"{shlex.join(argv)}: {' '.join(path)} has no subcommand {name!r}"
        command = sub
        path.append(name)
    command.make_context(" ".join(path), list(args))


def check_gunicorn(argv: list[str]) -> None:
    from gunicorn.config import Config as GunicornConfig

    options = GunicornConfig().parser().parse_args(argv[1:])
    assert options.config, f"{shlex.join(argv)}: gunicorn should be given gunicorn.conf.py"
    assert (ROOT / options.config).is_file(), f"{options.config} does not exist"
    assert len(options.args) == 1 and re.fullmatch(r"[\w.]+:\w+", options.args[0]), options.args
    module, attribute = options.args[0].split(":")
    probe = f"import {module}; assert callable({module}.{attribute})"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": "sqlite://"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"{options.args[0]} is not an importable WSGI app: {result.stderr}"


def check_command(argv: list[str]) -> None:
    assert argv, "an empty command"
    program = argv[0]
    if program in ("sh", "/bin/sh") and argv[1:2] == ["-c"]:
        for command in shell_commands(argv[2]):
            check_command(command)
        return
    if program == "python":
        assert argv[1] == "-c", argv
        compile(argv[2], "<command>", "exec")
        return
    scripts = {ep.name for ep in entry_points(group="console_scripts")}
    assert program in scripts, f"{program!r} is not a console script of an installed package"
    if program == "drawbridge":
        check_drawbridge(argv)
    elif program == "gunicorn":
        check_gunicorn(argv)
    else:
        pytest.fail(f"{shlex.join(argv)}: only drawbridge and gunicorn are expected in the deploy files")


def deploy_commands() -> list[tuple[str, list[str]]]:
    named = [(f"Procfile {name}", shlex.split(command)) for name, command in procfile().items()]
    for keyword, arguments in dockerfile():
        if keyword in ("CMD", "ENTRYPOINT"):
            named.append((f"Dockerfile {keyword}", docker_argv(arguments)))
    named.append(("Dockerfile HEALTHCHECK", healthcheck_argv()))
    named += [(f"app.json script {n}", shlex.split(c)) for n, c in app_json().get("scripts", {}).items()]
    return named


# -- the tests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("where", "argv"), deploy_commands(), ids=[where for where, _ in deploy_commands()])
def test_every_command_the_deploy_files_name_exists(where: str, argv: list[str]) -> None:
    check_command(argv)


def test_a_misspelt_command_would_be_caught() -> None:
    with pytest.raises(AssertionError, match="no subcommand 'upgrades'"):
        check_command(["drawbridge", "db", "upgrades"])
    with pytest.raises(click.UsageError):
        check_command(["drawbridge", "tokens", "create", "--user", "root", "--role", "superuser"])
    with pytest.raises(AssertionError, match="console script"):
        check_command(["sh", "-c", "drawbridge db upgrade && exec uwsgi app.wsgi"])


def test_procfile_migrates_in_the_release_phase_and_runs_web_and_worker() -> None:
    entries = procfile()
    assert set(entries) == {"release", "web", "worker"}
    assert shlex.split(entries["release"]) == ["drawbridge", "db", "upgrade"]
    assert shlex.split(entries["worker"]) == ["drawbridge", "worker"]
    assert shlex.split(entries["web"])[0] == "gunicorn"


def test_app_json_deploys_web_and_worker_with_postgres_and_the_python_buildpack() -> None:
    data = app_json()
    assert set(data["formation"]) == set(procfile()) - {"release"}
    assert all(f["quantity"] >= 1 for f in data["formation"].values())
    addons = {a["plan"].split(":")[0]: a for a in data["addons"]}
    assert addons["heroku-postgresql"].get("as", "DATABASE") == "DATABASE"
    assert [b["url"] for b in data["buildpacks"]] == ["heroku/python"]
    # The Python buildpack installs from requirements.txt and picks Python from .python-version.
    assert (ROOT / "requirements.txt").read_text().split() == ["-e", "."]
    version = (ROOT / ".python-version").read_text().strip()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    minimum = project["requires-python"].removeprefix(">=")
    assert tuple(map(int, version.split("."))) >= tuple(map(int, minimum.split(".")))


def test_app_json_config_vars_are_exactly_the_ones_drawbridge_reads() -> None:
    env = app_json()["env"]
    read = config_vars_read()
    # DATABASE_URL is set by the heroku-postgresql add-on attached as DATABASE.
    missing, unknown = read - {"DATABASE_URL"} - set(env), set(env) - read
    assert not missing, f"add {sorted(missing)} to app.json's env, with a description"
    assert not unknown, f"app.json sets {sorted(unknown)}, which Drawbridge does not read"
    for name, spec in env.items():
        assert spec.get("description"), f"{name} has no description"
        assert isinstance(spec.get("required"), bool), f"{name} does not say whether it is required"
    required = {name for name, spec in env.items() if spec["required"]}
    assert required == {"HEROKU_API_TOKEN"}
    defaults = {name: spec["value"] for name, spec in env.items() if "value" in spec}
    Config.from_env(defaults)


def test_every_variable_of_design_md_is_read_by_the_configuration() -> None:
    if not DESIGN.is_file():
        pytest.skip("shared/DESIGN.md is not beside this checkout")
    text = DESIGN.read_text()
    environment = text[text.index("Environment:") :].split("\n\n", 1)[0]
    named = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", environment))
    assert named, "no variables found in DESIGN.md's Environment paragraph"
    assert named <= config_vars_read(), f"DESIGN.md names {sorted(named - config_vars_read())}"


def test_readme_configuration_table_lists_every_variable() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Configuration") :].split("\n## ", 2)[1]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    listed = {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1])}
    missing = (config_vars_read() | PLATFORM_VARS) - listed
    assert not missing, f"add {sorted(missing)} to the README's Configuration table"


def test_dockerfile_runs_as_a_non_root_user_with_a_health_check_and_migrates_first() -> None:
    instructions = dockerfile()
    stages = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    final = instructions[stages[-1] :]
    users = [args for keyword, args in final if keyword == "USER"]
    assert users, "the final stage sets no USER, so it runs as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]
    assert all(keyword != "HEALTHCHECK" or args != "NONE" for keyword, args in final)
    assert "/healthz" in " ".join(healthcheck_argv())
    base = final[0][1]
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", base), f"final stage should be a slim image: {base}"

    (cmd,) = [docker_argv(args) for keyword, args in final if keyword == "CMD"]
    commands = [c[:3] for c in shell_commands(cmd[2])] if cmd[:2] == ["sh", "-c"] else [cmd[:3]]
    assert commands[0] == ["drawbridge", "db", "upgrade"]
    assert commands[-1][0] == "gunicorn"


def test_dockerignore_keeps_the_venv_and_git_out_but_not_what_the_image_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        parts = Path(path).parts
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        return any(
            fnmatch.fnmatch(prefix, pattern.removeprefix("**/"))
            or fnmatch.fnmatch(Path(prefix).name, pattern.removeprefix("**/"))
            for pattern in patterns
            for prefix in prefixes
        )

    assert ignored(".venv/bin/python") and ignored(".git/HEAD")
    assert ignored("drawbridge.db") and ignored("app/__pycache__/cli.cpython-311.pyc")
    copied = [
        source
        for keyword, args in dockerfile()
        if keyword == "COPY" and "--from=" not in args
        for source in args.split()[:-1]
    ]
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
        assert not ignored(source), f".dockerignore leaves {source} out, but the Dockerfile copies it"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _program(name: str) -> str:
    if name == "python":
        return sys.executable
    local = BIN / name
    found = str(local) if local.exists() else shutil.which(name)
    assert found, f"{name} is not installed"
    return found


def test_gunicorn_serves_the_api_on_port_and_the_health_check_passes(tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "WEB_CONCURRENCY": "1",
        "DATABASE_URL": f"sqlite:///{tmp_path}/drawbridge.db",
    }
    argv = [os.path.expandvars(arg) for arg in shlex.split(procfile()["web"])]
    check = healthcheck_argv()
    server = subprocess.Popen(
        [_program(argv[0]), *argv[1:]],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            result = subprocess.run(
                [_program(check[0]), *check[1:]], env=env, capture_output=True, text=True, timeout=30
            )
            if result.returncode == 0:
                break
            assert server.poll() is None, f"gunicorn exited: {server.communicate()[1]}"
            assert time.monotonic() < deadline, f"the health check kept failing: {result.stderr}"
            time.sleep(0.2)
    finally:
        server.terminate()
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    assert "GET /healthz" in out, "the access log should go to stdout"
    assert f"Listening at: http://0.0.0.0:{port}" in err


@pytest.mark.skipif(
    os.environ.get("DRAWBRIDGE_TEST_DOCKER") != "1",
    reason="building the image needs Docker and a registry to pull from; set DRAWBRIDGE_TEST_DOCKER=1",
)
def test_the_image_builds_and_runs_as_a_non_root_user() -> None:
    tag = "drawbridge-packaging-test"
    build = subprocess.run(["docker", "build", "-t", tag, str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    whoami = subprocess.run(["docker", "run", "--rm", tag, "id", "-u"], capture_output=True, text=True)
    assert whoami.stdout.strip() not in ("", "0"), whoami.stderr
    help_text = subprocess.run(
        ["docker", "run", "--rm", tag, "drawbridge", "--help"], capture_output=True, text=True
    )
    assert "worker" in help_text.stdout, help_text.stderr
