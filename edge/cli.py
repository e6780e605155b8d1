"""``ironlink-agent``: run the agent, check a config, show its status, enroll its machines."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from edge.config import AgentConfig, EdgeConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
ConfigPath = Annotated[Path, typer.Argument(help="The gateway's YAML config.")]
console = Console()


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
    """What the running agent last reported: backlog, drops, sources, uplink."""
    loaded = _config(config)
    try:
        health = json.loads(loaded.status_path.read_text())
    except (OSError, ValueError):
        typer.echo(f"error: no status at {loaded.status_path} (is the agent running?)", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(health, indent=1))
        return
    age = time.time() - health["written_at"]
    backlog = health["backlog"]
    console.print(
        f"gateway {health['gateway']} boot {health['boot']}, reported {age:.1f} s ago; backlog "
        f"{backlog['messages']} messages, {backlog['store_bytes']} bytes, "
        f"oldest unsent {backlog['oldest_unsent_age_s']} s"
    )
    drops = ", ".join(f"{reason} {count}" for reason, count in sorted(health["drops"].items())) or "none"
    console.print(f"drops: {drops}")
    table = Table("machine", "source", "since", "readings", "uplink", "last error")
    for machine, source in health["sources"].items():
        link = health["uplink"].get(machine, {})
        error = source.get("last_error") or link.get("last_error") or ""
        table.add_row(
            machine,
            source["state"],
            f"{time.time() - source['since']:.0f} s",
            str(source["readings"]),
            link.get("state", "-"),
            error[:60],
        )
    console.print(table)
    if age > max(10.0, 5 * loaded.status_interval_s):
        raise typer.Exit(1)


@app.command()
def enroll(config: ConfigPath) -> None:
    """Claim an identity for every machine without one; renew those close to expiry."""
    from edge.identity import EnrollmentError, claim, needs_renewal, renew

    loaded = _config(config)
    settings, folder = loaded.uplink.claim, loaded.uplink.identity_dir
    if settings is None or folder is None:
        typer.echo("error: uplink.claim and uplink.identity_dir are required to enroll", err=True)
        raise typer.Exit(2)
    for machine in loaded.machines:
        cert = folder / f"{machine.id}.pem"
        try:
            if not cert.is_file():
                typer.echo(f"{machine.id}: claimed, {claim(loaded, machine)}")
            elif needs_renewal(cert, settings.renew_before_days):
                typer.echo(f"{machine.id}: renewed, {renew(loaded, machine)}")
            else:
                typer.echo(f"{machine.id}: valid")
        except EnrollmentError as error:
            typer.echo(f"error: {machine.id}: {error}", err=True)
            raise typer.Exit(2) from None


def main() -> None:
    app()
