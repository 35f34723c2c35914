"""``gpu-dispatch``: the command-line tool.

Follows Celery's own conventions (click, one sub-command per role, ``--help``
everywhere).  Settings come from environment variables (see ``gpu-dispatch
config``).
"""

from __future__ import annotations

import sys

import click

import celeryconfig
from gpu_dispatch.servers import ServerError, local_servers


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """GPU-aware dispatch of inference work over Celery, with Nacos as the live registry of GPUs."""


@main.group()
def servers() -> None:
    """Start, stop and report the local Redis and Nacos servers."""


@servers.command("up")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for each server to answer.")
def servers_up(timeout: float) -> None:
    """Start Redis and Nacos on this machine unless they already answer (installs them the first time)."""
    try:
        for server in local_servers(celeryconfig):
            click.echo(server.start(timeout=timeout))
    except ServerError as exc:
        raise click.ClickException(str(exc)) from None


@servers.command("install")
def servers_install() -> None:
    """Install the servers' programs if missing (redis-server with apt-get; r-nacos with cargo)."""
    try:
        for server in local_servers(celeryconfig):
            server.ensure_installed()
            click.echo(f"{server.name}: {server.installed_as()}")
    except ServerError as exc:
        raise click.ClickException(str(exc)) from None


@servers.command("down")
def servers_down() -> None:
    """Stop the servers that `gpu-dispatch servers up` started; others are left alone."""
    for server in local_servers(celeryconfig):
        click.echo(server.stop())


@servers.command("status")
def servers_status() -> None:
    """Say whether each server answers, and whether gpu-dispatch started it."""
    statuses = [server.status() for server in local_servers(celeryconfig)]
    for status in statuses:
        click.echo(status.line())
    sys.exit(0 if all(s.answering for s in statuses) else 1)


@main.command("config")
def config() -> None:
    """Print every setting: environment variable, value in force, default, unit and meaning."""
    import os

    for setting in celeryconfig.SETTINGS.values():
        value = os.environ.get(setting.env, setting.default)
        if "PASSWORD" in setting.env and value:
            value = "***"
        click.echo(f"{setting.env}={value}")
        click.echo(f"    {setting.meaning} [{setting.unit}; default {setting.default!r}]")
