"""Scheduled backups of a database instance to a protected volume of its own.

Shared by :mod:`components.influxdb` and :mod:`components.postgres`: each passes the command that
dumps its engine into ``BACKUP_DIR``; dumps older than ``KEEP_DAYS`` are pruned by the same job.
"""

from __future__ import annotations

import pulumi_kubernetes as k8s

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
from infra.config import ComputeResources

BACKUP_DIR = "/backup"
KEEP_DAYS = 7


def backup_script(dump_command: str) -> str:
    """Dump into a timestamped entry of ``BACKUP_DIR``, then prune entries older than ``KEEP_DAYS``."""
    return (
        "set -eu\n"
        'target="' + BACKUP_DIR + '/$(date -u +%Y%m%dT%H%M%SZ)"\n'
        f"{dump_command}\n"
        f"find {BACKUP_DIR} -mindepth 1 -maxdepth 1 -mtime +{KEEP_DAYS} -exec rm -rf {{}} +\n"
    )


def declare_backup(
    kube: Kube,
    *,
    instance: str,
    engine: str,
    schedule: str,
    image: str,
    dump_command: str,
    env: list[Manifest],
    user: int,
    storage: str,
    storage_class: str | None,
    resources: ComputeResources,
    service_account: str,
) -> k8s.batch.v1.CronJob:
    """A backup volume (protected like the data) and the CronJob that fills it."""
    name = f"{instance}-backup"
    object_labels = labels(engine, instance, ROLE_BACKUP)
    kube.volume_claim(name, object_labels, storage, storage_class)
    volumes, mounts = scratch_volumes({"tmp": "/tmp"})
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
    return kube.cron_job(name, object_labels, cron_job_spec(schedule, pod))
