"""What every ``ironlink`` command shares: the console, stack loading and error reporting."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar

import typer
from rich.console import Console

from infra.config import PlatformConfig, StackConfigError, UnknownStackError, load_stack

console = Console()
errors = Console(stderr=True)
if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")
EXIT_BAD_INPUT = 2
EXIT_REGISTRY_UNAVAILABLE = 1
_TENANT_ID = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")

RegistryOption = Annotated[
    str | None,
    typer.Option("--registry", envvar="IRONLINK_REGISTRY_DSN", help="PostgreSQL DSN of the registry."),
]


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    errors.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def report_config_error(error: StackConfigError) -> NoReturn:
    errors.print(f"[bold red]error:[/] {error}", highlight=False)
    raise typer.Exit(EXIT_BAD_INPUT)


def guarded(action: Callable[[], T]) -> T:
    """Run ``action``; turn config and unknown-stack errors into exit code 2 with their message."""
    try:
        return action()
    except StackConfigError as error:
        report_config_error(error)
    except UnknownStackError as error:
        fail(str(error))


@contextlib.contextmanager
def migrated_registry(dsn: str) -> Iterator[psycopg.Connection]:
    """A connection to the registry with its migrations applied, or exit 1 naming ``--registry``
    when it cannot be reached (psycopg and the migrations load only when a command needs them)."""
    import psycopg

    from registry.migrate import apply_migrations

    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    except psycopg.Error as error:
        fail(f"--registry: cannot connect to the registry: {error}".strip(), EXIT_REGISTRY_UNAVAILABLE)
    with conn:
        apply_migrations(conn)
        yield conn


def check_tenant(tenant: str, problems: list[str]) -> None:
    """Append the problem with ``--tenant`` unless it is a tenant id."""
    if not (_TENANT_ID.match(tenant) and len(tenant) <= 32):
        problems.append(f"--tenant: {tenant[:80]!r} is not a tenant id (lowercase letters, digits, '-')")


def refuse(problems: list[str]) -> None:
    """Exit 2 listing every problem at once, if there is any."""
    if problems:
        fail("\n  ".join([f"{len(problems)} problem{'s' if len(problems) > 1 else ''}:", *problems]))


@contextlib.contextmanager
def required_registry(dsn: str | None) -> Iterator[psycopg.Connection]:
    """:func:`migrated_registry` of ``--registry``, or exit 2 when no DSN was given."""
    if not dsn:
        fail("--registry: is required (a PostgreSQL DSN, or set IRONLINK_REGISTRY_DSN)")
    with migrated_registry(dsn) as conn:
        yield conn


def stack_config(stack: str) -> PlatformConfig:
    return guarded(lambda: load_stack(stack))
