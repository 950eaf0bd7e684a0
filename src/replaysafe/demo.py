"""`replaysafe demo`: the chaos harness's ``demo`` preset (:mod:`replaysafe.chaos.demo`).

This module only keeps the demo's import path: the scenario, its runs and its worker processes
live in the chaos package (one implementation of "run workers under faults and count effects").
"""

from __future__ import annotations

from replaysafe.chaos.demo import (
    BROKER_FAULTS,
    FAULTS,
    PRESET,
    STATEMENTS,
    GuaranteeResult,
    build_app,
    demo_json,
    fault_plan,
    run_demo,
    run_guarantee,
    sqs_url,
)

__all__ = [
    "BROKER_FAULTS",
    "FAULTS",
    "PRESET",
    "STATEMENTS",
    "GuaranteeResult",
    "build_app",
    "demo_json",
    "fault_plan",
    "run_demo",
    "run_guarantee",
    "sqs_url",
]
