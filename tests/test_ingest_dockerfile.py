"""The worker's image: pinned, non-root, with a healthcheck, and holding everything it imports."""

from __future__ import annotations

from tests import image_closure as image

DOCKERFILE = image.ROOT / "ingest" / "Dockerfile"
INSTRUCTIONS = image.instructions(DOCKERFILE)


def test_the_worker_runs_on_a_pinned_slim_python_as_a_numeric_non_root_user_with_a_healthcheck() -> None:
    image.non_root_uid(INSTRUCTIONS)
    (healthcheck,) = INSTRUCTIONS["HEALTHCHECK"]
    assert '"-m", "ingest.healthcheck"' in healthcheck
    assert INSTRUCTIONS["ENTRYPOINT"] == ['["python", "-m", "ingest"]']


def test_the_image_pins_every_distribution_the_worker_imports_at_the_version_tested() -> None:
    """Each third-party import of the code the image runs (the worker and the dead-letter consumer,
    followed through the project's own imports) is pinned (pip brings their own dependencies),
    nothing else is, and each pin is the version this suite runs against."""
    _, imported = image.closure("ingest", skip=set())
    pinned = image.pins(INSTRUCTIONS)
    assert {image.normalised(name) for name in pinned} == imported
    assert image.version_drift(pinned) == []


def test_the_image_copies_every_project_module_the_worker_imports() -> None:
    files, _ = image.closure("ingest", skip=set())
    assert image.left_out(files, DOCKERFILE) == []
