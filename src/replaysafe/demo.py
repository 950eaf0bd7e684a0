"""`replaysafe demo`: the chain that charges customers twice, replayed under each guarantee.

For ``orders`` orders, ``capture-payment:order-i`` is published to an in-memory broker with
RabbitMQ-like redelivery (a dead consumer's unsettled message is requeued) and consumed by a pool of
workers on a SQLite ledger. The same faults, chosen by ``seed``, hit every guarantee:

- ``ambiguous_publish_accepted``: the broker stored the message but the producer saw an error;
- ``ambiguous_publish_lost``: the producer saw the same error, and the broker really lost it;
- ``crash_after_charge``: the worker dies after the charge, before anything records it;
- ``crash_before_charge``: the worker dies right before the charge (under at-most-once that is
  after the broker already completed the message).

Charges go to a fake payment provider that records every charge and honours idempotency keys only
when the handler declared its effect ``keyed``. The counts come from the provider's own records,
not from the runtime's opinion of itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from replaysafe import failpoints as fp
from replaysafe import observe as o
from replaysafe.app import App, Context, RetryPolicy
from replaysafe.brokers import broker_from_url
from replaysafe.brokers.base import Broker, RedeliveryKind
from replaysafe.brokers.memory import MemoryBroker
from replaysafe.envelope import Envelope, operation_id
from replaysafe.errors import PublishAmbiguous, SimulatedCrash
from replaysafe.failpoints import Failpoints
from replaysafe.guarantees import Effect, Guarantee
from replaysafe.ledger import ledger_from_url
from replaysafe.ledger.base import Ledger
from replaysafe.ledger.sqlite import SQLiteLedger
from replaysafe.observe import Stats
from replaysafe.producer import Producer
from replaysafe.testing import EffectProbe

SOURCE = "payments"
DOWNSTREAM = "payments-api"

#: fault name -> the failpoint that injects it
FAULTS: dict[str, str] = {
    "ambiguous_publish_accepted": fp.PUBLISH_AFTER_ACCEPT,
    "ambiguous_publish_lost": fp.PUBLISH_BEFORE_ACCEPT,
    "crash_after_charge": fp.AFTER_EFFECT_BEFORE_LEDGER,
    "crash_before_charge": fp.BEFORE_EFFECT,
}
FAULT_RATE = 0.03

STATEMENTS: dict[Guarantee, str] = {
    Guarantee.AT_MOST_ONCE: (
        "at-most-once: the broker completes the message before the charge, so nothing is ever "
        "replayed and replay never hurts; a crash between completion and the charge loses the "
        "order, and an ambiguous publish is never retried."
    ),
    Guarantee.AT_LEAST_ONCE: (
        f"at-least-once: the charge happens before completion, so nothing is lost; every crash "
        f"between charge and completion and every retried ambiguous publish replays the charge, "
        f"and {DOWNSTREAM} (unkeyed) charges again: replay hurts at {DOWNSTREAM}."
    ),
    Guarantee.EFFECTIVELY_ONCE: (
        f"effectively-once: replay stops hurting at {DOWNSTREAM} (keyed): the ledger claims "
        f"each operation before the charge, duplicate copies are answered from the ledger, and a "
        f"re-run after a crash carries the same idempotency key."
    ),
}


@dataclass
class GuaranteeResult:
    guarantee: Guarantee
    operations: int
    effects: int
    duplicates: int
    lost: int
    quarantined: int
    faults: dict[str, int]
    #: copies the broker holds (known on the memory broker only)
    transport_copies: int | None = 0
    seconds: float = 0.0
    worker_restarts: int = 0
    #: deliveries the ledger answered without running the handler (completed or in flight)
    answered_by_ledger: int = 0
    #: re-runs the downstream answered from its idempotency key (no new charge)
    answered_by_key: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "guarantee": self.guarantee.value,
            "operations": self.operations,
            "effects": self.effects,
            "duplicates": self.duplicates,
            "lost": self.lost,
            "quarantined": self.quarantined,
            "faults": dict(self.faults),
        }


def fault_plan(orders: int, seed: int) -> dict[str, set[str]]:
    """Which orders each fault hits: the same for every guarantee, disjoint, at least one each."""
    if orders < len(FAULTS):
        raise ValueError(f"the demo needs at least {len(FAULTS)} orders, one per fault")
    rng = random.Random(seed)
    per_fault = max(1, round(orders * FAULT_RATE))
    ids = rng.sample(range(orders), min(orders, per_fault * len(FAULTS)))
    plan: dict[str, set[str]] = {}
    for n, name in enumerate(FAULTS):
        plan[name] = {_op(i) for i in ids[n * per_fault : (n + 1) * per_fault]}
    return plan


def _op(i: int) -> str:
    return operation_id("capture-payment", f"order-{i}")


def _arm(failpoints: Failpoints, plan: Mapping[str, set[str]]) -> None:
    for name, point in FAULTS.items():
        targets = plan[name]
        fired: set[str] = set()

        def once(
            ctx: Mapping[str, Any], targets: set[str] = targets, fired: set[str] = fired
        ) -> bool:
            op = ctx.get("operation_id")
            if op in targets and op not in fired:
                fired.add(op)
                return True
            return False

        if point in (fp.PUBLISH_AFTER_ACCEPT, fp.PUBLISH_BEFORE_ACCEPT):
            accepted = point == fp.PUBLISH_AFTER_ACCEPT
            failpoints.enable(
                point,
                "raise",
                when=once,
                error=PublishAmbiguous(
                    "demo: the publish confirm never came back "
                    f"({'the broker did store the message' if accepted else 'the broker lost it'})"
                ),
            )
        else:
            failpoints.enable(point, "kill", when=once)


def build_app(
    guarantee: Guarantee,
    broker: Broker,
    ledger: Ledger,
    provider: EffectProbe,
    *,
    failpoints: Failpoints | None = None,
    lease: float = 0.5,
    source: str = SOURCE,
) -> App:
    """The demo's payments app: one ``capture_payment`` handler under ``guarantee``; the effect
    is declared keyed under effectively-once (the provider honours the key) and unkeyed
    otherwise."""
    if isinstance(broker, MemoryBroker):
        broker.declare(source, mode=RedeliveryKind.NACK)
    app = App("demo", broker=broker, ledger=ledger, failpoints=failpoints or Failpoints())
    keyed = guarantee is Guarantee.EFFECTIVELY_ONCE

    @app.handler(
        source,
        guarantee=guarantee,
        effect=Effect.keyed(DOWNSTREAM) if keyed else Effect.unkeyed(DOWNSTREAM),
        key=lambda p: ("capture-payment", p["order_id"]),
        example={"order_id": "order-1", "amount": 100},
        lease=lease,
        retry=RetryPolicy(max_attempts=10, base_delay=0.01, max_delay=0.05),
        concurrency=1,
    )
    async def capture_payment(ctx: Context) -> str:
        p = ctx.payload
        return await provider.apply(p["order_id"], p["amount"], ctx.idempotency_key)

    return app


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
    quiet: float = 4.0,
    time_limit: float = 300.0,
) -> GuaranteeResult:
    """Replay the chain for one guarantee and count business effects at the provider.

    ``broker_url`` is ``memory`` or any URL ``broker_from_url`` knows; ``ledger_spec`` is
    ``sqlite`` (a file in ``workdir``), ``memory``, a PostgreSQL DSN or a Redis URL. On a real
    broker a simulated crash abandons the worker's subscription, so the broker recovers its
    messages its own way (RabbitMQ requeues, SQS waits for the visibility timeout, Kafka rewinds
    to the committed offset), and the run ends after ``quiet`` seconds without deliveries.
    """
    started = time.perf_counter()
    plan = fault_plan(orders, seed)
    failpoints = Failpoints()
    tag = uuid.uuid4().hex[:8]
    memory = broker_url == "memory"
    # a short Kafka session: each simulated crash makes the group rebalance, and Tansu waits
    # about half the session timeout per join
    extra: dict[str, Any] = {"session_timeout": 3.0} if broker_url.startswith("kafka") else {}
    broker = broker_from_url(broker_url, failpoints=failpoints, **extra)
    source = SOURCE if memory else f"rs-demo-{guarantee.value}-{tag}"
    ledger = _demo_ledger(ledger_spec, guarantee, workdir, tag)
    # the payments API: records every charge, honours idempotency keys only for keyed effects
    provider = EffectProbe(honour_keys=guarantee is Guarantee.EFFECTIVELY_ONCE)
    app = build_app(guarantee, broker, ledger, provider, failpoints=failpoints, lease=lease,
                    source=source)  # fmt: skip
    group = app.handlers["capture_payment"].group
    await broker.prepare_source(source, [group], visibility_timeout=2.0)
    _arm(failpoints, plan)
    producer = Producer(broker, guarantee, backoff=0.005)
    rng = random.Random(seed)
    envelopes = [
        Envelope.of(
            _op(i),
            {"order_id": f"order-{i}", "amount": rng.randint(100, 50_000)},
            key=f"customer-{i % 97}",
        )
        for i in range(orders)
    ]
    restarts = 0
    stats: list[Stats] = []
    done = asyncio.Event()

    async def supervise(n: int) -> None:
        nonlocal restarts
        while not done.is_set():
            worker = app.worker(owner=f"worker-{n}-{restarts}")
            stats.append(worker.stats)
            stopper = asyncio.create_task(_stop_when(done, worker))
            try:
                await worker.run(drain_timeout=5.0)
            except SimulatedCrash:
                restarts += 1  # the process died; its supervisor starts a new one
            finally:
                stopper.cancel()

    def delivered() -> int:
        return sum(st.total(o.RECEIVED) for st in stats)

    pool = [asyncio.create_task(supervise(n)) for n in range(workers)]
    quarantine = []
    try:
        for env in envelopes:
            with contextlib.suppress(PublishAmbiguous):
                await producer.publish(source, [env])
        async with asyncio.timeout(time_limit):
            if isinstance(broker, MemoryBroker):
                # the memory broker has no 'drained' event; poll its depth
                while broker.depth(source, group) > 0:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            else:
                # a real broker cannot say "nothing will ever be redelivered": wait until every
                # operation that reached it was delivered at least once, then for quiet
                reached = orders - (
                    len(plan["ambiguous_publish_lost"])
                    if guarantee is Guarantee.AT_MOST_ONCE
                    else 0
                )
                while delivered() < reached:  # noqa: ASYNC110 - counters, no event to wait on
                    await asyncio.sleep(0.1)
                seen, still = -1, 0.0
                while still < quiet:
                    await asyncio.sleep(0.25)
                    now_seen = delivered() + provider.calls
                    still = still + 0.25 if now_seen == seen else 0.0
                    seen = now_seen
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
            await _drop_ledger(ledger)
            if not memory:
                with contextlib.suppress(Exception):
                    await broker.drop_source(source, [group])
            await broker.close()

    per_order = provider.per_subject()
    quarantined_ops = {e.operation_id for e in quarantine}
    all_ops = {f"order-{i}": _op(i) for i in range(orders)}
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
        transport_copies=len(broker.published(source))
        if isinstance(broker, MemoryBroker)
        else None,
        seconds=time.perf_counter() - started,
        worker_restarts=restarts,
        answered_by_ledger=sum(st.total(o.DUPLICATE_HITS) for st in stats),
        answered_by_key=provider.replays_answered,
    )


def _demo_ledger(spec: str, guarantee: Guarantee, workdir: Path, tag: str) -> Ledger:
    """A fresh ledger namespace per run: its own file, schema or key prefix."""
    if spec == "sqlite":
        return SQLiteLedger(workdir / f"ledger-{guarantee.value}.db")  # WAL, synchronous=FULL
    if spec.startswith(("postgres://", "postgresql://")) or "dbname=" in spec:
        return ledger_from_url(spec, schema=f"rs_demo_{tag}", auto_migrate=True)
    if spec.startswith(("redis://", "rediss://")):
        return ledger_from_url(spec, prefix=f"rs-demo:{tag}:")
    return ledger_from_url(spec)


async def _drop_ledger(ledger: Ledger) -> None:
    """Remove the run's schema / keys (the demo leaves nothing behind), then close."""
    try:
        drop = getattr(ledger, "drop", None)
        if callable(drop):
            await drop()
    finally:
        await ledger.close()


async def _stop_when(done: asyncio.Event, worker: Any) -> None:
    await done.wait()
    worker.stop()


async def run_demo(
    orders: int = 1000,
    seed: int = 7,
    workers: int = 8,
    broker_url: str = "memory",
    ledger_spec: str = "sqlite",
) -> list[GuaranteeResult]:
    with tempfile.TemporaryDirectory(prefix="replaysafe-demo-") as tmp:
        return [
            await run_guarantee(
                g,
                orders=orders,
                seed=seed,
                workdir=Path(tmp),
                workers=workers,
                broker_url=broker_url,
                ledger_spec=ledger_spec,
            )
            for g in Guarantee
        ]


def demo_json(orders: int, seed: int, results: list[GuaranteeResult]) -> dict[str, Any]:
    return {"orders": orders, "seed": seed, "results": [r.as_json() for r in results]}
