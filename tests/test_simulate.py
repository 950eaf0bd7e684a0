"""The load model (`replaysafe simulate`): the seed's numbers, the formulas against an independent
Monte Carlo of the same process, the model against the REAL runtime on the memory broker with a
fake clock, the CLI (--json, --from-metrics, --scale, --plot) and the missing-extra errors."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

# the sim extra is part of the test install: a missing one fails the run, never skips it
import numpy as np
import pytest
from click.testing import CliRunner

from replaysafe import ConfigurationError, Context, Envelope, Guarantee, MissingExtra
from replaysafe import observe as o
from replaysafe import simulate as sim
from replaysafe.app import RetryPolicy
from replaysafe.brokers.base import RedeliveryKind
from replaysafe.cli import main
from replaysafe.simulate import (
    LatencyModel,
    LoadModel,
    MetricsView,
    fit_latency,
    preset,
    redelivery_chain,
    simulate,
)
from replaysafe.simulate import latency as sim_latency

from .runtime_harness import SOURCE, Harness

REQUIRED_KEYS = {
    "rate_per_s",
    "outlive_visibility_fraction",
    "redelivery_eligible_per_s",
    "ambiguous_executions_per_s",
    "ledger_rows_at_horizon",
    "ledger_bytes_at_horizon",
    "redeliveries_per_s",
    "replay_set_at_crash",
    "duplicates_per_hour_no_ledger",
    "duplicates_per_hour_with_ledger",
    "ledger_ops_per_s",
    "in_flight_needed",
    "extension_effect",
    "open_ambiguity",
}


# --------------------------------------------------------------------------- the seed's numbers


def test_sale_preset_reproduces_the_seed() -> None:
    r = simulate(preset("seed-sale"))
    # "0.4% of messages outliving visibility: 72 messages/s become eligible for redelivery"
    assert r.outlive_visibility_fraction == pytest.approx(0.004, rel=1e-9)
    assert abs(r.redelivery_eligible_per_s - 72) <= 1
    # "at 2.3 attempts on average, about 165 handler executions/s" on ambiguous operations
    assert r.attempts_per_outlive == pytest.approx(2.3, abs=1e-6)
    assert abs(r.ambiguous_executions_per_s - 165) <= 2
    # the fitted mixture keeps the stated mean and p99
    assert r.latency.mean() == pytest.approx(0.9, rel=1e-9)
    assert float(r.latency.quantile(0.99)) == pytest.approx(11.0, rel=1e-6)
    # and the aggregated sample of one hour agrees with the closed form
    assert r.sampled is not None
    assert abs(r.sampled.redelivery_eligible_per_s - 72) <= 1
    assert abs(r.sampled.ambiguous_executions_per_s - 165.6) <= 2
    assert r.sampled.messages == pytest.approx(18_000 * 3600, rel=0.01)
    # Little's law: 18,000/s x (0.9 s + 20 ms ack) in flight, plus the overlapping retries
    assert 18_000 * 0.92 < r.in_flight_needed < 18_000 * 0.92 * 1.3
    assert r.extension_effect["on"]["in_flight_needed"] == pytest.approx(18_000 * 0.92)
    # 24 h of 18,000/s stay in the ledger
    assert r.ledger_rows_at_horizon == pytest.approx(18_000 * 86_400, rel=1e-4)
    assert r.ledger_bytes_at_horizon == pytest.approx(r.ledger_rows_at_horizon * 358.6, rel=1e-9)


def test_test_preset_is_effectively_exactly_once() -> None:
    r = simulate(preset("seed-test"))
    assert r.redelivery_eligible_per_s < 0.01
    assert r.ambiguous_executions_per_s < 0.01
    assert r.redeliveries_per_s < 0.01
    assert r.latency.mean() == pytest.approx(0.12, rel=1e-9)
    assert float(r.latency.quantile(0.99)) < 2.0
    # 400/s x (120 ms + 20 ms ack) in flight, 2.8 per worker
    assert r.in_flight_needed == pytest.approx(400 * 0.14, rel=1e-3)
    assert r.in_flight_needed_per_worker == pytest.approx(400 * 0.14 / 20, rel=1e-3)
    assert r.ledger_rows_at_horizon == pytest.approx(400 * 86_400, rel=1e-4)


def test_ten_times_the_sale_is_ten_times_the_ambiguity() -> None:
    base = simulate(preset("seed-sale"), sample=False)
    big = simulate(preset("seed-sale").scaled(10), sample=False)
    keys = (
        "redelivery_eligible_per_s",
        "ambiguous_executions_per_s",
        "redeliveries_per_s",
        "duplicates_per_hour_no_ledger",
        "ledger_rows_at_horizon",
        "in_flight_needed",
    )
    for key in keys:
        assert getattr(big, key) == pytest.approx(10 * getattr(base, key), rel=1e-9), key
    assert big.outlive_visibility_fraction == pytest.approx(base.outlive_visibility_fraction)


# --------------------------------------------------------------------------- fits and formulas


def test_lognormal_fit_reproduces_mean_and_p99() -> None:
    lat = LatencyModel.lognormal(0.12, 1.2)
    assert lat.mean() == pytest.approx(0.12, rel=1e-12)
    # erfc is a Chebyshev fit with relative error < 1.2e-7: quantiles are that exact
    assert float(lat.quantile(0.99)) == pytest.approx(1.2, rel=1e-6)
    rng = np.random.default_rng(1)
    draws = lat.sample(rng, 400_000)
    assert float(np.mean(draws)) == pytest.approx(0.12, rel=0.03)
    assert float(np.quantile(draws, 0.99)) == pytest.approx(1.2, rel=0.03)
    assert float(np.mean(draws > 0.5)) == pytest.approx(float(lat.sf(0.5)), rel=0.03)


def test_impossible_inputs_are_refused_with_what_to_change() -> None:
    # a lognormal with a 120 ms mean cannot have a 2 s p99 (ratio 16.7 > 14.96)
    with pytest.raises(ConfigurationError, match="p99/mean ratio"):
        LatencyModel.lognormal(0.12, 2.0)
    # a stated tail smaller than the lognormal's own
    with pytest.raises(ConfigurationError, match="already puts"):
        fit_latency(0.9, 11.0, visibility=30.0, tail_beyond_visibility=0.0005)
    # p99 below the visibility but more than 1% beyond it
    with pytest.raises(ConfigurationError, match="inconsistent tail"):
        fit_latency(0.9, 11.0, visibility=30.0, tail_beyond_visibility=0.05)
    with pytest.raises(ConfigurationError, match="out of reach"):
        simulate(replace(preset("seed-sale"), attempts_per_outlive=2.9), sample=False)
    with pytest.raises(ConfigurationError, match="not both"):
        LoadModel(rate_per_s=1, attempts_per_outlive=2.0, retry_slow_probability=0.5)
    with pytest.raises(ConfigurationError, match="rate_per_s"):
        LoadModel(rate_per_s=0)


def _monte_carlo_chain(
    lat: LatencyModel, v: float, budget: int, rho: float, n: int, seed: int
) -> np.ndarray:
    """The overlap process by brute force, written independently of the closed form: execution i
    starts at (i-1)V if nothing has finished yet; a retry of a slow op is slow again with
    probability rho. Returns the share of messages delivered a (j+1)-th time, j = 1..B."""
    rng = np.random.default_rng(seed)
    first = lat.sample(rng, n)
    finish = first.copy()  # earliest finish among the executions started so far
    out = []
    for j in range(1, budget + 1):
        redelivered = finish > j * v  # still not completed when the j-th timeout expires
        out.append(float(np.mean(redelivered)))
        if j == budget:
            break
        idx = np.flatnonzero(redelivered)
        slow = rng.random(idx.size) < rho
        retry = lat.sample(rng, idx.size)
        retry[slow] = lat.sample_beyond(rng, int(slow.sum()), v)
        finish[idx] = np.minimum(finish[idx], j * v + retry)
    return np.array(out)


@pytest.mark.parametrize("rho", [0.0, 0.6])
def test_redelivery_chain_matches_a_brute_force_run_of_the_same_process(rho: float) -> None:
    lat = fit_latency(2.5, 20.0, visibility=10.0, tail_beyond_visibility=0.07, slow_median=14.0,
                      slow_sigma=0.3)  # fmt: skip
    closed = np.asarray(redelivery_chain(lat, 10.0, 4, rho))
    n = 400_000
    brute = _monte_carlo_chain(lat, 10.0, 4, rho, n, seed=3)
    for p, q in zip(closed, brute, strict=True):
        sd = math.sqrt(p * (1 - p) / n)
        assert abs(p - q) <= 5 * sd + 1e-6, (closed, brute)
    assert closed[1] > 1e-4  # the second redelivery is exercised (~280 of 400k), not vanishing


def test_extension_turns_overlap_into_crash_replay_only() -> None:
    sale = replace(preset("seed-sale"), crash_rate_per_hour=6.0)
    off = simulate(sale, sample=False)
    on = simulate(replace(sale, extension=True), sample=False)
    # a crash replays the crashed worker's in-flight work; overlapping retries add to it when off
    replays_on = 6.0 / 3600 * on.replay_set.as_json()["per_worker"]["deliveries"]
    replays_off = 6.0 / 3600 * off.replay_set.as_json()["per_worker"]["deliveries"]
    assert replays_on == pytest.approx(6.0 / 3600 * 18_000 * 0.92 / 20, rel=1e-4)
    assert on.redelivery_eligible_per_s == pytest.approx(replays_on, rel=1e-4)
    assert off.redelivery_eligible_per_s == pytest.approx(72 + replays_off, rel=1e-4)
    assert off.extension_effect["on"] == pytest.approx(on.extension_effect["on"])
    assert on.extension_effect["on"]["visibility_extensions_per_s"] > 0
    assert on.duplicates_per_hour_no_ledger < off.duplicates_per_hour_no_ledger / 100
    # a crash of one worker replays ~1/20 of the fleet's in-flight work; with f = 1 only the ack
    # window (20 ms of arrivals) had its effect already
    assert off.replay_set.already_effected == pytest.approx(18_000 * 0.02, rel=1e-6)


def test_ledger_turns_crash_replays_into_the_declared_effects_outcome() -> None:
    base = replace(preset("seed-sale"), crash_rate_per_hour=6.0, effect_at=0.5)
    keyed = simulate(base, sample=False)
    unkeyed = simulate(replace(base, effect="unkeyed"), sample=False)
    retry = simulate(replace(base, effect="unkeyed-retry"), sample=False)
    assert keyed.duplicates_per_hour_with_ledger == 0
    assert keyed.duplicates_per_hour_no_ledger > 0
    assert unkeyed.duplicates_per_hour_with_ledger == 0
    assert unkeyed.outcome_unknown_per_hour_with_ledger > 0
    assert unkeyed.ledger_ops_per_s["quarantines"] > 0
    assert 0 < retry.duplicates_per_hour_with_ledger < retry.duplicates_per_hour_no_ledger


def test_a_year_of_sale_traffic_is_aggregated_not_looped() -> None:
    # the bench times it; here only that a long run is sampled in slices with sane totals
    m = replace(preset("seed-sale"), duration=30 * 86_400.0, slice_seconds=60.0)
    r = simulate(m)
    assert r.sampled is not None
    assert r.sampled.slices == 30 * 1440
    assert r.sampled.messages == pytest.approx(18_000 * 30 * 86_400, rel=1e-3)
    assert r.sampled.redelivery_eligible_per_s == pytest.approx(72, rel=0.01)
    assert r.sampled.ledger_rows_at_end == pytest.approx(18_000 * 86_400, rel=1e-3)
    assert r.sampled.duplicates_per_hour_max >= r.sampled.duplicates_per_hour_mean


# --------------------------------------------------------------------------- the real runtime


async def _run_runtime(model: LoadModel, n: int, seed: int) -> dict[str, Any]:
    """Drive the real App + Worker (AT_LEAST_ONCE) on the memory broker in VISIBILITY_TIMEOUT mode
    with a fake clock; handlers sleep latencies drawn from the model's own fitted distribution."""
    r = simulate(model, sample=False)
    lat, v, rho = r.latency, model.visibility_timeout, r.retry_slow_probability
    rng = np.random.default_rng(seed)
    # stratified first latencies (one draw per 1/n quantile slice): removes the binomial noise of
    # the outlive count, so the comparison measures the runtime, not the dice
    first = lat.quantile((rng.permutation(n) + rng.random(n)) / n)
    slow_retries = list(lat.sample_beyond(rng, n, v))
    fresh_retries = list(lat.sample(rng, n))
    h = Harness(mode=RedeliveryKind.VISIBILITY_TIMEOUT)
    assert h.broker.capabilities(SOURCE).extend_visibility
    executions = [0] * n
    running = 0

    async def handle(ctx: Context) -> None:
        nonlocal running
        i = int(ctx.payload["i"])
        executions[i] += 1
        if ctx.attempt == 1:
            latency = float(first[i])
        elif rng.random() < rho:  # a retry of an operation that outlived: slow again
            latency = float(slow_retries.pop())
        else:
            latency = float(fresh_retries.pop())
        running += 1
        try:
            await h.clock.sleep(latency)
        finally:
            running -= 1

    # AT_LEAST_ONCE with visibility extension switched off (and a deadline longer than any
    # sampled latency): copies that outlive the 10 s visibility are really redelivered by the
    # broker while the first execution still runs, as the model assumes
    h.handler(Guarantee.AT_LEAST_ONCE, lease=1e6, concurrency=5000, extend_visibility=False,
              retry=RetryPolicy(max_attempts=model.max_attempts))(handle)  # fmt: skip
    h.start(workers=2)
    step = 1.0 / model.rate_per_s  # one arrival per step
    samples: list[int] = []
    warm, stop_at = 4 * v, n * step
    published = 0
    for _ in range(20):
        await asyncio.sleep(0)
    while published < n:
        await h.publish(Envelope.of(f"op-{published}", {"i": published}))
        published += 1
        h.clock.advance(step)
        for _ in range(12):
            await asyncio.sleep(0)
        if warm <= published * step <= stop_at:
            samples.append(running)
    await h.run_until(lambda: h.depth() == 0, seconds=model.max_attempts * v + 60, step=step)
    # let the executions still running after their message completed finish (no dangling tasks)
    await h.run_until(lambda: running == 0, seconds=3600, step=1.0)
    await h.stop()
    group = h.group()
    counts = [h.broker.delivery_count(SOURCE, group, f"op-{i}") for i in range(n)]
    return {
        "result": r,
        "outlived": sum(1 for c in counts if c >= 2),
        "third_deliveries": sum(1 for c in counts if c >= 3),
        "redeliveries": sum(c - 1 for c in counts),
        "executions": sum(executions),
        "exhausted": h.total(o.QUARANTINED, reason="max_attempts"),
        "in_flight_mean": sum(samples) / len(samples),
        "worker_redeliveries": h.total(o.REDELIVERIES),
    }


@pytest.mark.parametrize(("budget", "rho"), [(3, 0.0), (3, 0.5), (2, 0.9)])
async def test_model_matches_the_real_runtime_on_the_memory_broker(budget: int, rho: float) -> None:
    """Tolerances: the outlive count is stratified, so it must match N·S(V) within 3% (the clock
    steps of 50 ms quantise latencies near V); totals that depend on random retries must match
    within 4 standard deviations of their sampling noise plus 3%; the mean in-flight count must
    match Little's law within 15% (its autocorrelated noise is ~5%)."""
    model = LoadModel(
        rate_per_s=20.0,
        workers=2,
        latency_mean=2.5,
        latency_p99=20.0,
        tail_beyond_visibility=0.07,
        slow_median=14.0,
        slow_sigma=0.3,
        retry_slow_probability=rho,
        visibility_timeout=10.0,
        max_attempts=budget,
        ack_latency=0.0,
    )
    n = 5000
    got = await _run_runtime(model, n, seed=11)
    r = got["result"]
    p = np.asarray(r.redelivery_chain)
    assert p[0] == pytest.approx(0.07, rel=1e-9)
    assert p[1] > (0.005 if rho > 0 else 0.0003)  # the second link is exercised (or, at rho = 0,
    # all but absent: a retry is then as fast as any first execution)

    assert abs(got["outlived"] - n * p[0]) <= max(3, 0.03 * n * p[0]), (got, n * p[0])

    def noise(expected_extra_levels: np.ndarray) -> float:
        # variance of Σ_{j>=2} 1{R >= j} per operation (the part the retries' dice decide)
        mean = float(np.sum(expected_extra_levels))
        second = float(np.sum((2 * np.arange(1, len(expected_extra_levels) + 1) - 1)
                              * expected_extra_levels))  # fmt: skip
        return math.sqrt(n * max(second - mean * mean, 0.0))

    # delivered three times or more: the second link of the chain on its own
    want_third = n * float(p[1])
    assert abs(got["third_deliveries"] - want_third) <= 4 * math.sqrt(want_third) + 3, got

    want_redeliveries = n * float(np.sum(p))
    tol = 4 * noise(p[1:]) + 0.03 * want_redeliveries + 3
    assert abs(got["redeliveries"] - want_redeliveries) <= tol, (got, want_redeliveries, tol)
    # the runtime's own redelivery counter agrees with the broker's delivery counts
    assert got["worker_redeliveries"] == got["redeliveries"]

    want_exec = n * (1 + float(np.sum(p[:-1])))
    tol = 4 * noise(p[1:-1]) + 0.03 * n * float(np.sum(p[:-1])) + 3
    assert abs(got["executions"] - want_exec) <= tol, (got, want_exec, tol)

    want_exhausted = n * float(p[-1])
    assert abs(got["exhausted"] - want_exhausted) <= 4 * math.sqrt(want_exhausted) + 3, got
    if budget == 2:  # the (B+1)-th delivery is quarantined as max_attempts: really exercised
        assert got["exhausted"] >= 20, got

    assert got["in_flight_mean"] == pytest.approx(r.in_flight_needed, rel=0.15), got


# --------------------------------------------------------------------------- the CLI


def _cli(*args: str) -> Any:
    result = CliRunner().invoke(main, ["simulate", *args], catch_exceptions=False)
    return result


def test_cli_json_has_the_keys() -> None:
    res = _cli("--preset", "seed-sale", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert set(out) >= REQUIRED_KEYS
    assert abs(out["redelivery_eligible_per_s"] - 72) <= 1
    assert abs(out["ambiguous_executions_per_s"] - 165) <= 2
    assert set(out["replay_set_at_crash"]) == {"t", "fleet", "per_worker"}
    assert set(out["extension_effect"]) == {"off", "on"}
    assert out["inputs"]["rate_per_s"] == 18_000


def test_cli_options_override_the_preset_and_take_durations() -> None:
    res = _cli("--preset", "seed-sale", "--visibility", "40s", "--retention", "7d",
               "--duration", "2m", "--no-sample", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["inputs"]["visibility_timeout"] == 40
    assert out["inputs"]["retention"] == 7 * 86_400
    assert out["inputs"]["duration"] == 120
    assert out["sampled"] is None
    # the tail share is re-fitted at the new visibility: still 0.4% beyond it
    assert out["outlive_visibility_fraction"] == pytest.approx(0.004, rel=1e-6)
    # a visibility the slow component cannot reach with 0.4% is refused, saying what to change
    res = _cli("--preset", "seed-sale", "--visibility", "2m", "--no-sample")
    assert res.exit_code == 1 and "larger slow_median" in res.output
    # at 45 s no retry slowness gives 2.3 executions per outlived op; an explicit retry
    # probability replaces the preset's attempts target instead of clashing with it
    res = _cli("--preset", "seed-sale", "--visibility", "45s", "--no-sample")
    assert res.exit_code == 1 and "out of reach" in res.output
    res = _cli("--preset", "seed-sale", "--visibility", "45s", "--retry-slow-probability", "0.5",
               "--no-sample", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["retry_slow_probability"] == 0.5 and out["inputs"]["attempts_per_outlive"] is None


def test_cli_human_output_and_errors() -> None:
    res = _cli("--preset", "seed-test")
    assert res.exit_code == 0, res.output
    assert "effectively exactly-once" in " ".join(res.output.split())
    res = _cli("--preset", "seed-sale", "--no-sample")
    assert "no longer rare enough to ignore" in " ".join(res.output.split())
    res = _cli("--rate", "400", "--latency-mean", "0.12", "--latency-p99", "2")
    assert res.exit_code == 1
    assert "no lognormal has mean" in res.output
    res = _cli()
    assert res.exit_code == 2 and "give a load" in res.output
    res = _cli("--rate", "10", "--duration", "soon")
    assert res.exit_code == 2 and "not a duration" in res.output


EXPOSITION = """\
# HELP replaysafe_deliveries_total replaysafe_deliveries_total
# TYPE replaysafe_deliveries_total counter
replaysafe_deliveries_total{handler="charge",outcome="applied"} 9900.0
replaysafe_deliveries_total{handler="charge",outcome="quarantined"} 100.0
replaysafe_deliveries_total{handler="charge",outcome="duplicate"} 700.0
replaysafe_deliveries_total{handler="email",outcome="applied"} 5000.0
# TYPE replaysafe_handler_seconds histogram
replaysafe_handler_seconds_bucket{handler="charge",le="0.1"} 4000.0
replaysafe_handler_seconds_bucket{handler="charge",le="0.5"} 8000.0
replaysafe_handler_seconds_bucket{handler="charge",le="1.0"} 9000.0
replaysafe_handler_seconds_bucket{handler="charge",le="5.0"} 9950.0
replaysafe_handler_seconds_bucket{handler="charge",le="10.0"} 9970.0
replaysafe_handler_seconds_bucket{handler="charge",le="30.0"} 9990.0
replaysafe_handler_seconds_bucket{handler="charge",le="+Inf"} 10000.0
replaysafe_handler_seconds_sum{handler="charge"} 4500.0
replaysafe_handler_seconds_count{handler="charge"} 10000.0
replaysafe_handler_seconds_bucket{handler="email",le="0.1"} 5000.0
replaysafe_handler_seconds_bucket{handler="email",le="+Inf"} 5000.0
replaysafe_handler_seconds_sum{handler="email"} 100.0
replaysafe_handler_seconds_count{handler="email"} 5000.0
"""


def test_metrics_parser_reads_the_histogram() -> None:
    view = MetricsView.read(EXPOSITION, handler="charge")
    assert view.deliveries == 10_000  # applied + quarantined: duplicates are repeat deliveries
    assert view.mean == pytest.approx(0.45)
    # rank 9900 lies in (1.0, 5.0]: 1 + 4 * (9900 - 9000) / 950
    assert view.quantile(0.99) == pytest.approx(1 + 4 * 900 / 950)
    assert view.share_beyond(10.0) == pytest.approx(0.003)
    assert view.share_beyond(30.0) == pytest.approx(0.001)
    assert view.share_beyond(7.5) == pytest.approx(1 - (9950 + 20 * 2.5 / 5) / 10_000)
    assert view.share_beyond(100.0) is None  # no finite bucket reaches it
    both = MetricsView.read(EXPOSITION)
    assert both.deliveries == 15_000 and both.latency_count == 15_000
    with pytest.raises(ConfigurationError, match="line 2"):
        sim.parse_exposition('ok 1\nbad{handler="x} 2\n')
    with pytest.raises(ConfigurationError, match="no replaysafe_handler_seconds_count"):
        MetricsView.read(EXPOSITION, handler="nobody")


def test_cli_from_metrics_projects_k_times_the_traffic(tmp_path: Path) -> None:
    dump = tmp_path / "metrics.txt"
    dump.write_text(EXPOSITION)
    common = ["--from-metrics", str(dump), "--window", "100", "--handler", "charge",
              "--visibility", "10", "--slow-median", "15", "--no-sample", "--json"]  # fmt: skip
    res = _cli(*common)
    assert res.exit_code == 0, res.output
    one = json.loads(res.output)
    assert one["rate_per_s"] == pytest.approx(100.0)  # 10,000 first passes in 100 s
    fm = one["from_metrics"]
    assert fm["measured_latency_mean"] == pytest.approx(0.45)
    assert fm["measured_latency_p99"] == pytest.approx(1 + 4 * 900 / 950)
    assert fm["measured_share_beyond_visibility"] == pytest.approx(0.003)
    # the measured tail is heavier than the lognormal's: the mixture carries it exactly
    assert one["outlive_visibility_fraction"] == pytest.approx(0.003, rel=1e-6)
    assert len(one["latency_fit"]["components"]) == 2
    assert one["latency_fit"]["mean_s"] == pytest.approx(0.45, rel=1e-9)
    res = _cli(*common, "--scale", "10")
    assert res.exit_code == 0, res.output
    ten = json.loads(res.output)
    assert ten["scale"] == 10
    for key in ("rate_per_s", "redelivery_eligible_per_s", "ambiguous_executions_per_s",
                "redeliveries_per_s", "ledger_rows_at_horizon"):  # fmt: skip
        assert ten[key] == pytest.approx(10 * one[key], rel=1e-9), key
        assert ten["baseline"][key] == pytest.approx(one[key], rel=1e-9), key
    assert ten["outlive_visibility_fraction"] == pytest.approx(one["outlive_visibility_fraction"])
    # at 5 s the measured tail (0.5%) is LIGHTER than the lognormal with this mean and p99: the
    # model keeps the lognormal (conservative) and says so
    res = _cli("--from-metrics", str(dump), "--window", "100", "--handler", "charge",
               "--visibility", "5", "--no-sample", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    light = json.loads(res.output)
    assert light["from_metrics"]["measured_share_beyond_visibility"] == pytest.approx(0.005)
    assert light["outlive_visibility_fraction"] > 0.005
    assert any("not used" in note for note in light["from_metrics"]["notes"])
    # without --window there is no rate to read
    res = _cli("--from-metrics", str(dump))
    assert res.exit_code == 2 and "--window" in res.output


def test_cli_from_two_dumps_uses_the_difference(tmp_path: Path) -> None:
    earlier = tmp_path / "a.txt"
    later = tmp_path / "b.txt"
    earlier.write_text(EXPOSITION)

    def double(line: str) -> str:
        name, value = line.rsplit(" ", 1)
        return line if line.startswith("#") else f"{name} {2 * float(value)}"

    doubled = "\n".join(double(line) for line in EXPOSITION.splitlines())
    later.write_text(doubled)
    res = _cli("--from-metrics", str(earlier), "--from-metrics", str(later), "--window", "50",
               "--handler", "charge", "--no-sample", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["rate_per_s"] == pytest.approx(200.0)  # 10,000 more in 50 s
    assert out["from_metrics"]["measured_latency_mean"] == pytest.approx(0.45)
    res = _cli("--from-metrics", str(later), "--from-metrics", str(earlier), "--window", "50")
    assert res.exit_code == 1 and "time order" in res.output


def test_cli_reads_the_real_prometheus_exposition(tmp_path: Path) -> None:
    from replaysafe.observe import prometheus as prom

    stats = o.Stats()
    lat = LatencyModel.lognormal(0.2, 2.0)
    for x in lat.sample(np.random.default_rng(5), 20_000):
        stats.observe(o.HANDLER_SECONDS, float(x), handler="h")
    stats.inc(o.DELIVERIES, 20_000, handler="h", outcome=o.APPLIED)
    dump = tmp_path / "live.txt"
    dump.write_text(prom.render(lambda: [stats]))
    res = _cli("--from-metrics", str(dump), "--window", "200", "--no-sample", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["rate_per_s"] == pytest.approx(100.0)
    assert out["from_metrics"]["measured_latency_mean"] == pytest.approx(0.2, rel=0.05)
    # the p99 interpolated in the (1.0, 2.5] bucket lands near the true 2.0
    assert out["from_metrics"]["measured_latency_p99"] == pytest.approx(2.0, rel=0.15)


def test_cli_plot_writes_an_image(tmp_path: Path) -> None:
    import matplotlib  # noqa: F401 - the report extra: missing fails, never skips

    path = tmp_path / "ambiguity.png"
    res = _cli("--preset", "seed-sale", "--no-sample", "--plot", str(path))
    assert res.exit_code == 0, res.output
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 20_000


# --------------------------------------------------------------------------- missing extras


def test_missing_numpy_names_the_sim_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "numpy", None)  # makes `import numpy` raise ImportError
    monkeypatch.setitem(sim_latency.__dict__, "np", None)  # forget the numpy _load() bound
    with pytest.raises(MissingExtra) as info:
        simulate(preset("seed-test"))
    assert info.value.extra == "sim" and "replaysafe[sim]" in str(info.value)
    res = _cli("--preset", "seed-test")
    assert res.exit_code == 1 and "replaysafe[sim]" in res.output


def test_without_numpy_the_cli_loads_and_names_the_extra() -> None:
    """numpy is imported lazily: a fresh interpreter without it still loads the CLI and the
    model's inputs, and `simulate` names the extra (an eager import would fail at load)."""
    code = (
        "import sys\n"
        "sys.modules['numpy'] = None\n"
        "from click.testing import CliRunner\n"
        "from replaysafe.cli import main\n"
        "from replaysafe.simulate import preset\n"
        "preset('seed-sale')\n"
        "r = CliRunner().invoke(main, ['simulate', '--preset', 'seed-test'])\n"
        "print(r.exit_code, r.output)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("1 ") and "replaysafe[sim]" in proc.stdout, proc.stdout


def test_missing_matplotlib_names_the_report_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = _cli("--preset", "seed-test", "--no-sample", "--plot", str(tmp_path / "x.png"))
    assert res.exit_code == 1 and "replaysafe[report]" in res.output
