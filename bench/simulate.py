"""The load model at scale: a year of the seed's sale traffic (18,000 msg/s, 5.7e11 messages).

Times ``replaysafe.simulate.simulate`` on the ``seed-sale`` preset over 365 days, aggregated in
one-second slices (3.15e7 slices, drawn a day at a time) and, side by side in the same run, in
one-minute slices and closed form only. Reports wall seconds and simulated messages per wall
second; writes bench/results/simulate.json. The issue's bar is "a year in under a minute on this
machine"; the numbers are for this machine only.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from replaysafe.simulate import preset, simulate

YEAR = 365 * 86_400.0


def run(slice_seconds: float | None, days: float) -> dict[str, Any]:
    model = replace(
        preset("seed-sale"),
        duration=days * 86_400.0,
        slice_seconds=slice_seconds or 1.0,
        crash_rate_per_hour=2.0,  # exercise the crash draws too
    )
    started = time.perf_counter()
    result = simulate(model, sample=slice_seconds is not None)
    seconds = time.perf_counter() - started
    out: dict[str, Any] = {
        "slice_seconds": slice_seconds,
        "simulated_seconds": model.duration,
        "seconds": round(seconds, 3),
        "redelivery_eligible_per_s": result.redelivery_eligible_per_s,
        "ambiguous_executions_per_s": result.ambiguous_executions_per_s,
    }
    if result.sampled is not None:
        s = result.sampled
        out.update(
            slices=s.slices,
            messages=s.messages,
            messages_per_wall_second=round(s.messages / seconds),
            sampled_redelivery_eligible_per_s=s.redelivery_eligible_per_s,
            sampled_ambiguous_executions_per_s=s.ambiguous_executions_per_s,
            worst_slice_eligible_per_s=s.worst_slice_eligible_per_s,
            worst_hour_duplicates_no_ledger=s.duplicates_per_hour_max,
            crashes=s.crashes,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--days", type=float, default=365.0)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "simulate.json"
    )
    args = parser.parse_args()
    variants = {
        "one-second slices": run(1.0, args.days),
        "one-minute slices": run(60.0, args.days),
        "closed form only": run(None, args.days),
    }
    report = {
        "benchmark": "simulate",
        "preset": "seed-sale",
        "days": args.days,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "target": "a year of 18,000 msg/s in under 60 s",
        "results": variants,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in variants.items():
        rate = r.get("messages_per_wall_second")
        extra = f"   {r['messages']:.3e} messages, {rate:.3e} msg per wall second" if rate else ""
        print(f"{name:18} {r['seconds']:>8.2f} s{extra}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
