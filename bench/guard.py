"""Sync guard cost: how a synchronous caller should reach the ledger, measured side by side.

Issue 14's bar: a sync guard at batch 1 runs >= 0.8x the ops/s of the SAME statements issued raw
with the sync driver, on SQLite, PostgreSQL and Redis. The ledgers are async; this bench measures
the candidate ways for a plain ``def`` caller to use them, beside that raw baseline. One operation
is a claim + a complete of a fresh operation id; batch 10 is ``claim_many`` + ``complete_many`` of
10 (10 operations). One caller thread (the batch-1 bar is about one caller's latency).

Paths (``path`` in the results; ``api`` is "sync" except for ``async``):

  raw            the ledger's own statements with the SYNC driver in a plain loop, no replaysafe:
                 SQLite     - sqlite3, WAL, the ledger's default synchronous, the ledger's
                              BEGIN IMMEDIATE / token read / batched record read / upsert /
                              token bump / COMMIT, then BEGIN IMMEDIATE / read / narrow UPDATE /
                              COMMIT (``SQLiteCore.claim_rows`` / ``complete_many_rows``);
                 PostgreSQL - psycopg sync, one autocommit connection, the ledger's own composed
                              claim and complete statements (``PostgresLedger._sql``), binary
                              results where the ledger asks for them;
                 Redis      - redis-py sync (hiredis), EVALSHA of the ledger's own claim and
                              complete Lua scripts with the ledger's KEYS and packed ARGV.
  async          the async ledger awaited directly in an event loop (api="async"): no sync hop.
  raw-async      PostgreSQL and Redis: the raw statements through the ASYNC driver (psycopg
                 AsyncConnection; the async ledger's own redis.asyncio client) in an event loop
                 (api="async"): what the async driver alone costs, before any replaysafe code.
  loop-per-op    one background event-loop thread owns the ledger; the caller submits ONE
                 coroutine (claim + complete) per step with run_coroutine_threadsafe().result().
  loop-per-call  the same, one submit per ledger call (claim, then complete: two hops per step).
  private-loop   the caller thread owns an event loop and its own ledger instance and runs each
                 step with loop.run_until_complete().
  executor       SQLite only: the ledger's own connection-thread executor called synchronously,
                 ``executor.submit(job).result()`` per ledger call (the asyncio lock bypassed:
                 safe here because nothing else uses that ledger object).
  inline         SQLite only: the ledger's own jobs (``SQLiteCore.job(claim_rows …)``) run in the
                 caller thread under a threading.Lock (no thread hop at all).
  native         the backend's sync twin, ``Ledger.sync()``, called in the caller thread
                 (SQLite: ``SyncSQLiteLedger``; Redis: ``SyncRedisLedger``, redis.Redis;
                 PostgreSQL: ``SyncPostgresLedger``, psycopg's sync pool); skipped for a backend
                 that has none.

The Guard itself is not measured yet: add a function per guard variant to ``PATHS`` (see
``guard_sync`` there) once ``replaysafe.guard`` exists.

Variants are interleaved round by round (the order rotated each round) so drift on the shared
machine hits them all alike; each ``ops_per_s`` is the median over rounds, each ``ratio`` the
median of per-round ratios to the same round's raw run. ``cpu_us_per_op`` is this process's CPU
(every thread: the background loop's too) per operation.

Writes bench/results/guard.json. Timings are for this machine only; compare ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import shutil
import sqlite3
import statistics
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from replaysafe import Context, Effect, Envelope, Guarantee, Guard
from replaysafe.errors import CapabilityError
from replaysafe.ledger.base import Acquired, ClaimRequest, Ledger, OpKey, Record, SyncLedger
from replaysafe.ledger.sqlite import (
    _COMPLETE_RECORD,
    _SAVE_RECORD,
    _SELECT_MANY,
    SQLiteLedger,
)

PG_DSN = os.environ.get("REPLAYSAFE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("REPLAYSAFE_BENCH_REDIS", "redis://127.0.0.1:6379/0")
FP = "sha256:" + "ab" * 32  # a realistic fingerprint length
OWNER = "bench-worker"
LEASE = 30.0
RESULT = '{"receipt":"r-1"}'

T = TypeVar("T")
SyncStep = Callable[[], None]
AsyncStep = Callable[[], Awaitable[None]]

#: operation ids, unique across every variant of a run (next() on a count is atomic in CPython)
_IDS = itertools.count()


def new_ops(batch: int) -> list[str]:
    return [f"op-{next(_IDS)}" for _ in range(batch)]


# ---------------------------------------------------------------------- drivers


def drive_sync(step: SyncStep, batch: int, seconds: float) -> tuple[float, float]:
    """Call ``step`` for ``seconds``: (operations per second, process CPU us per operation)."""
    done = 0
    started, cpu = time.perf_counter(), time.process_time()
    stop_at = started + seconds
    while time.perf_counter() < stop_at:
        step()
        done += batch
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return done / elapsed, cpu / max(done, 1) * 1e6


async def drive_async(step: AsyncStep, batch: int, seconds: float) -> tuple[float, float]:
    done = 0
    started, cpu = time.perf_counter(), time.process_time()
    stop_at = started + seconds
    while time.perf_counter() < stop_at:
        await step()
        done += batch
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return done / elapsed, cpu / max(done, 1) * 1e6


class LoopThread:
    """One event loop running forever on a daemon thread; ``call`` runs a coroutine on it and
    blocks the calling thread for the result (the background-loop candidate)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


# ---------------------------------------------------------------------- ledger steps


async def ledger_claim_complete(ledger: Ledger, scope: str, batch: int) -> None:
    """One step through the async ledger API: ``batch`` fresh operations claimed and completed."""
    ops = new_ops(batch)
    if batch == 1:
        out = await ledger.claim(OpKey(scope, ops[0]), FP, OWNER, LEASE)
        assert isinstance(out, Acquired), out
        await ledger.complete(out.claim, RESULT)
        return
    outs = await ledger.claim_many([ClaimRequest(OpKey(scope, op), FP, OWNER, LEASE) for op in ops])
    claims = [o.claim for o in outs if isinstance(o, Acquired)]
    assert len(claims) == batch, outs
    done = await ledger.complete_many([(c, RESULT) for c in claims])
    assert all(isinstance(d, Record) for d in done), done


def hop_per_call_step(bg: LoopThread, ledger: Ledger, scope: str, batch: int) -> SyncStep:
    """Each ledger call is its own submit to the background loop (two hops per step)."""

    def step() -> None:
        ops = new_ops(batch)
        if batch == 1:
            out = bg.call(ledger.claim(OpKey(scope, ops[0]), FP, OWNER, LEASE))
            assert isinstance(out, Acquired), out
            bg.call(ledger.complete(out.claim, RESULT))
            return
        reqs = [ClaimRequest(OpKey(scope, op), FP, OWNER, LEASE) for op in ops]
        outs = bg.call(ledger.claim_many(reqs))
        claims = [o.claim for o in outs if isinstance(o, Acquired)]
        assert len(claims) == batch, outs
        done = bg.call(ledger.complete_many([(c, RESULT) for c in claims]))
        assert all(isinstance(d, Record) for d in done), done

    return step


# ---------------------------------------------------------------------- variants


@dataclass
class Variant:
    backend: str
    path: str
    batch: int
    #: seconds -> (ops/s, CPU us per op)
    run: Callable[[float], tuple[float, float]]
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)

    @property
    def api(self) -> str:
        return "async" if self.path in ("async", "raw-async", "guard-async") else "sync"


@dataclass
class Backend:
    """What the variants of one backend share: how to make a fresh async ledger, the raw sync
    step, and the background and private loops (each with its own ledger)."""

    name: str
    make_ledger: Callable[[], Ledger]
    raw_step: Callable[[str, int], SyncStep]
    environment: dict[str, Any]
    close_raw: Callable[[], None]
    cleanup: Callable[[], None] = lambda: None
    bg: LoopThread = field(default_factory=LoopThread)
    bg_ledger: Ledger | None = None
    private_loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    private_ledger: Ledger | None = None
    extra_closers: list[Callable[[], None]] = field(default_factory=list)
    #: (private loop's ledger, scope, batch) -> the raw statements through the async driver
    raw_async_step: Callable[[Ledger, str, int], Awaitable[AsyncStep]] | None = None

    def open(self) -> None:
        self.bg_ledger = self.make_ledger()
        self.bg.call(self.bg_ledger.get(OpKey("bench", "warm-up")))
        self.private_ledger = self.make_ledger()
        self.private_loop.run_until_complete(self.private_ledger.get(OpKey("bench", "warm-up")))

    def close(self) -> None:
        for closer in self.extra_closers:
            closer()
        if self.bg_ledger is not None:
            self.bg.call(self.bg_ledger.close())
        self.bg.stop()
        if self.private_ledger is not None:
            self.private_loop.run_until_complete(self.private_ledger.close())
        self.private_loop.close()
        self.close_raw()
        self.cleanup()


def scope_of(path: str, batch: int) -> str:
    return f"{path}-{batch}"


def variant_raw(b: Backend, batch: int) -> Variant:
    step = b.raw_step(scope_of("raw", batch), batch)
    return Variant(b.name, "raw", batch, partial(drive_sync, step, batch))


def variant_async(b: Backend, batch: int) -> Variant:
    ledger, loop, scope = b.private_ledger, b.private_loop, scope_of("async", batch)
    assert ledger is not None

    def run(seconds: float) -> tuple[float, float]:
        step = partial(ledger_claim_complete, ledger, scope, batch)
        return loop.run_until_complete(drive_async(step, batch, seconds))

    return Variant(b.name, "async", batch, run)


def variant_raw_async(b: Backend, batch: int) -> Variant | None:
    if b.raw_async_step is None:
        return None
    ledger, loop = b.private_ledger, b.private_loop
    assert ledger is not None
    step = loop.run_until_complete(b.raw_async_step(ledger, scope_of("raw-async", batch), batch))

    def run(seconds: float) -> tuple[float, float]:
        return loop.run_until_complete(drive_async(step, batch, seconds))

    return Variant(b.name, "raw-async", batch, run)


def variant_loop_per_op(b: Backend, batch: int) -> Variant:
    ledger, bg, scope = b.bg_ledger, b.bg, scope_of("loop-per-op", batch)
    assert ledger is not None

    def step() -> None:
        bg.call(ledger_claim_complete(ledger, scope, batch))

    return Variant(b.name, "loop-per-op", batch, partial(drive_sync, step, batch))


def variant_loop_per_call(b: Backend, batch: int) -> Variant:
    assert b.bg_ledger is not None
    step = hop_per_call_step(b.bg, b.bg_ledger, scope_of("loop-per-call", batch), batch)
    return Variant(b.name, "loop-per-call", batch, partial(drive_sync, step, batch))


def variant_private_loop(b: Backend, batch: int) -> Variant:
    ledger, loop, scope = b.private_ledger, b.private_loop, scope_of("private-loop", batch)
    assert ledger is not None

    def step() -> None:
        loop.run_until_complete(ledger_claim_complete(ledger, scope, batch))

    return Variant(b.name, "private-loop", batch, partial(drive_sync, step, batch))


def sqlite_job_step(call: Callable[[Callable[[], T]], T], ledger: SQLiteLedger, scope: str,
                    batch: int) -> SyncStep:  # fmt: skip
    """A step made of the SQLite ledger's own jobs (``SQLiteCore.job`` around ``claim_rows`` /
    ``complete_rows`` / ``complete_many_rows``: exactly what its async methods queue on the
    executor), each run through ``call`` (on the executor, or inline)."""
    core = ledger._core

    def step() -> None:
        reqs = [ClaimRequest(OpKey(scope, op), FP, OWNER, LEASE) for op in new_ops(batch)]
        outs = call(partial(core.job, partial(core.claim_rows, reqs), True))
        claims = [o.claim for o in outs if isinstance(o, Acquired)]
        assert len(claims) == batch, outs
        if batch == 1:
            call(partial(core.job, partial(core.complete_rows, claims[0], RESULT), True))
            return
        items = [(c, RESULT) for c in claims]
        done = call(partial(core.job, partial(core.complete_many_rows, items), True))
        assert all(isinstance(d, Record) for d in done), done

    return step


def variant_sqlite_executor(b: Backend, batch: int) -> Variant | None:
    if b.name != "sqlite":
        return None
    ledger = b.make_ledger()
    assert isinstance(ledger, SQLiteLedger)
    b.extra_closers.append(lambda: asyncio.run(ledger.close()))

    def on_executor(job: Callable[[], T]) -> T:
        return ledger._executor.submit(job).result()

    step = sqlite_job_step(on_executor, ledger, scope_of("executor", batch), batch)
    return Variant(b.name, "executor", batch, partial(drive_sync, step, batch))


def variant_sqlite_inline(b: Backend, batch: int) -> Variant | None:
    if b.name != "sqlite":
        return None
    ledger = b.make_ledger()
    assert isinstance(ledger, SQLiteLedger)
    lock = threading.Lock()

    def close() -> None:
        with lock:
            ledger._core.drop_connection()  # opened on this thread: closed here, not on executor
        asyncio.run(ledger.close())

    b.extra_closers.append(close)

    def inline(job: Callable[[], T]) -> T:
        with lock:
            return job()

    step = sqlite_job_step(inline, ledger, scope_of("inline", batch), batch)
    return Variant(b.name, "inline", batch, partial(drive_sync, step, batch))


def twin_step(ledger: SyncLedger, scope: str, batch: int) -> SyncStep:
    """Claim + complete ``batch`` fresh operations through a sync twin (``Ledger.sync()``), in
    the caller's thread: the calls a sync guard makes, without the guard."""

    def step() -> None:
        ops = new_ops(batch)
        if batch == 1:
            out = ledger.claim(OpKey(scope, ops[0]), FP, OWNER, LEASE)
            assert isinstance(out, Acquired), out
            ledger.complete(out.claim, RESULT)
            return
        outs = ledger.claim_many([ClaimRequest(OpKey(scope, op), FP, OWNER, LEASE) for op in ops])
        claims = [o.claim for o in outs if isinstance(o, Acquired)]
        assert len(claims) == batch, outs
        done = ledger.complete_many([(c, RESULT) for c in claims])
        assert all(isinstance(d, Record) for d in done), done

    return step


def variant_native(b: Backend, batch: int) -> Variant | None:
    """The backend's sync twin (``Ledger.sync()``), called in this thread; None when the
    backend has none."""
    parent = b.make_ledger()
    try:
        ledger = parent.sync()
    except CapabilityError:
        asyncio.run(parent.close())
        return None
    b.extra_closers.append(ledger.close)
    b.extra_closers.append(lambda: asyncio.run(parent.close()))
    step = twin_step(ledger, scope_of("native", batch), batch)
    return Variant(b.name, "native", batch, partial(drive_sync, step, batch))


def _guard(ledger: Ledger, path: str, batch: int) -> Guard:
    return Guard(ledger, name=scope_of(path, batch), guarantee=Guarantee.EFFECTIVELY_ONCE,
                 effect=Effect.keyed("bench"), lease=LEASE, tracing=False)  # fmt: skip


def _messages(batch: int) -> list[Envelope]:
    return [Envelope.of(op, {"n": 1}) for op in new_ops(batch)]


def _effect(ctx: Context) -> str:
    return "r-1"


async def _aeffect(ctx: Context) -> str:
    return "r-1"


def variant_guard_sync(b: Backend, batch: int) -> Variant:
    """The public sync guard (``run_batch_sync``: fn in this thread, the ledger on the guard's
    background loop), one claim + effect + complete of ``batch`` fresh operations per step."""
    guard = _guard(b.make_ledger(), "guard-sync", batch)
    b.extra_closers.append(guard.close_sync)

    def step() -> None:
        guard.run_batch_sync(_messages(batch), _effect)

    return Variant(b.name, "guard-sync", batch, partial(drive_sync, step, batch))


def variant_guard_async(b: Backend, batch: int) -> Variant:
    """The public async guard (``await run_batch``) on the private loop."""
    ledger, loop = b.private_ledger, b.private_loop
    assert ledger is not None
    guard = _guard(ledger, "guard-async", batch)
    b.extra_closers.append(lambda: loop.run_until_complete(guard.close()))

    async def step() -> None:
        await guard.run_batch(_messages(batch), _aeffect)

    def run(seconds: float) -> tuple[float, float]:
        return loop.run_until_complete(drive_async(step, batch, seconds))

    return Variant(b.name, "guard-async", batch, run)


#: one function per path, in report order; the guard's two APIs first
PATHS: dict[str, Callable[[Backend, int], Variant | None]] = {
    "raw": variant_raw,
    "guard-sync": variant_guard_sync,
    "guard-async": variant_guard_async,
    "async": variant_async,
    "raw-async": variant_raw_async,
    "loop-per-op": variant_loop_per_op,
    "loop-per-call": variant_loop_per_call,
    "private-loop": variant_private_loop,
    "executor": variant_sqlite_executor,
    "inline": variant_sqlite_inline,
    "native": variant_native,
}


# ---------------------------------------------------------------------- raw steps per backend


def setup_sqlite(synchronous: str) -> Backend:
    tmp = Path(tempfile.mkdtemp(prefix="replaysafe-bench-guard-"))
    path = tmp / "ledger.db"  # every variant shares the file, as processes sharing a ledger do
    asyncio.run(_create_sqlite(path, synchronous))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")

    def raw_step(scope: str, batch: int) -> SyncStep:
        size = 1 << (batch - 1).bit_length()  # the ledger pads the batched read the same way
        select = _SELECT_MANY[size]

        def step() -> None:
            ops = new_ops(batch)
            params = [scope, *ops, *[ops[-1]] * (size - batch)]
            now = time.time()
            conn.execute("BEGIN IMMEDIATE")
            (last,) = conn.execute("SELECT last_token FROM replaysafe_meta").fetchone()
            assert not conn.execute(select, params).fetchall()
            conn.executemany(
                _SAVE_RECORD,
                [(scope, op, FP, "in_flight", last + i, OWNER, now + LEASE, 1, None, None, now,
                  now, None, None) for i, op in enumerate(ops, 1)],
            )  # fmt: skip
            conn.execute("UPDATE replaysafe_meta SET last_token = ?", (last + batch,))
            conn.execute("COMMIT")
            now = time.time()
            conn.execute("BEGIN IMMEDIATE")
            rows = conn.execute(select, params).fetchall()
            tokens = {row[1]: row[4] for row in rows if row[3] == "in_flight"}
            assert all(tokens[op] == last + i for i, op in enumerate(ops, 1)), rows
            conn.executemany(_COMPLETE_RECORD, [(RESULT, now, now, scope, op) for op in ops])
            conn.execute("COMMIT")

        return step

    env = {
        "sqlite_version": sqlite3.sqlite_version,
        "sqlite_synchronous": synchronous,
        "sqlite_path": str(path),
    }
    return Backend(
        "sqlite",
        partial(SQLiteLedger, path, synchronous=synchronous),
        raw_step,
        env,
        conn.close,
        cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True),
    )


async def _create_sqlite(path: Path, synchronous: str) -> None:
    ledger = SQLiteLedger(path, synchronous=synchronous)
    await ledger.get(OpKey("bench", "warm-up"))  # creates the schema
    await ledger.close()


def setup_postgres() -> Backend | str:
    try:
        import psycopg

        from replaysafe.ledger.postgres import PostgresLedger
    except ImportError as exc:
        return f"psycopg not installed ({exc})"
    schema = f"rs_bench_guard_{uuid.uuid4().hex[:8]}"

    def make() -> Ledger:
        return PostgresLedger(PG_DSN, schema=schema, min_size=1, max_size=2)

    try:
        migrator = PostgresLedger(PG_DSN, schema=schema, min_size=1, max_size=1)

        async def migrate() -> None:
            await migrator.migrate()
            await migrator.close()

        asyncio.run(migrate())
        conn = psycopg.Connection.connect(PG_DSN, autocommit=True)
    except Exception as exc:
        return f"PostgreSQL at {PG_DSN} is not usable ({type(exc).__name__}: {exc})"
    env: dict[str, Any] = {
        "psycopg_version": psycopg.__version__,
        "psycopg_impl": psycopg.pq.__impl__,
    }
    for setting in ("server_version", "synchronous_commit", "fsync"):
        row = conn.execute(f"SHOW {setting}").fetchone()
        env[f"postgres_{setting}"] = None if row is None else row[0]
    # the ledger's own composed statements (composing needs no connection)
    texts = PostgresLedger(PG_DSN, schema=schema)
    claim_one, complete_one = texts._sql("claim_one"), texts._sql("complete")
    claim_many, complete_many = texts._sql("claim_many"), texts._sql("complete_many")

    def raw_step(scope: str, batch: int) -> SyncStep:
        def one() -> None:
            (op,) = new_ops(1)
            params = {"scope": scope, "op": op, "fp": FP, "owner": OWNER, "lease": LEASE,
                      "marks": False}  # fmt: skip
            row = conn.execute(claim_one, params, binary=True).fetchone()
            assert row is not None and row[1], row  # written: acquired
            params = {"f_scope": scope, "f_op": op, "f_token": row[6], "result": RESULT}
            assert conn.execute(complete_one, params).fetchone() is not None

        def many() -> None:
            ops = new_ops(batch)
            scopes = [scope] * batch
            params: dict[str, Any] = {
                "scope": scopes, "op": ops, "fp": [FP] * batch, "owner": [OWNER] * batch,
                "lease": [LEASE] * batch, "marks": [False] * batch,
            }  # fmt: skip
            rows = conn.execute(claim_many, params, binary=True).fetchall()
            tokens = {r[0]: r[6] for r in rows if r[1]}  # ord -> token (all acquired)
            assert len(tokens) == batch, rows
            params = {
                "scope": scopes,
                "op": ops,
                "token": [tokens[i] for i in range(1, batch + 1)],
                "result": [RESULT] * batch,
            }
            rows = conn.execute(complete_many, params, binary=True).fetchall()
            assert sum(1 for r in rows if r[1]) == batch, rows

        return one if batch == 1 else many

    aconns: list[Any] = []

    async def raw_async_step(_: Ledger, scope: str, batch: int) -> AsyncStep:
        aconn = await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True)
        aconns.append(aconn)

        async def step() -> None:
            ops = new_ops(batch)
            if batch == 1:
                params: dict[str, Any] = {"scope": scope, "op": ops[0], "fp": FP, "owner": OWNER,
                                          "lease": LEASE, "marks": False}  # fmt: skip
                row = await (await aconn.execute(claim_one, params, binary=True)).fetchone()
                assert row is not None and row[1], row
                params = {"f_scope": scope, "f_op": ops[0], "f_token": row[6], "result": RESULT}
                assert await (await aconn.execute(complete_one, params)).fetchone() is not None
                return
            scopes = [scope] * batch
            params = {
                "scope": scopes, "op": ops, "fp": [FP] * batch, "owner": [OWNER] * batch,
                "lease": [LEASE] * batch, "marks": [False] * batch,
            }  # fmt: skip
            rows = await (await aconn.execute(claim_many, params, binary=True)).fetchall()
            tokens = {r[0]: r[6] for r in rows if r[1]}
            assert len(tokens) == batch, rows
            params = {"scope": scopes, "op": ops, "result": [RESULT] * batch,
                      "token": [tokens[i] for i in range(1, batch + 1)]}  # fmt: skip
            rows = await (await aconn.execute(complete_many, params, binary=True)).fetchall()
            assert sum(1 for r in rows if r[1]) == batch, rows

        return step

    def close_raw() -> None:
        conn.close()
        for aconn in aconns:
            asyncio.run(aconn.close())

    def cleanup() -> None:
        with psycopg.Connection.connect(PG_DSN, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')

    return Backend(
        "postgres", make, raw_step, env, close_raw, cleanup=cleanup, raw_async_step=raw_async_step
    )


def setup_redis() -> Backend | str:
    try:
        import redis

        from replaysafe.ledger.redis import RedisLedger
        from replaysafe.stores.redis.codec import _KEY_HEAD
        from replaysafe.stores.redis.scripts import _SCRIPTS
    except ImportError as exc:
        return f"redis not installed ({exc})"
    prefix = f"rs-bench-guard:{uuid.uuid4().hex[:8]}:"
    try:
        client = redis.Redis.from_url(REDIS_URL)
        info = client.info("server")
        config = client.config_get("append*")
        for script in _SCRIPTS.values():
            client.script_load(script.text)
    except Exception as exc:
        return f"Redis at {REDIS_URL} is not usable ({type(exc).__name__}: {exc})"
    env = {
        "redis_version": info.get("redis_version"),
        "redis_appendonly": _text(config.get(b"appendonly", config.get("appendonly"))),
        "redis_appendfsync": _text(config.get(b"appendfsync", config.get("appendfsync"))),
        "redis_py_version": redis.__version__,
        "hiredis": redis.utils.HIREDIS_AVAILABLE,
    }
    p = prefix.encode()
    token_key, log_key = p + b"token", p + b"completions"
    retention_ms = str(round(RedisLedger(REDIS_URL, prefix=prefix).retention * 1000))
    claim_sha, complete_sha = _SCRIPTS["claim"].sha, _SCRIPTS["complete"].sha
    u32 = struct.Struct("<I").pack
    # per item, as RedisLedger._claim packs it: scope, op, fingerprint, owner, lease (us), marks
    tail = u32(len(OWNER)) + OWNER.encode() + struct.pack("<d", LEASE * 1_000_000) + b"\x00"
    fp, result = u32(len(FP)) + FP.encode(), RESULT.encode()

    def claim_args(scope: str, batch: int) -> tuple[list[bytes], list[Any]]:
        """(record keys, EVALSHA arguments of the claim script) for ``batch`` fresh operations."""
        s = scope.encode()
        head, packed_scope = _KEY_HEAD % (p, len(s), s), u32(len(s)) + s
        ops = [op.encode() for op in new_ops(batch)]
        keys = [head + op for op in ops]
        blob = b"".join(packed_scope + u32(len(op)) + op + fp + tail for op in ops)
        return keys, [claim_sha, batch + 1, token_key, *keys, blob]

    def complete_args(keys: list[bytes], reply: list[Any]) -> list[Any]:
        tokens = [b"%d" % t for t in reply[1:]]  # a new operation acquired: its token
        assert len(tokens) == len(keys), reply
        blob = b"".join(u32(len(t)) + t + b"\x01" + u32(len(result)) + result for t in tokens)
        return [complete_sha, len(keys) + 1, log_key, *keys, retention_ms, blob]

    def check_done(done: list[Any]) -> None:
        assert all(type(item) is int for item in done[1:]), done  # completed: created_at

    def raw_step(scope: str, batch: int) -> SyncStep:
        def step() -> None:
            keys, args = claim_args(scope, batch)
            check_done(client.evalsha(*complete_args(keys, client.evalsha(*args))))

        return step

    async def raw_async_step(ledger: Ledger, scope: str, batch: int) -> AsyncStep:
        aclient = ledger._client  # type: ignore[attr-defined]

        async def step() -> None:
            keys, args = claim_args(scope, batch)
            check_done(await aclient.evalsha(*complete_args(keys, await aclient.evalsha(*args))))

        return step

    def cleanup() -> None:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])
        client.close()

    return Backend(
        "redis",
        partial(RedisLedger, REDIS_URL, prefix=prefix),
        raw_step,
        env,
        lambda: None,
        cleanup=cleanup,
        raw_async_step=raw_async_step,
    )


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


# ---------------------------------------------------------------------- main


def measure(
    backends: list[str], batches: list[int], paths: list[str], seconds: float, rounds: int,
    synchronous: str,
) -> dict[str, Any]:  # fmt: skip
    started = time.perf_counter()
    environment: dict[str, Any] = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "seconds_per_run": seconds,
        "rounds": rounds,
        "caller_threads": 1,
    }
    results: list[dict[str, Any]] = []
    setups: dict[str, Callable[[], Backend | str]] = {
        "sqlite": partial(setup_sqlite, synchronous),
        "postgres": setup_postgres,
        "redis": setup_redis,
    }
    for name in backends:
        got = setups[name]()
        if isinstance(got, str):
            environment[f"{name}_skipped"] = got
            print(f"{name}: skipped ({got})")
            continue
        backend = got
        backend_started = time.perf_counter()
        try:
            backend.open()
            variants = [
                v for batch in batches for p in ["raw", *paths]
                if (v := PATHS[p](backend, batch)) is not None
            ]  # fmt: skip
            for r in range(rounds):
                shift = r % len(variants)  # rotate: no variant always runs first or last
                for v in variants[shift:] + variants[:shift]:
                    t0 = time.perf_counter()
                    rate, cpu = v.run(seconds)
                    v.walls.append(time.perf_counter() - t0)
                    v.rates.append(rate)
                    v.cpu_us.append(cpu)
        finally:
            backend.close()
        environment.update({k: v for k, v in backend.environment.items() if k != "sqlite_path"})
        environment[f"{name}_wall_s"] = round(time.perf_counter() - backend_started, 1)
        raws = {v.batch: v for v in variants if v.path == "raw"}
        for v in variants:
            raw = raws[v.batch]
            ratios = [a / b for a, b in zip(v.rates, raw.rates, strict=True)]
            results.append({
                "backend": v.backend, "api": v.api, "path": v.path, "batch": v.batch,
                "ops_per_s": round(statistics.median(v.rates), 1),
                "raw_ops_per_s": round(statistics.median(raw.rates), 1),
                "ratio": round(statistics.median(ratios), 3),
                "cpu_us_per_op": round(statistics.median(v.cpu_us), 1),
                "rounds_ops_per_s": [round(x, 1) for x in v.rates],
            })  # fmt: skip
    environment["wall_s"] = round(time.perf_counter() - started, 1)
    return {"environment": environment, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="duration of each run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 10])
    parser.add_argument(
        "--backends", nargs="+", choices=["sqlite", "postgres", "redis"],
        default=["sqlite", "postgres", "redis"],
    )  # fmt: skip
    parser.add_argument(
        "--paths", nargs="+", choices=[p for p in PATHS if p != "raw"],
        default=[p for p in PATHS if p != "raw"], help="the paths beside raw (always run)",
    )  # fmt: skip
    parser.add_argument(
        "--sqlite-synchronous", default="FULL", choices=["OFF", "NORMAL", "FULL", "EXTRA"],
        help="PRAGMA synchronous of every SQLite connection (FULL: the ledger's default)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "guard.json"
    )
    args = parser.parse_args()
    report = measure(
        args.backends, args.batches, args.paths, args.seconds, args.rounds,
        args.sqlite_synchronous,
    )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for r in report["results"]:
        print(
            f"{r['backend']:9} batch {r['batch']:>3}  {r['path']:14} {r['ops_per_s']:>10.1f} ops/s"
            f"  x{r['ratio']:.3f} of raw  {r['cpu_us_per_op']:>7.1f} us CPU/op"
        )
    print(f"written to {args.out} in {report['environment']['wall_s']}s")


if __name__ == "__main__":
    main()
