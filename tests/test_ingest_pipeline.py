"""The worker's pure parts: derived metrics, quota, line protocol, dead letters, store errors."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import pytest
import urllib3
from influxdb_client import Point as ClientPoint
from influxdb_client import WritePrecision
from influxdb_client.rest import ApiException

from ingest.contract import Reason, Rejected, TelemetryV2
from ingest.derive import DerivedMetrics
from ingest.pipeline import DeadLetter, Pipeline, Point, TenantQuota, dead_letter_document
from ingest.points import to_line
from ingest.settings import worker_settings_for
from ingest.store import is_retryable
from tests.fixtures.ingest import ACME_PRESS, GLOBEX_MOLDER, fleet_machines, platform, topic, v1, v2

T0 = 1_750_000_000.0


def sample(ts: float, status: str = "running", **metrics: float) -> TelemetryV2:
    return TelemetryV2(
        schema_version=2,
        tenant_id="acme",
        site_id="plant-1",
        machine_id="press-01",
        machine_type="hydraulic_press",
        ts=ts,
        status=status,  # type: ignore[arg-type]
        metrics=metrics or {"oil_temp_c": 50.0},
    )


# ---------------------------------------------------------------------------------- derived
def test_duty_cycle_and_uptime_credit_each_interval_to_the_status_that_began_it() -> None:
    derived = DerivedMetrics(window_s=900, max_gap_s=60)
    assert derived.update(sample(T0, "running")) == {}, "a first sample has no history"
    derived.update(sample(T0 + 30, "stopped"))  # 30 s running
    derived.update(sample(T0 + 40, "fault"))  # 10 s stopped
    result = derived.update(sample(T0 + 50, "running"))  # 10 s fault
    assert result["duty_cycle_pct"] == pytest.approx(100 * 30 / 50)
    assert result["uptime_pct"] == pytest.approx(100 * 40 / 50)


def test_temperature_delta_follows_the_machine_types_temperature_metric() -> None:
    derived = DerivedMetrics(window_s=900, max_gap_s=60)
    derived.update(sample(T0, oil_temp_c=50.0))
    assert derived.update(sample(T0 + 1, oil_temp_c=53.5))["temp_delta_c"] == pytest.approx(3.5)
    assert "temp_delta_c" not in derived.update(sample(T0 + 2, pressure_bar=100.0))
    assert derived.update(sample(T0 + 3, oil_temp_c=52.0))["temp_delta_c"] == pytest.approx(-1.5)


def test_a_silence_is_credited_only_up_to_the_gap_cap() -> None:
    derived = DerivedMetrics(window_s=900, max_gap_s=60)
    derived.update(sample(T0, "stopped"))
    derived.update(sample(T0 + 60, "running"))  # 60 s stopped
    result = derived.update(sample(T0 + 600, "running"))  # silent 540 s: only 60 s counted
    assert result["duty_cycle_pct"] == pytest.approx(50.0)


def test_the_window_forgets_old_intervals() -> None:
    derived = DerivedMetrics(window_s=100, max_gap_s=60)
    derived.update(sample(T0, "fault"))
    derived.update(sample(T0 + 50, "running"))  # 50 s fault
    for step in range(1, 5):
        result = derived.update(sample(T0 + 50 + 50 * step, "running"))
    assert result["uptime_pct"] == pytest.approx(100.0), "fault left the 100 s window"


def test_a_late_or_redelivered_sample_changes_nothing() -> None:
    derived = DerivedMetrics(window_s=900, max_gap_s=60)
    derived.update(sample(T0, "running"))
    first = derived.update(sample(T0 + 10, "stopped"))
    assert derived.update(sample(T0 + 10, "stopped")) == {}
    assert derived.update(sample(T0 + 5, "fault")) == {}
    assert derived.update(sample(T0 + 20, "stopped"))["duty_cycle_pct"] == pytest.approx(50.0)
    assert first["duty_cycle_pct"] == pytest.approx(100.0)


# ------------------------------------------------------------------------------------ quota
@dataclass
class Clock:
    """The worker's monotonic clock, moved by the test."""

    now: float = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_quota_admits_its_burst_at_once_then_refills_at_its_rate() -> None:
    clock = Clock()
    quota = TenantQuota(messages_per_second=4, burst_s=60, clock=clock)
    assert sum(quota.admit() for _ in range(300)) == 240, "60 s of 4/s pass at once, not one more"
    clock.now += 0.25
    assert [quota.admit(), quota.admit()] == [True, False], "a quarter second earns one message"
    clock.now += 3600
    assert sum(quota.admit() for _ in range(300)) == 240, "an idle hour refills only up to the burst"


def test_a_sender_at_its_quota_is_never_refused() -> None:
    clock = Clock()
    quota = TenantQuota(messages_per_second=4, burst_s=1, clock=clock)
    for _ in range(4):
        quota.admit()  # the burst spent: from here on only the rate counts
    admitted = []
    for _ in range(400):
        clock.now += 0.25
        admitted.append(quota.admit())
    assert all(admitted)


# ------------------------------------------------------------------------------ line protocol
def parse_line(line: str) -> tuple[str, dict[str, str], dict[str, str], str]:
    head, fields, ts = line.split(" ")
    measurement, *tags = head.split(",")
    return (
        measurement,
        dict(tag.split("=", 1) for tag in tags),
        dict(field.split("=", 1) for field in fields.split(",")),
        ts,
    )


def test_the_line_is_the_point_influxdb_client_would_write() -> None:
    telemetry = sample(T0 + 0.123, "fault", oil_temp_c=50.0, stroke_count=1e12)
    derived = {"duty_cycle_pct": 12.5, "temp_delta_c": -0.25}
    reference = (
        ClientPoint("telemetry")
        .tag("tenant_id", "acme")
        .tag("site_id", "plant-1")
        .tag("machine_id", "press-01")
        .tag("machine_type", "hydraulic_press")
        .field("oil_temp_c", 50.0)
        .field("stroke_count", 1e12)
        .field("duty_cycle_pct", 12.5)
        .field("temp_delta_c", -0.25)
        .field("status", "fault")
        .field("status_code", 2)
        .time(int(T0 * 1000) + 123, WritePrecision.MS)
        .to_line_protocol()
    )
    ours, theirs = parse_line(to_line(telemetry, derived)), parse_line(reference)
    assert ours[:2] == theirs[:2] and ours[3] == theirs[3]
    assert ours[2].keys() == theirs[2].keys()
    for name, value in ours[2].items():  # floats may print differently (61.0 vs 61), never mean it
        numeric = not (value.startswith('"') or value.endswith("i"))
        assert (float(value) == float(theirs[2][name])) if numeric else value == theirs[2][name], name


# ------------------------------------------------------------------------------ dead letters
def test_a_dead_letter_keeps_text_payloads_as_text_and_binary_as_base64_within_the_bound() -> None:
    rejected = Rejected(Reason.MALFORMED, "payload: Invalid JSON")
    text = json.loads(dead_letter_document(rejected, "ironlink/a/b/c/telemetry", b'{"x": 1', T0, 100))
    assert text == {
        "reason": "malformed",
        "detail": "payload: Invalid JSON",
        "topic": "ironlink/a/b/c/telemetry",
        "payload": '{"x": 1',
        "payload_encoding": "text",
        "payload_bytes": 7,
        "truncated": False,
        "received_at": "2025-06-15T15:06:40.000+00:00",
    }
    binary = json.loads(dead_letter_document(rejected, "t", b"\xff" * 10, T0, 4))
    assert binary["payload_encoding"] == "base64" and base64.b64decode(binary["payload"]) == b"\xff" * 4
    assert binary["truncated"] is True and binary["payload_bytes"] == 10


# ---------------------------------------------------------------------------------- pipeline
def pipeline(quota: float | None = None, clock: Clock | None = None, **settings: Any) -> Pipeline:
    """The two-tenant test platform's pipeline; ``quota``: every tenant's messages per second."""
    tenant_quota = {"max_devices": 50, "messages_per_second": quota}
    config = platform(**({"broker": {"tenant_quota": tenant_quota}} if quota else {}))
    worker = worker_settings_for(
        config,
        mqtt_host="b",
        mqtt_port=1,
        store_urls={"influxdb": "http://s"},
        **({"machines": fleet_machines()} | settings),
    )
    return Pipeline(worker, clock or Clock())


def test_the_pipeline_turns_a_valid_message_into_a_point_of_its_tenant() -> None:
    outcome = pipeline().process(topic(ACME_PRESS), v2(ACME_PRESS, T0), T0)
    assert isinstance(outcome, Point) and outcome.tenant_id == "acme" and outcome.ts == T0
    assert outcome.line.endswith(f" {int(T0 * 1000)}")


def test_a_tenant_unknown_to_this_platform_is_dead_lettered() -> None:
    stranger = ("initech", "hq", "press-01")
    payload = v2(ACME_PRESS, T0).replace(b'"acme"', b'"initech"').replace(b'"plant-1"', b'"hq"')
    outcome = pipeline().process(topic(stranger), payload, T0)
    assert isinstance(outcome, DeadLetter) and outcome.reason is Reason.UNKNOWN_TENANT
    assert outcome.tenant_label == "_unknown", "metric labels stay bounded to configured tenants"


def test_a_tenant_over_its_quota_is_dead_lettered() -> None:
    subject = pipeline(quota=1, quota_burst_s=1)  # one message, then one a second
    first = subject.process(topic(ACME_PRESS), v2(ACME_PRESS, T0), T0)
    second = subject.process(topic(ACME_PRESS), v2(ACME_PRESS, T0 + 1), T0)
    assert isinstance(first, Point)
    assert isinstance(second, DeadLetter) and second.reason is Reason.QUOTA_EXCEEDED
    assert "'acme' is over its quota of 1 messages/s" in second.detail
    assert json.loads(second.document)["reason"] == "quota_exceeded"
    globex = subject.process(topic(GLOBEX_MOLDER), v2(GLOBEX_MOLDER, T0, mold_temp_c=60.0), T0)
    assert isinstance(globex, Point), "each tenant has its own bucket"


def test_spreading_ts_does_not_bypass_the_quota() -> None:
    """Arrival counts, not the payload's ts: a flood stamped a second apart is still a flood."""
    subject = pipeline(quota=2, quota_burst_s=10)  # 20 at once
    outcomes = [
        subject.process(topic(ACME_PRESS), v2(ACME_PRESS, T0 - 3600 + step), T0) for step in range(30)
    ]
    assert [isinstance(outcome, Point) for outcome in outcomes] == [True] * 20 + [False] * 10
    assert {outcome.reason for outcome in outcomes[20:] if isinstance(outcome, DeadLetter)} == {
        Reason.QUOTA_EXCEEDED
    }


def test_a_backlog_within_the_burst_passes_at_once() -> None:
    """What the broker queued during a 30 s worker restart arrives at once, within the 60 s burst."""
    subject = pipeline(quota=2)
    backlog = [
        subject.process(topic(ACME_PRESS), v2(ACME_PRESS, T0 + step / 2), T0 + 30) for step in range(60)
    ]
    assert all(isinstance(outcome, Point) for outcome in backlog)


def test_each_replica_admits_its_share_of_the_quota() -> None:
    clock = Clock()
    subject = pipeline(quota=4, clock=clock, quota_burst_s=10, quota_share_replicas=2)  # 2/s here
    at_once = [subject.process(topic(ACME_PRESS), v2(ACME_PRESS, T0 + step), T0) for step in range(30)]
    assert sum(isinstance(outcome, Point) for outcome in at_once) == 20, "10 s of this replica's 2/s"
    refused = at_once[-1]
    assert (
        isinstance(refused, DeadLetter) and "this replica admits 2/s (one of 2 sharing it)" in refused.detail
    )
    clock.now += 1
    later = [subject.process(topic(ACME_PRESS), v2(ACME_PRESS, T0 + 100 + step), T0) for step in range(3)]
    assert [isinstance(outcome, Point) for outcome in later] == [True, True, False]


def test_a_message_refused_for_its_ts_does_not_spend_quota() -> None:
    subject = pipeline(quota=1, quota_burst_s=1)
    future = subject.process(topic(ACME_PRESS), v2(ACME_PRESS, T0 + 3 * DAY), T0)
    assert isinstance(future, DeadLetter) and future.reason is Reason.TS_IN_FUTURE
    assert isinstance(subject.process(topic(ACME_PRESS), v2(ACME_PRESS, T0), T0), Point)


# ------------------------------------------------------------------------------- ts bounds
DAY = 86_400
RAW_BASIC = 7 * DAY  # the test platform's tenants are on tier "basic": raw data kept 7 days


@pytest.mark.parametrize(
    ("offset", "reason"),
    [
        (3 * DAY, Reason.TS_IN_FUTURE),  # a device whose clock is days ahead
        (300.001, Reason.TS_IN_FUTURE),
        (300, None),  # exactly at the skew bound
        (0, None),
        (-RAW_BASIC, None),  # exactly at the age bound
        (-RAW_BASIC - 0.001, Reason.TS_TOO_OLD),
        (-30 * DAY, Reason.TS_TOO_OLD),
    ],
)
def test_ts_is_bounded_by_the_clock_skew_ahead_and_the_tiers_age_behind(
    offset: float, reason: Reason | None
) -> None:
    outcome = pipeline().process(topic(ACME_PRESS), v2(ACME_PRESS, T0 + offset), T0)
    if reason is None:
        assert isinstance(outcome, Point), outcome
    else:
        assert isinstance(outcome, DeadLetter) and outcome.reason is reason, outcome
        assert json.loads(outcome.document)["reason"] == reason.value


def test_a_ts_rejection_names_the_field_the_value_and_the_bound() -> None:
    ahead = pipeline().process(topic(ACME_PRESS), v2(ACME_PRESS, T0 + 3 * DAY), T0)
    assert isinstance(ahead, DeadLetter)
    assert ahead.detail == (
        f"ts: {T0 + 3 * DAY!r} (2025-06-18T15:06:40.000+00:00) is 259200 s ahead of its arrival at "
        "2025-06-15T15:06:40.000+00:00; at most 300 s is allowed (ingest.max_clock_skew_s)"
    )
    old = pipeline().process(topic(ACME_PRESS), v1(ACME_PRESS, int(T0) - 8 * DAY, T_OIL=50.0), T0)
    assert isinstance(old, DeadLetter) and old.reason is Reason.TS_TOO_OLD
    assert old.detail.startswith(f"ts: {T0 - 8 * DAY!r} (2025-06-07T15:06:40.000+00:00) is 691200 s older")
    assert old.detail.endswith(f"tenant 'acme' accepts at most {RAW_BASIC} s (its retention tier's max_age)")


def test_the_bounds_follow_the_config() -> None:
    config = platform(
        ingest={"max_clock_skew_s": 5},
        influxdb={"retention_tiers": {"basic": {"raw": "forever", "downsampled": "forever"}}},
    )
    subject = Pipeline(
        worker_settings_for(
            config, mqtt_host="b", mqtt_port=1, store_urls={"influxdb": "http://s"}, machines=fleet_machines()
        ),
        Clock(),
    )
    ahead = subject.process(topic(ACME_PRESS), v2(ACME_PRESS, T0 + 6), T0)
    assert isinstance(ahead, DeadLetter) and ahead.reason is Reason.TS_IN_FUTURE
    ancient = subject.process(topic(ACME_PRESS), v2(ACME_PRESS, T0 - 3650 * DAY), T0)
    assert isinstance(ancient, Point), "raw data kept forever: no age bound"


def test_an_unforeseen_error_becomes_a_dead_letter_not_a_poison_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    subject = pipeline()

    def explode(*_: object) -> dict[str, float]:
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(subject.derived, "update", explode)
    outcome = subject.process(topic(ACME_PRESS), v2(ACME_PRESS, T0), T0)
    assert isinstance(outcome, DeadLetter) and outcome.reason is Reason.INTERNAL_ERROR
    assert "ZeroDivisionError" in outcome.detail


# ------------------------------------------------------------------------------------- store
@pytest.mark.parametrize(
    ("error", "retry"),
    [
        (ApiException(status=400, reason="bad line"), False),
        (ApiException(status=422, reason="field type conflict"), False),
        (ApiException(status=401, reason="unauthorized"), True),
        (ApiException(status=503, reason="unavailable"), True),
        (urllib3.exceptions.NewConnectionError(None, "refused"), True),  # type: ignore[arg-type]
    ],
)
def test_only_a_refusal_of_the_data_itself_is_not_retried(error: Exception, retry: bool) -> None:
    assert is_retryable(error) is retry
