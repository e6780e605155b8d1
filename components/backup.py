"""Scheduled backups of an in-cluster database instance.

Shared by :mod:`components.influxdb` and :mod:`components.postgres` (databases on RDS or Timestream
have the managed service's backups instead). Where the stack has a backup bucket
(:class:`components.aws.backup_bucket.BackupBucket`), the CronJob runs ``python -m backup`` from the
backup image: the engine's dump is streamed to S3 in parts, off the cluster and out of the zone,
and retention is the bucket's lifecycle. The pod requests what a streamed upload needs (a few parts
in memory), not what the database needs. Without a bucket, dumps go to a protected volume of their
own, pruned after ``KEEP_DAYS``; that volume sits in the database's zone, so it is a fallback only.

The caller's ``env`` names the database the way the engines' tools read it (``PGHOST``, ``PGUSER``,
``PGDATABASE``, ``PGPASSWORD``; ``INFLUX_HOST``, ``INFLUX_TOKEN``), so no secret is in a command line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, cast

import pulumi
import pulumi_kubernetes as k8s

from backup.layout import MIB, part_size_for, upload_memory_bytes
from components.kube import Kube
from components.render.kubernetes import (
    ROLE_BACKUP,
    Manifest,
    container,
    cron_job_spec,
    labels,
    pod_template,
    scratch_volumes,
)
from infra.config import Amounts, ComputeResources

BACKUP_SERVICE_ACCOUNT = "backup"
"""The ServiceAccount every backup CronJob of a bucket-backed namespace runs as."""
BACKUP_DIR = "/backup"
KEEP_DAYS = 7
SCRATCH_DIR = "/scratch"
SCRATCH_TTL_S = 3600
BACKUP_USER = 10001
"""The backup image's user (``backup/Dockerfile``)."""
BUCKET_ENV = "IRONLINK_BACKUP_BUCKET"
PROCESS_MEMORY_MIB = 128
"""Python, boto3 and the dump tool beside the upload's parts."""
_QUANTITY_FACTORS = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}

Engine = Literal["postgres", "influxdb"]


@dataclass(frozen=True)
class BackupTarget:
    """Where a region's backups go: its bucket, and the image and identity that write to it."""

    bucket: pulumi.Input[str]
    region: str
    """The first level of every key (``<region>/<database>/<timestamp>.dump``)."""
    image: str
    service_account: str
    """Carries the bucket's credentials (IRSA role annotation, or the cluster's Pod Identity)."""


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes storage quantity (``20Gi``, ``500G``) in bytes, rounded up."""
    for suffix, factor in _QUANTITY_FACTORS.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    decimal = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    if quantity[-1:] in decimal:
        return int(float(quantity[:-1]) * decimal[quantity[-1]])
    return int(float(quantity))


def upload_resources(part_size: int) -> ComputeResources:
    """A streamed upload's pod: a tenth of a CPU, and memory for its parts in flight."""
    memory = f"{upload_memory_bytes(part_size) // MIB + PROCESS_MEMORY_MIB}Mi"
    return ComputeResources(
        requests=Amounts(cpu="100m", memory=memory), limits=Amounts(cpu="1", memory=memory)
    )


def backup_script(dump_command: str) -> str:
    """Dump into a timestamped entry of ``BACKUP_DIR``, then prune entries older than ``KEEP_DAYS``."""
    return (
        "set -eu\n"
        'target="' + BACKUP_DIR + '/$(date -u +%Y%m%dT%H%M%SZ)"\n'
        f"{dump_command}\n"
        f"find {BACKUP_DIR} -mindepth 1 -maxdepth 1 -mtime +{KEEP_DAYS} -exec rm -rf {{}} +\n"
    )


def scratch_volume(storage: str, storage_class: str | None) -> Manifest:
    """A generic ephemeral volume as large as the database's: ``influx backup`` writes a directory
    before it can be streamed, and the volume is deleted with the pod."""
    spec: Manifest = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": storage}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    return {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": spec}}}


def declare_backup(
    kube: Kube,
    *,
    instance: str,
    engine: Engine,
    schedule: str,
    image: str,
    dump_command: str,
    env: list[Manifest],
    user: int,
    storage: str,
    storage_class: str | None,
    resources: ComputeResources,
    service_account: str,
    target: BackupTarget | None,
) -> k8s.batch.v1.CronJob:
    """The CronJob that backs ``instance`` up: to ``target``'s bucket, or (no bucket) to a protected
    volume with ``dump_command`` run in the database's own ``image``."""
    name = f"{instance}-backup"
    object_labels = labels(engine, instance, ROLE_BACKUP)
    volumes, mounts = scratch_volumes({"tmp": "/tmp"})
    if target is not None:
        part_size = part_size_for(quantity_bytes(storage))
        if engine == "influxdb":
            volumes.append(scratch_volume(storage, storage_class))
            mounts.append({"name": "scratch", "mountPath": SCRATCH_DIR})
        arguments = ["--bucket", f"$({BUCKET_ENV})", "--region", target.region, "--database", instance]
        arguments += [
            "--part-size-mib",
            str(part_size // MIB),
            "--scratch",
            SCRATCH_DIR if engine == "influxdb" else "/tmp",
        ]
        job = container(
            "backup",
            target.image,
            resources=upload_resources(part_size),
            env=[*env, {"name": BUCKET_ENV, "value": target.bucket}],
            mounts=mounts,
            command=["python", "-m", "backup", engine],
            args=arguments,
        )
        user, service_account = BACKUP_USER, target.service_account
    else:
        kube.volume_claim(name, object_labels, storage, storage_class)
        volumes.append({"name": "backup", "persistentVolumeClaim": {"claimName": name}})
        mounts.append({"name": "backup", "mountPath": BACKUP_DIR})
        job = container(
            "backup",
            image,
            resources=resources,
            env=env,
            mounts=mounts,
            command=["/bin/sh", "-c", backup_script(dump_command)],
        )
    pod = pod_template(
        object_labels,
        [job],
        user=user,
        service_account=service_account,
        volumes=volumes,
        restart_policy="OnFailure",
    )
    spec = cron_job_spec(schedule, pod)
    if any("ephemeral" in volume for volume in volumes):
        # A finished pod keeps its ephemeral volume: delete the pod (and the volume) an hour after.
        spec["jobTemplate"]["spec"]["ttlSecondsAfterFinished"] = SCRATCH_TTL_S
    return kube.cron_job(name, object_labels, spec)


def backup_service_account(
    kube: Kube, annotations: Mapping[str, pulumi.Output[str]]
) -> k8s.core.v1.ServiceAccount:
    """The ServiceAccount of every backup pod of the namespace (``annotations``: its IRSA role; EKS's
    webhook mounts the role's web-identity token itself, so the API token stays unmounted)."""
    object_labels = labels("backup", BACKUP_SERVICE_ACCOUNT, ROLE_BACKUP)
    metadata = kube.meta(BACKUP_SERVICE_ACCOUNT, object_labels, cast(Mapping[str, str], annotations) or None)
    return k8s.core.v1.ServiceAccount(
        BACKUP_SERVICE_ACCOUNT, metadata=metadata, automount_service_account_token=False, opts=kube.opts()
    )
