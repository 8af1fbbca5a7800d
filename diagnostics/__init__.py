"""Independence diagnostics: how orthogonal the domain and instruction task vectors are.

Per tensor, streamed chunk by chunk in float64 sums (stats), grouped by layer, module type and
overall from those sums (aggregate), written as diagnostics.json / .md / .svg (report). The merge
measures through finmerge.plugins.collector; `finmerge diagnose` reads the checkpoints (standalone).
"""

from finmerge.diagnostics.stats import StatsCollector, Sums, TensorAccumulator

__all__ = ["StatsCollector", "Sums", "TensorAccumulator"]
