"""The chaos harness: producer, workers, nemesis, one run per (guarantee, effect, fault) cell.

For ``--broker memory`` the workers are supervised tasks in this process (the memory broker only
lives here): a crash is a failpoint ``kill`` (``SimulatedCrash``), after which the supervisor
starts a new worker, as ``demo.py`` does. For RabbitMQ, SQS and Kafka the workers are separate OS
processes (``python -m replaysafe.chaos.worker SPEC.json``) running the real runtime; a crash is
``os._exit`` at the failpoint (as SIGKILL: nothing settled), a pause is ``SIGSTOP`` then
``SIGCONT`` from here, a rebalance is a worker process joining and leaving the group.

A run: configure the sink, open the ledger, start the workers, publish (through the producer, or
through the outbox relay for ``relay_crash``), wait until every confirmed operation is resolved
and the system is quiet, run the second phase of faults that need one (``key_reuse``,
``redrive_applied``), stop everything it started, then count with the checker.
Every wait is bounded; every server binds 127.0.0.1; whatever a run starts, it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from replaysafe import failpoints as fp
from replaysafe.app import App
from replaysafe.brokers.base import Broker, RedeliveryKind
from replaysafe.chaos.app import (
    RecordingBroker,
    RunSpec,
    build_app,
    create_effects_table,
    effects_table,
    hits,
    mark_once,
    open_redrive_gate,
    read_records,
)
from replaysafe.chaos.checker import Flag, Published, RunResult, check
from replaysafe.chaos.sink import APPLIED, Attempt, EffectSink
from replaysafe.envelope import Envelope
from replaysafe.errors import (
    ConfigurationError,
    LedgerUnavailable,
    PublishAmbiguous,
    SimulatedCrash,
)
from replaysafe.failpoints import Failpoints
from replaysafe.guarantees import Guarantee
from replaysafe.ledger import ledger_from_url
from replaysafe.ledger.base import LedgerBackend, QuarantineEntry
from replaysafe.producer import Producer
from replaysafe.quarantine import QuarantineReason
from replaysafe.runtime.worker import Worker

log = logging.getLogger("replaysafe.chaos")

FAULTS = (
    "crash_after_effect",
    "crash_after_claim",
    "visibility_overlap",
    "pause_beyond_lease",
    "rebalance",
    "ambiguous_publish",
    "key_reuse",
    "poison",
    "ledger_restart",
    "broker_restart",
    "response_lost",
    "redrive_applied",
    "beyond_horizon",
    "relay_crash",
)
BROKERS = ("memory", "rabbitmq", "sqs", "kafka", "nats")
LEDGERS = ("sqlite", "postgres", "redis")
EFFECTS = ("keyed", "transactional", "unkeyed")
GUARANTEES = tuple(g.value for g in Guarantee)

#: share of operations each fault targets (at least 2)
FAULT_RATE = 0.04


def applicable(fault: str, *, broker: str, ledger: str, effect: str, guarantee: str) -> str | None:
    """None when the cell makes sense, else why it is left out of ``all``."""
    if effect == "transactional" and guarantee != Guarantee.EFFECTIVELY_ONCE.value:
        return "a transactional effect is effectively-once by definition"
    if effect == "transactional" and ledger == "redis":
        return "Redis is not a transactional ledger"
    if fault == "ledger_restart" and ledger == "sqlite":
        return "SQLite has no server connection to cut"
    if fault == "broker_restart" and broker != "rabbitmq":
        return (
            "a RabbitMQ fault (the workers' connections to the server are cut: unacked "
            "deliveries are requeued); SQS has no connection to cut, and restarting moto or "
            "Tansu (memory storage) would wipe the messages themselves"
        )
    if fault == "rebalance" and broker not in ("kafka", "memory"):
        return "consumer-group rebalances are a Kafka (offset) fault"
    if fault == "visibility_overlap" and broker not in ("sqs", "memory"):
        return "needs a visibility timeout (SQS)"
    if fault == "visibility_overlap" and effect == "transactional" and ledger == "sqlite":
        return (
            "SQLite serialises transactions: a handler slower than the visibility timeout holds "
            "the ledger's write lock, so no second copy can even be claimed"
        )
    if fault == "response_lost" and effect == "transactional":
        return "a transactional effect has no response to lose"
    if fault == "crash_after_claim" and guarantee != Guarantee.EFFECTIVELY_ONCE.value:
        return "only effectively-once claims"
    if fault == "redrive_applied" and guarantee == Guarantee.AT_MOST_ONCE.value:
        return "at-most-once completes before the handler: nothing is quarantined to redrive"
    if fault == "pause_beyond_lease" and broker == "rabbitmq":
        return "a stopped RabbitMQ consumer keeps its messages until its connection dies"
    return None


@dataclass(slots=True)
class ChaosConfig:
    broker: str = "memory"
    ledger: str = "sqlite"
    effects: tuple[str, ...] = ("keyed",)
    guarantees: tuple[str, ...] = GUARANTEES
    faults: tuple[str, ...] = FAULTS
    ops: int = 200
    workers: int = 3
    seed: int = 7
    lease: float = 1.5
    concurrency: int = 8
    workdir: str | None = None
    broker_url: str | None = None
    ledger_url: str | None = None
    #: per-run wall-clock bound (seconds)
    run_timeout: float = 90.0
    #: cells run at the same time (each has its own queue, ledger and sink run)
    parallel: int = 1
    #: explicit cells (guarantee, effect, fault); overrides the product of the lists above
    cells: list[tuple[str, str, str]] | None = None

    def matrix(self) -> list[tuple[str, str, str]]:
        if self.cells is not None:
            return list(self.cells)
        out = []
        for effect in self.effects:
            for guarantee in self.guarantees:
                for fault in self.faults:
                    why = applicable(
                        fault,
                        broker=self.broker,
                        ledger=self.ledger,
                        effect=effect,
                        guarantee=guarantee,
                    )
                    if why is None:
                        out.append((guarantee, effect, fault))
        return out


@dataclass(slots=True)
class Matrix:
    broker: str
    ledger: str
    ops: int
    seed: int
    runs: list[RunResult] = field(default_factory=list)
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "broker": self.broker,
            "ledger": self.ledger,
            "ops": self.ops,
            "seed": self.seed,
            "runs": [r.as_json() for r in self.runs],
        }


def op_id(i: int) -> str:
    return f"chaos-op:{i}"


def pick_targets(ops: int, seed: int, fault: str) -> list[str]:
    """The operations a fault targets: the same for every guarantee and effect of one seed."""
    rng = random.Random(f"{seed}:{fault}")
    n = min(ops, max(2, round(ops * FAULT_RATE)))
    return [op_id(i) for i in sorted(rng.sample(range(ops), n))]


def _run_name(index: int, guarantee: str, effect: str, fault: str) -> str:
    """Readable and unique per invocation (server-side names never collide with an earlier
    run's leftovers)."""
    name = re.sub(r"[^a-z0-9]+", "-", f"r{index}-{guarantee}-{effect}-{fault}".lower())[:54]
    return f"{name}-{uuid.uuid4().hex[:4]}"


# --------------------------------------------------------------------------- ledgers


async def open_ledger(
    cfg: ChaosConfig, run: str, rundir: Path
) -> tuple[LedgerBackend, dict[str, Any]]:
    """A fresh ledger for one run, and the JSON a worker process needs to open the same one: its
    URL (``ledger_from_url``: the one grammar), plus what the nemesis and the cleanup read."""
    if cfg.ledger == "sqlite":
        path = str(rundir / "ledger.db")
        conf: dict[str, Any] = {"kind": "sqlite", "path": path, "url": f"sqlite:{path}"}
    elif cfg.ledger == "postgres":
        base = cfg.ledger_url or "postgresql://postgres@127.0.0.1:5432/test"
        # the run's connections carry its name: ledger_restart terminates exactly those
        sep = "&" if "?" in base else "?"
        dsn = f"{base}{sep}application_name={_app_name(run)}"
        schema = "chaos_" + run.replace("-", "_")[-55:]
        own = urlencode({"schema": schema, "auto_migrate": "1", "max_size": "4"})
        conf = {"kind": "postgres", "dsn": dsn, "schema": schema, "url": f"{dsn}&{own}"}
    elif cfg.ledger == "redis":
        base = cfg.ledger_url or "redis://127.0.0.1:6379/0"
        # the run's connections carry its name (a URL option overrides the ledger's default
        # client name): ledger_restart kills exactly those
        sep = "&" if "?" in base else "?"
        url = f"{base}{sep}client_name={_app_name(run)}"
        prefix = f"rs-chaos:{run}:{uuid.uuid4().hex[:6]}:"
        conf = {"kind": "redis", "url": f"{url}&{urlencode({'prefix': prefix})}",
                "prefix": prefix, "client_url": url}  # fmt: skip
    else:
        raise ConfigurationError(f"unknown ledger {cfg.ledger!r}; use one of {', '.join(LEDGERS)}")
    return ledger_from_spec(conf), conf


def _app_name(run: str) -> str:
    return f"rs-chaos-{run}"[:63]


async def ledger_nemesis(spec: RunSpec, kills: int = 5, every: float = 0.3) -> None:
    """``ledger_restart``: cut the run's ledger connections (and only those: PostgreSQL matches
    them by ``application_name`` and terminates their backends; Redis by client name, ``CLIENT
    KILL ID``) ``kills`` times while the run works. A kill that cut at least one connection is a
    hit."""
    name = _app_name(spec.run)
    for k in range(kills):
        await asyncio.sleep(every)
        if spec.ledger["kind"] == "redis":
            killed = await _kill_redis_clients(spec.ledger["client_url"], name)
        else:
            killed = await _kill_pg_backends(spec.ledger["dsn"], name)
        if killed:
            mark_once(spec.state_dir, spec.fault, f"kill-{k}")


async def _kill_pg_backends(dsn: str, name: str) -> int:
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = %s "
            "AND pid <> pg_backend_pid()",
            (name,),
        )
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _kill_redis_clients(url: str, name: str) -> int:
    from redis.asyncio import Redis

    # the nemesis's own connection must not carry the run's name
    plain = url.split("?", 1)[0]
    client = Redis.from_url(plain, client_name="rs-chaos-nemesis")
    try:
        killed = 0
        for c in await client.client_list():
            if c.get("name") == name:
                killed += int(await client.client_kill_filter(_id=c["id"]))
        return killed
    finally:
        await client.aclose()


def ledger_from_spec(conf: dict[str, Any]) -> LedgerBackend:
    """The run's ledger from its spec (in the harness and in each worker process): its URL, and
    the keyword options a ``key=value`` DSN cannot carry."""
    return ledger_from_url(conf["url"], **conf.get("options", {}))


async def drop_ledger(ledger: LedgerBackend, conf: dict[str, Any]) -> None:
    """Remove a run's server-side ledger state (schema, keys); files go with the workdir."""
    with contextlib.suppress(Exception):
        await ledger.close()
    if conf["kind"] == "postgres":
        import psycopg
        from psycopg import sql

        async with await psycopg.AsyncConnection.connect(conf["dsn"], autocommit=True) as conn:
            await conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(conf["schema"]))
            )
    elif conf["kind"] == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(conf["client_url"])
        try:
            keys = [k async for k in client.scan_iter(match=conf["prefix"] + "*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


async def _retrying(call: Callable[[], Awaitable[Any]]) -> Any:
    """The harness's own ledger reads ride out ``ledger_restart`` (bounded: 10 tries)."""
    for attempt in range(10):
        try:
            return await call()
        except LedgerUnavailable:
            if attempt == 9:
                raise
            await asyncio.sleep(0.3)


async def _effect_rows(
    ledger: LedgerBackend, run: str, kind: str, schema: str | None = None
) -> list[Attempt]:
    rows: list[Attempt] = await _retrying(lambda: _read_effect_rows(ledger, run, kind, schema))
    return rows


async def _read_effect_rows(
    ledger: LedgerBackend, run: str, kind: str, schema: str | None
) -> list[Attempt]:
    from replaysafe.ledger.base import TransactionalLedger

    assert isinstance(ledger, TransactionalLedger)
    ph = "%s" if kind == "postgres" else "?"
    async with ledger.transaction() as tx:
        rows = await tx.fetchall(
            f"SELECT run, op, fingerprint, token, pid, started, ended "
            f"FROM {effects_table(kind, schema)} "
            f"WHERE run = {ph}",
            (run,),
        )
    return [Attempt(r[0], r[1], r[2], r[3], None, r[4], r[5], r[6], APPLIED) for r in rows]


async def _flags(ledger: LedgerBackend) -> list[Flag]:
    entries: list[QuarantineEntry] = await _retrying(lambda: ledger.quarantined(limit=100_000))
    return [Flag(e.operation_id, e.reason.value, e.risk.value, e.created_at) for e in entries]


# --------------------------------------------------------------------------- brokers


def broker_conf(cfg: ChaosConfig, fault: str) -> dict[str, Any]:
    if cfg.broker == "memory":
        mode = RedeliveryKind.NACK
        if fault in ("visibility_overlap", "pause_beyond_lease"):
            mode = RedeliveryKind.VISIBILITY_TIMEOUT
        elif fault == "rebalance":
            mode = RedeliveryKind.OFFSET_REWIND
        return {"kind": "memory", "mode": mode.value}
    return {"kind": cfg.broker, "url": cfg.broker_url}


def normalise_broker_url(kind: str, url: str | None) -> str:
    """Accept what the test fixtures and operators naturally have (``host:port`` for Kafka, a
    plain ``http://`` endpoint for an SQS-compatible server) and give each adapter its URL."""
    if kind == "rabbitmq":
        return url or "amqp://guest:guest@127.0.0.1:5672/"
    if kind == "nats":
        return url or "nats://127.0.0.1:4222"
    if url is None:
        raise ConfigurationError(f"--broker {kind} needs --broker-url")
    if kind == "kafka" and "://" not in url:
        return f"kafka://{url}"
    if kind == "sqs" and url.startswith(("http://", "https://")):
        # a local SQS-compatible server (moto) takes any credentials
        scheme, _, rest = url.partition("://")
        return f"sqs+{scheme}://testing:testing@{rest.rstrip('/')}?region=us-east-1"
    return url


def broker_from_conf(conf: dict[str, Any], spec: RunSpec, failpoints: Failpoints) -> Broker:
    """A real broker adapter for a worker process or the producer (drivers import lazily)."""
    kind = conf["kind"]
    url = normalise_broker_url(kind, conf.get("url"))
    opts = dict(conf.get("options", {}))
    if kind == "rabbitmq":
        from replaysafe.brokers.rabbitmq import RabbitMQBroker

        return RabbitMQBroker.from_url(url, failpoints=failpoints, **opts)
    if kind == "sqs":
        from replaysafe.brokers.sqs import SQSBroker

        return SQSBroker.from_url(url, failpoints=failpoints, **opts)
    if kind == "kafka":
        from replaysafe.brokers.kafka import KafkaBroker

        return KafkaBroker.from_url(url, failpoints=failpoints, **opts)
    if kind == "nats":
        from replaysafe.brokers.nats import NATSBroker

        return NATSBroker.from_url(url, failpoints=failpoints, **opts)
    raise ConfigurationError(f"unknown broker {kind!r}; use one of {', '.join(BROKERS)}")


# --------------------------------------------------------------------------- producer


def envelopes_for(spec: RunSpec, ops: int, seed: int) -> list[Envelope]:
    rng = random.Random(seed)
    out = []
    stale = set(spec.targets) if spec.fault == "beyond_horizon" else set()
    now = time.time()
    for i in range(ops):
        op = op_id(i)
        env = Envelope.of(op, {"i": i, "amount": rng.randint(100, 50_000)}, key=f"k{i % 16}")
        if op in stale:
            # first published longer ago than the horizon: the ledger may have forgotten it
            env = env.with_published_at(now - spec.horizon - 600)
        out.append(env)
    return out


async def produce(
    spec: RunSpec,
    publisher: Broker,
    envelopes: list[Envelope],
    history: list[Published],
    failpoints: Failpoints,
    *,
    outbox_path: Path | None = None,
) -> None:
    """Publish ``envelopes`` under the run's guarantee, recording the producer's history.

    ``ambiguous_publish``: the publish of a target is accepted by the broker, then answered with
    ``PublishAmbiguous`` (failpoint ``publish_after_accept``); the producer retries with the same
    operation id (at-most-once gives up). ``relay_crash``: envelopes are staged in an outbox and
    published by a relay that is killed between publish and mark once per target.
    """
    guarantee = Guarantee(spec.guarantee)
    targets = set(spec.targets)
    if spec.fault == "ambiguous_publish":
        failpoints.enable(
            fp.PUBLISH_AFTER_ACCEPT,
            "raise",
            when=lambda ctx: (
                ctx.get("operation_id") in targets
                and mark_once(spec.state_dir, spec.fault, str(ctx.get("operation_id")))
            ),
            error=PublishAmbiguous("chaos: the confirm was lost after the broker accepted"),
        )
    if spec.fault == "relay_crash":
        assert outbox_path is not None
        await _produce_through_outbox(spec, publisher, envelopes, history, outbox_path)
        return
    producer = Producer(publisher, guarantee, backoff=0.01)
    for start in range(0, len(envelopes), 20):
        chunk = envelopes[start : start + 20]
        confirmed = False
        with contextlib.suppress(PublishAmbiguous):
            confirmed = (await producer.publish(spec.source, chunk)).confirmed
        history.extend(Published(e.operation_id, e.fingerprint, confirmed, time.time())
                       for e in chunk)  # fmt: skip
    failpoints.disable(fp.PUBLISH_AFTER_ACCEPT)


async def _produce_through_outbox(
    spec: RunSpec,
    publisher: Broker,
    envelopes: list[Envelope],
    history: list[Published],
    path: Path,
) -> None:
    from replaysafe.ledger.sqlite import SQLiteLedger
    from replaysafe.outbox.relay import Relay
    from replaysafe.outbox.sqlite import SQLiteOutboxStore

    db = SQLiteLedger(path)
    store = SQLiteOutboxStore(db)
    await store.migrate()
    targets = set(spec.targets)
    relay_fps = Failpoints()
    relay_fps.enable(
        fp.RELAY_AFTER_PUBLISH_BEFORE_MARK,
        "kill",
        when=lambda ctx: any(
            op in targets and mark_once(spec.state_dir, spec.fault, op)
            for op in ctx.get("operation_ids", [])
        ),
    )
    try:
        # staged in one business transaction each chunk: committed = acknowledged to the caller
        for start in range(0, len(envelopes), 20):
            chunk = [e.with_published_at(time.time()) for e in envelopes[start : start + 20]]
            async with db.transaction() as tx:
                await store.stage(tx, spec.source, chunk)
            history.extend(Published(e.operation_id, e.fingerprint, True, time.time())
                           for e in chunk)  # fmt: skip
        owner = f"chaos-relay-{uuid.uuid4().hex[:6]}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            # a killed relay is restarted with the same owner: it takes its own lease back
            relay = Relay(store, publisher, batch=10, failpoints=relay_fps, owner=owner)
            try:
                while await store.pending_count() > 0 and time.monotonic() < deadline:
                    await relay.run_once()
                break
            except SimulatedCrash:
                continue
    finally:
        await db.close()


# --------------------------------------------------------------------------- one run


@dataclass(slots=True)
class RunContext:
    cfg: ChaosConfig
    sink: EffectSink
    spec: RunSpec
    ledger: LedgerBackend
    history: list[Published]
    rundir: Path
    #: how each settle wait ended (evidence when a run reports losses: did it end unsettled?)
    settles: list[str] = field(default_factory=list)


async def run_cell(
    cfg: ChaosConfig, sink: EffectSink, index: int, guarantee: str, effect: str, fault: str
) -> RunResult:
    started = time.monotonic()
    run = _run_name(index, guarantee, effect, fault)
    base = Path(cfg.workdir or tempfile.gettempdir())
    rundir = base / run
    _mkdirs(str(rundir))
    targets = [] if fault == "none" else pick_targets(cfg.ops, cfg.seed, fault)
    lease = cfg.lease
    if fault == "visibility_overlap" and cfg.broker == "sqs":
        # SQS visibility is whole seconds: the lease (and the slow first execution, 1.5 leases)
        # must outlast the 1 s visibility by enough that the copy is fetched while the first
        # execution still runs; at 1.5 s the copy had 0.2 s to be picked up and a loaded machine
        # missed it
        lease = max(lease, 4 * SQS_OVERLAP_VISIBILITY)
    spec = RunSpec(
        run=run,
        guarantee=guarantee,
        effect=effect,
        fault=fault,
        source=f"chaos-{run}",
        group=f"chaos-{run}-g",
        sink_url=sink.url,
        state_dir=str(rundir / "state"),
        record_dir=str(rundir / "records"),
        targets=targets,
        lease=lease,
        concurrency=cfg.concurrency,
        in_process=cfg.broker == "memory",
        # Kafka redelivers a stalled member's records only after its session timeout and a rejoin
        pause=(lease * 2.5 + (6.0 if cfg.broker == "kafka" else 0.0))
        if fault == "pause_beyond_lease"
        else 0.0,
        slow=lease * 1.5 if fault == "visibility_overlap" else 0.0,
        extend_visibility=fault != "visibility_overlap",
    )
    _mkdirs(spec.state_dir)
    sink.configure(
        run,
        keyed=effect == "keyed",
        slow={op: spec.slow for op in targets} if fault == "visibility_overlap" else None,
        response_lost=targets if fault == "response_lost" else (),
    )
    ledger, spec.ledger = await open_ledger(cfg, run, rundir)
    spec.broker = broker_conf(cfg, fault)
    history: list[Published] = []
    ctx = RunContext(cfg, sink, spec, ledger, history, rundir)
    try:
        if effect == "transactional":
            await create_effects_table(ledger, spec.ledger["kind"], spec.ledger.get("schema"))
        if cfg.broker == "memory":
            await _memory_run(ctx)
        else:
            from replaysafe.chaos.procs import process_run

            await process_run(ctx)
        attempts = (
            await _effect_rows(ledger, run, spec.ledger["kind"], spec.ledger.get("schema"))
            if effect == "transactional"
            else sink.attempts(run)
        )
        flags = await _flags(ledger)
    finally:
        await drop_ledger(ledger, spec.ledger)
    records = read_records(spec.record_dir)
    completed = [(r["op"], r["t"]) for r in records if r["e"] == "completed" and r["op"]]
    result = check(
        guarantee=guarantee,
        effect=effect,
        fault=fault,
        history=history,
        attempts=attempts,
        quarantine=flags,
        completed=completed,
        fault_hits=count_hits(spec, records, attempts, history),
    )
    result.windows = ambiguity_windows(attempts, completed)
    result.seconds = time.monotonic() - started
    result.evidence = _evidence(ctx, result, records)
    return result


def _evidence(ctx: RunContext, r: RunResult, records: list[dict[str, Any]]) -> list[str]:
    """For a run that lost operations: how its settle waits ended and what the broker records
    show of (up to 5 of) the lost ones, so that a failure in CI explains itself."""
    if not r.lost_ops:
        return []
    t0 = min((p.at for p in ctx.history), default=0.0)
    out = [f"settle: {'; '.join(ctx.settles) or 'none'}"]
    for op in r.lost_ops[:5]:
        seen = [f"{e['e']}@{e['t'] - t0:.2f}s/pid{e['pid']}" for e in records if e.get("op") == op]
        published = [f"{p.at - t0:.2f}s" for p in ctx.history if p.op == op and p.confirmed]
        out.append(f"lost {op}: published {published}, records {seen or 'none'}")
    return out


def _mkdirs(path: str) -> None:
    Path(path).mkdir(parents=True, exist_ok=True)


def count_hits(
    spec: RunSpec,
    records: list[dict[str, Any]],
    attempts: Sequence[Attempt],
    history: Sequence[Published],
) -> int:
    """How often the fault hit its window (not merely how often it was armed)."""
    fault = spec.fault
    targets = set(spec.targets)
    if fault == "pause_beyond_lease":
        # the window: another worker took the operation over while the paused one was stalled
        # (in one process every worker shares the pid, so the pause interval decides there)
        n = 0
        for op, pid, at in hits(spec.state_dir, fault):
            if any(
                r["e"] == "delivered"
                and r["op"] == op
                and r["t"] > at
                and (r.get("pid") != pid if not spec.in_process else r["t"] < at + spec.pause)
                for r in records
            ):
                n += 1
        return n
    if fault == "visibility_overlap":
        # the window: another copy was delivered while the first execution was still running
        first: dict[str, float] = {}
        n = 0
        for r in records:
            if r["e"] != "delivered" or r["op"] not in targets:
                continue
            t0 = first.setdefault(r["op"], r["t"])
            if 0 < r["t"] - t0 < spec.slow:
                n += 1
                first[r["op"]] = -1e18  # count each operation once
        return n
    if fault == "response_lost":
        return sum(1 for a in attempts if a.outcome == "applied_response_lost")
    if fault == "key_reuse":
        first_fp: dict[str, str] = {}
        for p in history:
            first_fp.setdefault(p.op, p.fingerprint)
        return sum(
            1
            for r in records
            if r["e"] == "delivered" and r["op"] in first_fp and r["fp"] != first_fp[r["op"]]
        )
    if fault == "beyond_horizon":
        return sum(1 for r in records if r["e"] == "delivered" and r["op"] in targets)
    if fault == "redrive_applied":
        redriven = {op for op, _, _ in hits(spec.state_dir, fault)}
        applied = {a.op for a in attempts if a.effect}
        return len(redriven & applied)
    return len(hits(spec.state_dir, fault))


def ambiguity_windows(
    attempts: Iterable[Attempt], completed: Iterable[tuple[str, float]]
) -> list[float]:
    """EFFECTED -> COMPLETED per operation: first effect's end to the first completion after it."""
    effected: dict[str, float] = {}
    for a in attempts:
        if a.effect and (a.op not in effected or a.ended < effected[a.op]):
            effected[a.op] = a.ended
    out: list[float] = []
    seen: set[str] = set()
    for op, t in sorted(completed, key=lambda x: x[1]):
        e = effected.get(op)
        if op in seen or e is None or t < e:
            continue
        seen.add(op)
        out.append(t - e)
    return out


async def _resolved(ctx: RunContext) -> tuple[int, int]:
    """(unresolved confirmed operations, activity counter) for the quiet-and-done wait."""
    attempts = (
        await _effect_rows(
            ctx.ledger, ctx.spec.run, ctx.spec.ledger["kind"], ctx.spec.ledger.get("schema")
        )
        if ctx.spec.effect == "transactional"
        else ctx.sink.attempts(ctx.spec.run)
    )
    applied = {a.op for a in attempts if a.effect}
    quarantined = {f.op for f in await _flags(ctx.ledger)}
    confirmed = {p.op for p in ctx.history if p.confirmed}
    unresolved = len(confirmed - applied - quarantined)
    activity = len(attempts) + len(quarantined)
    return unresolved, activity


async def wait_settled(
    ctx: RunContext,
    *,
    depth: Callable[[], Awaitable[int]] | None = None,
    authoritative: bool = False,
    quiet: float | None = None,
) -> None:
    """Wait until the run has settled, bounded by the run timeout.

    ``depth()`` is what the broker still holds for the group. ``authoritative`` (the memory
    broker: unsettled deliveries included) means depth 0 is the end once nothing moved for
    ``quiet`` seconds. Otherwise (real brokers report ready messages, not those held by a
    consumer) the run has settled when the broker holds nothing and every confirmed operation is
    applied or quarantined with ``quiet`` seconds without movement — or, when some stay
    unresolved (losses are a possible outcome), three times as long."""
    quiet = quiet if quiet is not None else max(1.0, ctx.spec.lease, ctx.spec.pause + 0.5)
    deadline = time.monotonic() + ctx.cfg.run_timeout
    last_change = time.monotonic()
    last: tuple[int, int, int] | None = None
    while time.monotonic() < deadline:
        unresolved, activity = await _resolved(ctx)
        held = 0
        if depth is not None:
            try:
                held = await depth()
            except Exception as exc:  # a depth probe failing must not end the run early
                log.warning("chaos run %s: broker depth unavailable: %r", ctx.spec.run, exc)
                held = -1
        state = (activity, held, _record_count(ctx.spec.record_dir))
        if state != last:
            last = state
            last_change = time.monotonic()
        idle = time.monotonic() - last_change
        log.debug("chaos run %s: unresolved=%d held=%d idle=%.1f", ctx.spec.run, unresolved,
                  held, idle)  # fmt: skip
        if held == 0 and authoritative and idle >= quiet:
            ctx.settles.append(f"settled ({unresolved} unresolved)")
            return
        if (
            held == 0
            and not authoritative
            and ((unresolved == 0 and idle >= quiet) or idle >= quiet * 3)
        ):
            ctx.settles.append(
                "settled" if unresolved == 0 else f"quiet {idle:.1f}s, {unresolved} unresolved"
            )
            return
        await asyncio.sleep(0.2)
    ctx.settles.append(f"timed out after {ctx.cfg.run_timeout:.0f}s")
    log.warning("chaos run %s did not settle within %.0fs", ctx.spec.run, ctx.cfg.run_timeout)


def _record_count(record_dir: str) -> int:
    d = Path(record_dir)
    return sum(f.stat().st_size for f in d.glob("*.jsonl")) if d.is_dir() else 0


async def second_phase(ctx: RunContext, publisher: Broker, app: App) -> bool:
    """Faults that act after the first drain. Returns True when something was published."""
    spec = ctx.spec
    if spec.fault == "key_reuse":
        reused = [
            Envelope.of(op, {"i": -1, "amount": 1, "reused": True}, key="reuse")
            for op in spec.targets
        ]
        producer = Producer(publisher, Guarantee(spec.guarantee))
        await producer.publish(spec.source, reused)
        ctx.history.extend(Published(e.operation_id, e.fingerprint, True, time.time())
                           for e in reused)  # fmt: skip
        return True
    if spec.fault == "redrive_applied":
        from replaysafe.redrive import redrive

        open_redrive_gate(spec.state_dir)
        targets = set(spec.targets)
        everything: list[QuarantineEntry] = await _retrying(
            lambda: ctx.ledger.quarantined(limit=100_000)
        )
        entries = [
            e
            for e in everything
            if e.operation_id in targets and e.reason is QuarantineReason.NON_RETRYABLE_ERROR
        ]
        for r in await redrive(app, entries):
            if r.redriven and r.operation_id is not None:
                mark_once(spec.state_dir, spec.fault, r.operation_id)
        return bool(entries)
    return False


# --------------------------------------------------------------------------- memory broker


async def _memory_run(ctx: RunContext) -> None:
    from replaysafe.brokers.memory import MemoryBroker

    spec = ctx.spec
    failpoints = Failpoints()
    broker = MemoryBroker(failpoints=failpoints)
    mode = RedeliveryKind(spec.broker["mode"])
    broker.declare(
        spec.source,
        mode=mode,
        visibility_timeout=(spec.lease / 4 if spec.fault == "visibility_overlap" else spec.lease),
        partitions=4 if mode is RedeliveryKind.OFFSET_REWIND else 1,
    )
    recording = RecordingBroker(broker, spec.record_dir)
    app = build_app(spec, recording, ctx.ledger, failpoints)
    from replaysafe.chaos.app import arm

    arm(spec, failpoints)
    done = asyncio.Event()
    restarts = 0
    # a crash loop must end, but every targeted crash is a restart: poison crashes its worker
    # up to max_attempts + 2 times per target (the 10k-op run exhausted a fixed 500)
    budget = max(500, 2 * len(spec.targets) * (spec.max_attempts + 2))

    async def supervise(n: int, until: asyncio.Event) -> None:
        nonlocal restarts
        generation = 0
        while not until.is_set() and restarts < budget:
            worker = Worker(app, owner=f"w{n}.{generation}")
            stopper = asyncio.ensure_future(until.wait())
            runner = asyncio.ensure_future(worker.run(drain_timeout=spec.pause + 5))
            try:
                await asyncio.wait({stopper, runner}, return_when=asyncio.FIRST_COMPLETED)
                if not runner.done():
                    worker.stop()
                await runner
            except SimulatedCrash:
                restarts += 1
                generation += 1
            finally:
                stopper.cancel()

    pool = [asyncio.create_task(supervise(n, done)) for n in range(ctx.cfg.workers)]
    nemesis: asyncio.Task[None] | None = None
    try:
        envelopes = envelopes_for(spec, ctx.cfg.ops, ctx.cfg.seed)
        if spec.fault == "rebalance":
            nemesis = asyncio.create_task(_memory_rebalance(spec, supervise))
        elif spec.fault == "ledger_restart":
            nemesis = asyncio.create_task(ledger_nemesis(spec))
        await produce(spec, broker, envelopes, ctx.history, failpoints,
                      outbox_path=ctx.rundir / "outbox.db")  # fmt: skip

        async def depth() -> int:
            return int(broker.depth(spec.source, spec.group))

        await wait_settled(ctx, depth=depth, authoritative=True)
        if nemesis is not None:
            await nemesis
        if await second_phase(ctx, broker, app):
            await wait_settled(ctx, depth=depth, authoritative=True)
    finally:
        done.set()
        if nemesis is not None:
            nemesis.cancel()
        async with asyncio.timeout(spec.pause + 30):
            await asyncio.gather(*pool, return_exceptions=True)
        await broker.close()


async def _memory_rebalance(
    spec: RunSpec, supervise: Callable[[int, asyncio.Event], Coroutine[Any, Any, None]]
) -> None:
    """A consumer joins the group mid-run and leaves again, twice (each join and each leave
    rebalances the partitions while work is in flight)."""
    for round_ in range(2):
        await asyncio.sleep(0.05)
        leave = asyncio.Event()
        task = asyncio.create_task(supervise(100 + round_, leave))
        mark_once(spec.state_dir, spec.fault, f"join-{round_}")
        await asyncio.sleep(0.15)
        leave.set()
        await task
        mark_once(spec.state_dir, spec.fault, f"leave-{round_}")


# --------------------------------------------------------------------------- the matrix


async def run_matrix(
    cfg: ChaosConfig, *, progress: Callable[[RunResult], None] | None = None
) -> Matrix:
    """Run every cell of ``cfg`` one after the other against one shared sink."""
    started = time.monotonic()
    cells = cfg.matrix()
    if not cells:
        raise ConfigurationError(
            "no cell of the matrix applies to this broker/ledger/effect/guarantee/fault choice"
        )
    matrix = Matrix(cfg.broker, cfg.ledger, cfg.ops, cfg.seed)
    own_dir = None
    if cfg.workdir is None:
        own_dir = tempfile.TemporaryDirectory(prefix="replaysafe-chaos-")
        cfg.workdir = own_dir.name
    try:
        with EffectSink(Path(cfg.workdir) / "sink-journal.db") as sink:
            gate = asyncio.Semaphore(max(1, cfg.parallel))

            async def one(index: int, cell: tuple[str, str, str]) -> RunResult:
                async with gate:
                    result = await run_cell(cfg, sink, index, *cell)
                if progress is not None:
                    progress(result)
                return result

            matrix.runs = list(
                await asyncio.gather(*(one(i, cell) for i, cell in enumerate(cells)))
            )
    finally:
        if own_dir is not None:
            cfg.workdir = None
            own_dir.cleanup()
    matrix.seconds = time.monotonic() - started
    return matrix


#: on real brokers the transactional and unkeyed effects run under the faults that hit the
#: worker process itself; producer-side faults (ambiguous publish, relay crash, key reuse,
#: redrive, horizon) are effect-independent there and run with the keyed effect
PROCESS_FAULTS = frozenset(
    {"crash_after_effect", "crash_after_claim", "pause_beyond_lease", "visibility_overlap",
     "rebalance", "poison", "response_lost", "broker_restart"}
)  # fmt: skip
#: the visibility timeout (s) of an SQS queue in a visibility_overlap run: the smallest whole value
SQS_OVERLAP_VISIBILITY = 1
#: Kafka: every worker restart costs a group rejoin, so fewer cells still
KAFKA_FAULTS = frozenset({"crash_after_effect", "pause_beyond_lease", "rebalance"})


def default_cells(broker: str, ledger: str) -> list[tuple[str, str, str]]:
    """The small matrix asserted by the tests: effectively-once with a keyed effect under every
    applicable fault; the transactional and unkeyed effects under every fault on the memory
    broker and under the process faults on real brokers (``PROCESS_FAULTS``; ``KAFKA_FAULTS``
    on Kafka); plus the three contrast cells under ``crash_after_effect``."""
    eo = Guarantee.EFFECTIVELY_ONCE.value
    cells = []
    for effect in EFFECTS:
        for fault in FAULTS:
            if applicable(fault, broker=broker, ledger=ledger, effect=effect, guarantee=eo):
                continue
            if broker != "memory" and effect != "keyed":
                subset = KAFKA_FAULTS if broker == "kafka" else PROCESS_FAULTS
                if fault not in subset:
                    continue
            cells.append((eo, effect, fault))
    cells += [
        (Guarantee.AT_LEAST_ONCE.value, "unkeyed", "crash_after_effect"),
        (Guarantee.AT_LEAST_ONCE.value, "keyed", "crash_after_effect"),
        (Guarantee.AT_MOST_ONCE.value, "unkeyed", "crash_after_effect"),
    ]
    return cells
