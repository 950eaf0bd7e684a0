"""Pausing a handler: a durable flag in the ledger that every worker of the app obeys.

Paused: no new fetch from the handler's source (a fetch already waiting is interrupted), work in
flight finishes and settles normally. Resumed: fetching again, the rest drains, nothing lost or
applied twice. Plus the CLI (`replaysafe handler pause | resume | list`) and `inspect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import types
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from replaysafe import Context, Effect, Guarantee
from replaysafe import observe as o
from replaysafe.cli import main
from replaysafe.errors import ConfigurationError, LedgerUnavailable
from replaysafe.ledger.base import PauseState
from replaysafe.ledger.memory import MemoryLedger
from replaysafe.testing import FakeClock

from .runtime_harness import SOURCE, Harness, order
from .waits import until

EO = Guarantee.EFFECTIVELY_ONCE
HANDLER = "charge"


class Gated:
    """A keyed charge that waits at a gate: lets a test hold work in flight."""

    def __init__(self, h: Harness, *, concurrency: int = 4) -> None:
        self.h = h
        self.started: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()

        async def charge(ctx: Context) -> str:
            self.started.append(ctx.operation_id)
            await self.gate.wait()
            return await h.probe.apply(ctx.payload["order"], 10, ctx.idempotency_key)

        h.handler(EO, effect=Effect.keyed("payments"), name=HANDLER, lease=30, timeout=60,
                  concurrency=concurrency)(charge)  # fmt: skip

    def paused_everywhere(self) -> bool:
        return bool(self.h.workers) and all(HANDLER in w.paused for w in self.h.workers)

    def running_everywhere(self) -> bool:
        return bool(self.h.workers) and all(not w.paused for w in self.h.workers)


async def idle(h: Harness, seconds: float) -> None:
    """Let ``seconds`` of fake time pass in small steps (the workers run between them)."""
    for _ in range(int(seconds / 0.25)):
        h.clock.advance(0.25)
        for _ in range(10):
            await asyncio.sleep(0)


def broker_counts(h: Harness) -> tuple[int, int]:
    """(messages waiting, messages handed out and unsettled) in the handler's group."""
    group = h.app.handlers[HANDLER].group
    out = h.broker.in_flight(SOURCE, group)
    return h.broker.depth(SOURCE, group) - out, out


async def test_pause_mid_stream_stops_fetching_lets_in_flight_settle_and_resume_drains() -> None:
    h = Harness()
    g = Gated(h, concurrency=4)
    g.gate.clear()
    await h.publish(*(order(i) for i in range(12)))
    h.start()
    await h.run_until(lambda: len(g.started) == 4)  # the first batch is in flight, held
    await h.ledger.set_paused(HANDLER, True, reason="provider outage", by="test")
    await h.run_until(g.paused_everywhere)
    [worker] = h.workers
    assert worker.paused[HANDLER].reason == "provider outage"
    assert worker.stats.gauge(o.HANDLER_PAUSED, handler=HANDLER) == 1.0
    assert broker_counts(h) == (8, 4)

    g.gate.set()  # in-flight work finishes and settles normally while paused
    await h.run_until(lambda: broker_counts(h) == (8, 0))
    assert len(h.probe.effects) == 4
    await idle(h, 60.0)  # then a long pause: nothing more is fetched
    assert len(g.started) == 4
    assert broker_counts(h) == (8, 0)
    assert worker.stats.total(o.RECEIVED) == 4

    await h.ledger.set_paused(HANDLER, False)
    await h.drain()
    await h.stop()
    assert worker.stats.gauge(o.HANDLER_PAUSED, handler=HANDLER) == 0.0
    assert h.probe.per_subject() == {f"order-{i}": 1 for i in range(12)}  # nothing lost or twice
    assert sorted(g.started) == sorted(f"charge:order-{i}" for i in range(12))  # each ran once
    assert h.total(o.RECEIVED) == 12  # nothing was fetched twice
    assert h.crashes == 0


async def test_a_fetch_waiting_on_an_empty_source_is_interrupted_by_a_pause() -> None:
    h = Harness()
    g = Gated(h)
    h.start()
    await h.run_until(lambda: bool(h.workers))
    # idle: the consume loop waits inside next_batch on the empty source
    await h.run_until(lambda: h.workers[0].control.gates[HANDLER].fetching)
    await h.ledger.set_paused(HANDLER, True)
    await h.run_until(g.paused_everywhere)
    await h.publish(*(order(i) for i in range(3)))  # arrives while paused
    await idle(h, 10.0)
    assert g.started == [] and broker_counts(h) == (3, 0)
    await h.ledger.set_paused(HANDLER, False)
    await h.drain()
    await h.stop()
    assert h.probe.per_subject() == {f"order-{i}": 1 for i in range(3)}
    assert h.crashes == 0


async def test_every_worker_obeys_the_flag_and_a_new_worker_starts_paused() -> None:
    h = Harness()
    g = Gated(h)
    await h.ledger.set_paused(HANDLER, True, reason="before start")
    await h.publish(*(order(i) for i in range(6)))
    h.start(workers=3)
    await h.run_until(lambda: len(h.workers) == 3)
    await h.run_until(g.paused_everywhere)
    await idle(h, 5.0)
    assert g.started == [] and broker_counts(h) == (6, 0)  # not even a first batch
    await h.ledger.set_paused(HANDLER, False)
    await h.run_until(g.running_everywhere)
    await h.drain()
    await h.stop()
    assert h.probe.per_subject() == {f"order-{i}": 1 for i in range(6)}


async def test_pausing_another_handler_leaves_this_one_running() -> None:
    h = Harness()
    Gated(h)
    await h.ledger.set_paused("some-other-handler", True)
    await h.publish(*(order(i) for i in range(3)))
    h.start()
    await h.drain()
    await h.stop()
    assert h.probe.per_subject() == {f"order-{i}": 1 for i in range(3)}
    assert all(not w.paused for w in h.workers)


class FlakyControl(MemoryLedger):
    """A memory ledger whose control read fails while ``down`` (the rest keeps working)."""

    down = False

    async def paused(self) -> dict[str, PauseState]:
        if self.down:
            raise LedgerUnavailable("paused: connection refused (test)")
        return await super().paused()


async def test_a_failed_control_read_keeps_the_last_known_state_and_is_counted() -> None:
    clock = FakeClock()
    h = Harness(ledger=FlakyControl(clock), clock=clock)
    g = Gated(h)
    assert isinstance(h.ledger, FlakyControl)
    await h.ledger.set_paused(HANDLER, True)
    await h.publish(*(order(i) for i in range(3)))
    h.start()
    await h.run_until(g.paused_everywhere)
    h.ledger.down = True
    await h.ledger.set_paused(HANDLER, False)  # written, but the workers cannot read it
    await h.run_until(lambda: h.total(o.LEDGER_UNAVAILABLE) >= 3)
    assert g.paused_everywhere() and g.started == []  # still paused: the last known state
    h.ledger.down = False
    await h.drain()
    await h.stop()
    assert h.probe.per_subject() == {f"order-{i}": 1 for i in range(3)}


def test_control_interval_must_be_positive() -> None:
    h = Harness()
    Gated(h)
    from replaysafe.runtime.worker import Worker

    with pytest.raises(ConfigurationError, match="control_interval"):
        Worker(h.app, control_interval=0)


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def app_module() -> Iterator[tuple[str, Harness]]:
    h = Harness()
    Gated(h)
    module = types.ModuleType("rs_pause_app")
    module.app = h.app  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    yield f"{module.__name__}:app", h
    del sys.modules[module.__name__]


def test_cli_pause_list_resume(app_module: tuple[str, Harness]) -> None:
    target, h = app_module
    runner = CliRunner()
    paused = runner.invoke(main, ["handler", "pause", target, HANDLER, "--reason", "outage"])
    assert paused.exit_code == 0, paused.output
    assert f"paused {HANDLER}" in paused.output and "resume" in paused.output
    state = asyncio.run(h.ledger.paused())[HANDLER]
    assert state.reason == "outage" and "@" in state.by  # user@host by default

    listed = runner.invoke(main, ["handler", "list", target, "--json"])
    assert listed.exit_code == 0, listed.output
    [row] = json.loads(listed.output)
    assert row["handler"] == HANDLER and row["paused"] and row["reason"] == "outage"
    assert row["source"] == SOURCE and row["guarantee"] == EO.value
    table = runner.invoke(main, ["handler", "list", target])
    assert "paused" in table.output and "outage" in table.output

    inspected = runner.invoke(main, ["inspect", target, "--json"])
    assert inspected.exit_code == 0, inspected.output
    assert json.loads(inspected.output)["paused_handlers"][HANDLER]["reason"] == "outage"

    resumed = runner.invoke(main, ["handler", "resume", target, HANDLER])
    assert resumed.exit_code == 0, resumed.output
    assert f"resumed {HANDLER}" in resumed.output
    assert asyncio.run(h.ledger.paused()) == {}
    again = runner.invoke(main, ["handler", "resume", target, HANDLER])
    assert again.exit_code == 0 and "was not paused" in again.output
    [row] = json.loads(runner.invoke(main, ["handler", "list", target, "--json"]).output)
    assert row["paused"] is False


def test_cli_refuses_an_unknown_handler_but_can_clear_a_flag_left_behind(
    app_module: tuple[str, Harness],
) -> None:
    target, h = app_module
    runner = CliRunner()
    bad = runner.invoke(main, ["handler", "pause", target, "nope"])
    assert bad.exit_code != 0 and "has no handler 'nope'" in bad.output
    assert asyncio.run(h.ledger.paused()) == {}
    # a flag of a handler since renamed: listed as not in this app, and resume clears it
    asyncio.run(h.ledger.set_paused("old-name", True, reason="left behind"))
    rows = json.loads(runner.invoke(main, ["handler", "list", target, "--json"]).output)
    assert [(r["handler"], r["known"], r["paused"]) for r in rows] == [
        (HANDLER, True, False),
        ("old-name", False, True),
    ]
    cleared = runner.invoke(main, ["handler", "resume", target, "old-name"])
    assert cleared.exit_code == 0, cleared.output
    assert asyncio.run(h.ledger.paused()) == {}
    unknown = runner.invoke(main, ["handler", "resume", target, "never-existed"])
    assert unknown.exit_code != 0 and "has no handler" in unknown.output


# --------------------------------------------------------------------------- Kafka


async def test_a_paused_kafka_handler_keeps_its_group_membership(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Kafka drops a member that does not poll within max.poll.interval.ms. A paused handler
    fetches nothing, but the adapter's background fetcher keeps polling (with the partitions
    paused once its buffer is full): after a pause of twice max.poll.interval.ms the member still
    holds its partitions (no revoke, no loss) and the resume drains everything once."""
    import logging
    import time
    import uuid

    from replaysafe import App, Worker
    from replaysafe.brokers.kafka import KafkaBroker
    from replaysafe.failpoints import Failpoints
    from replaysafe.ledger import MemoryLedger
    from replaysafe.testing import EffectProbe

    max_poll = 4.0  # the smallest librdkafka allows with session.timeout.ms = 3000
    broker = KafkaBroker(
        kafka_bootstrap, failpoints=Failpoints(), session_timeout=3.0, heartbeat_interval=0.3,
        poll_interval=0.05, drain_timeout=3.0, join_timeout=30.0, request_timeout=10.0,
        consumer_config={"max.poll.interval.ms": int(max_poll * 1000)},
    )  # fmt: skip
    topic = f"rs-pause-{uuid.uuid4().hex[:10]}"
    await broker.create_topic(topic, 2)
    ledger = MemoryLedger()
    app = App("pause-kafka", broker=broker, ledger=ledger)
    probe = EffectProbe(honour_keys=True)

    @app.handler(topic, guarantee=EO, effect=Effect.keyed("payments"), name=HANDLER,
                 concurrency=4, lease=10)  # fmt: skip
    async def charge(ctx: Context) -> str:
        return await probe.apply(ctx.payload["order"], 10, ctx.idempotency_key)

    caplog.set_level(logging.INFO, logger="replaysafe.brokers.kafka")
    await ledger.set_paused(HANDLER, True, reason="kafka test")
    worker = Worker(app, control_interval=0.2)
    task = asyncio.create_task(worker.run(drain_timeout=5))
    try:
        # joined: the Kafka subscription has its partitions (it subscribes even while paused)
        await until(
            lambda: bool(worker._subs) and worker._subs[0]._assigned.is_set(),  # type: ignore[attr-defined]
            seconds=60, what="the Kafka partitions assigned",
        )  # fmt: skip
        now = time.time()
        await broker.publish(topic, [order(i).with_published_at(now) for i in range(10)])
        await asyncio.sleep(2 * max_poll + 1.0)  # paused: nothing may be fetched meanwhile
        assert probe.effects == [] and worker.stats.total(o.RECEIVED) == 0
        assert not task.done()
        await ledger.set_paused(HANDLER, False)
        await until(lambda: len(probe.per_subject()) == 10, seconds=30, what="10 orders applied")
        changes = [r.getMessage() for r in caplog.records
                   if " revoked " in r.getMessage() or " lost " in r.getMessage()
                   or "poll interval" in r.getMessage()]  # fmt: skip
        assert changes == []  # the member never left its group while paused
    finally:
        worker.stop()
        async with asyncio.timeout(30):
            await task
        with contextlib.suppress(Exception):
            await broker.delete_topic(topic)
        await broker.close()
    assert probe.per_subject() == {f"order-{i}": 1 for i in range(10)}
    assert worker.stats.total(o.RECEIVED) == 10  # no record was handed out twice
