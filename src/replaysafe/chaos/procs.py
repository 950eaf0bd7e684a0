"""Worker processes for the real brokers: start, supervise, pause, rebalance, stop.

Each worker is ``python -m replaysafe.chaos.worker SPEC.json``. The supervisor restarts a worker
that died (a failpoint ``exit`` is the crash; restarts are bounded), ends a ``SIGSTOP`` pause with
``SIGCONT`` once the pause has outlived the lease, and at the end stops every process it started
(SIGCONT, SIGTERM, then SIGKILL after a bounded wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from replaysafe.chaos.app import build_app, hits, mark_once
from replaysafe.chaos.cells import SQS_OVERLAP_VISIBILITY
from replaysafe.chaos.ledgers import ledger_nemesis
from replaysafe.chaos.publish import broker_from_conf, envelopes_for, produce
from replaysafe.chaos.settle import second_phase, wait_settled
from replaysafe.failpoints import Failpoints

if TYPE_CHECKING:
    from replaysafe.brokers.base import Broker
    from replaysafe.chaos.settle import RunContext

#: restarts allowed per run at least (a crash loop must end); scaled with the targets
MAX_RESTARTS = 200


class Pool:
    """The run's worker processes: ``python -m MODULE SPEC.json`` each (``module``: the chaos
    worker, for a matrix cell and for the demo preset alike)."""

    module = "replaysafe.chaos.worker"

    def __init__(self, spec_path: Path, logdir: Path, state_dir: str, pause: float) -> None:
        self.spec_path = spec_path
        self.logdir = logdir
        self.state_dir = state_dir
        self.pause = pause
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.extra: list[subprocess.Popen[bytes]] = []
        self.restarts = 0
        #: every targeted crash is a restart (poison: up to max_attempts + 2 per target)
        self.max_restarts = MAX_RESTARTS
        self.stopping = False
        self._continued: set[tuple[int, float]] = set()
        self._logs: list[IO[bytes]] = []

    def spawn(self) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"worker-{len(self._logs)}.log", "wb")  # noqa: SIM115
        self._logs.append(log)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("REPLAYSAFE_FAILPOINTS", None)  # the spec arms exactly the run's fault
        return subprocess.Popen(
            [sys.executable, "-m", self.module, str(self.spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def start(self, n: int) -> None:
        for slot in range(n):
            self.procs[slot] = self.spawn()

    async def supervise(self) -> None:
        """Restart dead workers; resume paused ones after the pause (bounded by the caller)."""
        while not self.stopping:
            for slot, proc in list(self.procs.items()):
                if proc.poll() is not None and self.restarts < self.max_restarts:
                    self.restarts += 1
                    self.procs[slot] = self.spawn()
            if self.pause:
                now = time.time()
                for _, pid, at in hits(self.state_dir, "pause_beyond_lease"):
                    if pid <= 0:
                        # a marker still being written: kill(0, ...) would signal this whole
                        # process group, resuming every stopped worker early
                        continue
                    # one process may be paused more than once (several target operations)
                    if (pid, at) not in self._continued and now - at >= self.pause:
                        self._continued.add((pid, at))
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGCONT)
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        self.stopping = True
        everyone = [*self.procs.values(), *self.extra]
        for p in everyone:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)
                    p.terminate()
        deadline = time.monotonic() + 15
        # polling children: there is no event to wait on for a process exit here
        while time.monotonic() < deadline and any(p.poll() is None for p in everyone):  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        for p in everyone:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        for log in self._logs:
            log.close()


async def _setup(ctx: RunContext, admin: Broker) -> None:
    spec, kind = ctx.spec, ctx.spec.broker["kind"]
    if kind == "rabbitmq":
        await admin.declare(spec.source, [spec.group])  # type: ignore[attr-defined]
    elif kind == "sqs":
        vis = (
            SQS_OVERLAP_VISIBILITY
            if spec.fault == "visibility_overlap"
            else max(1, math.ceil(spec.lease))
        )
        await admin.create_queue(spec.source, visibility_timeout=vis)  # type: ignore[attr-defined]
    elif kind == "kafka":
        await admin.create_topic(spec.source, partitions=2)  # type: ignore[attr-defined]
    elif kind == "nats":  # the group's durable consumer, AckWait = the lease
        await admin.prepare_source(spec.source, [spec.group], visibility_timeout=spec.lease)


async def _teardown(ctx: RunContext, admin: Broker) -> None:
    spec, kind = ctx.spec, ctx.spec.broker["kind"]
    with contextlib.suppress(Exception):
        if kind == "rabbitmq":
            await admin.delete(spec.source, [spec.group])  # type: ignore[attr-defined]
        elif kind == "sqs":
            await admin.delete_queue(spec.source)  # type: ignore[attr-defined]
        elif kind == "kafka":
            await admin.delete_topic(spec.source)  # type: ignore[attr-defined]
        elif kind == "nats":
            await admin.drop_source(spec.source)


async def broker_depth(ctx: RunContext, admin: Broker) -> int:
    """Messages the broker still holds for the run's group and has not handed to a consumer:
    RabbitMQ ready messages in the main queue and its retry bands (not the dead-letter queue),
    SQS visible + in flight + delayed, Kafka records past the group's committed offsets (read
    through the admin API, which does not touch the group's membership)."""
    spec, kind = ctx.spec, ctx.spec.broker["kind"]
    if kind == "rabbitmq":
        depths = await admin.queue_depths(spec.source, spec.group)  # type: ignore[attr-defined]
        return sum(n for name, n in depths.items() if not name.endswith("/dead"))
    if kind == "sqs":
        d = await admin.approximate_depth(spec.source)  # type: ignore[attr-defined]
        return int(d["visible"] + d["in_flight"] + d["delayed"])
    if kind == "nats":  # not yet delivered + delivered and unacked
        return (await admin.group_state(spec.source, spec.group)).messages or 0
    lag = await admin.lag(spec.source, spec.group)  # type: ignore[attr-defined]
    return int(sum(lag.values()))


def broker_options(kind: str, url: str) -> dict[str, Any]:
    """Adapter options for short runs on a shared machine (fast group joins, short polls)."""
    if kind == "kafka":
        return {
            "session_timeout": 3.0,
            "heartbeat_interval": 0.3,
            "poll_interval": 0.05,
            "drain_timeout": 3.0,
            "join_timeout": 30.0,
        }
    if kind == "sqs":
        return {"wait_time": 1, "delete_window": 0.02}
    if kind == "nats":
        # the stream's Nats-Msg-Id window would drop redrive_applied's re-publish (identical to
        # the original, seconds later): keep the window shorter than a run's first phase.
        # max_deliver: JetStream counts every delivery, also those answered "in flight
        # elsewhere" (a live lease) and those a killed worker held unseen, so a poison copy
        # spent the default 10 before the ledger's attempts reached max_attempts and was
        # dead-lettered by the broker, unquarantined (CI, 2026-12-08): the ledger's budget must
        # be the one that runs out first
        return {"fetch_wait": 0.5, "duplicate_window": 1.0, "max_deliver": 50}
    return {}


async def process_run(ctx: RunContext) -> None:
    spec = ctx.spec
    spec.in_process = False
    kind = spec.broker["kind"]
    spec.broker.setdefault("options", broker_options(kind, spec.broker["url"]))
    producer_fps = Failpoints()
    admin = broker_from_conf(spec.broker, spec, producer_fps)
    spec_path = ctx.rundir / "spec.json"
    spec_path.write_text(spec.to_json())
    pool = Pool(spec_path, ctx.rundir, spec.state_dir, spec.pause)
    pool.max_restarts = max(MAX_RESTARTS, 2 * len(spec.targets) * (spec.max_attempts + 2))
    supervisor: asyncio.Task[None] | None = None
    nemesis: asyncio.Task[None] | None = None
    try:
        await _setup(ctx, admin)
        pool.start(ctx.cfg.workers)
        supervisor = asyncio.create_task(pool.supervise())
        if spec.fault == "rebalance":
            nemesis = asyncio.create_task(_rebalance(pool, spec.state_dir, spec.fault))
        elif spec.fault == "ledger_restart":
            nemesis = asyncio.create_task(ledger_nemesis(spec))
        envelopes = envelopes_for(spec, ctx.cfg.ops, ctx.cfg.seed)
        await produce(spec, admin, envelopes, ctx.history, producer_fps,
                      outbox_path=ctx.rundir / "outbox.db")  # fmt: skip

        async def depth() -> int:
            return await broker_depth(ctx, admin)

        await wait_settled(ctx, depth=depth)
        if nemesis is not None:
            async with asyncio.timeout(60):
                await nemesis
        app = build_app(spec, admin, ctx.ledger, Failpoints())
        if await second_phase(ctx, admin, app):
            await wait_settled(ctx, depth=depth)
    finally:
        if nemesis is not None:
            nemesis.cancel()
        await pool.stop()
        if supervisor is not None:
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
        await _teardown(ctx, admin)
        with contextlib.suppress(Exception):
            await admin.close()


async def _rebalance(pool: Pool, state_dir: str, fault: str) -> None:
    """A worker process joins the consumer group mid-run, stays for a moment and leaves
    (SIGTERM: a graceful leave, revoking its partitions mid-batch). Each join and leave that
    happened while the others were working is a hit."""
    await asyncio.sleep(0.5)
    extra = pool.spawn()
    pool.extra.append(extra)
    mark_once(state_dir, fault, "join-0")
    await asyncio.sleep(4.0)
    extra.terminate()
    deadline = time.monotonic() + 20
    while extra.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110 - child exit
        await asyncio.sleep(0.1)
    mark_once(state_dir, fault, "leave-0")
