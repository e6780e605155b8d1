"""Rich views of the dev platform, shared by ``ironlink dev`` / ``ironlink simulate`` and ``make demo``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from rich.console import Console, Group
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from infra.config import PlatformConfig
from infra.fleet import Fleet
from localdev.platform import PROCESSES, STEPS, Notify, PlatformStatus
from localdev.simulator import RunResult
from localdev.victoria import MachinePoints

_BUSY = ("preparing", "starting", "syncing", "stopping")


@contextmanager
def progress(console: Console) -> Iterator[Notify]:
    """A progress line per step of ``up``; yields the callback :meth:`DevPlatform.up` reports to."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        tasks = {name: bar.add_task(f"{name}: waiting", total=1) for name in ("state", *PROCESSES, *STEPS)}

        def notify(process: str, event: str) -> None:
            bar.update(tasks[process], description=f"{process}: {event}", completed=int(event not in _BUSY))

        yield notify


def _ago(moment: datetime | None) -> str:
    if moment is None:
        return "never"
    seconds = max(0.0, (datetime.now(UTC) - moment).total_seconds())
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def status_view(status: PlatformStatus) -> Group:
    processes = Table(title="processes", title_justify="left")
    for column in ("process", "pid", "account", "port", "health"):
        processes.add_column(column)
    for item in status.processes:
        health = "[red]down[/]"
        if item.alive:
            health = "[green]up[/]" if item.listening else "[yellow]not listening[/]"
        processes.add_row(item.name, str(item.pid or "-"), item.user or "-", str(item.port or "-"), health)
    tenants = Table(title="tenants (machines: last hour; rate: last minute)", title_justify="left")
    for column in ("tenant", "machines seen", "messages/s", "last seen", "dead letters (registry)"):
        tenants.add_column(column)
    for tenant in status.tenants:
        tenants.add_row(
            tenant.tenant_id,
            f"{tenant.machines_seen}/{tenant.machines}",
            f"{tenant.messages_per_second:.1f}",
            _ago(tenant.last_seen),
            "?" if tenant.dead_lettered is None else str(tenant.dead_lettered),
        )
    parts: list[Table | str] = [processes, tenants]
    if status.store_error:
        parts.append(f"[yellow]store: {status.store_error}[/]")
    return Group(*parts)


def simulation_view(result: RunResult, duration: float, rate: float) -> Table:
    table = Table(title=f"simulated {duration:g}s at {rate:g} msg/s per machine", title_justify="left")
    table.add_column("device", no_wrap=True)
    for column in ("schema", "published", "acked", "refused", "gaps", "faults"):
        table.add_column(column)
    for device in result.devices:
        table.add_row(
            device.username,
            f"v{device.schema_version}",
            str(device.published),
            str(device.acknowledged),
            str(device.refused),
            str(device.skipped),
            str(device.faults),
        )
    return table


def points_view(config: PlatformConfig, fleet: Fleet, points: list[MachinePoints]) -> Group:
    """Per tenant, what landed in the store for each of its machines (and anything unexpected)."""
    stored = {(p.tenant_id, p.site_id, p.machine_id): p for p in points}
    tables: list[Table] = []
    for tenant in config.tenants:
        table = Table(title=f"{tenant.id} ({tenant.name})", title_justify="left")
        for column in ("site", "machine", "type", "points", "metrics", "last point"):
            table.add_column(column)
        for site, machine in fleet.of(tenant.id).machines:
            found = stored.pop((tenant.id, site.id, machine.id), None)
            last = found.last_seen_ms if found else None
            table.add_row(
                site.id,
                machine.id,
                machine.type,
                str(found.points) if found else "[red]0[/]",
                str(len(found.metrics)) if found else "-",
                _ago(datetime.fromtimestamp(last / 1000, UTC) if last else None),
            )
        tables.append(table)
    if stored:
        strays = Table(title="[red]series outside the fleet's machines[/]", title_justify="left")
        for column in ("tenant_id", "site_id", "machine_id", "points"):
            strays.add_column(column)
        for (tenant_id, site_id, machine_id), found in sorted(stored.items()):
            strays.add_row(tenant_id, site_id, machine_id, str(found.points))
        tables.append(strays)
    return Group(*tables)
