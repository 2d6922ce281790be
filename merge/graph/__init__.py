"""Model graphs: which tensor axes index the same hidden units (permutation specs).

`trace` derives a spec from a runnable module with torch.fx; `families` derives one from tensor names and
config.json for known architectures.
"""

from __future__ import annotations

from suture.merge.graph.trace import Tap, TraceResult, spec_from_module, trace_module

__all__ = ["Tap", "TraceResult", "spec_from_module", "trace_module"]
