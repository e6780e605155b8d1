"""Entry point of ``pulumi up`` (``main: infra/`` in Pulumi.yaml): the program lives in ``infra.program``."""

from infra import program

program.main()
