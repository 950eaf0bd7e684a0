"""The demo preset on RabbitMQ, SQS and Kafka: worker processes (the chaos worker, given the
demo's spec), real faults, the settle wait of the chaos harness, and each fault counted from its
evidence. See :mod:`replaysafe.chaos.demo` for the faults."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from replaysafe.brokers import broker_from_url
from replaysafe.chaos.app import RunSpec, hits, read_records
from replaysafe.chaos.cells import ChaosConfig
from replaysafe.chaos.checker import Published
from replaysafe.chaos.demo_plan import (
    BROKER_FAULTS,
    FAULTS,
    JOIN_PACE,
    KILL_FAULTS,
    PROCESS_CONCURRENCY,
    PROCESS_LEASE,
    PUBLISH_FAULTS,
    SQS_SLOW,
    SQS_VISIBILITY,
    GuaranteeResult,
    arm_publish,
    broker_fault_targets,
    drop_demo_ledger,
    fault_plan,
    ledger_conf,
    order_envelopes,
    order_op,
    read_counters,
)
from replaysafe.chaos.ledgers import ledger_from_spec
from replaysafe.chaos.procs import Pool, broker_depth, broker_options
from replaysafe.chaos.settle import RunContext, wait_settled
from replaysafe.chaos.sink import REPLAYED, Attempt, EffectSink
from replaysafe.envelope import Envelope
from replaysafe.errors import ConfigurationError, PublishAmbiguous
from replaysafe.failpoints import Failpoints
from replaysafe.guarantees import Guarantee
from replaysafe.producer import Producer


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
    """The chaos harness's worker pool (the chaos worker process, given the demo's spec), keeping
    every process it started, so a SIGKILL can be told from a clean stop."""

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


async def run_processes(
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

    started = time.perf_counter()
    kind = broker_kind(broker_url)
    plan = fault_plan(orders, seed)
    targets = broker_fault_targets(orders, seed, plan) if kind != "kafka" else set()
    eo = guarantee is Guarantee.EFFECTIVELY_ONCE
    tag = uuid.uuid4().hex[:8]
    run = f"rs-demo-{guarantee.value}-{tag}"
    rundir = workdir / run
    rundir.mkdir(parents=True)
    conf = ledger_conf(ledger_spec, rundir, guarantee.value, tag)
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
    os.makedirs(spec.state_dir, exist_ok=True)
    producer_fps = Failpoints()
    arm_publish(producer_fps, plan)
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

            envelopes = order_envelopes(orders, seed)
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
                await drop_demo_ledger(ledger, conf)
                with contextlib.suppress(Exception):
                    await admin.drop_source(run, [spec.group])
                await admin.close()
        attempts = sink.attempts(run)

    records = read_records(spec.record_dir)
    per_op = Counter(a.op for a in attempts if a.effect)
    quarantined_ops = {e.operation_id for e in quarantine}
    all_ops = [order_op(i) for i in range(orders)]
    faults = {name: producer_fps.fired[FAULTS[name]] for name in PUBLISH_FAULTS}
    faults.update(process_fault_hits(spec, guarantee, records, attempts, killed, joins))
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
        answered_by_ledger=read_counters(spec.state_dir),
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


def process_fault_hits(
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
