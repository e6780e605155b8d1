"""``python -m backup ENGINE --bucket B --region R --database D``: the backup CronJob's command.

Credentials come from the pod: the database's from its environment (``PG*``, ``INFLUX_*``), AWS's
from the default chain (IRSA or EKS Pod Identity on the backup ServiceAccount). Bad arguments exit
2 naming each one, before anything runs; a failed dump or upload exits 1 and publishes nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from backup.layout import BUCKET_PATTERN, LABEL_PATTERN, MIB, PART_SIZE_MAX, PART_SIZE_MIN, new_key
from backup.s3 import BackupError

EXIT_BAD_INPUT = 2


def problems_of(args: argparse.Namespace) -> list[str]:
    problems = []
    if not BUCKET_PATTERN.match(args.bucket):
        problems.append(f"--bucket: {args.bucket[:80]!r} is not an S3 bucket name")
    for name in ("region", "database"):
        value = getattr(args, name)
        if not LABEL_PATTERN.match(value):
            problems.append(f"--{name}: {value[:80]!r} is not a DNS label (a-z, 0-9, '-', at most 63)")
    if not PART_SIZE_MIN <= args.part_size_mib * MIB <= PART_SIZE_MAX:
        problems.append(
            f"--part-size-mib: {args.part_size_mib} is not between "
            f"{PART_SIZE_MIN // MIB} and {PART_SIZE_MAX // MIB}"
        )
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    from backup.dump import ENGINES, dump_plan, run_backup

    parser = argparse.ArgumentParser(prog="python -m backup", description=__doc__)
    parser.add_argument("engine", choices=ENGINES)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--region", required=True, help="the Ironlink region: the keys' first level")
    parser.add_argument("--database", required=True, help="the database instance (postgres, influxdb, ...)")
    parser.add_argument("--part-size-mib", type=int, default=16)
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args(argv)
    problems = problems_of(args)
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return EXIT_BAD_INPUT

    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    key = new_key(args.region, args.database)
    try:
        stored = run_backup(
            boto3.client("s3"),
            args.bucket,
            key,
            dump_plan(args.engine, args.scratch),
            args.part_size_mib * MIB,
        )
    except (BackupError, BotoCoreError, ClientError, OSError) as error:
        print(f"error: backup {key.key!r}: {error}", file=sys.stderr)
        return 1
    print(f"stored s3://{args.bucket}/{stored.key} {stored.size} bytes sha256 {stored.sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
