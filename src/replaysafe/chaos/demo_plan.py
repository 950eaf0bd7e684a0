"""The demo preset's scenario: the payments app, the capture-payment orders, the faults a seed
chooses for them (the same under every guarantee), how they are armed, and the result and JSON
the demo reports. Run by :mod:`replaysafe.chaos.demo`; see its docstring."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from replaysafe import failpoints as fp
from replaysafe import observe as o
from replaysafe.app import App, Context, RetryPolicy
from replaysafe.brokers.base import Broker, RedeliveryKind
from replaysafe.brokers.memory import MemoryBroker
from replaysafe.chaos.ledgers import drop_ledger, ledger_from_spec
from replaysafe.envelope import Envelope, operation_id
from replaysafe.errors import PublishAmbiguous
from replaysafe.failpoints import Failpoints
from replaysafe.guarantees import Effect, Guarantee
from replaysafe.ledger.base import LedgerBackend
from replaysafe.observe import Stats
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
#: the producer-side faults (this process, every broker)
PUBLISH_FAULTS = ("ambiguous_publish_accepted", "ambiguous_publish_lost")
#: the worker-side crashes (worker processes SIGKILL themselves there on real brokers)
KILL_FAULTS = ("crash_after_charge", "crash_before_charge")

#: the broker's own fault on each real broker: one more key of the JSON's ``faults`` there
BROKER_FAULTS: dict[str, str] = {
    "rabbitmq": "channel_closed_before_ack",
    "sqs": "visibility_expired_mid_handler",
    "kafka": "consumer_joined_mid_batch",
}
#: the claim lease of worker processes: a SIGKILLed holder's lease runs out after this
PROCESS_LEASE = 1.5
#: handlers per worker process at a time (as in memory: a crash takes exactly its own order)
PROCESS_CONCURRENCY = 1
#: RabbitMQ: how long a worker waits after its connection was closed before it acks
#: SQS: the queue's visibility timeout, and how long the provider holds the target's first charge
SQS_VISIBILITY = 2
SQS_SLOW = 3.5
#: Kafka: one order is published every JOIN_PACE seconds until the joining worker got a record
JOIN_PACE = 0.25

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
    #: deliveries the ledger answered without running the handler (completed or in flight); on
    #: real brokers each worker process writes its counter every 0.5 s, at exit and before a kill
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
        plan[name] = {order_op(i) for i in ids[n * per_fault : (n + 1) * per_fault]}
    return plan


def broker_fault_targets(orders: int, seed: int, plan: Mapping[str, set[str]]) -> set[str]:
    """The orders the broker's own fault targets (RabbitMQ, SQS): as many as each planned fault,
    disjoint from them, the same for every guarantee; empty when no order is left."""
    taken = set().union(*plan.values())
    free = [i for i in range(orders) if order_op(i) not in taken]
    per_fault = max(1, round(orders * FAULT_RATE))
    rng = random.Random(f"{seed}:broker")
    return {order_op(i) for i in rng.sample(free, min(len(free), per_fault))}


def order_op(i: int) -> str:
    return operation_id("capture-payment", f"order-{i}")


def order_envelopes(orders: int, seed: int) -> list[Envelope]:
    rng = random.Random(seed)
    return [
        Envelope.of(
            order_op(i),
            {"order_id": f"order-{i}", "amount": rng.randint(100, 50_000)},
            key=f"customer-{i % 97}",
        )
        for i in range(orders)
    ]


def _once(targets: set[str]) -> fp.Predicate:
    fired: set[str] = set()

    def when(ctx: Mapping[str, Any]) -> bool:
        op = ctx.get("operation_id")
        if op in targets and op not in fired:
            fired.add(op)
            return True
        return False

    return when


def arm_publish(failpoints: Failpoints, plan: Mapping[str, set[str]]) -> None:
    """The producer's ambiguous publishes: the confirm never comes back, once per target."""
    for name in PUBLISH_FAULTS:
        point = FAULTS[name]
        accepted = point == fp.PUBLISH_AFTER_ACCEPT
        failpoints.enable(
            point,
            "raise",
            when=_once(plan[name]),
            error=PublishAmbiguous(
                "demo: the publish confirm never came back "
                f"({'the broker did store the message' if accepted else 'the broker lost it'})"
            ),
        )


def arm_in_process(failpoints: Failpoints, plan: Mapping[str, set[str]]) -> None:
    """Every fault in one process (the memory broker): a crash is ``SimulatedCrash``."""
    arm_publish(failpoints, plan)
    for name in KILL_FAULTS:
        failpoints.enable(FAULTS[name], "kill", when=_once(plan[name]))


def build_app(
    guarantee: Guarantee,
    broker: Broker,
    ledger: LedgerBackend,
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


def ledger_conf(spec: str, workdir: Path, name: str, tag: str) -> dict[str, Any]:
    """A fresh ledger namespace per run (its own file, schema or key prefix), as the JSON a worker
    process needs to open the same ledger (``replaysafe.chaos.harness.ledger_from_spec``: its URL
    and options), plus what the cleanup reads."""
    if spec == "sqlite":
        path = str(workdir / f"ledger-{name}.db")
        return {"kind": "sqlite", "path": path, "url": f"sqlite:{path}"}
    if spec.startswith(("postgres://", "postgresql://")) or "dbname=" in spec:
        schema = f"rs_demo_{tag}"
        return {"kind": "postgres", "dsn": spec, "schema": schema, "url": spec,
                "options": {"schema": schema, "auto_migrate": True}}  # fmt: skip
    if spec.startswith(("redis://", "rediss://")):
        prefix = f"rs-demo:{tag}:"
        return {"kind": "redis", "url": spec, "client_url": spec, "prefix": prefix,
                "options": {"prefix": prefix}}  # fmt: skip
    return {"kind": "url", "url": spec}


def open_demo_ledger(conf: Mapping[str, Any]) -> LedgerBackend:
    """The in-process ledger of ``conf``."""
    return ledger_from_spec(dict(conf))


async def drop_demo_ledger(ledger: LedgerBackend, conf: Mapping[str, Any]) -> None:
    """Close the ledger and remove the run's schema or keys (the demo leaves nothing behind)."""
    await drop_ledger(ledger, dict(conf))


def write_counters(state_dir: str, stats: Stats) -> None:
    """This process's runtime counters the demo shows (replaced atomically: a reader never sees
    half a file)."""
    d = Path(state_dir) / "counters"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f"{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"answered_by_ledger": stats.total(o.DUPLICATE_HITS)}))
    os.replace(tmp, d / f"{os.getpid()}.json")


def read_counters(state_dir: str) -> int:
    """Copies answered from the ledger, summed over every worker process of the run."""
    d = Path(state_dir) / "counters"
    if not d.is_dir():
        return 0
    return sum(int(json.loads(f.read_text())["answered_by_ledger"]) for f in d.glob("*.json"))
