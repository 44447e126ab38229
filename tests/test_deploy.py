"""The Dockerfile and docker-compose.yml agree with the real CLI: commands, flags, ports, paths.

No Docker engine runs here, so the files are parsed and every command they run is checked against
the click commands it would invoke (flags exist, values parse), and ports and paths against the
server's defaults.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import click
import pytest

from search import DEFAULT_HTTP_PORT, DEFAULT_PORT
from search.cli import serve
from search.healthcheck import main as healthcheck

yaml = pytest.importorskip("yaml", reason="PyYAML (dev extra) parses docker-compose.yml")

ROOT = Path(__file__).resolve().parent.parent


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def exec_form(arguments: str) -> list[str]:
    assert arguments.startswith("["), f"use the exec (JSON array) form so signals reach the server: {arguments}"
    return json.loads(arguments)


def parse_with(command: click.Command, args: list[str]) -> dict:
    """Parse ``args`` exactly as the real command would (unknown flags and bad values fail)."""
    ctx = command.make_context(command.name or "command", list(args), resilient_parsing=False)
    return ctx.params


def serve_args_of(command: list[str]) -> list[str]:
    assert command[:2] == ["matchmap", "serve"], f"expected `matchmap serve ...`, got {command}"
    return command[2:]


def healthcheck_args_of(command: list[str]) -> list[str]:
    assert command[:3] == ["python", "-m", "search.healthcheck"], f"unexpected health probe {command}"
    return command[3:]


def test_dockerfile_runs_the_real_serve_command_on_the_default_port():
    instructions = dockerfile_instructions()
    single = {k: v for k, v in instructions}
    assert single["FROM"] == "python:3.11-slim-bookworm"
    entrypoint, cmd = exec_form(single["ENTRYPOINT"]), exec_form(single["CMD"])
    params = parse_with(serve, serve_args_of(entrypoint + cmd))
    assert [params["port"], params["http_port"]] == [DEFAULT_PORT, DEFAULT_HTTP_PORT] == [int(p) for p in single["EXPOSE"].split()]
    assert not params["no_http"]
    assert str(params["data_dir"]) in single["VOLUME"]
    assert f"MATCHMAP_DATA_DIR={params['data_dir']}" in single["ENV"].replace(" ", "")
    assert single["STOPSIGNAL"] == "SIGTERM"
    probe = exec_form(single["HEALTHCHECK"].split("CMD", 1)[1].strip())
    probe_params = parse_with(healthcheck, healthcheck_args_of(probe))
    assert probe_params["target"] == f"localhost:{DEFAULT_PORT}"
    # every package the server imports is copied into the image before `pip install .`
    copied = {args.split()[0] for keyword, args in instructions if keyword == "COPY"}
    for package in ("matchmap", "encoders", "indexer", "search", "protos", "pyproject.toml"):
        assert package in copied, f"the Dockerfile does not COPY {package}"


def test_compose_services_use_real_flags_ports_volumes_and_health_probe():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    entrypoint = exec_form(dict(dockerfile_instructions())["ENTRYPOINT"])
    servers = {name: s for name, s in compose["services"].items() if name.startswith("search")}
    assert set(servers) == {"search", "search-pg"}
    for name, service in servers.items():
        params = parse_with(serve, serve_args_of(entrypoint + service["command"]))
        host_port, container_port = service["ports"][0].split(":")
        assert int(container_port) == params["port"] == DEFAULT_PORT, name
        http_host_port, http_container_port = service["ports"][1].split(":")  # the search page and JSON API
        assert int(http_container_port) == params["http_port"] == DEFAULT_HTTP_PORT and not params["no_http"], name
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert str(params["data_dir"]) in mounts, f"{name}: --data-dir {params['data_dir']} is not a volume"
        assert mounts[str(params["data_dir"])] in compose["volumes"]
        probe = service["healthcheck"]["test"]
        assert probe[0] == "CMD"
        assert parse_with(healthcheck, healthcheck_args_of(probe[1:]))["target"] == f"localhost:{params['port']}"
        assert service["stop_signal"] == "SIGTERM"
        assert "MATCHMAP_TOKEN" in service["environment"]
    assert servers["search"]["ports"] == [f"{DEFAULT_PORT}:{DEFAULT_PORT}", f"{DEFAULT_HTTP_PORT}:{DEFAULT_HTTP_PORT}"]
    assert len({p.split(":")[0] for s in servers.values() for p in s["ports"]}) == 4  # no host port twice
    assert "profiles" not in servers["search"]


def test_compose_postgres_profile_points_the_catalog_at_the_postgres_service():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    postgres, server = services["postgres"], services["search-pg"]
    assert postgres["profiles"] == ["postgres"] == server["profiles"]
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    entrypoint = exec_form(dict(dockerfile_instructions())["ENTRYPOINT"])
    db_url = parse_with(serve, serve_args_of(entrypoint + server["command"]))["db_url"]
    url = urlsplit(db_url)
    assert url.scheme == "postgresql+psycopg2"
    assert url.hostname == "postgres" and url.port == 5432
    env = postgres["environment"]
    assert url.username == env["POSTGRES_USER"] and url.path.lstrip("/") == env["POSTGRES_DB"]
    assert url.password == env["POSTGRES_PASSWORD"]  # the same ${POSTGRES_PASSWORD:-...} expression
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])


def test_dockerignore_keeps_the_virtualenv_data_and_git_out_of_the_build_context():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "data", "corpus", "runs"} <= ignored
    sources = {shlex.split(args)[0] for keyword, args in dockerfile_instructions() if keyword == "COPY"}
    assert not sources & ignored, f"the Dockerfile copies ignored paths: {sources & ignored}"
