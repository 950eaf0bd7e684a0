"""The ambiguity surface: ambiguous executions/s over traffic scales and visibility timeouts
(``replaysafe simulate --plot``)."""

# ruff: noqa: RUF002 - the docstring uses the package docstring's notation (Greek letters)

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from replaysafe.simulate.latency import _load, redelivery_chain
from replaysafe.simulate.model import SimulationResult, simulate

if TYPE_CHECKING:
    from replaysafe.simulate.latency import FloatArray
    from replaysafe.simulate.load import LoadModel


def ambiguity_surface(
    model: LoadModel, scales: Any, visibilities: Any
) -> tuple[SimulationResult, FloatArray]:
    """Ambiguous executions/s over a grid of traffic scales (rows) and visibility timeouts
    (columns), extension off, with the latency and ρ fitted at the model's own visibility."""
    _load()
    import numpy as np  # present: _load() raised MissingExtra otherwise

    base = simulate(model, sample=False)
    vis = np.asarray(visibilities, dtype=float)
    chain = np.asarray(
        redelivery_chain(base.latency, vis, model.max_attempts, base.retry_slow_probability)
    )
    per_op = chain[0] + np.sum(chain[:-1], axis=0)  # λ·p1·attempts = λ·(p1 + Σ_{j<B} p_j)
    rates = model.rate_per_s * np.asarray(scales, dtype=float)
    return base, np.asarray(np.outer(rates, per_op), dtype=float)
