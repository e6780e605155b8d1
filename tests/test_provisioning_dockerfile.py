"""The provisioning service's image: pinned, non-root, a volume for the CA keys, and holding every
module the service imports (followed from ``provisioning/`` through the project's own imports)."""

from __future__ import annotations

from tests import image_closure as image

DOCKERFILE = image.ROOT / "provisioning" / "Dockerfile"
INSTRUCTIONS = image.instructions(DOCKERFILE)


def test_the_service_runs_as_a_numeric_non_root_user_with_a_volume_for_its_ca_keys() -> None:
    image.non_root_uid(INSTRUCTIONS)
    assert INSTRUCTIONS["VOLUME"] == ["/ca"] and "IRONLINK_PROV_CA_DIR=/ca" in INSTRUCTIONS["ENV"]
    assert INSTRUCTIONS["ENTRYPOINT"] == ['["python", "-m", "provisioning"]']
    assert len(INSTRUCTIONS["HEALTHCHECK"]) == 1


def test_the_image_pins_every_distribution_the_service_imports_at_the_version_tested() -> None:
    _, imported = image.closure("provisioning", skip={"openapi.py"})
    pinned = image.pins(INSTRUCTIONS)
    # psycopg's binary build and pool are extras of psycopg (imported as psycopg / psycopg_pool).
    assert imported <= {image.normalised(name) for name in pinned}, imported
    assert image.version_drift(pinned) == []


def test_the_image_copies_every_project_module_the_service_imports() -> None:
    files, _ = image.closure("provisioning", skip={"openapi.py"})
    assert image.left_out(files, DOCKERFILE) == []
