"""The demo preset's side of a chaos worker process (``python -m replaysafe.chaos.worker
SPEC.json`` dispatches here when the spec is the demo's): the chaos app on the real broker and
ledger, with the demo's crashes (SIGKILL at the failpoint) and the broker's own fault armed, and
the runtime counters the demo shows written for the harness to read."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Mapping
from typing import Any

from replaysafe import failpoints as fp
from replaysafe.brokers import broker_from_url
from replaysafe.chaos.app import (
    BROKER_RESTART_WAIT,
    RecordingBroker,
    RunSpec,
    close_quietly,
    cut_own_connections,
    mark_once,
    relayed,
)
from replaysafe.chaos.app import build_app as chaos_app
from replaysafe.chaos.demo_plan import FAULTS, KILL_FAULTS, write_counters
from replaysafe.chaos.ledgers import ledger_from_spec
from replaysafe.failpoints import Failpoints
from replaysafe.guarantees import Guarantee
from replaysafe.observe import Stats
from replaysafe.runtime.worker import Worker
from replaysafe.testing.netcut import CutRelay


def arm_worker(
    spec: RunSpec,
    kills: Mapping[str, set[str]],
    close: set[str],
    failpoints: Failpoints,
    relay: CutRelay | None,
    before_kill: Callable[[], None] = lambda: None,
) -> None:
    """Arm a demo worker process's faults; each fires once per order across every process (the
    markers are ``O_EXCL`` files, so a restarted worker does not fire again on the redelivery).

    A crash leaves its marker, calls ``before_kill`` (the demo writes the worker's counters), then
    the process sends itself SIGKILL: nothing is settled, released or flushed.

    ``close`` (RabbitMQ): after the charge (effectively-once: after the ledger recorded it) and
    before the ack, every connection between the worker and the server is cut (``relay``, the
    worker's :class:`~replaysafe.testing.netcut.CutRelay`); the worker then waits
    :data:`~replaysafe.chaos.app.BROKER_RESTART_WAIT` seconds so that it reads the reset
    before it acks."""
    eo = spec.guarantee == Guarantee.EFFECTIVELY_ONCE.value
    close_point = fp.AFTER_LEDGER_BEFORE_ACK if eo else fp.AFTER_EFFECT_BEFORE_LEDGER
    points = {FAULTS[name] for name in KILL_FAULTS} | ({close_point} if close else set())
    for point in points:
        here = {name: kills.get(name, set()) for name in KILL_FAULTS if FAULTS[name] == point}
        closing = close if point == close_point else set()

        def when(
            ctx: Mapping[str, Any],
            here: dict[str, set[str]] = here,
            closing: set[str] = closing,
        ) -> bool:
            op = str(ctx.get("operation_id"))
            for name, targets in here.items():
                if op in targets and mark_once(spec.state_dir, name, op):
                    before_kill()
                    os.kill(os.getpid(), signal.SIGKILL)
                    os._exit(137)  # pragma: no cover - SIGKILL cannot be caught; never reached
            if op in closing and mark_once(spec.state_dir, f"{spec.fault}-armed", op):
                try:
                    cut_own_connections(relay, spec.state_dir, spec.fault, op)
                finally:
                    mark_once(spec.state_dir, f"{spec.fault}-tried", op)
                return True  # the failpoint's sleep: the close is read before the ack
            return False

        failpoints.enable(point, "sleep", when=when, seconds=BROKER_RESTART_WAIT)


async def demo_worker_main(doc: Mapping[str, Any]) -> None:
    """One demo worker process (``python -m replaysafe.chaos.worker SPEC.json`` given the demo's
    spec ``doc``: the run and the kills): the chaos app (charges at the provider) on the real
    broker and ledger, every delivery and completion journaled, the demo's faults armed.
    SIGTERM/SIGINT stop it gracefully (drain, settle what finished)."""
    spec = RunSpec(**doc["run"])
    failpoints = Failpoints()
    close = set(spec.targets) if spec.fault == "channel_closed_before_ack" else set()
    url = spec.broker["url"]
    relay: CutRelay | None = None
    if close:
        # the fault cuts this worker's connections: they all go through its own relay
        relay, url = await relayed(url)
    broker = broker_from_url(url, failpoints=failpoints, **spec.broker["options"])
    ledger = ledger_from_spec(spec.ledger)
    app = chaos_app(spec, RecordingBroker(broker, spec.record_dir), ledger, failpoints)
    kills = {name: set(ops) for name, ops in doc["kills"].items()}
    stats: list[Stats] = []

    def flush_counters() -> None:
        if stats:
            write_counters(spec.state_dir, stats[0])

    arm_worker(spec, kills, close, failpoints, relay, before_kill=flush_counters)
    worker = Worker(app)
    stats.append(worker.stats)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    writer = asyncio.create_task(_every(0.5, flush_counters))
    try:
        await worker.run(drain_timeout=5.0)
    finally:
        writer.cancel()
        flush_counters()
        await close_quietly(broker, ledger, relay)


async def _every(seconds: float, call: Callable[[], None]) -> None:
    while True:
        call()
        await asyncio.sleep(seconds)
