"""`replaysafe demo`: the chain that charges customers twice, replayed under each guarantee.

For ``orders`` orders, ``capture-payment:order-i`` is published and consumed by a pool of workers,
once per guarantee. The same faults, chosen by ``seed``, hit every guarantee:

- ``ambiguous_publish_accepted``: the broker stored the message but the producer saw an error;
- ``ambiguous_publish_lost``: the producer saw the same error, and the broker really lost it;
- ``crash_after_charge``: the worker dies after the charge, before anything records it;
- ``crash_before_charge``: the worker dies right before the charge (under at-most-once that is
  after the broker already completed the message).

On the memory broker (the default, ``make demo``) the broker redelivers like RabbitMQ (a dead
consumer's unsettled message is requeued), the workers are supervised tasks of this process on a
SQLite ledger, a crash is the failpoint ``kill`` (``SimulatedCrash``), and the payments provider is
an :class:`~replaysafe.testing.EffectProbe` that honours idempotency keys only when the handler
declared its effect ``keyed``.

On RabbitMQ, SQS and Kafka the faults are real (:func:`run_guarantee` -> ``_run_processes``): the
workers are OS processes (``python -m replaysafe.demo SPEC.json``, supervised and restarted by
:class:`replaysafe.chaos.procs.Pool`), a crash is a SIGKILL the worker sends itself at the
failpoint (nothing settled, released or flushed), the provider is the chaos
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
counts only the hits its evidence shows (see :func:`_process_fault_hits`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from replaysafe import failpoints as fp
from replaysafe import observe as o
from replaysafe.app import App, Context, RetryPolicy
from replaysafe.brokers import broker_from_url
from replaysafe.brokers.base import Broker, RedeliveryKind
from replaysafe.brokers.memory import MemoryBroker
from replaysafe.chaos.procs import Pool
from replaysafe.envelope import Envelope, operation_id
from replaysafe.errors import ConfigurationError, PublishAmbiguous, SimulatedCrash
from replaysafe.failpoints import Failpoints
from replaysafe.guarantees import Effect, Guarantee
from replaysafe.ledger.base import LedgerBackend
from replaysafe.observe import Stats
from replaysafe.producer import Producer
from replaysafe.runtime.worker import Worker
from replaysafe.testing import EffectProbe
from replaysafe.testing.netcut import CutRelay

if TYPE_CHECKING:
    from replaysafe.chaos.app import RunSpec
    from replaysafe.chaos.checker import Published
    from replaysafe.chaos.sink import Attempt

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
        plan[name] = {_op(i) for i in ids[n * per_fault : (n + 1) * per_fault]}
    return plan


def broker_fault_targets(orders: int, seed: int, plan: Mapping[str, set[str]]) -> set[str]:
    """The orders the broker's own fault targets (RabbitMQ, SQS): as many as each planned fault,
    disjoint from them, the same for every guarantee; empty when no order is left."""
    taken = set().union(*plan.values())
    free = [i for i in range(orders) if _op(i) not in taken]
    per_fault = max(1, round(orders * FAULT_RATE))
    rng = random.Random(f"{seed}:broker")
    return {_op(i) for i in rng.sample(free, min(len(free), per_fault))}


def _op(i: int) -> str:
    return operation_id("capture-payment", f"order-{i}")


def _envelopes(orders: int, seed: int) -> list[Envelope]:
    rng = random.Random(seed)
    return [
        Envelope.of(
            _op(i),
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


def _arm_publish(failpoints: Failpoints, plan: Mapping[str, set[str]]) -> None:
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


def _arm(failpoints: Failpoints, plan: Mapping[str, set[str]]) -> None:
    """Every fault in one process (the memory broker): a crash is ``SimulatedCrash``."""
    _arm_publish(failpoints, plan)
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
    return await _run_processes(guarantee, orders=orders, seed=seed, workdir=workdir,
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
    conf = _ledger_conf(ledger_spec, workdir, guarantee.value, uuid.uuid4().hex[:8])
    ledger = _demo_ledger(conf)
    # the payments API: records every charge, honours idempotency keys only for keyed effects
    provider = EffectProbe(honour_keys=guarantee is Guarantee.EFFECTIVELY_ONCE)
    app = build_app(guarantee, broker, ledger, provider, failpoints=failpoints, lease=lease)
    group = app.handlers["capture_payment"].group
    _arm(failpoints, plan)
    producer = Producer(broker, guarantee, backoff=0.005)
    restarts = 0
    stats: list[Stats] = []
    done = asyncio.Event()

    async def supervise(n: int) -> None:
        nonlocal restarts
        while not done.is_set():
            worker = Worker(app, owner=f"worker-{n}-{restarts}")
            stats.append(worker.stats)
            stopper = asyncio.create_task(_stop_when(done, worker))
            try:
                await worker.run(drain_timeout=5.0)
            except SimulatedCrash:
                restarts += 1  # the process died; its supervisor starts a new one
            finally:
                stopper.cancel()

    pool = [asyncio.create_task(supervise(n)) for n in range(workers)]
    quarantine = []
    try:
        for env in _envelopes(orders, seed):
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
            await _drop_ledger(ledger, conf)
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
        transport_copies=len(broker.published(SOURCE)),
        seconds=time.perf_counter() - started,
        worker_restarts=restarts,
        answered_by_ledger=sum(st.total(o.DUPLICATE_HITS) for st in stats),
        answered_by_key=provider.replays_answered,
    )


def _ledger_conf(spec: str, workdir: Path, name: str, tag: str) -> dict[str, Any]:
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


def _demo_ledger(conf: Mapping[str, Any]) -> LedgerBackend:
    """The in-process ledger of ``conf``."""
    from replaysafe.chaos.harness import ledger_from_spec

    return ledger_from_spec(dict(conf))


async def _drop_ledger(ledger: LedgerBackend, conf: Mapping[str, Any]) -> None:
    """Close the ledger and remove the run's schema or keys (the demo leaves nothing behind)."""
    from replaysafe.chaos.harness import drop_ledger

    await drop_ledger(ledger, dict(conf))


async def _stop_when(done: asyncio.Event, worker: Any) -> None:
    await done.wait()
    worker.stop()


# --------------------------------------------------------------------------- real brokers


def broker_kind(url: str) -> str:
    """``rabbitmq``, ``sqs`` or ``kafka`` for a broker URL (the scheme decides)."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme in ("amqp", "amqps"):
        return "rabbitmq"
    if scheme in ("sqs", "sqs+http", "sqs+https"):
        return "sqs"
    if scheme == "kafka":
        return "kafka"
    shown = url.split("@")[-1]  # never echo credentials
    raise ConfigurationError(
        f"the demo runs on memory, amqp://, sqs+http(s):// or kafka:// brokers, not {shown!r}"
    )


def sqs_url(endpoint: str) -> str:
    """The demo's URL for a local SQS-compatible endpoint ``http://host:port`` (moto takes any
    credentials; they travel as the URL's user info)."""
    return "sqs+http://test:test@" + endpoint.removeprefix("http://").rstrip("/") + "/us-east-1"


@contextlib.contextmanager
def local_broker(kind: str) -> Iterator[str]:
    """A throwaway local server for ``kind`` (``sqs``: moto, ``kafka``: Tansu; memory storage,
    127.0.0.1, stopped on exit); yields the demo's URL for it. ``ServerUnavailable`` names what
    to install when it cannot start."""
    from replaysafe.testing.servers import local_kafka, local_sqs

    if kind == "sqs":
        with local_sqs() as endpoint:
            yield sqs_url(endpoint)
    elif kind == "kafka":
        with local_kafka() as bootstrap:
            yield f"kafka://{bootstrap}"
    else:
        raise ConfigurationError(f"no throwaway server for {kind!r}; give the broker's URL")


class _Workers(Pool):
    """The chaos harness's worker pool, running demo workers (``python -m replaysafe.demo``) and
    keeping every process it started, so a SIGKILL can be told from a clean stop."""

    module = "replaysafe.demo"

    def __init__(self, spec_path: Path, logdir: Path, state_dir: str) -> None:
        super().__init__(spec_path, logdir, state_dir, pause=0.0)
        self.spawned: list[subprocess.Popen[bytes]] = []

    def spawn(self) -> subprocess.Popen[bytes]:
        proc = super().spawn()
        self.spawned.append(proc)
        return proc

    def alive(self) -> set[int]:
        return {p.pid for p in self.spawned if p.poll() is None}

    def sigkilled(self) -> set[int]:
        """Pids of the processes that died of SIGKILL so far (call before :meth:`stop`, whose
        last resort is SIGKILL too)."""
        return {p.pid for p in self.spawned if p.poll() == -signal.SIGKILL}


async def _run_processes(
    guarantee: Guarantee,
    *,
    orders: int,
    seed: int,
    workdir: Path,
    workers: int,
    broker_url: str,
    ledger_spec: str,
    time_limit: float,
) -> GuaranteeResult:
    """One guarantee on a real broker with worker processes and real faults.

    Publishes every order (Kafka: a quarter, then one at a time around the joining worker), waits
    until the run has settled (every published order charged or quarantined, or no movement for
    a while, the broker holding nothing, and every held-back ack or slow charge over), stops the
    workers, then counts charges from the provider's journal and fault hits from their evidence.
    """
    from replaysafe.chaos.app import RunSpec
    from replaysafe.chaos.harness import ChaosConfig, RunContext, ledger_from_spec, wait_settled
    from replaysafe.chaos.procs import broker_depth, broker_options
    from replaysafe.chaos.sink import REPLAYED, EffectSink

    started = time.perf_counter()
    kind = broker_kind(broker_url)
    plan = fault_plan(orders, seed)
    targets = broker_fault_targets(orders, seed, plan) if kind != "kafka" else set()
    eo = guarantee is Guarantee.EFFECTIVELY_ONCE
    tag = uuid.uuid4().hex[:8]
    run = f"rs-demo-{guarantee.value}-{tag}"
    rundir = workdir / run
    rundir.mkdir(parents=True)
    conf = _ledger_conf(ledger_spec, rundir, guarantee.value, tag)
    if conf["kind"] not in ("sqlite", "postgres", "redis"):
        raise ConfigurationError(
            f"worker processes cannot share the ledger {ledger_spec.split('@')[-1]!r}: use "
            "sqlite, a PostgreSQL DSN or a Redis URL on a real broker"
        )
    options = broker_options(kind, broker_url)
    spec = RunSpec(
        run=run,
        guarantee=guarantee.value,
        effect="keyed" if eo else "unkeyed",
        fault=BROKER_FAULTS[kind],
        source=run,
        group=f"{run}-g",
        sink_url="",
        state_dir=str(rundir / "state"),
        record_dir=str(rundir / "records"),
        targets=sorted(targets),
        lease=PROCESS_LEASE,
        concurrency=PROCESS_CONCURRENCY,
        max_attempts=10,
        slow=SQS_SLOW if kind == "sqs" else 0.0,
        # SQS: nothing extends the visibility, so it expires under the slow charge
        extend_visibility=kind != "sqs",
        in_process=False,
        broker={"kind": kind, "url": broker_url, "options": options},
        ledger=conf,
    )
    _mkdirs(spec.state_dir)
    producer_fps = Failpoints()
    _arm_publish(producer_fps, plan)
    history: list[Published] = []
    killed: set[int] = set()
    joins: list[tuple[int, float]] = []
    with EffectSink(rundir / "provider.db") as sink:
        spec.sink_url = sink.url
        sink.configure(
            run, keyed=eo, slow={op: SQS_SLOW for op in targets} if kind == "sqs" else None
        )
        spec_path = rundir / "spec.json"
        spec_path.write_text(json.dumps({"run": asdict(spec), "kills": {
            name: sorted(plan[name]) for name in KILL_FAULTS}}))  # fmt: skip
        admin = broker_from_url(broker_url, failpoints=producer_fps, **options)
        ledger = ledger_from_spec(conf)
        pool = _Workers(spec_path, rundir, spec.state_dir)
        ctx = RunContext(ChaosConfig(run_timeout=time_limit), sink, spec, ledger, history, rundir)
        supervisor: asyncio.Task[None] | None = None
        try:
            # the schema (or file) exists before any worker opens it
            await ledger.quarantined(limit=1)
            await admin.prepare_source(run, [spec.group], visibility_timeout=SQS_VISIBILITY,
                                       partitions=workers + 1)  # fmt: skip
            pool.start(workers)
            supervisor = asyncio.create_task(pool.supervise())
            producer = Producer(admin, guarantee, backoff=0.005)

            async def publish(envs: Iterable[Envelope]) -> None:
                for env in envs:
                    confirmed = False
                    with contextlib.suppress(PublishAmbiguous):
                        confirmed = (await producer.publish(run, [env])).confirmed
                    history.append(_published(env, confirmed))

            envelopes = _envelopes(orders, seed)
            if kind == "kafka":
                joins.append(await _join_mid_batch(pool, spec, envelopes, publish, time_limit))
            else:
                await publish(envelopes)

            depth = _throttled(lambda: broker_depth(ctx, admin), 1.0)

            deadline = time.monotonic() + time_limit
            while True:
                await wait_settled(ctx, depth=depth)
                # a held-back ack or a slow charge may still move something after the quiet
                left = _fault_pending_until(spec, kind, pool.alive()) - time.time()
                if left <= 0 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(left)
            killed = pool.sigkilled()
        finally:
            await pool.stop()
            if supervisor is not None:
                supervisor.cancel()
                await asyncio.gather(supervisor, return_exceptions=True)
            try:
                quarantine = await ledger.quarantined(limit=orders * 2)
            finally:
                await _drop_ledger(ledger, conf)
                with contextlib.suppress(Exception):
                    await admin.drop_source(run, [spec.group])
                await admin.close()
        attempts = sink.attempts(run)

    from replaysafe.chaos.app import read_records

    records = read_records(spec.record_dir)
    per_op = Counter(a.op for a in attempts if a.effect)
    quarantined_ops = {e.operation_id for e in quarantine}
    all_ops = [_op(i) for i in range(orders)]
    faults = {name: producer_fps.fired[FAULTS[name]] for name in PUBLISH_FAULTS}
    faults.update(_process_fault_hits(spec, guarantee, records, attempts, killed, joins))
    return GuaranteeResult(
        guarantee=guarantee,
        operations=orders,
        effects=sum(per_op.values()),
        duplicates=sum(1 for op in all_ops if per_op[op] > 1),
        lost=sum(1 for op in all_ops if per_op[op] == 0 and op not in quarantined_ops),
        quarantined=len(quarantined_ops),
        faults={name: faults[name] for name in (*FAULTS, BROKER_FAULTS[kind])},
        transport_copies=None,
        seconds=time.perf_counter() - started,
        worker_restarts=pool.restarts,
        answered_by_ledger=_read_counters(spec.state_dir),
        answered_by_key=sum(1 for a in attempts if a.outcome == REPLAYED),
    )


def _throttled(probe: Callable[[], Awaitable[int]], every: float) -> Callable[[], Awaitable[int]]:
    """``probe`` run at most once per ``every`` seconds (the last answer in between): each
    ``RabbitMQBroker.queue_depths`` call leaves channels open (robust channels reopen after the
    404 of a retry band that does not exist), and the connection allows 2047."""
    last: list[tuple[float, int]] = []

    async def depth() -> int:
        now = time.monotonic()
        if not last or now - last[0][0] >= every:
            last[:] = [(now, await probe())]
        return last[0][1]

    return depth


def _published(env: Envelope, confirmed: bool) -> Published:
    from replaysafe.chaos.checker import Published

    return Published(env.operation_id, env.fingerprint, confirmed, time.time())


async def _join_mid_batch(
    pool: _Workers,
    spec: RunSpec,
    envelopes: list[Envelope],
    publish: Callable[[Iterable[Envelope]], Awaitable[None]],
    time_limit: float,
) -> tuple[int, float]:
    """Kafka ``consumer_joined_mid_batch``: publish a quarter of the orders; once the group is
    consuming them, start one more worker process (it joins the group and the group rebalances
    while its members hold records in flight), and publish the rest one at a time until the new
    member got a record (then all at once). Returns the new worker's pid and when it started."""
    from replaysafe.chaos.app import read_records

    first = max(1, len(envelopes) // 4)
    await publish(envelopes[:first])
    deadline = time.monotonic() + time_limit
    while not read_records(spec.record_dir) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)  # the journal is a file: no event to wait on
    extra = pool.spawn()
    pool.extra.append(extra)  # stopped with the pool; never restarted
    joined_at = time.time()
    rest = envelopes[first:]
    while rest:
        if any(r["e"] == "delivered" and r["pid"] == extra.pid
               for r in read_records(spec.record_dir)):  # fmt: skip
            await publish(rest)
            break
        await publish(rest[:1])
        rest = rest[1:]
        await asyncio.sleep(JOIN_PACE)
    return extra.pid, joined_at


def _fault_pending_until(spec: RunSpec, kind: str, alive: set[int]) -> float:
    """Until when (epoch seconds) an armed fault may still change the outcome: a connection
    close under way in a live worker, or just done (RabbitMQ: the ack goes out, the requeued copy
    comes back); a slow first charge (SQS) that has not ended. ``alive``: the workers' pids."""
    from replaysafe.chaos.app import hits, read_records

    until = 0.0
    if kind == "rabbitmq":
        tried = {op: at for op, _, at in hits(spec.state_dir, f"{spec.fault}-tried")}
        for op, pid, at in hits(spec.state_dir, f"{spec.fault}-armed"):
            if op in tried:
                until = max(until, tried[op] + 1.5)
            else:  # still closing; a worker that died meanwhile closed nothing more
                until = max(until, time.time() + 0.5 if pid in alive else at + 1.5)
    elif kind == "sqs":
        targets = set(spec.targets)
        for r in read_records(spec.record_dir):
            if r["e"] == "delivered" and r["op"] in targets:
                until = max(until, r["t"] + spec.slow + 1.0)
    return until


def _process_fault_hits(
    spec: RunSpec,
    guarantee: Guarantee,
    records: list[dict[str, Any]],
    attempts: list[Attempt],
    killed: set[int],
    joins: list[tuple[int, float]],
) -> dict[str, int]:
    """The worker-side faults' hits, each from its evidence:

    - a crash: the worker left its marker at the failpoint (a charge already made, or not yet)
      and that process then died of SIGKILL;
    - ``channel_closed_before_ack``: the worker's connections were cut while it held its ack
      back (the marker is only left when a connection was cut);
    - ``visibility_expired_mid_handler``: the target's first charge ended after the visibility
      timeout of its first delivery, and (unless at-most-once already deleted the message)
      another copy was delivered in between;
    - ``consumer_joined_mid_batch``: the joining worker got records, and the group had handed
      out records before it started.
    """
    from replaysafe.chaos.app import hits

    out = {
        name: sum(1 for _, pid, _ in hits(spec.state_dir, name) if pid in killed)
        for name in KILL_FAULTS
    }
    delivered = [r for r in records if r["e"] == "delivered"]
    if spec.fault == "channel_closed_before_ack":
        out[spec.fault] = len(hits(spec.state_dir, spec.fault))
    elif spec.fault == "visibility_expired_mid_handler":
        n = 0
        for op in spec.targets:
            times = sorted(r["t"] for r in delivered if r["op"] == op)
            calls = [a for a in attempts if a.op == op]
            if not times or not calls:
                continue
            first = min(calls, key=lambda a: a.started)
            if first.ended - times[0] <= SQS_VISIBILITY:
                continue
            if guarantee is Guarantee.AT_MOST_ONCE or any(
                times[0] < t < first.ended for t in times[1:]
            ):
                n += 1
        out[spec.fault] = n
    elif spec.fault == "consumer_joined_mid_batch":
        out[spec.fault] = sum(
            1
            for pid, at in joins
            if any(r["pid"] == pid for r in delivered)
            and any(r["pid"] != pid and r["t"] < at for r in delivered)
        )
    return out


def _mkdirs(path: str) -> None:
    Path(path).mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------- worker process


def _load(spec_path: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(Path(spec_path).read_text())
    return doc


def _arm_worker(
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
    from replaysafe.chaos.app import BROKER_RESTART_WAIT, cut_own_connections, mark_once

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


async def _worker_main(spec_path: str) -> None:
    """One demo worker process: the chaos app (charges at the provider) on the real broker and
    ledger, every delivery and completion journaled, the demo's faults armed. SIGTERM/SIGINT
    stop it gracefully (drain, settle what finished)."""
    from replaysafe.chaos.app import RecordingBroker, RunSpec, close_quietly, relayed
    from replaysafe.chaos.app import build_app as chaos_app
    from replaysafe.chaos.harness import ledger_from_spec

    doc = _load(spec_path)
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

    def write_counters() -> None:
        if stats:
            _write_counters(spec.state_dir, stats[0])

    _arm_worker(spec, kills, close, failpoints, relay, before_kill=write_counters)
    worker = Worker(app)
    stats.append(worker.stats)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    writer = asyncio.create_task(_every(0.5, write_counters))
    try:
        await worker.run(drain_timeout=5.0)
    finally:
        writer.cancel()
        write_counters()
        await close_quietly(broker, ledger, relay)


async def _every(seconds: float, call: Callable[[], None]) -> None:
    while True:
        call()
        await asyncio.sleep(seconds)


def _write_counters(state_dir: str, stats: Stats) -> None:
    """This process's runtime counters the demo shows (replaced atomically: a reader never sees
    half a file)."""
    d = Path(state_dir) / "counters"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f"{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"answered_by_ledger": stats.total(o.DUPLICATE_HITS)}))
    os.replace(tmp, d / f"{os.getpid()}.json")


def _read_counters(state_dir: str) -> int:
    """Copies answered from the ledger, summed over every worker process of the run."""
    d = Path(state_dir) / "counters"
    if not d.is_dir():
        return 0
    return sum(int(json.loads(f.read_text())["answered_by_ledger"]) for f in d.glob("*.json"))


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
    return {"orders": orders, "seed": seed, "results": [r.as_json() for r in results]}


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(process)d %(message)s")
    if len(sys.argv) != 2:
        sys.exit("usage: python -m replaysafe.demo SPEC.json  (a demo worker process)")
    asyncio.run(_worker_main(sys.argv[1]))
