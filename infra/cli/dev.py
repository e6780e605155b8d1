"""``ironlink dev up|status|down|logs`` and ``ironlink simulate``: Phase A on this machine.

The stack file drives everything (``--stack``, default ``dev``); state, keys, data and logs live in
``--state-dir`` (default ``.ironlink/dev``). Exit codes: 0 done (``status``: everything healthy),
1 the platform could not start or a process is down, 2 bad input (stack file, option).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.live import Live

from infra.cli import app
from infra.cli.common import console, fail, stack_config
from localdev import platform as devplatform
from localdev import simulator, views
from localdev.platform import PROCESSES, DevPlatform, PlatformError, UnsupportedStackError
from localdev.servers import MissingPackageError
from localdev.state import DEFAULT_STATE_DIR, Layout, StateError

EXIT_UNHEALTHY = 1

dev_app = typer.Typer(
    name="dev",
    help="Run Phase A on this machine: TLS Mosquitto, PostgreSQL, VictoriaMetrics and the ingest worker.",
    no_args_is_help=True,
)
app.add_typer(dev_app)

StackOption = Annotated[str, typer.Option("--stack", help="Stack file stacks/Pulumi.<stack>.yaml to run.")]
StateDirOption = Annotated[
    Path, typer.Option("--state-dir", help="Folder holding the platform's state, keys, data and logs.")
]


def _platform(stack: str, state_dir: Path) -> DevPlatform:
    try:
        return DevPlatform(stack_config(stack), state_dir, stack)
    except UnsupportedStackError as error:
        fail(str(error))


def _failed(error: Exception) -> None:
    """Platform errors (a missing package, a busy port, a server that did not start): exit 1."""
    fail(str(error), code=EXIT_UNHEALTHY)


# ------------------------------------------------------------------------------------------- up
@dev_app.command()
def up(stack: StackOption = "dev", state_dir: StateDirOption = DEFAULT_STATE_DIR) -> None:
    """Start the platform (or heal it: dead processes restart, changed ones reconfigure)."""
    platform = _platform(stack, state_dir)
    try:
        with views.progress(console) as notify:
            outcomes = platform.up(notify)
    except (PlatformError, MissingPackageError, StateError) as error:
        _failed(error)
    for warning in platform.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    changed = [f"{name} {outcome}" for name, outcome in outcomes.items() if outcome != "running"]
    console.print(
        f"[green]dev platform up[/] ({', '.join(changed) or 'all was running'}) in {platform.layout.root}\n"
        f"MQTT over TLS: 127.0.0.1:{platform.ports.mqtt}, CA {platform.ca_file}; "
        f"store: {platform.store.base_url}"
    )


# ----------------------------------------------------------------------------------------- down
@dev_app.command()
def down(
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
    purge: Annotated[bool, typer.Option(help="Also delete the state folder: credentials, CA, data.")] = False,
) -> None:
    """Stop every process of the platform and wait until none is left."""
    try:
        outcomes = devplatform.down(state_dir, lambda process, event: console.print(f"{process}: {event}"))
        if purge:
            devplatform.purge(state_dir)
    except (PlatformError, StateError) as error:
        _failed(error)
    stopped = [name for name, outcome in outcomes.items() if outcome == "stopped"]
    console.print(f"[green]dev platform down[/] (stopped: {', '.join(stopped) or 'nothing was running'})")


# --------------------------------------------------------------------------------------- status
@dev_app.command()
def status(
    stack: StackOption = "dev",
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(min=0.5, help="Seconds between refreshes with --watch.")] = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Per-process health and per-tenant activity; exits 1 when any process is down."""
    platform = _platform(stack, state_dir)
    if not Layout.at(state_dir).state_file.exists():
        fail(f"--state-dir: {str(state_dir)!r} holds no dev platform (run 'ironlink dev up')", EXIT_UNHEALTHY)
    current = platform.status()
    if watch:
        with Live(views.status_view(current), console=console, refresh_per_second=4) as live:
            try:
                while True:
                    time.sleep(interval)
                    current = platform.status()
                    live.update(views.status_view(current))
            except KeyboardInterrupt:
                pass
    elif as_json:
        typer.echo(json.dumps(asdict(current), default=str, indent=2))
    else:
        console.print(views.status_view(current))
    if not current.healthy:
        raise typer.Exit(EXIT_UNHEALTHY)


# ----------------------------------------------------------------------------------------- logs
def _tail(path: Path, lines: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return []


@dev_app.command()
def logs(
    process: Annotated[
        str | None, typer.Argument(help=f"One of: {', '.join(PROCESSES)} (default: all).")
    ] = None,
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
    lines: Annotated[int, typer.Option("--lines", "-n", min=1, help="Lines to show per process.")] = 40,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines until Ctrl-C.")
    ] = False,
) -> None:
    """Show the processes' logs (``logs/<process>.log`` in the state folder)."""
    if process is not None and process not in PROCESSES:
        fail(f"PROCESS: {process!r} is not a process of the dev platform (known: {', '.join(PROCESSES)})")
    layout = Layout.at(state_dir)
    names = [process] if process else list(PROCESSES)
    for name in names:
        if len(names) > 1:
            console.rule(name)
        for line in _tail(layout.log(name), lines):
            console.out(line if len(names) == 1 else f"{name} | {line}", highlight=False)
    if follow:
        offsets = {name: _size(layout.log(name)) for name in names}
        try:
            while True:
                for name in names:
                    path = layout.log(name)
                    size = _size(path)
                    if size < offsets[name]:
                        offsets[name] = 0  # the log was truncated or replaced
                    if size > offsets[name]:
                        with path.open("rb") as handle:
                            handle.seek(offsets[name])
                            chunk = handle.read().decode(errors="replace")
                        offsets[name] = size
                        for line in chunk.splitlines():
                            console.out(line if len(names) == 1 else f"{name} | {line}", highlight=False)
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# ------------------------------------------------------------------------------------- simulate
@app.command()
def simulate(
    stack: StackOption = "dev",
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
    duration: Annotated[float, typer.Option(min=0.1, help="Seconds to publish for.")] = 20.0,
    rate: Annotated[float, typer.Option(min=0.01, max=100.0, help="Messages per second per machine.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Random seed, for a repeatable run.")] = None,
) -> None:
    """Publish realistic telemetry for every machine of the stack, each with its own credential."""
    platform = _platform(stack, state_dir)
    try:
        result = simulator.run(platform, duration=duration, rate=rate, seed=seed)
    except (PlatformError, simulator.SimulatorError, StateError) as error:
        _failed(error)
    console.print(views.simulation_view(result, duration, rate))
    for username in result.without_password:
        console.print(
            f"[yellow]skipped {username}[/]: the stack sets its password_hash, so its password is unknown"
        )
    if any(device.refused for device in result.devices):
        raise typer.Exit(EXIT_UNHEALTHY)
