"""Dockerfile, compose.yaml and the systemd unit: they parse and name only what exists.

CI machines have no Docker engine, so the images are not built here (docs/deploy.md says how
they were tried). These checks catch what breaks silently: a COPY of a moved folder, a
compose file whose NapCat is pointed at the wrong path or token, an env name drawbridge does
not read, a unit that would restart forever on a settings error.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import yaml

from bot.config import Settings

ROOT = Path(__file__).resolve().parent.parent
# nonebot's own settings, read by its driver rather than by our Settings class.
NONEBOT_NAMES = {"HOST", "PORT", "ONEBOT_ACCESS_TOKEN"}


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    steps = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            steps.append((word.upper(), rest.strip()))
    return steps


def _env_names() -> set[str]:
    names = set(NONEBOT_NAMES)
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        choices = getattr(alias, "choices", [alias] if isinstance(alias, str) else [])
        names.update(c.upper() for c in choices if isinstance(c, str) and c.isupper())
    return names


def test_dockerfile_copies_only_existing_paths_and_runs_the_bot_unprivileged() -> None:
    steps = _dockerfile()
    assert steps[0][0] == "FROM" and "slim" in steps[0][1]
    copies = [args for op, args in steps if op == "COPY"]
    assert copies
    for args in copies:
        *sources, _target = shlex.split(args)
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies missing path {source}"
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for pattern in packages["packages"]["find"]["include"]:
        folder = pattern.rstrip("*")
        assert any(folder in args for args in copies), f"the image lacks the {folder} package"
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    # The entry point is the console script pyproject declares.
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entry = json.loads(next(args for op, args in steps if op == "ENTRYPOINT"))
    command = json.loads(next(args for op, args in steps if op == "CMD"))
    assert entry[0] in scripts and command == ["run"]
    # Data goes to the volume.
    volume = json.loads(next(args for op, args in steps if op == "VOLUME"))
    env = " ".join(args for op, args in steps if op == "ENV")
    assert f"DRAWBRIDGE_DATA_DIR={volume[0]}" in env


def test_dockerignore_keeps_what_the_image_copies() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for args in (args for op, args in _dockerfile() if op == "COPY"):
        for source in shlex.split(args)[:-1]:
            assert source not in ignored
    assert {".env", "data", ".git"} <= ignored  # secrets and the database stay out


def test_compose_wires_napcat_to_drawbridge_with_the_shared_token() -> None:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    bot = compose["services"]["drawbridge"]
    napcat = compose["services"]["napcat"]
    assert (ROOT / bot["build"] / "Dockerfile").is_file()
    env = bot["environment"]
    assert set(env) <= _env_names(), set(env) - _env_names()
    assert env["QQ_ENABLED"] == "true"
    # The endpoint leaves loopback, so the token must be required, not optional.
    assert env["HOST"] == "0.0.0.0"
    assert re.fullmatch(r"\$\{ONEBOT_ACCESS_TOKEN:\?.+\}", env["ONEBOT_ACCESS_TOKEN"])
    # Data in a named volume mounted where DRAWBRIDGE_DATA_DIR points.
    data_volume, _, mount = bot["volumes"][0].partition(":")
    assert data_volume in compose["volumes"] and mount == env["DRAWBRIDGE_DATA_DIR"]
    for volume in napcat["volumes"]:
        assert volume.partition(":")[0] in compose["volumes"]
    # NapCat's OneBot template: a reverse WebSocket to the drawbridge service, same token.
    target = napcat["configs"][0]
    content = compose["configs"][target["source"]]["content"]
    onebot = json.loads(content.replace("${ONEBOT_ACCESS_TOKEN}", "t0ken"))
    (client,) = onebot["network"]["websocketClients"]
    assert client["enable"] is True
    assert client["url"] == f"ws://drawbridge:{env['PORT']}/onebot/v11/ws"
    assert client["token"] == "t0ken"
    assert client["messagePostFormat"] == "array"
    assert target["target"].endswith("/napcat/config/onebot11.json")
    # NapCat's web UI is published on loopback only.
    assert all(p.startswith("127.0.0.1:") for p in napcat["ports"])


def test_systemd_unit_restarts_on_exit_1_but_not_on_bad_settings() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "deploy" / "drawbridge.service")
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "drawbridge" and argv[1] == "run"
    assert "--env-file" in argv
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"
    assert service["UMask"] == "0077"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_compose_postgres_variant_points_every_process_at_the_postgres_service() -> None:
    base: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    variant: dict[str, Any] = yaml.safe_load((ROOT / "compose.postgres.yaml").read_text())
    postgres = variant["services"]["postgres"]
    pg_env = postgres["environment"]
    assert re.fullmatch(r"\$\{POSTGRES_PASSWORD:\?.+\}", pg_env["POSTGRES_PASSWORD"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert not postgres.get("ports")  # the database stays on the compose network
    bots = {name: service for name, service in variant["services"].items() if name != "postgres"}
    assert "drawbridge" in base["services"] and set(bots) == {"drawbridge", "drawbridge-telegram"}
    for service in bots.values():
        env = service["environment"]
        assert set(env) <= _env_names(), set(env) - _env_names()
        url = env["DRAWBRIDGE_DATABASE_URL"].replace("${POSTGRES_PASSWORD}", "pw")
        assert url == (
            f"postgresql://{pg_env['POSTGRES_USER']}:pw@postgres:5432/{pg_env['POSTGRES_DB']}"
        )
        Settings(database_url=url)  # a URL the bot accepts
        # Every process reads users' keys with one secret: required, not per-volume files.
        assert re.fullmatch(r"\$\{DRAWBRIDGE_SECRET_KEY:\?.+\}", env["DRAWBRIDGE_SECRET_KEY"])
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    second = bots["drawbridge-telegram"]
    assert second["profiles"] == ["telegram"] and second["env_file"] == ".env"
    data_volume, _, mount = second["volumes"][0].partition(":")
    assert (
        data_volume in variant["volumes"] and mount == second["environment"]["DRAWBRIDGE_DATA_DIR"]
    )
    assert postgres["volumes"][0].partition(":")[0] in variant["volumes"]
