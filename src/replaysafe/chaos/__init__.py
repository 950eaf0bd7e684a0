"""The chaos harness: real faults against real brokers, counting business effects at a sink.

See ``docs/chaos.md``. Entry points: :func:`run_matrix` (``replaysafe chaos``), the
:class:`~replaysafe.chaos.sink.EffectSink`, and :func:`~replaysafe.chaos.checker.check`.
"""

from replaysafe.chaos.cells import FAULTS, ChaosConfig, Matrix, default_cells
from replaysafe.chaos.checker import Flag, Published, RunResult, check, contrast_bar, pass_bar
from replaysafe.chaos.harness import run_matrix
from replaysafe.chaos.sink import Attempt, EffectSink, call_sink

__all__ = [
    "FAULTS",
    "Attempt",
    "ChaosConfig",
    "EffectSink",
    "Flag",
    "Matrix",
    "Published",
    "RunResult",
    "call_sink",
    "check",
    "contrast_bar",
    "default_cells",
    "pass_bar",
    "run_matrix",
]
