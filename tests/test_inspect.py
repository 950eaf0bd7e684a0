"""`replaysafe inspect`: the ledger summary and one operation's story."""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from replaysafe import App, Context, Effect, Envelope, Guarantee, RetryPolicy
from replaysafe.brokers import MemoryBroker
from replaysafe.cli import main
from replaysafe.ledger.memory import MemoryLedger
from replaysafe.testing import FakeClock

from .runtime_harness import Harness

EO = Guarantee.EFFECTIVELY_ONCE


@pytest.fixture
def harness_module() -> Iterator[tuple[str, Harness]]:
    h = Harness()
    module = types.ModuleType("rs_inspect_app")
    module.app = h.app  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    yield f"{module.__name__}:app", h
    del sys.modules[module.__name__]


async def _exercise(h: Harness) -> None:
    calls: dict[str, int] = {}

    async def charge(ctx: Context) -> None:
        n = calls[ctx.operation_id] = calls.get(ctx.operation_id, 0) + 1
        if ctx.payload["flaky"] and n < 3:
            raise RuntimeError("503")
        if ctx.payload["poison"]:
            raise RuntimeError("always")

    h.handler(EO, effect=Effect.keyed("payments"), lease=5,
              retry=RetryPolicy(max_attempts=4, base_delay=0.1))(charge)  # fmt: skip
    envs = [Envelope.of(f"op:{i}", {"flaky": i == 1, "poison": i == 2}) for i in range(5)]
    await h.publish(*envs)
    h.start()
    await h.drain()
    await h.stop()


async def test_summary_counts_states_hot_keys_and_quarantine(
    harness_module: tuple[str, Harness],
) -> None:
    from replaysafe.cli.inspect import ledger_report, operation_report

    _, h = harness_module
    await _exercise(h)
    doc = await ledger_report(h.app)
    assert doc["by_state"] == {"completed": 4, "quarantined": 1}
    assert doc["quarantined_by_reason"] == {"max_attempts": 1}
    hot = [(x["operation_id"], x["attempts"]) for x in doc["hot_operations"]]
    assert hot == [("op:2", 4), ("op:1", 3)]  # poison: budget of 4 spent; flaky: 3rd run won
    assert doc["completed_last_hour"] == 4
    assert doc["projected_rows_at_horizon"] == 4 * 24 * 7
    op = await operation_report(h.app, "op:1")
    [story] = op["handlers"]
    assert story["state"] == "completed" and story["attempts"] == 3
    assert story["effected_at"] >= story["first_claimed_at"]
    poison = (await operation_report(h.app, "op:2"))["handlers"][0]
    assert poison["quarantine"][0]["reason"] == "max_attempts"


def test_expired_leases_are_open_ambiguity() -> None:
    import asyncio

    from replaysafe.ledger.base import OpKey

    clock = FakeClock()
    ledger = MemoryLedger(clock)
    app = App("x", broker=MemoryBroker(clock=clock), ledger=ledger, clock=clock)

    async def go() -> dict[str, object]:
        from replaysafe.cli.inspect import ledger_report

        await ledger.claim(OpKey("h", "a"), "fp", "w1", 5)
        await ledger.claim(OpKey("h", "b"), "fp", "w1", 50)
        clock.advance(10)
        return await ledger_report(app)

    doc = asyncio.run(go())
    assert doc["expired_leases"] == 1 and doc["oldest_in_flight_age_seconds"] == 10


def test_cli_inspect(harness_module: tuple[str, Harness]) -> None:
    import asyncio

    target, h = harness_module

    async def seed() -> None:
        from replaysafe.ledger.base import OpKey

        out = await h.ledger.claim(OpKey("charge", "op:9"), "fp", "w1", 5)
        await h.ledger.complete(out.claim)  # type: ignore[union-attr]

    async def noop(ctx: Context) -> None:
        return None

    h.app.handler("orders", guarantee=EO, effect=Effect.keyed("payments"), name="charge")(noop)
    asyncio.run(seed())
    runner = CliRunner()
    summary = runner.invoke(main, ["inspect", target, "--json"])
    assert summary.exit_code == 0, summary.output
    assert json.loads(summary.output)["by_state"] == {"completed": 1}
    table = runner.invoke(main, ["inspect", target])
    assert "operations completed" in table.output
    one = runner.invoke(main, ["inspect", target, "op:9"])
    assert "completed" in one.output and "attempts 1" in one.output
