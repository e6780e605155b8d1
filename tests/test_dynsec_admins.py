"""Two dynamic-security admins at once: the provisioning service and the dev platform's device sync.

Every listener sets ``use_username_as_clientid``, so one username is one session: a second login
as ``admin.dynsec`` takes the first one's session over. The dev platform's sync therefore logs in
as its own admin (``localdev.platform.DEVICE_SYNC_ADMIN``), and both work side by side against a
real Mosquitto with its plugin.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from components.render.mosquitto import DYNSEC_ADMIN, BrokerAccount, render_dynamic_security_config
from localdev.platform import DEVICE_SYNC_ADMIN
from provisioning.brokers import MosquittoDynamicSecurity
from registry.access import service_usernames
from registry.credentials import generate_password, hash_password
from tests.conftest import MosquittoFactory
from tests.fixtures.registry import platform
from tests.test_broker_isolation import DYNAMIC, Broker, start_broker

pytestmark = pytest.mark.integration
TAKEOVER_WAIT = 5.0


@pytest.fixture
def broker(start_mosquitto: MosquittoFactory, server_root: Path, tmp_path: Path) -> Iterator[Broker]:
    started = start_broker(start_mosquitto, server_root / f"dynsec-admins-{tmp_path.name}", DYNAMIC)
    yield started
    started.close()


def _login(broker: Broker, username: str, password: str) -> MosquittoDynamicSecurity:
    ca_file = str(broker.folder / "ca.pem")
    return MosquittoDynamicSecurity("127.0.0.1", broker.port, username, password, ca_file=ca_file).connect()


def _add(directory: MosquittoDynamicSecurity, machine: str) -> None:
    directory.add_device(
        f"acme.plant-1.{machine}",
        generate_password(),
        tenant_id="acme",
        site_id="plant-1",
        machine_id=machine,
    )


def test_the_device_sync_and_the_provisioning_service_are_admins_side_by_side(broker: Broker) -> None:
    service = broker.directory  # admin.dynsec, connected as the provisioning service is
    assert service is not None
    password = generate_password()
    service.add_admin(DEVICE_SYNC_ADMIN, password)  # what `ironlink dev up` does for an older state
    sync = _login(broker, DEVICE_SYNC_ADMIN, password)
    try:
        for n in range(5):  # interleaved: each command waits for its own answer
            _add(service, f"svc-made-{n}")
            _add(sync, f"sync-made-{n}")
        state = json.loads((broker.folder / "dynamic-security.json").read_text())
        clients = {client["username"] for client in state["clients"]}
        assert {f"acme.plant-1.{who}-made-{n}" for who in ("svc", "sync") for n in range(5)} <= clients
        assert (service.disconnects, sync.disconnects) == (0, 0), "one admin's session took the other's"
    finally:
        sync.close()


def test_a_second_login_as_the_same_admin_takes_the_first_ones_session(broker: Broker) -> None:
    """Why the sync has its own admin: the control case, with one username for both."""
    service = broker.directory
    assert service is not None
    intruder = _login(broker, DYNSEC_ADMIN, broker.password(DYNSEC_ADMIN))
    try:
        deadline = time.monotonic() + TAKEOVER_WAIT
        while service.disconnects == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.disconnects >= 1, "Mosquitto no longer binds the client id to the username"
    finally:
        intruder.close()


def test_the_first_state_gives_each_admin_its_own_client_and_control_role() -> None:
    fixture = platform()
    services = [BrokerAccount(name, fixture.hash_of(name)) for name in service_usernames(fixture.config)]
    admin = BrokerAccount(DYNSEC_ADMIN, hash_password("a"))
    sync = BrokerAccount(DEVICE_SYNC_ADMIN, hash_password("b"))
    state = json.loads(render_dynamic_security_config(fixture.config, admin, services, other_admins=[sync]))
    clients = {client["username"]: client for client in state["clients"]}
    roles = {role["rolename"]: role for role in state["roles"]}
    for name in (DYNSEC_ADMIN, DEVICE_SYNC_ADMIN):
        assert clients[name]["roles"] == [{"rolename": name}]
        assert {acl["topic"] for acl in roles[name]["acls"]} == {"$CONTROL/dynamic-security/#"}
    assert clients[DYNSEC_ADMIN]["password"] != clients[DEVICE_SYNC_ADMIN]["password"]
    with pytest.raises(ValueError, match="name one identity twice"):
        render_dynamic_security_config(fixture.config, admin, services, other_admins=[admin])
    with pytest.raises(ValueError, match=r"'svc\.ingest' is a service identity"):
        render_dynamic_security_config(fixture.config, admin, services, other_admins=[services[0]])
