"""Machine-type catalog: the canonical metrics each machine type reports.

The catalog is part of the telemetry contract (see ``ingest/README.md``): the stack config refuses a
machine whose type is not listed here, the worker maps vendor signal names onto canonical metric
names and checks bounds with it, and the simulator draws realistic values from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property


@dataclass(frozen=True)
class Metric:
    """One canonical metric: its unit, the physically plausible range and vendor aliases."""

    name: str
    unit: str
    minimum: float
    maximum: float
    typical: float
    vendor_signals: tuple[str, ...] = ()


@dataclass(frozen=True)
class MachineType:
    """A kind of machine and the canonical metrics it publishes."""

    name: str
    description: str
    metrics: tuple[Metric, ...] = field(default_factory=tuple)
    temperature_metric: str | None = None

    def metric(self, name: str) -> Metric | None:
        return self._by_name.get(name)

    def canonical_name(self, signal: str) -> str | None:
        """Canonical metric name for a canonical or vendor signal name, None when unknown."""
        return self._by_signal.get(signal)

    # Lookups by name: the worker asks these for every metric of every message.
    @cached_property
    def _by_name(self) -> dict[str, Metric]:
        return {metric.name: metric for metric in self.metrics}

    @cached_property
    def _by_signal(self) -> dict[str, str]:
        return {
            signal: metric.name for metric in self.metrics for signal in (metric.name, *metric.vendor_signals)
        }


GATEWAY_MACHINE_TYPE = "edge_gateway"
"""The type an edge gateway is enrolled as, to publish its own health (``edge/health.py``)."""

MACHINE_TYPES: dict[str, MachineType] = {
    machine_type.name: machine_type
    for machine_type in (
        MachineType(
            name="cnc_mill",
            description="CNC milling centre",
            temperature_metric="spindle_temp_c",
            metrics=(
                Metric("spindle_speed_rpm", "rpm", 0, 30000, 12000, ("S_ACT", "spindleSpeed")),
                Metric("spindle_temp_c", "degC", -20, 150, 45, ("T_SPINDLE", "spindleTemp")),
                Metric("spindle_load_pct", "%", 0, 150, 40, ("LOAD_SP", "spindleLoad")),
                Metric("vibration_mm_s", "mm/s", 0, 100, 2.5, ("VIB_RMS", "vibration")),
                Metric("power_kw", "kW", 0, 200, 11, ("P_TOTAL", "activePower")),
            ),
        ),
        MachineType(
            name="hydraulic_press",
            description="Hydraulic press",
            temperature_metric="oil_temp_c",
            metrics=(
                Metric("pressure_bar", "bar", 0, 700, 210, ("P_SYS", "systemPressure")),
                Metric("oil_temp_c", "degC", -20, 120, 50, ("T_OIL", "oilTemp")),
                Metric("stroke_count", "count", 0, 1e12, 1000, ("CNT_STROKE", "strokes")),
                Metric("motor_current_a", "A", 0, 500, 60, ("I_MOTOR", "motorCurrent")),
            ),
        ),
        MachineType(
            name="air_compressor",
            description="Industrial screw air compressor",
            temperature_metric="discharge_temp_c",
            metrics=(
                Metric("discharge_pressure_bar", "bar", 0, 16, 7.5, ("P_OUT", "dischargePressure")),
                Metric("discharge_temp_c", "degC", -20, 130, 80, ("T_OUT", "dischargeTemp")),
                Metric("motor_current_a", "A", 0, 400, 45, ("I_MOTOR", "motorCurrent")),
                Metric("power_kw", "kW", 0, 250, 30, ("P_TOTAL", "activePower")),
            ),
        ),
        MachineType(
            name="injection_molder",
            description="Plastic injection moulding machine",
            temperature_metric="barrel_temp_c",
            metrics=(
                Metric("barrel_temp_c", "degC", 0, 450, 230, ("T_BARREL", "barrelTemp")),
                Metric("mold_temp_c", "degC", 0, 200, 60, ("T_MOLD", "moldTemp")),
                Metric("injection_pressure_bar", "bar", 0, 3000, 1200, ("P_INJ", "injPressure")),
                Metric("cycle_time_s", "s", 0, 600, 30, ("T_CYCLE", "cycleTime")),
            ),
        ),
        MachineType(
            name="conveyor",
            description="Belt conveyor line",
            temperature_metric="motor_temp_c",
            metrics=(
                Metric("belt_speed_m_s", "m/s", 0, 10, 1.5, ("V_BELT", "beltSpeed")),
                Metric("motor_temp_c", "degC", -20, 130, 55, ("T_MOTOR", "motorTemp")),
                Metric("motor_current_a", "A", 0, 200, 12, ("I_MOTOR", "motorCurrent")),
            ),
        ),
        # The edge agent's own health (``edge/health.py``): a gateway is enrolled as a machine of
        # this type and publishes these numbers on its own telemetry topic, like any machine.
        # Counts of drops are since the agent started; source and uplink counts are of the
        # gateway's machines (at most ``edge.config.MAX_MACHINES``, 1000).
        MachineType(
            name=GATEWAY_MACHINE_TYPE,
            description="Edge gateway",
            metrics=(
                Metric("backlog_messages", "count", 0, 1e12, 0),
                Metric("backlog_bytes", "B", 0, 2.0**41, 0),
                Metric("store_bytes", "B", 0, 2.0**41, 1e6),
                Metric("oldest_unsent_age_s", "s", 0, 1e9, 0),
                Metric("dropped_max_bytes", "count", 0, 1e12, 0),
                Metric("dropped_disk_headroom", "count", 0, 1e12, 0),
                Metric("dropped_max_age", "count", 0, 1e12, 0),
                Metric("rejected_readings", "count", 0, 1e12, 0),
                Metric("sources_up", "count", 0, 1000, 2),
                Metric("sources_retrying", "count", 0, 1000, 0),
                Metric("sources_down", "count", 0, 1000, 0),
                Metric("uplinks_connected", "count", 0, 1000, 2),
                Metric("uplinks_disconnected", "count", 0, 1000, 0),
                Metric("identities_missing", "count", 0, 1000, 0),
            ),
        ),
    )
}
