"""A health probe for containers and orchestrators: ``python -m search.healthcheck [--target HOST:PORT]``.

Asks the standard grpc.health.v1 service (open even when the server requires a token); exits 0 when
the server reports SERVING, 1 otherwise (NOT_SERVING while shutting down, unreachable, timeout).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from search import DEFAULT_PORT
from search.client import SearchClient, SearchServiceError


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--target", default=f"localhost:{DEFAULT_PORT}", help="HOST:PORT of the server.")
@click.option("--service", default="", help='Service to ask about ("" = the whole server).')
@click.option("--tls-ca", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="PEM CA certificate, when the server uses TLS.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=3.0, help="Seconds to wait for an answer.")
def main(target: str, service: str, tls_ca: Path | None, timeout: float) -> None:
    """Exit 0 if the server at TARGET reports SERVING, else 1 (printing why)."""
    try:
        with SearchClient(target, tls_ca=tls_ca, timeout=timeout) as client:
            status = client.health(service)
    except SearchServiceError as error:
        click.echo(f"unhealthy: {error}", err=True)
        sys.exit(1)
    click.echo(status)
    sys.exit(0 if status == "SERVING" else 1)


if __name__ == "__main__":
    main()
