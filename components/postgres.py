"""PostgreSQL for metadata: the device registry (EMQX reads it to authenticate devices) and, in HA
phases, Grafana's shared database.

A single-node StatefulSet on a PVC; availability comes from scheduled ``pg_dump`` backups to a
protected volume. Only the pods that need it may connect (NetworkPolicy): the broker (EMQX's
authenticator), Grafana, the dead-letter consumer, the provisioning service and the backup job.
"""

from __future__ import annotations

from typing import NotRequired, Protocol, TypedDict

import pulumi
import pulumi_kubernetes as k8s

from components.backup import BackupTarget, declare_backup
from components.credentials import first_start_password, generated_password
from components.kube import Kube, inherited_dependencies
from components.providers.database_roles import RegistryServiceRole, service_dsn
from components.render.kubernetes import (
    ROLE_API,
    ROLE_BROKER,
    ROLE_DEAD_LETTERS,
    ROLE_GRAFANA,
    ROLE_INGEST,
    ROLE_POSTGRES,
    ROLE_PROVISIONING,
    Manifest,
    backup_peer,
    container,
    container_port,
    env_list,
    exec_probe,
    ingress_policy_spec,
    ingress_rule,
    labels,
    pod_peer,
    pod_template,
    role_selector,
    runner_peer,
    scratch_volumes,
    secret_env,
    selector,
    service_host,
    volume_claim_template,
)
from components.render.postgres import EMQX_ROLE, GRAFANA_ROLE, PASSWORD_ENV, render_init_script
from infra.config import PlatformConfig
from registry.roles import INGEST_ROLE

PORT = 5432
USER = 999  # the official image's postgres user
OWNER = "ironlink"
DATA_DIR = "/var/lib/postgresql/data"


class RegistryEndpoint(Protocol):
    """What the registry's clients need of it: the in-cluster :class:`Postgres` or, on AWS,
    :class:`components.aws.database.RegistryDatabase`."""

    host: str
    port: int
    database: str
    tls: bool
    """Whether its clients must encrypt (RDS PostgreSQL 15+ refuses them otherwise)."""
    emqx_password: pulumi.Output[str]
    grafana_password: pulumi.Output[str]
    dsn: pulumi.Output[str]
    ingest_dsn: pulumi.Output[str]
    """The ingest worker's DSN: its own role, with exactly its privileges (``registry.roles``)."""


class PostgresArgs(TypedDict):
    config: PlatformConfig
    """The region's config: ``postgres`` section (image, storage, resources, database, backups)."""
    provider: k8s.Provider
    """The region's Kubernetes provider (one per region, built by ``RegionalPlatform``)."""
    backup: NotRequired[BackupTarget | None]
    """The region's backup bucket; None: scheduled dumps go to a volume of their own."""


class Postgres(pulumi.ComponentResource):
    tls = False
    """In-cluster traffic stays inside the namespace; the image serves no certificate."""
    host: str
    """In-cluster DNS name of the Service."""
    port: int
    database: str
    owner: str
    """The database owner role (migrations, registry writes)."""
    owner_password: pulumi.Output[str]
    emqx_password: pulumi.Output[str]
    """Password of the read-only ``emqx`` role (secret)."""
    grafana_password: pulumi.Output[str]
    """Password of the ``grafana`` role owning the ``grafana`` database (secret)."""
    dsn: pulumi.Output[str]
    """Owner DSN ``postgresql://…`` (secret), for the registry provider and migrations."""
    ingest_dsn: pulumi.Output[str]
    """The ingest worker's DSN (secret): role ``ingest``, which reads the fleet and store routes
    and writes gaps and usage, nothing else (``registry.roles``)."""

    def __init__(self, name: str, args: PostgresArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("ironlink:postgres:Postgres", name, None, opts)
        config = args["config"]
        section, namespace = config.postgres, config.cluster.namespace
        kube = Kube(self, args["provider"], namespace, config.protect_stateful, inherited_dependencies(opts))
        object_labels = labels("postgres", name, ROLE_POSTGRES)
        pods = selector(object_labels)
        # Its backup job's pods share name and instance: the Service and the policy select the
        # database's own pods by role too (the StatefulSet's selector is immutable and stays).
        serving = {**pods, **role_selector(ROLE_POSTGRES)}

        # Passwords are baked into the data directory at first start: protected in every phase.
        self.owner_password = first_start_password(f"{name}-owner", parent=self)
        self.emqx_password = first_start_password(f"{name}-emqx", parent=self)
        self.grafana_password = first_start_password(f"{name}-grafana", parent=self)
        credentials = f"{name}-credentials"
        kube.secret(
            credentials,
            object_labels,
            {
                "owner-password": self.owner_password,
                EMQX_ROLE: self.emqx_password,
                GRAFANA_ROLE: self.grafana_password,
            },
            stateful=True,
        )
        init = f"{name}-init"
        kube.config_map(
            init, object_labels, {"10-ironlink-roles.sh": render_init_script(section.database, OWNER)}
        )

        kube.service_account(name, object_labels)
        env = [
            *env_list(
                {"POSTGRES_USER": OWNER, "POSTGRES_DB": section.database, "PGDATA": f"{DATA_DIR}/pgdata"}
            ),
            secret_env("POSTGRES_PASSWORD", credentials, "owner-password"),
            *(secret_env(variable, credentials, role) for role, variable in PASSWORD_ENV.items()),
        ]
        volumes, mounts = scratch_volumes({"run": "/var/run/postgresql", "tmp": "/tmp"})
        volumes.append({"name": "init", "configMap": {"name": init}})
        mounts += [
            {"name": "data", "mountPath": DATA_DIR},
            {"name": "init", "mountPath": "/docker-entrypoint-initdb.d", "readOnly": True},
        ]
        ready = exec_probe(["pg_isready", "-h", "127.0.0.1", "-U", OWNER, "-d", section.database])
        server = container(
            "postgres",
            section.image,
            resources=section.resources,
            env=env,
            ports=[container_port("postgres", PORT)],
            mounts=mounts,
            readiness=ready,
            liveness=exec_probe(ready["exec"]["command"], period=20, failures=6),
        )
        spec: Manifest = {
            "serviceName": name,
            "replicas": 1,
            "selector": {"matchLabels": pods},
            "template": pod_template(
                object_labels, [server], user=USER, service_account=name, volumes=volumes
            ),
            "volumeClaimTemplates": [
                volume_claim_template("data", section.storage, config.cluster.storage_class)
            ],
        }
        database = kube.stateful_set(name, object_labels, spec)
        ports = [{"name": "postgres", "port": PORT, "targetPort": "postgres", "protocol": "TCP"}]
        kube.service(name, object_labels, {"type": "ClusterIP", "selector": serving, "ports": ports})

        clients = [
            pod_peer(role_selector(ROLE_GRAFANA)),
            pod_peer(role_selector(ROLE_INGEST)),
            pod_peer(role_selector(ROLE_DEAD_LETTERS)),
            pod_peer(role_selector(ROLE_PROVISIONING)),
            pod_peer(role_selector(ROLE_API)),  # API keys, fleet, alerts, usage
            backup_peer(name),
            runner_peer(config.cluster.runner_namespace),  # pulumi up: the registry rows
        ]
        if config.broker.engine == "emqx":
            clients.append(pod_peer(role_selector(ROLE_BROKER)))
        kube.network_policy(
            name, object_labels, ingress_policy_spec(serving, [ingress_rule([(PORT, "TCP")], clients)])
        )

        self.host, self.port, self.database, self.owner = (
            service_host(name, namespace),
            PORT,
            section.database,
            OWNER,
        )
        if section.backup_schedule:
            declare_backup(
                kube,
                instance=name,
                engine="postgres",
                schedule=section.backup_schedule,
                image=section.image,
                dump_command='pg_dump -Fc -f "$target.dump"',
                env=[
                    *env_list(
                        {
                            "PGHOST": self.host,
                            "PGPORT": str(PORT),
                            "PGUSER": OWNER,
                            "PGDATABASE": self.database,
                        }
                    ),
                    secret_env("PGPASSWORD", credentials, "owner-password"),
                ],
                user=USER,
                storage=section.storage,
                storage_class=config.cluster.storage_class,
                resources=section.resources,
                service_account=name,
                target=args.get("backup"),
            )
        self.dsn = pulumi.Output.secret(
            pulumi.Output.concat(
                "postgresql://", OWNER, ":", self.owner_password, f"@{self.host}:{PORT}/{self.database}"
            )
        )
        self.ingest_dsn = ingest_role_dsn(self, name, self.host, depends_on=[database])
        self.register_outputs({"host": self.host, "dsn": self.dsn, "ingest_dsn": self.ingest_dsn})


def ingest_role_dsn(
    registry: RegistryEndpoint, name: str, host: pulumi.Input[str], *, depends_on: list[pulumi.Resource]
) -> pulumi.Output[str]:
    """The ingest worker's role on ``registry`` (a child of it, written with the owner's DSN once
    the database runs) and the DSN it logs in with, ready only once the role exists."""
    assert isinstance(registry, pulumi.Resource)
    password = generated_password(f"{name}-{INGEST_ROLE}", parent=registry, protect=False)
    role = RegistryServiceRole(
        f"{name}-{INGEST_ROLE}-role",
        dsn=registry.dsn,
        role=INGEST_ROLE,
        password=password,
        opts=pulumi.ResourceOptions(parent=registry, depends_on=depends_on),
    )
    return service_dsn(role, password, host, registry.port, registry.database)
