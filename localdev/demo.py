"""``make demo``: Phase A end to end on this machine, then a per-tenant account of what landed.

Starts the dev platform (``ironlink dev up``), lets every machine of the stack publish for a short
while (``ironlink simulate``), prints per tenant the points each machine has in the store since the
simulation began, checks that every machine landed and that no series strays outside its tenant,
asks the Ironlink API for each tenant's machines with a key of that tenant (one-day keys, revoked
at once), and stops the platform again unless ``--keep`` (``make demo KEEP=1``). Safe to run repeatedly:
the second run reuses the state folder (credentials, CA, data) and counts only its own points.

Exit codes: 0 every machine landed, 1 something did not (or a server could not start), 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import psycopg
from rich.console import Console
from rich.table import Table

from infra.config import StackConfigError, UnknownStackError, load_stack
from infra.tenancy import device_username
from localdev import platform as devplatform
from localdev import simulator, views
from localdev.platform import DevPlatform, PlatformError, UnsupportedStackError
from localdev.servers import MissingPackageError
from localdev.state import DEFAULT_STATE_DIR, StateError
from localdev.victoria import wait_for_points
from registry.api_keys import create_api_key, revoke_api_key

console = Console()


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.splitlines()[0])
    parser.add_argument("--stack", default="dev", help="stack file stacks/Pulumi.<stack>.yaml (default dev)")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of simulated telemetry")
    parser.add_argument("--rate", type=float, default=1.0, help="messages per second per machine")
    parser.add_argument("--keep", action="store_true", help="leave the platform running afterwards")
    arguments = parser.parse_args(argv)
    if arguments.duration <= 0:
        parser.error(f"--duration: {arguments.duration} must be positive")
    if arguments.rate <= 0:
        parser.error(f"--rate: {arguments.rate} must be positive")
    return arguments


def demo(platform: DevPlatform, duration: float, rate: float) -> bool:
    """Up, simulate, report; True when every simulated machine has points in the store."""
    console.rule(f"ironlink dev up (stack {platform.stack})")
    with views.progress(console) as notify:
        platform.up(notify)
    for warning in platform.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    console.rule(f"ironlink simulate: {duration:g}s")
    started = time.time()
    result = simulator.run(platform, duration=duration, rate=rate)
    console.print(views.simulation_view(result, duration, rate))
    simulated = {device.username for device in result.devices}
    expected = {
        (tenant_id, site.id, machine.id)
        for tenant_id, site, machine in platform.fleet.machines()
        if device_username(tenant_id, site.id, machine.id) in simulated
    }
    console.rule("what landed in the store (VictoriaMetrics), per tenant")
    # v1 payloads carry whole seconds: the first one may be stamped just before ``started``.
    points = wait_for_points(platform.store, expected, since=int(started))
    console.print(views.points_view(platform.config, platform.fleet, points))
    landed = {(p.tenant_id, p.site_id, p.machine_id) for p in points if p.points}
    missing, strays = expected - landed, landed - expected
    for username in result.without_password:
        console.print(f"[yellow]not simulated: {username}[/] (its password_hash comes from the fleet file)")
    if missing or strays:
        console.print(f"[red]missing: {sorted(missing)}; outside the fleet's machines: {sorted(strays)}[/]")
        return False
    total = sum(p.points for p in points)
    console.print(
        f"[green]{total} points from all {len(expected)} machines landed, each under its own tenant[/]"
    )
    fleet = {(tenant_id, site.id, machine.id) for tenant_id, site, machine in platform.fleet.machines()}
    return api_answers_each_tenant(platform, fleet)


def api_answers_each_tenant(platform: DevPlatform, fleet: set[tuple[str, str, str]]) -> bool:
    """``GET /v1/machines`` with a key of each tenant: exactly the fleet's machines of that tenant,
    with their latest status."""
    console.rule(f"the Ironlink API ({platform.api_url}), one key per tenant")
    table = Table("tenant", "site", "machine", "status", "last seen")
    seen: set[tuple[str, str, str]] = set()
    with psycopg.connect(platform.registry_dsn(), autocommit=True) as conn:
        for tenant_id in sorted({tenant for tenant, _, _ in fleet}):
            key, secret = create_api_key(
                conn,
                tenant_id,
                site_id=None,
                label="make demo",
                lifetime=timedelta(days=1),
                actor="make-demo",
            )
            try:
                answer = httpx.get(
                    f"{platform.api_url}/v1/machines",
                    headers={"Authorization": f"Bearer {secret}"},
                    timeout=10,
                )
            finally:
                revoke_api_key(conn, tenant_id, key.id, actor="make-demo")
            if answer.status_code != 200:
                console.print(
                    f"[red]{tenant_id}: the API answered {answer.status_code}: {answer.text[:200]}[/]"
                )
                return False
            for machine in answer.json()["machines"]:
                seen.add((tenant_id, machine["site_id"], machine["id"]))
                table.add_row(
                    tenant_id,
                    machine["site_id"],
                    machine["id"],
                    machine["status"] or "-",
                    machine["last_seen"] or "-",
                )
    console.print(table)
    if seen != fleet:
        console.print(f"[red]the API's machines differ from the fleet's: {sorted(seen ^ fleet)}[/]")
        return False
    console.print("[green]each tenant's key saw exactly its own machines[/]")
    return True


def main(argv: list[str] | None = None) -> int:
    arguments = _arguments(argv)
    try:
        platform = DevPlatform(load_stack(arguments.stack), arguments.state_dir, arguments.stack)
    except (StackConfigError, UnknownStackError, UnsupportedStackError) as error:
        console.print(f"[bold red]error:[/] {error}", highlight=False)
        return 2
    ok = False
    try:
        ok = demo(platform, arguments.duration, arguments.rate)
    except (MissingPackageError, PlatformError, StateError, simulator.SimulatorError) as error:
        console.print(f"[bold red]error:[/] {error}", highlight=False)
    finally:
        if arguments.keep:
            console.print(f"platform left running: 'ironlink dev status --state-dir {arguments.state_dir}'")
        else:
            console.rule("ironlink dev down")
            devplatform.down(arguments.state_dir)
            console.print("stopped (KEEP=1 leaves it running)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
