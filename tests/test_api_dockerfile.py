"""The API's image: pinned, non-root, a healthcheck, and holding every module the API imports
(followed from ``api/`` through the project's own imports)."""

from __future__ import annotations

from tests import image_closure as image

DOCKERFILE = image.ROOT / "api" / "Dockerfile"
INSTRUCTIONS = image.instructions(DOCKERFILE)


def test_the_api_runs_as_a_numeric_non_root_user_with_a_healthcheck_on_its_port() -> None:
    image.non_root_uid(INSTRUCTIONS)
    assert INSTRUCTIONS["ENTRYPOINT"] == ['["python", "-m", "api"]']
    (healthcheck,) = INSTRUCTIONS["HEALTHCHECK"]
    assert "127.0.0.1:8090/healthz" in healthcheck and INSTRUCTIONS["EXPOSE"] == ["8090"]


def test_the_image_pins_every_distribution_the_api_imports_at_the_version_tested() -> None:
    _, imported = image.closure("api", skip={"openapi.py"})
    pinned = {image.normalised(name) for name in image.pins(INSTRUCTIONS)}
    # psycopg's binary build is an extra of psycopg (imported as psycopg).
    assert imported <= pinned, imported - pinned
    assert image.version_drift(image.pins(INSTRUCTIONS)) == []


def test_the_image_copies_every_project_module_the_api_imports() -> None:
    files, _ = image.closure("api", skip={"openapi.py"})
    assert image.left_out(files, DOCKERFILE) == []
