"""``ironlink-agent``: run the agent, check a config, show its status, enroll its machines."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated

import typer

from edge.config import AgentConfig, EdgeConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
ConfigPath = Annotated[Path, typer.Argument(help="The gateway's YAML config.")]


def _config(path: Path) -> AgentConfig:
    try:
        return load_config(path)
    except EdgeConfigError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None


@app.command()
def run(config: ConfigPath) -> None:
    """Run the agent until SIGTERM."""
    from edge.agent import Agent

    agent = Agent(_config(config))
    if agent.store.moved_aside is not None:
        typer.echo(
            f"warning: the store was unreadable and was moved aside to {agent.store.moved_aside}", err=True
        )
    asyncio.run(agent.run())


@app.command()
def check(config: ConfigPath) -> None:
    """Validate a config (maps included) and exit: 0 when good, 2 with every problem."""
    loaded = _config(config)
    typer.echo(f"ok: gateway {loaded.gateway.id}, {len(loaded.machines)} machines")


@app.command()
def status(config: ConfigPath, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """What the running agent last reported: backlog, drops, health, sources, uplink, identities.
    Exits 1 when there is no report or it is stale (the agent is not running)."""
    from edge.health import render_status

    loaded = _config(config)
    try:
        health = json.loads(loaded.status_path.read_text())
    except (OSError, ValueError):
        typer.echo(f"error: no status at {loaded.status_path} (is the agent running?)", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(health, indent=1))
    else:
        from rich.console import Console

        render_status(health, Console())
    if time.time() - health["written_at"] > max(10.0, 5 * loaded.status_interval_s):
        raise typer.Exit(1)


@app.command()
def enroll(config: ConfigPath) -> None:
    """Claim an identity for every machine (and the gateway, with ``health``) without one; renew
    those close to expiry. ``run`` does the same by itself; this is for a first check by hand."""
    from edge.identity import EnrollmentError, claim, files, finish_renewal, identities, needs_renewal, renew

    loaded = _config(config)
    settings, folder = loaded.uplink.claim, loaded.uplink.identity_dir
    if settings is None or folder is None:
        typer.echo("error: uplink.claim and uplink.identity_dir are required to enroll", err=True)
        raise typer.Exit(2)
    failed = False
    for identity in identities(loaded):
        cert, _ = files(folder, identity.name)
        try:
            finish_renewal(folder, identity.name)
            if not cert.is_file():
                typer.echo(f"{identity.name}: claimed, {claim(loaded, identity)}")
            elif needs_renewal(cert, settings.renew_before_days):
                typer.echo(f"{identity.name}: renewed, {renew(loaded, identity)}")
            else:
                typer.echo(f"{identity.name}: valid")
        except EnrollmentError as error:
            typer.echo(f"error: {identity.name}: {error}", err=True)
            failed = True
        except (OSError, ValueError) as error:  # an unreadable certificate or key file
            typer.echo(f"error: {identity.name}: identity_unreadable: {error}", err=True)
            failed = True
    if failed:
        raise typer.Exit(2)


def main() -> None:
    app()
