"""``ironlink``: the one command-line entry point (plan, tenants, devices, the local dev platform).

Each concern lives in its own module and registers its commands on :data:`app`; bad input exits
with code 2 and a message that names the offending field and value.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="ironlink",
    help="Ironlink telemetry platform: plan stacks offline, manage tenants and devices, run Phase A locally.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# Command modules register themselves on `app` when imported.
from infra.cli import (  # noqa: E402  (after `app`, which they register on)
    alerts,  # noqa: F401  (ironlink alerts route add|list|remove)
    api_key,  # noqa: F401  (ironlink api-key create|list|revoke)
    backup,  # noqa: F401  (ironlink backup list|restore|download)
    deadletters,  # noqa: F401  (ironlink deadletters list|show|replay)
    dev,  # noqa: F401  (ironlink dev up|status|down|logs, ironlink simulate)
    device,  # noqa: F401  (ironlink device add, through the provisioning API)
    fleet,  # noqa: F401  (ironlink fleet import STACK)
    plan,  # noqa: F401  (ironlink plan [STACK...] | --all, ironlink plan diff)
    preview,  # noqa: F401  (ironlink preview pr|cleanup: pull-request preview stacks)
    provisioning,  # noqa: F401  (ironlink provisioning token create, ironlink claim create)
    stack,  # noqa: F401  (ironlink stack split STACK)
    tenant,  # noqa: F401  (ironlink tenant add|list|remove)
)


def main() -> None:
    app()
