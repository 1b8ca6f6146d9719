"""Counting and timing models: what the pipeline's ``profile`` stage and every report use.

* :mod:`.counters` -- parameters per component, MACs with ``torch.utils.flop_counter`` on
  ``meta`` (conv+linear and attention apart), fvcore/thop cross-checks;
* :mod:`.latency` -- warm-up, CUDA events or ``perf_counter``, median + IQR, peak memory.

The benchmark and report scripts on top of these live in ``profiling/``.
"""

from .counters import MacCounter, MacReport, count_macs, count_macs_fvcore, count_macs_thop, count_params
from .latency import LatencyReport, PeakMemory, device_name, measure_latency, peak_memory

__all__ = ["LatencyReport", "MacCounter", "MacReport", "PeakMemory", "count_macs", "count_macs_fvcore",
           "count_macs_thop", "count_params", "device_name", "measure_latency", "peak_memory"]
