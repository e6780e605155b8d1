"""Which input changes force a new resource, and which resources hold state, per type token.

The offline plan runs under the mock engine, which never diffs: what a provider replaces rather than
updates cannot be observed here, so it is written down, per provider, from the provider's own source
(read 2026-12):

- Kubernetes: pulumi-kubernetes ``provider/pkg/provider/diff.go`` (v4, commit cafe8c4), the
  ``forceNew`` table and ``metadataForceNewProperties``. ``.metadata.name`` and
  ``.metadata.namespace`` replace every kind. Secret ``data``/``stringData`` and ConfigMap
  ``data``/``binaryData`` replace unless the provider sets ``enableSecretMutable`` /
  ``enableConfigMapMutable`` (or the object sets ``immutable: true``). Ours sets both
  (:func:`components.kube.kubernetes_provider`, in platform and tenant stacks; no object of ours is
  ``immutable``): new data is an update in place, so the table lists no data path for them.
  PodDisruptionBudget ``spec`` replaces in ``policy/v1beta1`` only; ``policy/v1`` updates.
  A PVC's ``spec.resources`` (storage expansion) is an update since v4.
- pulumi-random: every input of ``RandomPassword``/``RandomBytes`` is ``ForceNew`` in
  terraform-provider-random (a new length is a new secret); pulumi-random bridges it.
- pulumi-tls: terraform-provider-tls marks every attribute ``RequiresReplace`` except a
  certificate's ``early_renewal_hours``; the bridge names them in camelCase as the plan does.
- Grafana (pulumiverse-grafana bridges grafana/terraform-provider-grafana,
  ``internal/resources/grafana/``, commit 3f9621f): ``orgIDAttribute()`` and
  ``pluginFrameworkOrgIDAttribute()`` are ``ForceNew``/``RequiresReplace`` for every org-scoped
  resource; Folder and DataSource ``uid``, RuleGroup ``name`` and ``folder_uid``, ContactPoint
  ``name``, FolderPermission ``folder_uid``; a Dashboard is replaced when the ``uid`` inside its
  ``config_json`` changes (``CustomizeDiff``). An Organization has no force-new input.
- AWS (pulumi-aws bridges terraform-provider-aws; from its resource documentation, "Forces new
  resource", not checked against a live provider here): S3 bucket name, RDS identifier, engine,
  storage encryption and its key, KMS key spec and usage, EFS creation token and encryption; a VPC's
  and a subnet's CIDR. EKS clusters and node groups from terraform-provider-aws's own schemas
  (``internal/service/eks/cluster.go`` at 00555dc, ``node_group.go`` at 012e0a3: ``ForceNew``),
  among them a node group's ``instance_types``.
- The dynamic providers of :mod:`components.providers`: their own ``diff`` methods
  (``replace_keys`` / ``plan_diff(replace=...)``); ``tests/test_plandiff.py`` calls each provider's
  ``diff`` with every input changed in turn and checks this table agrees.

A pattern is a dotted input path as the plan records inputs (wire names: ``ecdsaCurve``, not
``ecdsa_curve``); ``*`` matches any one key or list index; ``#`` parses the JSON text found there
and continues inside it (``configJson#uid``). The input at a pattern differing between two plans
means the change forces a replacement.
"""

from __future__ import annotations

_K8S = "kubernetes:"

KUBERNETES_METADATA: dict[str, str] = {
    "metadata.name": "an object's name is its identity: a new name is a new object",
    "metadata.namespace": "an object cannot move between namespaces",
}
"""Force-new for every Kubernetes kind (``metadataForceNewProperties``)."""

_LABEL_SELECTOR_WHY = "the API refuses to change a controller's selector"
_SELECTOR = {"spec.selector": _LABEL_SELECTOR_WHY}
_TLS_CERT_WHY = "terraform-provider-tls re-issues the certificate (RequiresReplace)"
_ORG_ID = {"orgId": "a Grafana object cannot move between orgs (org_id is ForceNew)"}

FORCE_NEW: dict[str, dict[str, str]] = {
    # ------------------------------------------------------------------ Kubernetes
    "kubernetes:apps/v1:StatefulSet": {
        **_SELECTOR,
        "spec.serviceName": "immutable in the StatefulSet API: pod DNS names derive from it",
        "spec.volumeClaimTemplates": "immutable in the StatefulSet API: claims are made once per ordinal",
        "spec.podManagementPolicy": "immutable in the StatefulSet API",
        "spec.revisionHistoryLimit": "pulumi-kubernetes replaces on it (forceNew table)",
    },
    "kubernetes:apps/v1:Deployment": dict(_SELECTOR),
    "kubernetes:apps/v1:DaemonSet": dict(_SELECTOR),
    "kubernetes:batch/v1:Job": {
        **_SELECTOR,
        "spec.template": "a Job's pod template is immutable",
        "spec.completions": "immutable for a non-indexed Job",
        "spec.parallelism": "pulumi-kubernetes replaces on it (forceNew table)",
    },
    "kubernetes:core/v1:PersistentVolumeClaim": {
        "spec.accessModes": "immutable once the claim is bound",
        "spec.selector": "immutable once the claim is bound",
        "spec.storageClassName": "a claim cannot move to another storage class",
        "spec.volumeName": "a claim cannot be bound to another volume",
    },
    # data/stringData (Secret) and data/binaryData (ConfigMap) update in place: our provider sets
    # enableSecretMutable and enableConfigMapMutable (see above).
    "kubernetes:core/v1:Secret": {"type": "a Secret's type is immutable"},
    "kubernetes:core/v1:ConfigMap": {},
    "kubernetes:core/v1:Service": {
        "spec.clusterIP": "a Service's cluster IP is immutable",
    },
    "kubernetes:policy/v1beta1:PodDisruptionBudget": {"spec": "immutable in policy/v1beta1"},
    "kubernetes:rbac.authorization.k8s.io/v1:RoleBinding": {"roleRef": "a binding's roleRef is immutable"},
    "kubernetes:rbac.authorization.k8s.io/v1:ClusterRoleBinding": {
        "roleRef": "a binding's roleRef is immutable"
    },
    "kubernetes:storage.k8s.io/v1:StorageClass": {
        "parameters": "immutable in the StorageClass API",
        "provisioner": "immutable in the StorageClass API",
    },
    # ------------------------------------------------------------------ pulumi-random
    "random:index/randomPassword:RandomPassword": {"*": "every input of a random value is ForceNew"},
    "random:index/randomBytes:RandomBytes": {"*": "every input of a random value is ForceNew"},
    # ------------------------------------------------------------------ pulumi-tls
    "tls:index/privateKey:PrivateKey": {
        "algorithm": "a key of another algorithm is another key",
        "ecdsaCurve": "a key on another curve is another key",
        "rsaBits": "a key of another size is another key",
    },
    "tls:index/certRequest:CertRequest": {
        "*": "terraform-provider-tls regenerates the CSR (RequiresReplace)"
    },
    "tls:index/selfSignedCert:SelfSignedCert": {
        key: _TLS_CERT_WHY
        for key in (
            "allowedUses",
            "dnsNames",
            "ipAddresses",
            "isCaCertificate",
            "privateKeyPem",
            "setAuthorityKeyId",
            "setSubjectKeyId",
            "subject",
            "uris",
            "validityPeriodHours",
        )
    },
    "tls:index/locallySignedCert:LocallySignedCert": {
        key: _TLS_CERT_WHY
        for key in (
            "allowedUses",
            "caCertPem",
            "caPrivateKeyPem",
            "certRequestPem",
            "isCaCertificate",
            "setSubjectKeyId",
            "validityPeriodHours",
        )
    },
    # ------------------------------------------------------------------ Grafana
    "grafana:oss/organization:Organization": {},
    "grafana:oss/dataSource:DataSource": {**_ORG_ID, "uid": "a datasource's uid is its identity"},
    "grafana:oss/folder:Folder": {**_ORG_ID, "uid": "a folder's uid is its identity"},
    "grafana:oss/dashboard:Dashboard": {
        **_ORG_ID,
        "configJson#uid": "the provider replaces a dashboard whose uid changes (CustomizeDiff)",
    },
    "grafana:oss/team:Team": dict(_ORG_ID),
    "grafana:oss/folderPermission:FolderPermission": {
        **_ORG_ID,
        "folderUid": "permissions belong to one folder (RequiresReplace)",
    },
    "grafana:alerting/ruleGroup:RuleGroup": {
        **_ORG_ID,
        "name": "a rule group is identified by its folder and name",
        "folderUid": "a rule group is identified by its folder and name",
    },
    "grafana:alerting/contactPoint:ContactPoint": {**_ORG_ID, "name": "a contact point's name is ForceNew"},
    # ------------------------------------------------------------------ AWS
    "aws:s3/bucket:Bucket": {
        "bucket": "a bucket's name is global and immutable",
        "bucketPrefix": "a bucket's name is global and immutable",
    },
    "aws:s3/bucketV2:BucketV2": {
        "bucket": "a bucket's name is global and immutable",
        "bucketPrefix": "a bucket's name is global and immutable",
    },
    "aws:rds/instance:Instance": {
        "identifier": "the DB instance identifier forces a new instance",
        "engine": "another engine is another database",
        "storageEncrypted": "encryption at rest cannot be switched on a running instance",
        "kmsKeyId": "the storage key cannot change on a running instance",
        "dbName": "the initial database is created once",
        "username": "the master username is set at creation",
    },
    "aws:kms/key:Key": {
        "customerMasterKeySpec": "a key's spec is fixed at creation",
        "keyUsage": "a key's usage is fixed at creation",
        "multiRegion": "multi-Region is fixed at creation",
    },
    "aws:eks/cluster:Cluster": {
        "name": "a cluster's name is its identity (ForceNew)",
        "roleArn": "the control plane's role is fixed at creation (ForceNew)",
        "bootstrapSelfManagedAddons": "the default add-ons are installed once, at creation (ForceNew)",
        "accessConfig.bootstrapClusterCreatorAdminPermissions": "made once, at creation",
        "kubernetesNetworkConfig.ipFamily": "the service address family is fixed at creation",
        "kubernetesNetworkConfig.serviceIpv4Cidr": "the service CIDR is fixed at creation",
    },
    "aws:eks/nodeGroup:NodeGroup": {
        key: "EKS cannot change it in place: a new group, auto-named, so created before the old one goes"
        for key in (
            "instanceTypes",
            "amiType",
            "capacityType",
            "diskSize",
            "subnetIds",
            "nodeRoleArn",
            "remoteAccess",
            "clusterName",
            "nodeGroupName",
            "nodeGroupNamePrefix",
        )
    },
    "aws:ec2/vpc:Vpc": {"cidrBlock": "a VPC's primary CIDR is fixed at creation"},
    "aws:ec2/instance:Instance": {
        "ami": "an instance boots from one image: a new AMI is a new instance",
        "rootBlockDevice.encrypted": "a root volume's encryption is fixed at creation",
        "subnetId": "an instance cannot move between subnets",
    },
    "aws:ec2/subnet:Subnet": {
        "cidrBlock": "a subnet's CIDR is fixed at creation",
        "availabilityZone": "a subnet lives in one zone",
        "vpcId": "a subnet cannot move between VPCs",
    },
    "aws:efs/fileSystem:FileSystem": {
        "creationToken": "the creation token is the file system's idempotency key",
        "encrypted": "encryption is fixed at creation",
        "kmsKeyId": "the key is fixed at creation",
        "performanceMode": "the performance mode is fixed at creation",
    },
    # ------------------------------------------------------------------ dynamic providers
    "pulumi-python:dynamic/influxdb:Organization": {
        "url": "another server holds another org",
        "adopt": "adopting an existing org and owning a new one are different resources",
    },
    "pulumi-python:dynamic/influxdb:Bucket": {
        "url": "another server holds another bucket",
        "org_id": "a bucket cannot move between orgs",
    },
    "pulumi-python:dynamic/influxdb:Token": {
        "url": "another server holds another token",
        "org_id": "a token cannot move between orgs",
        "permissions": "InfluxDB cannot change a token's permissions in place",
    },
    "pulumi-python:dynamic/registry:Tenant": {"tenant_id": "the rows are keyed by the tenant id"},
    "pulumi-python:dynamic/registry:ServiceAccount": {"username": "the credential is keyed by the username"},
}
"""Type token → {input path pattern: why a change there forces a new resource}."""

STATEFUL_TYPES: dict[str, str] = {
    "kubernetes:core/v1:PersistentVolumeClaim": "its volume holds the data",
    "kubernetes:apps/v1:StatefulSet": "its volumeClaimTemplates' claims hold data",
    "kubernetes:core/v1:Namespace": "deleting a namespace deletes everything in it",
    "pulumi-python:dynamic/influxdb:Bucket": "holds telemetry",
    "pulumi-python:dynamic/influxdb:Organization": "deleting an org deletes its buckets",
    "pulumi-python:dynamic/registry:Tenant": "the tenant's registry rows (sites, machines, devices)",
    "tls:index/selfSignedCert:SelfSignedCert": "a CA: every certificate in the field chains to it",
    "tls:index/privateKey:PrivateKey": "a CA's key: every certificate in the field chains to it",
    "aws:s3/bucket:Bucket": "holds objects",
    "aws:s3/bucketV2:BucketV2": "holds objects",
    "aws:rds/instance:Instance": "a database",
    "aws:eks/cluster:Cluster": "replacing a cluster loses every workload and volume in it",
    "aws:kms/key:Key": "what it encrypted is unreadable without it",
    "aws:efs/fileSystem:FileSystem": "holds files",
    "aws:timestreaminfluxdb/dbInstance:DbInstance": "a telemetry database",
    "aws:ec2/instance:Instance": "a Phase A VM: the registry, store and broker queue are on its disk",
}
"""Type token → why replacing or deleting it loses data (with :data:`STATEFUL_ONLY_IF` for the
types that hold state only in some configurations)."""

STATEFUL_ONLY_IF: dict[str, str] = {
    "kubernetes:apps/v1:StatefulSet": "input:spec.volumeClaimTemplates",
    "tls:index/selfSignedCert:SelfSignedCert": "input:isCaCertificate",
    "tls:index/privateKey:PrivateKey": "parent:ironlink:pki:CertificateAuthority",
}
"""``input:<path>``: stateful only when that input is set and not empty; ``parent:<type>``: only as a
child of a component of that type (the CA's key, not a server's)."""


def force_new_patterns(type_token: str) -> dict[str, str]:
    """Every pattern forcing replacement of ``type_token`` (Kubernetes kinds add the metadata ones)."""
    patterns = dict(FORCE_NEW.get(type_token, {}))
    if type_token.startswith(_K8S):
        patterns = {**KUBERNETES_METADATA, **patterns}
    return patterns
