"""Issue 14, "Done when" 1: a consumer written with a broker's plain client library and a Guard,
its processes killed (SIGKILL) and paused past the lease (SIGSTOP … SIGCONT), effects counted at
the sink.

Each cell: ``OPS`` operations published with the plain client (``DUPES`` of them twice, so two
copies of one operation meet in different consumers), no replaysafe headers (the guard's key
extractor reads ``op`` from the JSON body). Three consumer processes
(``python -m replaysafe.chaos.guard_consumer``) share a PostgreSQL ledger. Once a fifth of the
operations has an effect, a consumer holding copies it has not settled is killed with SIGKILL
(and replaced); once two fifths have, another one holding work is stopped with SIGSTOP for
longer than the lease, then continued (a fault is a hit only when its target held unsettled
copies). The run ends when every published copy was acked at the broker (the consumers'
journals, written after the broker took the ack; a copy only the killed process saw counts once
no consumer holds anything unsettled and the broker has nothing left for the group) and every
operation has an effect or a quarantine entry. It is judged by
:func:`replaysafe.chaos.checker.pass_bar` from the sink's journal (keyed, unkeyed) or the
effect rows in the ledger's database (transactional): keyed and transactional lose, duplicate,
overlap and ack-unapplied nothing; unkeyed loses nothing, every duplicate was quarantined
``outcome_unknown`` before it was re-run, and nothing else is quarantined.
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
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from replaysafe.chaos.app import create_effects_table
from replaysafe.chaos.checker import Flag, Published, RunResult, check, pass_bar
from replaysafe.chaos.guard_consumer import read_journals
from replaysafe.chaos.ledgers import _read_effect_rows
from replaysafe.chaos.sink import EffectSink, payload_fingerprint
from replaysafe.envelope import canonical_json
from replaysafe.ledger.postgres import PostgresLedger

from .conftest import ROOT, subprocess_env
from .waits import until

OPS = 120
DUPES = 30
CONSUMERS = 3
LEASE = 2.0
#: a pause longer than the lease: the stopped consumer's claims expire while it sleeps
PAUSE = 2 * LEASE + 1
#: real seconds a run may take to settle every copy (a shared 2-core machine)
SETTLE = 45.0
FAULT = "sigkill+sigstop"


@dataclass
class Destination:
    """A fresh queue or topic, how to publish plain bodies to it, and the consumer's options."""

    kind: str
    url: str
    source: str
    #: publishes bodies in order; returns each copy's broker id as the consumer journals it
    publish: Callable[[list[bytes]], Awaitable[list[str]]]
    #: copies the broker holds and has not handed to a consumer
    ready: Callable[[], Awaitable[int]]
    args: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- destinations


@contextlib.asynccontextmanager
async def rabbitmq(request: pytest.FixtureRequest) -> AsyncIterator[Destination]:
    import aio_pika

    url: str = request.getfixturevalue("amqp_url")
    queue = f"rs-gchaos-{uuid.uuid4().hex[:10]}"
    conn = await aio_pika.connect(url)
    try:
        channel = await conn.channel()  # publisher confirms: publish returns once confirmed
        await channel.declare_queue(queue, durable=True)

        async def publish(bodies: list[bytes]) -> list[str]:
            ids = [f"c{n}" for n in range(len(bodies))]
            for cid, body in zip(ids, bodies, strict=True):
                msg = aio_pika.Message(body, message_id=cid,
                                       delivery_mode=aio_pika.DeliveryMode.PERSISTENT)  # fmt: skip
                await channel.default_exchange.publish(msg, routing_key=queue)
            return ids

        async def ready() -> int:
            declared = await channel.declare_queue(queue, durable=True, passive=True)
            return int(declared.declaration_result.message_count or 0)

        yield Destination("rabbitmq", url, queue, publish, ready)
    finally:
        with contextlib.suppress(Exception):
            channel = await conn.channel()
            await channel.queue_delete(queue)
        await conn.close()


@contextlib.asynccontextmanager
async def sqs(request: pytest.FixtureRequest) -> AsyncIterator[Destination]:
    from aiobotocore.session import get_session

    endpoint: str = request.getfixturevalue("sqs_endpoint")
    queue = f"rs-gchaos-{uuid.uuid4().hex[:10]}"
    kw = {"region_name": "us-east-1", "endpoint_url": endpoint, "aws_access_key_id": "testing",
          "aws_secret_access_key": "testing"}  # fmt: skip
    async with get_session().create_client("sqs", **kw) as client:
        # the visibility timeout is the lease's order: a killed consumer's copies come back soon
        made = await client.create_queue(
            QueueName=queue, Attributes={"VisibilityTimeout": str(int(LEASE))}
        )
        qurl = made["QueueUrl"]

        async def publish(bodies: list[bytes]) -> list[str]:
            ids: list[str] = []
            for i in range(0, len(bodies), 10):
                entries = [{"Id": str(j), "MessageBody": b.decode()}
                           for j, b in enumerate(bodies[i : i + 10])]  # fmt: skip
                res = await client.send_message_batch(QueueUrl=qurl, Entries=entries)
                assert not res.get("Failed"), res
                ok = sorted(res["Successful"], key=lambda e: int(e["Id"]))
                ids += [e["MessageId"] for e in ok]
            return ids

        async def ready() -> int:
            names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
                     "ApproximateNumberOfMessagesDelayed"]  # fmt: skip
            got = await client.get_queue_attributes(QueueUrl=qurl, AttributeNames=names)
            return sum(int(got["Attributes"].get(n, 0)) for n in names)

        try:
            yield Destination("sqs", endpoint, queue, publish, ready)
        finally:
            with contextlib.suppress(Exception):
                await client.delete_queue(QueueUrl=qurl)


@contextlib.asynccontextmanager
async def kafka(request: pytest.FixtureRequest) -> AsyncIterator[Destination]:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    bootstrap: str = request.getfixturevalue("kafka_bootstrap")
    topic = f"rs-gchaos-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(topic, CONSUMERS + 1, 1)]).values():
        await asyncio.to_thread(fut.result, 30)

    async def publish(bodies: list[bytes]) -> list[str]:
        producer = Producer({"bootstrap.servers": bootstrap})
        ids: dict[int, str] = {}

        def report(n: int) -> Callable[[Any, Any], None]:
            def done(err: Any, rec: Any) -> None:
                assert err is None, err
                ids[n] = f"{rec.partition()}:{rec.offset()}"

            return done

        for n, body in enumerate(bodies):
            producer.produce(topic, value=body, key=str(n % 7), on_delivery=report(n))
            producer.poll(0)
        assert await asyncio.to_thread(producer.flush, 30) == 0
        return [ids[n] for n in range(len(bodies))]

    from replaysafe.brokers.kafka import KafkaBroker
    from replaysafe.failpoints import Failpoints

    group = f"g-{uuid.uuid4().hex[:8]}"
    probe = KafkaBroker(bootstrap, failpoints=Failpoints())

    async def ready() -> int:
        # records past the group's committed offsets (a read-only probe: it joins no group)
        return sum((await probe.lag(topic, group)).values())

    try:
        yield Destination("kafka", bootstrap, topic, publish, ready, ["--group", group])
    finally:
        await probe.close()
        for fut in admin.delete_topics([topic], operation_timeout=10).values():
            with contextlib.suppress(Exception):
                await asyncio.to_thread(fut.result, 15)


DESTINATIONS = {"rabbitmq": rabbitmq, "sqs": sqs, "kafka": kafka}


# --------------------------------------------------------------------------- the run


def bodies_for(seed: int) -> tuple[list[bytes], dict[str, bytes]]:
    """``OPS`` plain JSON bodies (canonical, so the sink's fingerprint is the published one's),
    ``DUPES`` of them published twice, shuffled."""
    rng = random.Random(seed)
    by_op = {f"op-{i}": canonical_json({"op": f"op-{i}", "amount": rng.randint(1, 9999)})
             for i in range(OPS)}  # fmt: skip
    bodies = list(by_op.values()) + rng.sample(list(by_op.values()), DUPES)
    rng.shuffle(bodies)
    return bodies, by_op


class Consumers:
    """The consumer processes of one run (each one's output in its own log file)."""

    def __init__(self, argv: list[str], logdir: Path) -> None:
        self.argv = argv
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"consumer-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "replaysafe.chaos.guard_consumer", *self.argv],
            cwd=ROOT, env=subprocess_env(PYTHONUNBUFFERED="1"), stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()  # the child holds its own descriptor
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)
                    p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-20000:]}"
                         for f in sorted(self.logdir.glob("consumer-*.log")))  # fmt: skip


@dataclass
class Cell:
    result: RunResult
    seconds: float
    hits: dict[str, bool]
    statuses: dict[str, int]


async def run_cell(
    dest: Destination, effect: str, api: str, pg_dsn: str, schema: str, tmp: Path
) -> Cell:
    run = f"gchaos-{uuid.uuid4().hex[:8]}"
    ledger = PostgresLedger(pg_dsn, schema=schema, auto_migrate=True, max_size=2)
    sink = EffectSink(tmp / "journal.db").start()
    record = tmp / "record"
    consumers = Consumers([
        "--broker", dest.kind, "--url", dest.url, "--source", dest.source, "--ledger", pg_dsn,
        "--schema", schema, "--effect", effect, "--api", api, "--sink", sink.url, "--run", run,
        "--record", str(record), "--lease", str(LEASE), "--concurrency", "8", "--work", "0.05",
        *dest.args,
    ], tmp)  # fmt: skip
    try:
        sink.configure(run, keyed=effect == "keyed")
        await ledger.migrate()  # before the consumer processes race to
        if effect == "transactional":
            await create_effects_table(ledger, "postgres", schema)

        async def effected() -> set[str]:
            if effect == "transactional":
                rows = await _read_effect_rows(ledger, run, "postgres", schema)
                return {a.op for a in rows}
            return {a.op for a in sink.attempts(run) if a.effect}

        bodies, by_op = bodies_for(seed=14)
        started = time.monotonic()
        copies = set(await dest.publish(bodies))
        assert len(copies) == len(bodies)
        for _ in range(CONSUMERS):
            consumers.spawn()
        hits: dict[str, bool] = {}

        async def progress(share: float) -> bool:
            return len(await effected()) >= OPS * share

        def holding(pid: int) -> bool:
            """The process has received copies it has not settled yet (claims in flight)."""
            held = 0
            for r in read_journals(record):
                if r["pid"] == pid:
                    held += 1 if r["status"] == "received" else -1
            return held > 0

        await until(lambda: progress(0.2), seconds=SETTLE, what="a fifth of the effects")

        def busy(but: int = 0) -> subprocess.Popen[bytes] | None:
            """A live consumer (other than ``but``) holding work: the fault's target."""
            live = [p for p in consumers.procs if p.poll() is None and p.pid != but]
            return next((p for p in live if holding(p.pid)), None)

        victim = await until(busy, seconds=SETTLE, what="a consumer holding work", interval=0.01)
        os.kill(victim.pid, signal.SIGKILL)
        # a hit: the process died holding copies it had received and not settled
        hits["sigkill"] = victim.wait(5) == -signal.SIGKILL and holding(victim.pid)
        consumers.spawn()
        await until(lambda: progress(0.4), seconds=SETTLE, what="two fifths of the effects")
        paused = await until(lambda: busy(but=victim.pid), seconds=SETTLE,
                             what="another consumer holding work", interval=0.01)  # fmt: skip
        os.kill(paused.pid, signal.SIGSTOP)
        held_at_stop = holding(paused.pid)
        await asyncio.sleep(PAUSE)  # the fault itself: the stop outlives the lease
        os.kill(paused.pid, signal.SIGCONT)
        hits["sigstop"] = paused.poll() is None and held_at_stop

        killed = {victim.pid}

        async def settled() -> bool:
            """Every copy acked; or, for a copy the killed process received, its fate (acked
            just before the kill, or back at the broker) settled by every other consumer
            holding nothing unsettled and the broker holding nothing ready; and every
            operation effected or quarantined."""
            lines = read_journals(record)
            done = {r["copy"] for r in lines if r["action"] == "ack"}
            held: dict[tuple[int, str], int] = {}
            for r in lines:
                if r["pid"] not in killed:
                    k = (r["pid"], r["copy"])
                    held[k] = held.get(k, 0) + (1 if r["status"] == "received" else -1)
            unknown = {r["copy"] for r in lines if r["pid"] in killed} - done
            if not copies <= done | unknown or any(held.values()):
                return False
            if (
                len(
                    await effected()
                    | {f.operation_id for f in await ledger.quarantined(limit=10_000)}
                )
                < OPS
            ):
                return False
            return await dest.ready() == 0

        try:
            await until(settled, seconds=SETTLE, what="every published copy settled")
        except BaseException:
            lines = read_journals(record)
            done = {r["copy"] for r in lines if r["action"] == "ack"}
            for cid in sorted(copies - done):
                print(cid, [r for r in lines if r["copy"] == cid])
            print("killed", victim.pid, "paused", paused.pid, "ready", await dest.ready())
            held: dict[tuple[int, str], int] = {}
            for r in lines:
                k = (r["pid"], r["copy"])
                held[k] = held.get(k, 0) + (1 if r["status"] == "received" else -1)
            print("held", {k: v for k, v in held.items() if v})
            resolved = await effected() | {f.operation_id for f in await ledger.quarantined()}
            print("unresolved", sorted(set(by_op) - resolved))
            for p in consumers.procs:
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGUSR1)  # each dumps its tasks and threads
            await asyncio.sleep(1)  # the dumps are written asynchronously; a diagnostic only
            print(consumers.logs())
            raise
        seconds = time.monotonic() - started
        consumers.stop()
        if effect == "transactional":
            attempts = await _read_effect_rows(ledger, run, "postgres", schema)
        else:
            attempts = sink.attempts(run)
        flags = [Flag(e.operation_id, e.reason.value, e.risk.value, e.created_at)
                 for e in await ledger.quarantined(limit=10_000)]  # fmt: skip
        journal = read_journals(record)
        result = check(
            guarantee="effectively-once", effect=effect, fault=FAULT,
            history=[Published(op, payload_fingerprint(b), True) for op, b in by_op.items()],
            attempts=attempts, quarantine=flags,
            completed=[(r["op"], r["t"]) for r in journal if r["action"] == "ack" and r["op"]],
            fault_hits=sum(hits.values()),
        )  # fmt: skip
        statuses: dict[str, int] = {}
        for r in journal:
            statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        for a in attempts:  # what the sink saw: applied, replayed (keyed), fenced
            statuses[f"sink:{a.outcome}"] = statuses.get(f"sink:{a.outcome}", 0) + 1
        cell = Cell(result, seconds, hits, statuses)
        print(json.dumps({"broker": dest.kind, "api": api, **result.as_json(),
                          "silent_duplicates": result.silent_duplicates,
                          "seconds": round(seconds, 1), "hits": hits,
                          "statuses": statuses}))  # fmt: skip
        return cell
    finally:
        consumers.stop()
        sink.stop()
        await ledger.close()


def judge(cell: Cell) -> None:
    r = cell.result
    assert all(cell.hits.values()), f"a fault missed its window: {cell.hits}"
    assert pass_bar(r) == [], pass_bar(r)
    assert r.ops == OPS
    if r.effect == "unkeyed":
        # every ambiguous operation is parked as outcome_unknown, never re-run, and nothing
        # else is quarantined
        assert r.silent_duplicates == 0
        assert r.flagged == r.quarantined
    else:
        assert r.quarantined == 0, f"{r.quarantined} quarantined with a {r.effect} effect"


@pytest.mark.parametrize(
    ("broker", "api", "effect"),
    [
        ("rabbitmq", "async", "keyed"),
        ("rabbitmq", "async", "unkeyed"),
        ("rabbitmq", "async", "transactional"),
        ("rabbitmq", "sync", "keyed"),
        ("rabbitmq", "sync", "unkeyed"),
        ("rabbitmq", "sync", "transactional"),
        ("sqs", "async", "keyed"),
        ("sqs", "async", "unkeyed"),
        ("sqs", "async", "transactional"),
        ("sqs", "sync", "keyed"),
        ("sqs", "sync", "unkeyed"),
        ("sqs", "sync", "transactional"),
        ("kafka", "async", "keyed"),
        ("kafka", "async", "unkeyed"),
        ("kafka", "async", "transactional"),
        ("kafka", "sync", "keyed"),
        ("kafka", "sync", "unkeyed"),
        ("kafka", "sync", "transactional"),
    ],
)
async def test_plain_consumer_with_a_guard_under_sigkill_and_sigstop(
    broker: str, api: str, effect: str, request: pytest.FixtureRequest, pg_dsn: str,
    pg_schema: str, tmp_path: Path,
) -> None:  # fmt: skip
    async with DESTINATIONS[broker](request) as dest:
        cell = await run_cell(dest, effect, api, pg_dsn, pg_schema, tmp_path)
    judge(cell)


# --------------------------------------------------------------------------- a Guard bug, fixed


async def test_a_lease_lost_after_the_run_ended_does_not_cancel_the_callers_task() -> None:
    """Found by the RabbitMQ cell (it failed before the keeper's fix): a consumer resumed after
    SIGSTOP had a handler task cancelled *after* ``guard.run`` had returned (lease_lost, nack),
    in its own code (the nack), so the copy was neither acked nor nacked. The keeper's extension
    was in flight when the function returned; when it failed with ``LeaseLost`` the keeper
    cancelled the task it had been watching — which, under a Guard, is the caller's task, now
    past ``guard.run``."""
    from replaysafe import Effect, Guarantee
    from replaysafe.errors import LeaseLost
    from replaysafe.guard import Guard, Message, Status
    from replaysafe.ledger import MemoryLedger

    ledger = MemoryLedger()
    extending = asyncio.Event()

    async def extend(claim: Any, lease: float) -> Any:
        extending.set()
        await asyncio.sleep(0.2)  # the run ends meanwhile
        raise LeaseLost("taken over while this process was stopped")

    ledger.extend = extend  # type: ignore[method-assign]
    guard = Guard(ledger, name="charge", guarantee=Guarantee.EFFECTIVELY_ONCE,
                  effect=Effect.keyed("psp"), lease=0.3)  # fmt: skip

    async def fn(ctx: Any) -> str:
        await extending.wait()  # return while the keeper's extension is in flight
        return "done"

    body = canonical_json({"op": "o1"})
    out = await guard.run(Message(body, {"rs-operation-id": "o1"}), fn)
    try:
        assert out.status is Status.APPLIED
        await asyncio.sleep(0.5)  # the caller's own work after the guard answered (an ack)
    finally:
        await guard.close()
