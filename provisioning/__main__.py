"""``python -m provisioning``: the provisioning API until SIGTERM.

Exit code 2 with every problem named when the settings are wrong (``provisioning/settings.py``), a
configured CA cannot be used, or the registry cannot be migrated; the CA keys are never printed.
"""

from __future__ import annotations

import sys

import psycopg
import uvicorn

from ingest.logs import configure_logging
from ingest.settings import SettingsError
from provisioning.app import create_app, open_provisioner
from provisioning.brokers import BrokerError
from provisioning.ca import CAError
from provisioning.settings import ProvisioningSettings
from provisioning.tls import TrustedCAs, server_config
from registry.migrate import MigrationError


def main() -> int:
    try:
        settings = ProvisioningSettings.from_env()
        settings.dsn()
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    trusted = TrustedCAs()
    try:
        service = open_provisioner(settings, on_new_ca=trusted)
    except CAError as error:
        print(f"error: IRONLINK_PROV_CA_*: {error}", file=sys.stderr)
        return 2
    except (psycopg.OperationalError, MigrationError) as error:
        print(f"error: IRONLINK_PROV_REGISTRY_DSN: the registry cannot be used: {error}", file=sys.stderr)
        return 2
    except BrokerError as error:
        print(f"error: IRONLINK_PROV_MOSQUITTO_*: {error}", file=sys.stderr)
        return 2
    app = create_app(service)
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        # Plain HTTP behind a TLS-terminating proxy: everything but renewal (which needs mTLS here).
        config = uvicorn.Config(
            app, host=settings.http_host, port=settings.http_port, log_level=settings.log_level
        )
    else:
        config = server_config(
            app,
            host=settings.http_host,
            port=settings.http_port,
            cert_file=str(settings.tls_cert_file),
            key_file=str(settings.tls_key_file),
            ca_bundle_pem=service.authorities.bundle_pem(),
            trusted=trusted,
            log_level=settings.log_level,
        )
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
