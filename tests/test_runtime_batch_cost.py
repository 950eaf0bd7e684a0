"""The cheaper batch paths keep their semantics: the worker's per-batch task handling and the
SQLite ledger's batched reads and writes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from replaysafe import App, Context, Envelope, Guarantee, Worker
from replaysafe import failpoints as fp
from replaysafe.brokers.memory import MemoryBroker
from replaysafe.errors import LeaseLost, SimulatedCrash
from replaysafe.ledger import MemoryLedger
from replaysafe.ledger.base import Acquired, ClaimRequest, Ledger, OpKey, Record
from replaysafe.ledger.sqlite import SQLiteLedger


async def test_a_crash_in_a_batch_kills_the_worker_while_an_earlier_delivery_still_runs() -> None:
    """The batch's tasks are awaited in order; a crash of a later delivery must not wait for an
    earlier, slow one (a killed process does nothing more)."""
    failpoints = fp.Failpoints()
    app = App("crash", broker=MemoryBroker(), ledger=MemoryLedger(), failpoints=failpoints)
    started = asyncio.Event()
    handled: list[str] = []

    async def handle(ctx: Context) -> None:
        handled.append(ctx.operation_id)
        if ctx.operation_id == "op-0":
            started.set()
            await asyncio.Event().wait()  # slow: never returns by itself

    app.handler("src", guarantee=Guarantee.AT_LEAST_ONCE, concurrency=8)(handle)
    failpoints.enable(
        fp.AFTER_EFFECT_BEFORE_LEDGER, "kill", when=lambda ctx: ctx["operation_id"] == "op-2"
    )
    await app.broker.publish("src", [Envelope.of(f"op-{i}", {"i": i}) for i in range(3)])
    worker = Worker(app)
    with pytest.raises(SimulatedCrash):
        async with asyncio.timeout(5):
            await worker.run()
    assert started.is_set() and sorted(handled) == ["op-0", "op-1", "op-2"]


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_large_batches_over_several_scopes_decide_like_single_calls(
    backend: str, tmp_path: Path
) -> None:
    """More keys than one batched read binds, in two scopes, with repeated keys: the same
    outcomes, in order, as the memory ledger's (one decision after another)."""
    ledger: Ledger = MemoryLedger() if backend == "memory" else SQLiteLedger(tmp_path / "l.db")
    try:
        # 900 requests, 600 distinct keys: (scope, id) repeats every 600 requests
        requests = [
            ClaimRequest(OpKey(f"s{i % 2}", f"op-{i % 600}"), "fp", "w", 30.0) for i in range(900)
        ]
        outcomes = await ledger.claim_many(requests)
        kinds = [type(x).__name__ for x in outcomes]
        assert kinds == ["Acquired"] * 600 + ["InFlight"] * 300
        claims = [x.claim for x in outcomes if isinstance(x, Acquired)]
        assert len({c.token for c in claims}) == 600
        # the first claim twice: its second copy finds the operation completed by the first
        done = await ledger.complete_many([(c, f"r{c.token}") for c in claims] + [(claims[0], "x")])
        assert all(isinstance(x, Record) and x.result == f"r{x.token}" for x in done[:600])
        assert isinstance(done[600], LeaseLost)
        again = await ledger.claim_many(requests[:3])
        assert [type(x).__name__ for x in again] == ["AlreadyDone"] * 3
        rec = await ledger.get(OpKey("s1", "op-599"))
        assert rec is not None and rec.result == f"r{rec.token}"
    finally:
        await ledger.close()
