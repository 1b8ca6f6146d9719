"""Model profiling: parameter and MAC counting (:mod:`profiling.counters`) and latency /
peak-memory measurement (:mod:`profiling.latency`)."""

from profiling.counters import (
    MacCounter,
    MacReport,
    count_macs,
    count_macs_fvcore,
    count_macs_thop,
    count_params,
)
from profiling.latency import LatencyReport, PeakMemory, device_name, measure_latency, peak_memory

__all__ = [
    "LatencyReport",
    "MacCounter",
    "MacReport",
    "PeakMemory",
    "count_macs",
    "count_macs_fvcore",
    "count_macs_thop",
    "count_params",
    "device_name",
    "measure_latency",
    "peak_memory",
]
