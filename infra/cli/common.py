"""What every ``ironlink`` command shares: the console, stack loading and error reporting."""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn, TypeVar

import typer
from rich.console import Console

from infra.config import PlatformConfig, StackConfigError, UnknownStackError, load_stack

console = Console()
errors = Console(stderr=True)
T = TypeVar("T")
EXIT_BAD_INPUT = 2


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


def stack_config(stack: str) -> PlatformConfig:
    return guarded(lambda: load_stack(stack))
