"""Declares the Kubernetes objects of one component: same provider, namespace, parent and protect rule.

Every component holds one :class:`Kube`; the object's Kubernetes name is also its Pulumi name
(unique per kind in a namespace, hence unique per type in the stack), so ``ironlink plan`` reads
like ``kubectl get``. ``stateful=True`` marks what holds or guards data; it is protected when the
stack sets ``protect_stateful`` (phases B and C), so ``pulumi destroy`` or a rename cannot drop it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from components.render.kubernetes import Manifest, object_meta


def inherited_dependencies(opts: pulumi.ResourceOptions | None) -> list[pulumi.Resource]:
    """A component's ``depends_on`` (e.g. the namespace), which Pulumi does not pass on to its children."""
    depends_on: Any = opts.depends_on if opts is not None else None
    if depends_on is None:
        return []
    return list(depends_on) if isinstance(depends_on, Sequence) else [depends_on]


def kubernetes_provider(
    name: str,
    *,
    context: str | None,
    kubeconfig: pulumi.Input[str] | None,
    namespace: str,
    opts: pulumi.ResourceOptions | None = None,
) -> k8s.Provider:
    """A stack's Kubernetes provider (platform and tenant stacks alike).

    Secrets and ConfigMaps keep their names (pods mount them by name): without
    ``enableSecretMutable``/``enableConfigMapMutable`` the provider replaces one on every change of
    its data, a delete and a create under the same name, during which a restarting pod finds nothing
    to mount. With them, new data is an update in place (``components/replacements.py``).
    """
    return k8s.Provider(
        name,
        context=context,
        kubeconfig=kubeconfig,
        namespace=namespace,
        enable_secret_mutable=True,
        enable_config_map_mutable=True,
        opts=opts,
    )


class Kube:
    def __init__(
        self,
        owner: pulumi.Resource,
        provider: k8s.Provider,
        namespace: str,
        protect: bool,
        depends_on: Sequence[pulumi.Resource] = (),
    ) -> None:
        self.owner, self.provider, self.namespace, self.protect = owner, provider, namespace, protect
        self.depends_on = list(depends_on)

    def opts(self, *, stateful: bool = False) -> pulumi.ResourceOptions:
        """Child options: explicit provider and parent, the component's dependencies, and ``protect``
        only on stateful resources."""
        return pulumi.ResourceOptions(
            parent=self.owner,
            provider=self.provider,
            protect=self.protect and stateful,
            depends_on=self.depends_on,
        )

    def meta(self, name: str, labels: Mapping[str, str], annotations: Mapping[str, str] | None = None) -> Any:
        return object_meta(name, self.namespace, labels, annotations)

    def secret(
        self,
        name: str,
        labels: Mapping[str, str],
        string_data: Mapping[str, pulumi.Input[str]],
        *,
        secret_type: str = "Opaque",
        stateful: bool = False,
    ) -> k8s.core.v1.Secret:
        """A Secret whose values are Pulumi secrets, whatever the caller passed (masked in state and plan)."""
        data: Any = pulumi.Output.secret(dict(string_data))
        return k8s.core.v1.Secret(
            name,
            metadata=self.meta(name, labels),
            type=secret_type,
            string_data=data,
            opts=self.opts(stateful=stateful),
        )

    def config_map(
        self, name: str, labels: Mapping[str, str], data: Mapping[str, str]
    ) -> k8s.core.v1.ConfigMap:
        return k8s.core.v1.ConfigMap(
            name, metadata=self.meta(name, labels), data=dict(data), opts=self.opts()
        )

    def service_account(self, name: str, labels: Mapping[str, str]) -> k8s.core.v1.ServiceAccount:
        return k8s.core.v1.ServiceAccount(
            name, metadata=self.meta(name, labels), automount_service_account_token=False, opts=self.opts()
        )

    def service(
        self,
        name: str,
        labels: Mapping[str, str],
        spec: Manifest,
        annotations: Mapping[str, str] | None = None,
    ) -> k8s.core.v1.Service:
        body: Any = spec
        return k8s.core.v1.Service(
            name, metadata=self.meta(name, labels, annotations), spec=body, opts=self.opts()
        )

    def stateful_set(
        self, name: str, labels: Mapping[str, str], spec: Manifest, *, stateful: bool = True
    ) -> k8s.apps.v1.StatefulSet:
        """``stateful=False`` for a set that is replaced as a matter of course (a worker colour): its
        volumes outlive it through the claim retention policy, not through ``protect``."""
        body: Any = spec
        return k8s.apps.v1.StatefulSet(
            name, metadata=self.meta(name, labels), spec=body, opts=self.opts(stateful=stateful)
        )

    def deployment(self, name: str, labels: Mapping[str, str], spec: Manifest) -> k8s.apps.v1.Deployment:
        body: Any = spec
        return k8s.apps.v1.Deployment(name, metadata=self.meta(name, labels), spec=body, opts=self.opts())

    def volume_claim(
        self,
        name: str,
        labels: Mapping[str, str],
        storage: str,
        storage_class: str | None,
        *,
        access_mode: str = "ReadWriteOnce",
    ) -> k8s.core.v1.PersistentVolumeClaim:
        """``access_mode="ReadWriteMany"`` for a volume that pods on several nodes share."""
        spec: Any = {"accessModes": [access_mode], "resources": {"requests": {"storage": storage}}}
        if storage_class:
            spec["storageClassName"] = storage_class
        return k8s.core.v1.PersistentVolumeClaim(
            name, metadata=self.meta(name, labels), spec=spec, opts=self.opts(stateful=True)
        )

    def disruption_budget(
        self, name: str, labels: Mapping[str, str], spec: Manifest
    ) -> k8s.policy.v1.PodDisruptionBudget:
        body: Any = spec
        return k8s.policy.v1.PodDisruptionBudget(
            name, metadata=self.meta(name, labels), spec=body, opts=self.opts()
        )

    def network_policy(
        self, name: str, labels: Mapping[str, str], spec: Manifest
    ) -> k8s.networking.v1.NetworkPolicy:
        body: Any = spec
        return k8s.networking.v1.NetworkPolicy(
            name, metadata=self.meta(name, labels), spec=body, opts=self.opts()
        )

    def cron_job(self, name: str, labels: Mapping[str, str], spec: Manifest) -> k8s.batch.v1.CronJob:
        body: Any = spec
        return k8s.batch.v1.CronJob(name, metadata=self.meta(name, labels), spec=body, opts=self.opts())

    def autoscaler(
        self, name: str, labels: Mapping[str, str], spec: Manifest
    ) -> k8s.autoscaling.v2.HorizontalPodAutoscaler:
        body: Any = spec
        return k8s.autoscaling.v2.HorizontalPodAutoscaler(
            name, metadata=self.meta(name, labels), spec=body, opts=self.opts()
        )
