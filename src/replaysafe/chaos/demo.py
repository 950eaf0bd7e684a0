"""The chaos harness's ``demo`` preset (``replaysafe chaos --preset demo``, and ``replaysafe demo``,
its alias): the chain that charges customers twice, replayed under each guarantee.

For ``orders`` orders, ``capture-payment:order-i`` is published and consumed by a pool of workers,
once per guarantee. The same faults, chosen by ``seed``, hit every guarantee:

- ``ambiguous_publish_accepted``: the broker stored the message but the producer saw an error;
- ``ambiguous_publish_lost``: the producer saw the same error, and the broker really lost it;
- ``crash_after_charge``: the worker dies after the charge, before anything records it;
- ``crash_before_charge``: the worker dies right before the charge (under at-most-once that is
  after the broker already completed the message).

On the memory broker (the default, ``make demo``) the broker redelivers like RabbitMQ (a dead
consumer's unsettled message is requeued), the workers are supervised tasks of this process on a
SQLite ledger (restarted by :func:`~replaysafe.chaos.harness.supervise_in_process`, as in the
chaos matrix), a crash is the failpoint ``kill`` (``SimulatedCrash``), and the payments provider is
an :class:`~replaysafe.testing.EffectProbe` that honours idempotency keys only when the handler
declared its effect ``keyed``.

On RabbitMQ, SQS and Kafka the faults are real (:func:`run_guarantee` ->
:func:`replaysafe.chaos.demo_procs.run_processes`): the workers are OS processes (the chaos
worker, ``python -m replaysafe.chaos.worker SPEC.json`` with the demo's spec, supervised and
restarted by :class:`replaysafe.chaos.procs.Pool`), a crash is a SIGKILL the worker sends
itself at the failpoint (nothing settled, released or flushed), the provider is the chaos
:class:`~replaysafe.chaos.sink.EffectSink` (loopback HTTP with its own journal; keyed under
effectively-once, unkeyed otherwise), and each broker's own fault joins in (:data:`BROKER_FAULTS`):

- RabbitMQ ``channel_closed_before_ack``: after the charge (effectively-once: after the ledger
  recorded it) the worker's connections to the server are cut (a loopback relay in the worker,
  :class:`~replaysafe.testing.netcut.CutRelay`) while it holds its ack back; the server requeues
  what the connections held unacked, as after a restart or a network failure;
- SQS ``visibility_expired_mid_handler``: the queue's visibility timeout is shorter than the
  provider's answer for the target's first charge and nothing extends it, so SQS hands out another
  copy while the first handler still runs;
- Kafka ``consumer_joined_mid_batch``: while the orders are still arriving and being worked on, one
  more worker process joins the consumer group; the rebalance moves partitions, with their
  uncommitted records, between members.

Ambiguous publishes are injected at the producer in this process on every broker. Either way the
counts come from the provider's own records, not from the runtime's opinion of itself; each fault
counts only the hits its evidence shows (see
:func:`replaysafe.chaos.demo_procs.process_fault_hits`).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

from replaysafe import observe as o
from replaysafe.brokers.memory import MemoryBroker
from replaysafe.chaos.demo_plan import (
    BROKER_FAULTS,
    FAULTS,
    SOURCE,
    STATEMENTS,
    GuaranteeResult,
    arm_in_process,
    build_app,
    drop_demo_ledger,
    fault_plan,
    ledger_conf,
    open_demo_ledger,
    order_envelopes,
    order_op,
)
from replaysafe.chaos.demo_procs import local_broker, run_processes, sqs_url
from replaysafe.chaos.harness import supervise_in_process
from replaysafe.errors import PublishAmbiguous
from replaysafe.failpoints import Failpoints
from replaysafe.guarantees import Guarantee
from replaysafe.observe import Stats
from replaysafe.producer import Producer
from replaysafe.testing import EffectProbe

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

#: the preset's name: ``replaysafe chaos --preset demo``
PRESET = "demo"


async def run_guarantee(
    guarantee: Guarantee,
    *,
    orders: int,
    seed: int,
    workdir: Path,
    workers: int = 8,
    lease: float = 0.5,
    broker_url: str = "memory",
    ledger_spec: str = "sqlite",
    time_limit: float = 300.0,
) -> GuaranteeResult:
    """Replay the chain for one guarantee and count business effects at the provider.

    ``broker_url`` is ``memory`` (workers are tasks of this process) or a RabbitMQ, SQS or Kafka
    URL ``broker_from_url`` knows (workers are processes and the faults are real; see the module
    docstring). ``ledger_spec`` is ``sqlite`` (a file in ``workdir``), ``memory`` (memory broker
    only), a PostgreSQL DSN or a Redis URL; the run's schema, keys or file are its own and
    removed at the end. ``time_limit`` bounds the wait for the run to settle.
    """
    if broker_url == "memory":
        return await _run_in_process(guarantee, orders=orders, seed=seed, workdir=workdir,
                                     workers=workers, lease=lease, ledger_spec=ledger_spec,
                                     time_limit=time_limit)  # fmt: skip
    return await run_processes(guarantee, orders=orders, seed=seed, workdir=workdir,
                               workers=workers, broker_url=broker_url, ledger_spec=ledger_spec,
                               time_limit=time_limit)  # fmt: skip


# --------------------------------------------------------------------------- memory broker


async def _run_in_process(
    guarantee: Guarantee,
    *,
    orders: int,
    seed: int,
    workdir: Path,
    workers: int,
    lease: float,
    ledger_spec: str,
    time_limit: float,
) -> GuaranteeResult:
    """The memory broker: supervised worker tasks, ``SimulatedCrash`` as the crash, the broker's
    own depth (unsettled deliveries included) as the end of the run."""
    started = time.perf_counter()
    plan = fault_plan(orders, seed)
    failpoints = Failpoints()
    broker = MemoryBroker(failpoints=failpoints)
    conf = ledger_conf(ledger_spec, workdir, guarantee.value, uuid.uuid4().hex[:8])
    ledger = open_demo_ledger(conf)
    # the payments API: records every charge, honours idempotency keys only for keyed effects
    provider = EffectProbe(honour_keys=guarantee is Guarantee.EFFECTIVELY_ONCE)
    app = build_app(guarantee, broker, ledger, provider, failpoints=failpoints, lease=lease)
    group = app.handlers["capture_payment"].group
    arm_in_process(failpoints, plan)
    producer = Producer(broker, guarantee, backoff=0.005)
    restarts = 0
    stats: list[Stats] = []
    done = asyncio.Event()

    def crashed() -> None:
        nonlocal restarts
        restarts += 1  # the process died; its supervisor starts a new one

    def slot(n: int) -> Coroutine[Any, Any, None]:
        return supervise_in_process(
            app, done, owner=lambda gen: f"worker-{n}-{gen}", drain_timeout=5.0,
            on_worker=lambda w: stats.append(w.stats), on_crash=crashed,
        )  # fmt: skip

    pool = [asyncio.create_task(slot(n)) for n in range(workers)]
    quarantine = []
    try:
        for env in order_envelopes(orders, seed):
            with contextlib.suppress(PublishAmbiguous):
                await producer.publish(SOURCE, [env])
        async with asyncio.timeout(time_limit):
            # the memory broker has no 'drained' event; poll its depth
            while broker.depth(SOURCE, group) > 0:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        done.set()
        await asyncio.gather(*pool)
    finally:
        done.set()
        for t in pool:
            t.cancel()
        await asyncio.gather(*pool, return_exceptions=True)
        try:
            quarantine = await ledger.quarantined(limit=orders * 2)
        finally:
            await drop_demo_ledger(ledger, conf)
            await broker.close()

    per_order = provider.per_subject()
    quarantined_ops = {e.operation_id for e in quarantine}
    all_ops = {f"order-{i}": order_op(i) for i in range(orders)}
    faults = {name: failpoints.fired[point] for name, point in FAULTS.items()}
    return GuaranteeResult(
        guarantee=guarantee,
        operations=orders,
        effects=len(provider.effects),
        duplicates=sum(1 for n in per_order.values() if n > 1),
        lost=sum(
            1
            for order, op in all_ops.items()
            if per_order[order] == 0 and op not in quarantined_ops
        ),
        quarantined=len(quarantined_ops),
        faults=faults,
        transport_copies=len(broker.published(SOURCE)),
        seconds=time.perf_counter() - started,
        worker_restarts=restarts,
        answered_by_ledger=sum(st.total(o.DUPLICATE_HITS) for st in stats),
        answered_by_key=provider.replays_answered,
    )


# --------------------------------------------------------------------------- the demo


@contextlib.asynccontextmanager
async def _broker_url(url: str) -> AsyncIterator[str]:
    """``sqs`` or ``kafka`` without a URL: a throwaway local server for the demo's duration."""
    if url in ("sqs", "kafka"):
        with local_broker(url) as started:
            yield started
    else:
        yield url


async def run_demo(
    orders: int = 1000,
    seed: int = 7,
    workers: int = 8,
    broker_url: str = "memory",
    ledger_spec: str = "sqlite",
) -> list[GuaranteeResult]:
    """Every guarantee in turn. ``broker_url``: ``memory``, a broker URL, or ``sqs`` / ``kafka``
    for a throwaway local server (moto, Tansu)."""
    with tempfile.TemporaryDirectory(prefix="replaysafe-demo-") as tmp:
        async with _broker_url(broker_url) as url:
            return [
                await run_guarantee(
                    g,
                    orders=orders,
                    seed=seed,
                    workdir=Path(tmp),
                    workers=workers,
                    broker_url=url,
                    ledger_spec=ledger_spec,
                )
                for g in Guarantee
            ]


def demo_json(orders: int, seed: int, results: list[GuaranteeResult]) -> dict[str, Any]:
    """The demo's JSON (``--json``): the run's size and seed, and each guarantee's counts."""
    return {"orders": orders, "seed": seed, "results": [r.as_json() for r in results]}
