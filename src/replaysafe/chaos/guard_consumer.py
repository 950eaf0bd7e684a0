"""A consumer written with a broker's plain client library and a :class:`~replaysafe.Guard`.

``python -m replaysafe.chaos.guard_consumer --broker rabbitmq|sqs|kafka --url URL --source NAME
--ledger URL --effect keyed|unkeyed|transactional --api async|sync --sink URL --run RUN
--record DIR``

This is the program issue 14 asks of a team that keeps its own consumer: aio-pika for RabbitMQ,
aiobotocore (async) or boto3 (sync) for SQS, confluent-kafka for Kafka. The guard decides; the
consumer tells the broker exactly what :attr:`Outcome.action` says:

- RabbitMQ: ``ack`` acks; ``nack`` holds the message for ``retry_after`` (capped) and then
  requeues it (AMQP has no delayed nack).
- SQS: ``ack`` deletes; ``nack`` sets the visibility timeout to ``retry_after``; while the
  function runs the guard extends visibility (``Message(extend=...)`` →
  ChangeMessageVisibility).
- Kafka: a partition's batch is committed only up to its first copy not answered ``ack``; the
  consumer then seeks back to that copy (after ``retry_after``, capped), so nothing past an
  un-acked offset is ever committed.

The sync API (``--api sync``) calls :meth:`Guard.run_sync` from a thread pool: boto3 receive
loop for SQS, a confluent-kafka poll loop for Kafka, and for RabbitMQ the aio-pika loop handing
each message to the pool (there is no sync client in the test environment; the guard side is
the same).

The effect lands at the chaos :class:`~replaysafe.chaos.sink.EffectSink` (keyed: the operation
id as ``Idempotency-Key``; unkeyed: no key) with the claim's fencing token, or, transactional, as
a row written through ``ctx.tx`` in the ledger's database. Every broker settlement is journaled
(one JSON line per copy, written after the broker took it) in ``--record``: the test's end
condition and its ``acked_unapplied`` count come from there. Payloads are plain JSON with an
``op`` field (the guard's key extractor), published with no replaysafe headers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import http.client
import importlib
import json
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from replaysafe.app import Context, RetryPolicy
from replaysafe.chaos.app import effects_table
from replaysafe.chaos.sink import EffectOutcomeUnknown, Fenced, KeyConflict, SinkError, call_sink
from replaysafe.errors import OutcomeUnknown
from replaysafe.guarantees import Effect, Guarantee
from replaysafe.guard import Guard, Message, Outcome
from replaysafe.ledger.base import LedgerBackend

T = TypeVar("T")
NAME = "apply"
#: the longest a nack is held back (RabbitMQ, Kafka) or a copy kept invisible (SQS)
MAX_NACK_DELAY = 2.0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m replaysafe.chaos.guard_consumer")
    p.add_argument("--broker", choices=("rabbitmq", "sqs", "kafka"), required=True)
    p.add_argument("--url", required=True, help="amqp://…, http://moto-endpoint, or bootstrap")
    p.add_argument("--source", required=True, help="queue (RabbitMQ, SQS) or topic (Kafka)")
    p.add_argument("--group", default="guard-chaos", help="Kafka consumer group")
    p.add_argument("--ledger", required=True, help="a SQLite file path or postgresql://…")
    p.add_argument("--schema", default="replaysafe", help="PostgreSQL ledger schema")
    p.add_argument("--effect", choices=("keyed", "unkeyed", "transactional"), required=True)
    p.add_argument("--api", choices=("async", "sync"), default="async")
    p.add_argument("--sink", default="", help="the effect sink's URL (keyed, unkeyed)")
    p.add_argument("--run", required=True, help="the sink's run name")
    p.add_argument("--record", required=True, help="directory of settlement journals")
    p.add_argument("--lease", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--work", type=float, default=0.02, help="seconds of work before the effect")
    return p.parse_args(argv)


def open_ledger(a: argparse.Namespace) -> tuple[LedgerBackend, str]:
    """The ledger and its kind (``sqlite`` or ``postgres``)."""
    if a.ledger.startswith(("postgres://", "postgresql://")):
        from replaysafe.ledger.postgres import PostgresLedger

        return PostgresLedger(a.ledger, schema=a.schema, auto_migrate=True, max_size=4), "postgres"
    from replaysafe.ledger.sqlite import SQLiteLedger

    return SQLiteLedger(a.ledger.removeprefix("sqlite://")), "sqlite"


def make_guard(a: argparse.Namespace, ledger: LedgerBackend) -> Guard:
    if a.effect == "transactional":
        effect = Effect.transactional()
    elif a.effect == "keyed":
        effect = Effect.keyed("effect-sink")
    else:
        # a fenced call was refused by the sink: proof that nothing was applied
        effect = Effect.unkeyed("effect-sink", not_applied_on=(Fenced,))
    return Guard(
        ledger, name=NAME, guarantee=Guarantee.EFFECTIVELY_ONCE, effect=effect,
        key=lambda p: str(p["op"]), lease=a.lease,
        retry=RetryPolicy(max_attempts=6, base_delay=0.05, max_delay=0.5),
    )  # fmt: skip


class Journal:
    """Appends one JSON line per settled copy with an unbuffered ``os.write`` (a line written
    survives SIGKILL; a copy settled but not yet written is undercounted, never invented)."""

    def __init__(self, directory: str) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._fd = os.open(Path(directory) / f"{os.getpid()}.jsonl",
                           os.O_CREAT | os.O_APPEND | os.O_WRONLY)  # fmt: skip

    def received(self, copy: str) -> None:
        self._write({"copy": copy, "op": None, "status": "received", "action": "none"})

    def failed(self, copy: str, exc: BaseException) -> None:
        """The guard raised (it should answer instead): the copy went back to the broker."""
        status = f"error:{type(exc).__name__}"
        self._write({"copy": copy, "op": None, "status": status, "action": "nack"})

    def returned(self, copy: str, out: Outcome) -> None:
        """Answered, but not completed at the broker (Kafka: past an uncommitted offset)."""
        self._write({"copy": copy, "op": out.operation_id, "status": out.status.value,
                     "action": "nack"})  # fmt: skip

    def settled(self, copy: str, out: Outcome) -> None:
        self._write({"copy": copy, "op": out.operation_id, "status": out.status.value,
                     "action": out.action})  # fmt: skip

    def _write(self, line: dict[str, Any]) -> None:
        line.update(t=time.time(), pid=os.getpid())
        os.write(self._fd, json.dumps(line).encode() + b"\n")


def read_journals(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every settlement line the consumers wrote (a torn last line of a killed one skipped)."""
    out: list[dict[str, Any]] = []
    d = Path(directory)
    for f in sorted(d.glob("*.jsonl")) if d.is_dir() else []:
        for line in f.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


# --------------------------------------------------------------------------- the effect


class Effects:
    """The function the guard runs, async and sync."""

    def __init__(self, a: argparse.Namespace, kind: str, guard: Guard) -> None:
        self.a = a
        self.kind = kind
        self.guard = guard
        self.table = effects_table(kind, a.schema if kind == "postgres" else None)
        ph = "%s" if kind == "postgres" else "?"
        self.insert = (f"INSERT INTO {self.table} (run, op, fingerprint, token, pid, started, "
                       f"ended) VALUES ({', '.join([ph] * 7)})")  # fmt: skip

    def _row(self, ctx: Context, started: float) -> tuple[Any, ...]:
        return (self.a.run, ctx.operation_id, ctx.envelope.fingerprint, ctx.token, os.getpid(),
                started, time.time())  # fmt: skip

    async def run(self, ctx: Context) -> Any:
        started = time.time()
        await asyncio.sleep(self.a.work)
        if self.a.effect == "transactional":
            assert ctx.tx is not None
            await ctx.tx.execute(self.insert, self._row(ctx, started))
            return None
        try:
            return await call_sink(
                self.a.sink, run=self.a.run, operation_id=ctx.operation_id,
                body=ctx.envelope.payload, idempotency_key=ctx.idempotency_key, token=ctx.token,
            )  # fmt: skip
        except EffectOutcomeUnknown as exc:
            raise OutcomeUnknown(f"the sink's answer for {ctx.operation_id} was lost") from exc

    def run_sync(self, ctx: Context) -> Any:
        started = time.time()
        time.sleep(self.a.work)
        if self.a.effect == "transactional":
            # on the sync path ctx.tx is the ledger twin's sync transaction
            assert ctx.tx is not None
            ctx.tx.execute(self.insert, self._row(ctx, started))
            return None
        return sink_sync(self.a.sink, self.a.run, ctx)


def sink_sync(url: str, run: str, ctx: Context) -> dict[str, Any]:
    """``POST /effect`` with ``http.client`` (what a sync consumer would use)."""
    host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
    headers = {"Content-Type": "application/json", "Connection": "close", "X-Chaos-Run": run,
               "X-Operation-Id": ctx.operation_id, "X-Worker-Pid": str(os.getpid())}  # fmt: skip
    if ctx.idempotency_key is not None:
        headers["Idempotency-Key"] = ctx.idempotency_key
    if ctx.token is not None:
        headers["X-Fence-Token"] = str(ctx.token)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", "/effect", body=ctx.envelope.payload, headers=headers)
        try:
            resp = conn.getresponse()
            raw = resp.read()
        except (http.client.RemoteDisconnected, ConnectionError) as exc:
            raise OutcomeUnknown(f"the sink's answer for {ctx.operation_id} was lost") from exc
    finally:
        conn.close()
    if resp.status == 412:
        raise Fenced(f"the sink fenced {ctx.operation_id}")
    if resp.status == 409:
        raise KeyConflict(f"the sink refused {ctx.operation_id}")
    if resp.status != 200:
        raise SinkError(f"the sink answered {resp.status} for {ctx.operation_id}")
    answer: dict[str, Any] = json.loads(raw or b"{}")
    return answer


def delay_of(out: Outcome) -> float:
    return min(max(out.retry_after or 0.0, 0.0), MAX_NACK_DELAY)


# --------------------------------------------------------------------------- RabbitMQ


async def rabbitmq(a: argparse.Namespace, guard: Guard, fx: Effects, journal: Journal,
                   stop: asyncio.Event) -> None:  # fmt: skip
    import aio_pika
    from aio_pika.abc import AbstractIncomingMessage

    pool = ThreadPoolExecutor(a.concurrency) if a.api == "sync" else None
    conn = await aio_pika.connect(a.url)
    tasks: set[asyncio.Task[None]] = set()
    try:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=a.concurrency)
        queue = await channel.get_queue(a.source, ensure=True)

        async def handle(msg: AbstractIncomingMessage) -> None:
            journal.received(str(msg.message_id))
            m = Message(msg.body, {k: str(v) for k, v in (msg.headers or {}).items()},
                        msg.content_type, redelivered=bool(msg.redelivered),
                        delivery_id=msg.message_id)  # fmt: skip
            try:
                if pool is None:
                    out = await guard.run(m, fx.run)
                else:
                    loop = asyncio.get_running_loop()
                    out = await loop.run_in_executor(pool, guard.run_sync, m, fx.run_sync)
            except BaseException as exc:
                # the guard answers, it does not raise: say so loudly, and let the copy come back
                print(f"guard.run raised for copy {msg.message_id}:", flush=True)
                traceback.print_exc(file=sys.stdout)
                await msg.nack(requeue=True)
                journal.failed(str(msg.message_id), exc)
                raise
            if out.action == "ack":
                await msg.ack()
            else:
                await asyncio.sleep(delay_of(out))
                await msg.nack(requeue=True)
            journal.settled(str(msg.message_id), out)

        def done(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            if task.cancelled():
                print(f"handling a copy was cancelled: {task!r}", flush=True)
            elif task.exception() is not None:
                exc = task.exception()
                print(f"handling a copy failed: {exc!r}", flush=True)
                traceback.print_exception(exc, file=sys.stdout)

        async def deliver(msg: AbstractIncomingMessage) -> None:
            task = asyncio.create_task(handle(msg))
            tasks.add(task)
            task.add_done_callback(done)

        tag = await queue.consume(deliver)
        await stop.wait()
        await queue.cancel(tag)
    finally:
        await asyncio.gather(*tasks, return_exceptions=True)
        await conn.close()
        if pool is not None:
            pool.shutdown()


# --------------------------------------------------------------------------- SQS


def _sqs_message(raw: dict[str, Any], extend: Callable[[float], Any]) -> Message:
    attempt = int(raw.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
    return Message(raw["Body"].encode(), attempt=attempt, delivery_id=raw["MessageId"],
                   extend=extend)  # fmt: skip


def _sqs_kw(a: argparse.Namespace) -> dict[str, Any]:
    return {"region_name": "us-east-1", "endpoint_url": a.url, "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing"}  # fmt: skip


async def sqs_async(a: argparse.Namespace, guard: Guard, fx: Effects, journal: Journal,
                    stop: asyncio.Event) -> None:  # fmt: skip
    # untyped libraries, imported by name (as the SQS adapter does)
    session = importlib.import_module("aiobotocore.session").get_session()
    async with session.create_client("sqs", **_sqs_kw(a)) as client:
        url = (await client.get_queue_url(QueueName=a.source))["QueueUrl"]

        def extender(handle: str) -> Callable[[float], Any]:
            async def extend(seconds: float) -> None:
                await client.change_message_visibility(
                    QueueUrl=url, ReceiptHandle=handle, VisibilityTimeout=math.ceil(seconds)
                )

            return extend

        async def settle(raw: dict[str, Any], out: Outcome) -> None:
            handle = raw["ReceiptHandle"]
            try:
                if out.action == "ack":
                    await client.delete_message(QueueUrl=url, ReceiptHandle=handle)
                else:
                    await client.change_message_visibility(
                        QueueUrl=url, ReceiptHandle=handle,
                        VisibilityTimeout=math.ceil(delay_of(out)),
                    )  # fmt: skip
            except Exception as exc:
                # a stale receipt handle (the copy was received again meanwhile): the copy's
                # current holder settles it
                print(f"settling {raw['MessageId']} failed: {exc!r}", flush=True)
                journal.failed(raw["MessageId"], exc)
                return
            journal.settled(raw["MessageId"], out)

        async def loop() -> None:
            while not stop.is_set():
                got = await client.receive_message(
                    QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                    AttributeNames=["ApproximateReceiveCount"],
                )  # fmt: skip
                raws = got.get("Messages", [])
                for r in raws:
                    journal.received(r["MessageId"])
                if not raws:
                    continue
                msgs = [_sqs_message(r, extender(r["ReceiptHandle"])) for r in raws]
                outs = await guard.run_batch(msgs, fx.run)
                for r, out in zip(raws, outs, strict=True):
                    await settle(r, out)

        # a few receive loops: batches of 10 each, so a slow batch does not stall the process
        await asyncio.gather(*(loop() for _ in range(max(1, a.concurrency // 4))))


def sqs_sync(a: argparse.Namespace, guard: Guard, fx: Effects, journal: Journal,
             stop: Any) -> None:  # fmt: skip
    client = importlib.import_module("boto3").client("sqs", **_sqs_kw(a))
    url = client.get_queue_url(QueueName=a.source)["QueueUrl"]

    def one(raw: dict[str, Any]) -> None:
        handle, copy = raw["ReceiptHandle"], raw["MessageId"]
        journal.received(copy)

        def extend(seconds: float) -> None:
            client.change_message_visibility(QueueUrl=url, ReceiptHandle=handle,
                                             VisibilityTimeout=math.ceil(seconds))  # fmt: skip

        try:
            out = guard.run_sync(_sqs_message(raw, extend), fx.run_sync)
            if out.action == "ack":
                client.delete_message(QueueUrl=url, ReceiptHandle=handle)
            else:
                seconds = math.ceil(delay_of(out))
                client.change_message_visibility(QueueUrl=url, ReceiptHandle=handle,
                                                 VisibilityTimeout=seconds)  # fmt: skip
        except BaseException as exc:
            # the copy comes back when its visibility ends
            print(f"copy {copy}: {exc!r}", flush=True)
            traceback.print_exc(file=sys.stdout)
            journal.failed(copy, exc)
            return
        journal.settled(copy, out)

    with ThreadPoolExecutor(a.concurrency) as pool:
        while not stop.is_set():
            got = client.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                         AttributeNames=["ApproximateReceiveCount"])  # fmt: skip
            list(pool.map(one, got.get("Messages", [])))


# --------------------------------------------------------------------------- Kafka


def _kafka_consumer(a: argparse.Namespace) -> Any:
    from confluent_kafka import Consumer

    return Consumer({
        "bootstrap.servers": a.url, "group.id": a.group, "enable.auto.commit": False,
        "auto.offset.reset": "earliest", "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500, "max.poll.interval.ms": 30000,
    })  # fmt: skip


def _kafka_settle(consumer: Any, a: argparse.Namespace, records: list[Any],
                  outs: list[Outcome | BaseException], journal: Journal) -> float:  # fmt: skip
    """Commit each partition up to its first copy not answered ``ack`` and seek back there.
    Returns how long to wait before polling again (the longest retry_after, capped). Every
    record of the batch gets a journal line: ``ack`` once committed, ``nack`` otherwise (it
    will be read again)."""
    from confluent_kafka import KafkaException, TopicPartition

    wait = 0.0
    by_part: dict[int, list[tuple[Any, Outcome | BaseException]]] = {}
    for rec, out in zip(records, outs, strict=True):
        by_part.setdefault(rec.partition(), []).append((rec, out))
    for part, pairs in by_part.items():
        pairs.sort(key=lambda p: p[0].offset())
        n_done = 0
        for _, out in pairs:
            if not isinstance(out, Outcome) or out.action != "ack":
                wait = max(wait, delay_of(out) if isinstance(out, Outcome) else MAX_NACK_DELAY)
                break
            n_done += 1
        try:
            if n_done:
                end = pairs[n_done - 1][0].offset() + 1
                consumer.commit(offsets=[TopicPartition(a.source, part, end)], asynchronous=False)
            if n_done < len(pairs):
                consumer.seek(TopicPartition(a.source, part, pairs[n_done][0].offset()))
        except KafkaException as exc:
            # the partition was revoked meanwhile (a rebalance): its new owner resumes from the
            # last commit, and these copies are answered from the ledger there
            print(f"partition {part}: {exc}", flush=True)
            n_done = 0
        for i, (rec, out) in enumerate(pairs):
            copy = f"{part}:{rec.offset()}"
            if isinstance(out, BaseException):
                journal.failed(copy, out)
            elif i < n_done:
                journal.settled(copy, out)
            else:
                journal.returned(copy, out)
    return wait


def _kafka_batch(consumer: Any, timeout: float, journal: Journal) -> list[Any]:
    records = [r for r in consumer.consume(num_messages=20, timeout=timeout) if r.error() is None]
    for r in records:
        journal.received(f"{r.partition()}:{r.offset()}")
    return records


def _kafka_message(rec: Any) -> Message:
    headers = {k: v.decode() for k, v in (rec.headers() or []) if v is not None}
    _, ts = rec.timestamp()
    return Message(rec.value(), headers, key=(rec.key() or b"").decode() or None,
                   broker_timestamp=ts / 1000 if ts > 0 else None,
                   delivery_id=f"{rec.partition()}:{rec.offset()}")  # fmt: skip


async def kafka_async(a: argparse.Namespace, guard: Guard, fx: Effects, journal: Journal,
                      stop: asyncio.Event) -> None:  # fmt: skip
    consumer = _kafka_consumer(a)
    consumer.subscribe([a.source])
    try:
        while not stop.is_set():
            records = await asyncio.to_thread(_kafka_batch, consumer, 0.5, journal)
            if not records:
                continue
            msgs = [_kafka_message(r) for r in records]
            outs: list[Outcome | BaseException] = list(await guard.run_batch(msgs, fx.run))
            wait = _kafka_settle(consumer, a, records, outs, journal)
            if wait:
                await asyncio.sleep(wait)
    finally:
        await asyncio.to_thread(consumer.close)


def kafka_sync(a: argparse.Namespace, guard: Guard, fx: Effects, journal: Journal,
               stop: Any) -> None:  # fmt: skip
    consumer = _kafka_consumer(a)
    consumer.subscribe([a.source])

    def one(rec: Any) -> Outcome | BaseException:
        try:
            return guard.run_sync(_kafka_message(rec), fx.run_sync)
        except BaseException as exc:  # reported, and the partition seeks back to it
            traceback.print_exc(file=sys.stdout)
            return exc

    try:
        with ThreadPoolExecutor(a.concurrency) as pool:
            while not stop.is_set():
                records = _kafka_batch(consumer, 0.5, journal)
                if not records:
                    continue
                outs = list(pool.map(one, records))
                wait = _kafka_settle(consumer, a, records, outs, journal)
                if wait:
                    stop.wait(wait)
    finally:
        consumer.close()


# --------------------------------------------------------------------------- main


async def main_async(a: argparse.Namespace) -> None:
    ledger, kind = open_ledger(a)
    guard = make_guard(a, ledger)
    fx = Effects(a, kind, guard)
    journal = Journal(a.record)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    run = {"rabbitmq": rabbitmq, "sqs": sqs_async, "kafka": kafka_async}[a.broker]
    try:
        await run(a, guard, fx, journal, stop)
    finally:
        if a.api == "sync":
            await asyncio.to_thread(guard.close_sync)  # its keeper thread and ledger twin
        await guard.close()
        await ledger.close()


def dump_tasks() -> None:
    """SIGUSR1: print where every task and thread waits (a test that timed out asks)."""
    for task in asyncio.all_tasks():
        task.print_stack(limit=12, file=sys.stdout)
    faulthandler.dump_traceback(sys.stdout, all_threads=True)
    sys.stdout.flush()


def main_sync(a: argparse.Namespace) -> None:
    import threading

    ledger, kind = open_ledger(a)
    guard = make_guard(a, ledger)
    fx = Effects(a, kind, guard)
    journal = Journal(a.record)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    faulthandler.register(signal.SIGUSR1, file=sys.stdout, all_threads=True)
    try:
        if a.broker == "sqs":
            sqs_sync(a, guard, fx, journal, stop)
        else:
            kafka_sync(a, guard, fx, journal, stop)
    finally:
        guard.close_sync()  # its keeper thread and ledger twin (the async ledger was never used)


def main(argv: list[str]) -> None:
    a = parse(argv)
    if a.api == "sync" and a.broker != "rabbitmq":
        main_sync(a)
    else:
        # RabbitMQ sync: the aio-pika loop feeds a thread pool that calls guard.run_sync
        asyncio.run(main_async(a))


if __name__ == "__main__":
    main(sys.argv[1:])
