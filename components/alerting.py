"""One Grafana org's alerts, all sent to the API's webhook; routing lives in the registry.

An org gets one contact point (a webhook to the API, with a bearer token of its own) and its
notification policy (the root of the org's tree) pointing there, grouped by tenant, site and
machine. Who gets told, on which channel and when is the tenant's routing in the registry
(``ironlink alerts route …``, the API's routes), never a Pulumi update, so the shared org needs
no tree listing its tenants: its one policy belongs to the platform stack, and each tenant with an
org of its own (isolation 2 and 3) declares its own from its stack.

The token is generated here and reaches the registry only as a digest
(:class:`~components.providers.registry.RegistryAlertSource`): the API authenticates each post by
it and learns which tenant the source speaks for (the shared org's source: the tenant each alert's
``tenant`` label names, among the shared org's tenants).
"""

from __future__ import annotations

from typing import NotRequired, TypedDict

import pulumi
from pulumiverse_grafana import alerting

from components.credentials import generated_password
from components.kube import inherited_dependencies
from components.providers.registry import RegistryAlertSource
from registry.alerts import TENANT_LABEL

CONTACT_POINT = "ironlink-api"
"""The contact point's name in every org (one per org)."""
GROUP_BY = ["alertname", "grafana_folder", TENANT_LABEL, "site_id", "machine_id"]
"""Labels alerts are grouped by: one notification per tenant, site and machine."""


class AlertWebhookArgs(TypedDict):
    source_id: str
    """The registry's name of this source (``registry.alerts.tenant_source_id`` or the shared one)."""
    tenant_id: str | None
    """The tenant the org belongs to; None for the shared org (the platform's source)."""
    url: pulumi.Input[str]
    """The API's webhook (``IronlinkApi.webhook_url``)."""
    registry_dsn: pulumi.Input[str]
    """Owner DSN of the registry (secret)."""
    grafana: pulumi.ProviderResource
    """The region's Grafana provider (admin basic auth)."""
    org_id: pulumi.Input[str] | None
    """The org; None: the shared org (the provider's default org)."""
    actor: str
    """Who the registry's audit trail names."""
    policy_aliases: NotRequired[list[pulumi.Alias]]
    """Where the org's policy was declared before (an org has one: a second resource replacing it
    would reset the org's tree when the old one is deleted, so it is adopted instead)."""


class AlertWebhook(pulumi.ComponentResource):
    contact_point: alerting.ContactPoint
    token: pulumi.Output[str]
    """The bearer token the contact point presents (secret)."""

    def __init__(self, name: str, args: AlertWebhookArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("ironlink:alerting:AlertWebhook", name, None, opts)
        after = inherited_dependencies(opts)  # the registry and Grafana must be up
        self.token = generated_password(f"{name}-token", parent=self, protect=False)
        # The registry knows the token before Grafana first presents it.
        source = RegistryAlertSource(
            f"{name}-source",
            dsn=args["registry_dsn"],
            source_id=args["source_id"],
            tenant_id=args["tenant_id"],
            token=self.token,
            actor=args["actor"],
            opts=pulumi.ResourceOptions(parent=self, depends_on=after),
        )
        in_grafana = pulumi.ResourceOptions(
            parent=self, provider=args["grafana"], depends_on=[*after, source]
        )
        self.contact_point = alerting.ContactPoint(
            f"{name}-contact-point",
            name=CONTACT_POINT,
            org_id=args["org_id"],
            webhooks=[
                {
                    "url": args["url"],
                    "http_method": "POST",
                    "authorization_scheme": "Bearer",
                    "authorization_credentials": self.token,
                }
            ],
            opts=in_grafana,
        )
        # The org's whole tree (Grafana keeps one per org): everything goes to the API.
        alerting.NotificationPolicy(
            f"{name}-notification-policy",
            org_id=args["org_id"],
            contact_point=self.contact_point.name,
            group_bies=GROUP_BY,
            opts=pulumi.ResourceOptions.merge(
                in_grafana, pulumi.ResourceOptions(aliases=args.get("policy_aliases") or [])
            ),
        )
        self.register_outputs({"contact_point": self.contact_point.name})
