"""The shared server fixtures start the real binaries and answer on their ports."""

import urllib.request

import psycopg
import pytest

pytestmark = pytest.mark.integration


def test_victoria_metrics_accepts_influx_line_protocol(victoria_metrics: str) -> None:
    request = urllib.request.Request(
        f"{victoria_metrics}/api/v2/write?org=x&bucket=y", data=b"probe,tenant_id=t value=1", method="POST"
    )
    with urllib.request.urlopen(request) as response:
        assert response.status == 204


def test_postgres_runs_queries(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
