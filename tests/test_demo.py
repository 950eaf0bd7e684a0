"""`replaysafe demo` end to end: the guarantees' sentences hold on the provider's own records."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from replaysafe.cli import main
from replaysafe.demo import FAULTS, fault_plan

from .conftest import subprocess_env


def run_json(*args: str) -> dict[str, object]:
    result = CliRunner().invoke(main, ["demo", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)  # type: ignore[no-any-return]


def check(doc: dict[str, object], orders: int, seed: int) -> None:
    assert set(doc) == {"orders", "seed", "results"}
    assert doc["orders"] == orders and doc["seed"] == seed
    results = {r["guarantee"]: r for r in doc["results"]}  # type: ignore[attr-defined]
    assert list(results) == ["at-most-once", "at-least-once", "effectively-once"]
    for r in results.values():
        assert set(r) == {
            "guarantee",
            "operations",
            "effects",
            "duplicates",
            "lost",
            "quarantined",
            "faults",
        }
        assert r["operations"] == orders
        assert set(r["faults"]) == set(FAULTS)
        # a fault that never fired proves nothing: every one must have hit its window
        assert all(n > 0 for n in r["faults"].values()), r
    amo, alo, eo = (results[g] for g in ("at-most-once", "at-least-once", "effectively-once"))
    assert amo["lost"] > 0 and amo["duplicates"] == 0
    assert alo["duplicates"] > 0 and alo["lost"] == 0
    assert eo["duplicates"] == 0 and eo["lost"] == 0 and eo["effects"] == orders
    # the counts follow from the faults, not from luck: one fault per hit order
    plan = fault_plan(orders, seed)
    assert amo["lost"] == len(plan["ambiguous_publish_lost"]) + len(plan["crash_before_charge"])
    assert alo["duplicates"] == (
        len(plan["ambiguous_publish_accepted"]) + len(plan["crash_after_charge"])
    )


def test_demo_json_shape_and_sentences() -> None:
    check(run_json("--orders", "300", "--seed", "11"), 300, 11)


def test_demo_same_seed_same_faults_and_counts() -> None:
    a = run_json("--orders", "120", "--seed", "3")
    b = run_json("--orders", "120", "--seed", "3")
    assert a == b


def test_demo_default_size_from_the_console_script() -> None:
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "replaysafe.cli", "demo", "--json"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    elapsed = time.monotonic() - started
    check(json.loads(out.stdout), 1000, 7)
    print(f"demo --orders 1000 took {elapsed:.1f}s")  # reported, never asserted (DESIGN §4)


def test_demo_table_names_where_replay_stops_hurting() -> None:
    result = CliRunner().invoke(main, ["demo", "--orders", "60"])
    assert result.exit_code == 0, result.output
    assert "Where replay stops hurting" in result.output
    assert "replay stops hurting at payments-api (keyed)" in result.output
    for g in ("at-most-once", "at-least-once", "effectively-once"):
        assert g in result.output


@pytest.mark.parametrize("orders", ["0", "3"])
def test_demo_refuses_too_few_orders(orders: str) -> None:
    result = CliRunner().invoke(main, ["demo", "--orders", orders])
    assert result.exit_code != 0


def test_chaos_preset_demo_is_the_demo(tmp_path: Path) -> None:
    """``replaysafe chaos --preset demo`` runs what ``replaysafe demo`` runs (one implementation)
    and prints its report; ``--json PATH`` writes the demo's JSON."""
    out = tmp_path / "demo.json"
    result = CliRunner().invoke(
        main, ["chaos", "--preset", "demo", "--ops", "60", "--seed", "3", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "Where replay stops hurting" in result.output
    assert json.loads(out.read_text()) == run_json("--orders", "60", "--seed", "3")


def test_chaos_preset_demo_refuses_matrix_options() -> None:
    result = CliRunner().invoke(main, ["chaos", "--preset", "demo", "--fault", "poison"])
    assert result.exit_code != 0
    assert "--fault" in result.output
    result = CliRunner().invoke(main, ["chaos", "--preset", "demo", "--broker", "nats"])
    assert result.exit_code != 0
    assert "not nats" in result.output
