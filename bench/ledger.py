"""Ledger cost: claim + complete operations per second, each backend beside a raw baseline.

For every backend, at batch 1 (``claim`` + ``complete``) and batch 100 (``claim_many`` +
``complete_many``), two variants run on new operations:

  ledger   the replaysafe ledger
  raw      the same statements issued directly with the driver, no replaysafe in the loop:
           PostgreSQL - the ledger's own INSERT … ON CONFLICT / UPDATE statements through psycopg,
                        on the ledger's own pool, with the ledger's result formats (binary for
                        the claims and complete_many) and plain Python lists as the arrays;
           Redis      - the ledger's own Lua scripts through EVALSHA, with the ledger's own KEYS
                        and packed ARGV (one claim and one complete script call per step);
           SQLite     - the ledger's own statements (BEGIN IMMEDIATE, read, upsert, token bump,
                        COMMIT) with sqlite3, synchronously on the event loop's thread;
           memory     - none (there is no driver: ``raw_ops_per_s`` is null).

Variants are interleaved in rounds (every variant once per round) so machine noise lands on all
of them alike; each result is the median of its rounds. PostgreSQL and Redis run ``--concurrency``
coroutines at once (several connections in flight, as a worker's handlers would); memory and
SQLite run one (SQLite has one writer; the raw loop is synchronous). SQLite uses
``synchronous=FULL``; PostgreSQL and Redis run with the servers' own settings (recorded in the
environment block). Redis is included only if ``replaysafe.ledger.redis.RedisLedger`` exists.

Writes bench/results/ledger.json. Timings are for this machine only; compare ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import itertools
import json
import os
import platform
import pstats
import shutil
import sqlite3
import statistics
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from replaysafe.ledger.base import Acquired, ClaimRequest, Ledger, OpKey, Record
from replaysafe.ledger.memory import MemoryLedger
from replaysafe.ledger.sqlite import _SAVE_RECORD, _SELECT_RECORD, SQLiteLedger

PG_DSN = os.environ.get("REPLAYSAFE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("REPLAYSAFE_BENCH_REDIS", "redis://127.0.0.1:6379/0")
FP = "sha256:" + "ab" * 32  # a realistic fingerprint length
OWNER = "bench-worker"
LEASE = 30.0
RESULT = '{"receipt":"r-1"}'

Step = Callable[[], Awaitable[None]]


@dataclass
class Variant:
    backend: str
    batch: int
    kind: str  # "ledger" | "raw"
    concurrency: int
    make_step: Callable[[str], Step]  # scope -> one claim+complete of `batch` operations
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    #: the server processes serving this variant (PostgreSQL backends), to measure their CPU
    server_pids: Callable[[], Awaitable[list[int]]] | None = None
    server_cpu_us: list[float] = field(default_factory=list)
    label: str = ""


async def drive(step: Step, batch: int, concurrency: int, seconds: float) -> tuple[float, float]:
    """Run ``step`` in ``concurrency`` loops for ``seconds``: (operations per second, this
    process's CPU microseconds per operation). The CPU figure is what the client side costs,
    whatever else the machine is doing."""
    done = 0
    stop_at = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await step()
            done += batch

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return done / elapsed, cpu / max(done, 1) * 1e6


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_seconds(pids: list[int]) -> float:
    """utime + stime of ``pids`` (Linux /proc; 0 where unreadable)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / _TICK


async def run_variant(v: Variant, scope: str, seconds: float) -> None:
    pids = await v.server_pids() if v.server_pids is not None else []
    before = proc_cpu_seconds(pids)
    rate, cpu = await drive(v.make_step(scope), v.batch, v.concurrency, seconds)
    v.rates.append(rate)
    v.cpu_us.append(cpu)
    if pids:
        spent = proc_cpu_seconds(pids) - before
        v.server_cpu_us.append(spent / (rate * seconds) * 1e6)


# ---------------------------------------------------------------------- the ledger (any backend)


def ledger_steps(ledger: Ledger, batch: int) -> Callable[[str], Step]:
    ids = itertools.count()

    def make(scope: str) -> Step:
        if batch == 1:

            async def one() -> None:
                out = await ledger.claim(OpKey(scope, f"op-{next(ids)}"), FP, OWNER, LEASE)
                assert isinstance(out, Acquired), out
                await ledger.complete(out.claim, RESULT)

            return one

        async def many() -> None:
            reqs = [
                ClaimRequest(OpKey(scope, f"op-{next(ids)}"), FP, OWNER, LEASE)
                for _ in range(batch)
            ]
            outs = await ledger.claim_many(reqs)
            claims = [o.claim for o in outs if isinstance(o, Acquired)]
            assert len(claims) == batch
            done = await ledger.complete_many([(c, RESULT) for c in claims])
            assert all(isinstance(d, Record) for d in done)

        return many

    return make


# ---------------------------------------------------------------------- raw PostgreSQL


def pg_raw_steps(ledger: Any, batch: int) -> Callable[[str], Step]:
    """The ledger's statements through psycopg on the ledger's own pool, with the ledger's result
    formats (binary for the claims and complete_many, text for the single complete)."""
    pool = ledger._pool
    claim_one, complete_one = ledger._sql("claim_one"), ledger._sql("complete")
    claim_many, complete_many = ledger._sql("claim_many"), ledger._sql("complete_many")
    ids = itertools.count()

    def make(scope: str) -> Step:
        if batch == 1:

            async def one() -> None:
                op = f"op-{next(ids)}"
                params = {"scope": scope, "op": op, "fp": FP, "owner": OWNER, "lease": LEASE}
                async with pool.connection() as conn:
                    cur = await conn.execute(claim_one, params, binary=True)
                    row = await cur.fetchone()
                assert row[1], row  # written: acquired
                params = {"f_scope": scope, "f_op": op, "f_token": row[6], "result": RESULT}
                async with pool.connection() as conn:
                    cur = await conn.execute(complete_one, params)
                    assert await cur.fetchone() is not None

            return one

        async def many() -> None:
            ops = [f"op-{next(ids)}" for _ in range(batch)]
            scopes = [scope] * batch
            params = {
                "scope": scopes,
                "op": ops,
                "fp": [FP] * batch,
                "owner": [OWNER] * batch,
                "lease": [LEASE] * batch,
            }
            async with pool.connection() as conn:
                cur = await conn.execute(claim_many, params, binary=True)
                rows = await cur.fetchall()
            tokens = {r[0]: r[6] for r in rows if r[1]}  # ord -> token (all acquired)
            assert len(tokens) == batch
            params = {
                "scope": scopes,
                "op": ops,
                "token": [tokens[i] for i in range(1, batch + 1)],
                "result": [RESULT] * batch,
            }
            async with pool.connection() as conn:
                cur = await conn.execute(complete_many, params, binary=True)
                assert sum(1 for r in await cur.fetchall() if r[1]) == batch

        return many

    return make


# ---------------------------------------------------------------------- raw SQLite


def sqlite_raw_steps(path: Path, batch: int) -> tuple[Callable[[str], Step], sqlite3.Connection]:
    """The SQLite ledger's statements with sqlite3 (WAL, synchronous=FULL, BEGIN IMMEDIATE)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    ids = itertools.count()

    def claim_rows(scope: str, ops: list[str]) -> list[int]:
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        (token,) = conn.execute("SELECT last_token FROM replaysafe_meta").fetchone()
        tokens = []
        for op in ops:
            assert conn.execute(_SELECT_RECORD, (scope, op)).fetchone() is None
            token += 1
            conn.execute(
                _SAVE_RECORD,
                (scope, op, FP, "in_flight", token, OWNER, now + LEASE, 1, None, None, now, now,
                 None),
            )  # fmt: skip
            tokens.append(token)
        conn.execute("UPDATE replaysafe_meta SET last_token = ?", (token,))
        conn.execute("COMMIT")
        return tokens

    def complete_rows(scope: str, ops: list[str], tokens: list[int]) -> None:
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        for op, token in zip(ops, tokens, strict=True):
            row = conn.execute(_SELECT_RECORD, (scope, op)).fetchone()
            assert row[4] == token and row[3] == "in_flight"
            conn.execute(
                _SAVE_RECORD,
                (scope, op, FP, "completed", token, OWNER, None, row[7], RESULT, None, row[10],
                 now, now),
            )  # fmt: skip
        conn.execute("COMMIT")

    def make(scope: str) -> Step:
        async def step() -> None:
            ops = [f"op-{next(ids)}" for _ in range(batch)]
            complete_rows(scope, ops, claim_rows(scope, ops))

        return step

    return make, conn


# ---------------------------------------------------------------------- raw Redis


def redis_raw_steps(ledger: Any, batch: int, scripts: dict[str, Any]) -> Callable[[str], Step]:
    """The Redis ledger's own Lua scripts, called exactly as the ledger calls them: one EVALSHA of
    the claim script and one of the complete script per step, with the same KEYS and the same
    packed ARGV (batch 1 is a batch of one, as in ``RedisLedger.claim``), on the ledger's own
    client. What is left out is replaysafe's Python: no ClaimRequest/Claim/Record objects, no
    error mapping, no chunking (a batch here never exceeds one chunk)."""
    client = ledger._client
    prefix = ledger.prefix.encode()
    token_key, completed_key = prefix + b"token", prefix + b"completions"
    retention_ms = str(round(ledger.retention * 1000))
    lease = struct.pack("<d", round(LEASE * 1_000_000))
    claim_sha, complete_sha = scripts["claim"].sha, scripts["complete"].sha
    fp, owner, result = FP.encode(), OWNER.encode(), RESULT.encode()
    u32 = struct.Struct("<I").pack
    ids = itertools.count()

    def make(scope: str) -> Step:
        s = scope.encode()

        async def step() -> None:
            ops = [f"op-{next(ids)}".encode() for _ in range(batch)]
            keys = [b"%bop:%d:%b:%b" % (prefix, len(s), s, op) for op in ops]
            blob = b"".join(
                b"%b%b%b%b%b%b%b%b%b"
                % (u32(len(s)), s, u32(len(op)), op, u32(len(fp)), fp, u32(len(owner)), owner,
                   lease)
                for op in ops
            )  # fmt: skip
            reply = await client.evalsha(claim_sha, batch + 1, token_key, *keys, blob)
            tokens = reply[1:]  # a new operation acquired: its token
            assert len(tokens) == batch and all(type(t) is int for t in tokens), reply
            blob = b"".join(
                b"%b%b\x01%b%b" % (u32(len(t)), t, u32(len(result)), result)
                for t in (b"%d" % t for t in tokens)
            )
            done = await client.evalsha(
                complete_sha, batch + 1, completed_key, *keys, retention_ms, blob
            )
            assert all(type(item) is int for item in done[1:]), done  # completed: created_at

        return step

    return make


# ---------------------------------------------------------------------- setup per backend


@dataclass
class Backend:
    name: str
    variants: list[Variant]
    environment: dict[str, Any]
    cleanup: Callable[[], Awaitable[None]]


async def setup_memory(batches: list[int], concurrency: int) -> Backend:
    ledger = MemoryLedger()
    variants = [Variant("memory", b, "ledger", 1, ledger_steps(ledger, b)) for b in batches]

    async def cleanup() -> None:
        await ledger.close()

    return Backend("memory", variants, {}, cleanup)


async def setup_sqlite(batches: list[int], concurrency: int) -> Backend:
    tmp = Path(tempfile.mkdtemp(prefix="replaysafe-bench-ledger-"))
    variants: list[Variant] = []
    ledgers: list[SQLiteLedger] = []
    raw_conns: list[sqlite3.Connection] = []
    for b in batches:
        path = tmp / f"ledger-{b}.db"  # one file per batch size; ledger and raw share it
        ledger = SQLiteLedger(path, synchronous="FULL")
        await ledger.get(OpKey("bench", "warm-up"))  # creates the schema
        ledgers.append(ledger)
        raw, conn = sqlite_raw_steps(path, b)
        raw_conns.append(conn)
        variants.append(Variant("sqlite", b, "ledger", 1, ledger_steps(ledger, b)))
        variants.append(Variant("sqlite", b, "raw", 1, raw))

    async def cleanup() -> None:
        for ledger in ledgers:
            await ledger.close()
        for conn in raw_conns:
            conn.close()
        shutil.rmtree(tmp, ignore_errors=True)

    env = {"sqlite_version": sqlite3.sqlite_version, "sqlite_synchronous": "FULL"}
    return Backend("sqlite", variants, env, cleanup)


async def setup_postgres(
    batches: list[int], concurrency: int, analyze: bool = False
) -> Backend | str:
    try:
        import psycopg
        from psycopg.conninfo import make_conninfo

        from replaysafe.ledger.postgres import PostgresLedger
    except ImportError as exc:
        return f"psycopg not installed ({exc})"
    schema = f"rs_bench_{uuid.uuid4().hex[:8]}"
    app_name = f"rs-bench-{uuid.uuid4().hex[:8]}"
    dsn = make_conninfo(PG_DSN, application_name=app_name)
    ledger = PostgresLedger(dsn, schema=schema, min_size=concurrency, max_size=concurrency)
    # analysis only: the same raw statements with commits that do not wait for the WAL flush
    async_dsn = make_conninfo(dsn, options="-c synchronous_commit=off")
    async_ledger = PostgresLedger(
        async_dsn, schema=schema, min_size=concurrency, max_size=concurrency
    )
    try:
        await ledger.migrate()
        await ledger.open()
        if analyze:
            await async_ledger.open()
        admin = await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True)
    except Exception as exc:
        await ledger.close()
        await async_ledger.close()
        return f"PostgreSQL at {ledger.dsn} is not usable ({exc})"
    env: dict[str, Any] = {"psycopg_version": psycopg.__version__}
    for setting in ("server_version", "synchronous_commit", "fsync", "wal_sync_method"):
        cur = await admin.execute(f"SHOW {setting}")
        row = await cur.fetchone()
        env[f"postgres_{setting}"] = None if row is None else row[0]

    async def pids() -> list[int]:
        cur = await admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app_name,)
        )
        return [pid for (pid,) in await cur.fetchall()]

    variants: list[Variant] = []
    for b in batches:
        variants.append(
            Variant("postgres", b, "ledger", concurrency, ledger_steps(ledger, b), server_pids=pids)
        )
        variants.append(
            Variant("postgres", b, "raw", concurrency, pg_raw_steps(ledger, b), server_pids=pids)
        )
        if analyze:
            variants.append(
                Variant(
                    "postgres",
                    b,
                    "raw",
                    concurrency,
                    pg_raw_steps(async_ledger, b),
                    server_pids=pids,
                    label="-async-commit",
                )
            )

    async def cleanup() -> None:
        await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await admin.close()
        await ledger.close()
        await async_ledger.close()

    return Backend("postgres", variants, env, cleanup)


async def setup_redis(batches: list[int], concurrency: int) -> Backend | str:
    try:
        from replaysafe.ledger import redis as redis_ledger
    except ImportError as exc:
        return f"replaysafe.ledger.redis is not available ({exc})"
    if not hasattr(redis_ledger, "RedisLedger"):
        return "replaysafe.ledger.redis has no RedisLedger yet"
    from replaysafe.stores.redis.scripts import _SCRIPTS as scripts

    prefix = f"rs-bench:{uuid.uuid4().hex[:8]}:"
    try:
        ledger = redis_ledger.RedisLedger(REDIS_URL, prefix=prefix)
        await ledger.get(OpKey("bench", "warm-up"))
        client = ledger._client
        info = await client.info("server")
        config = await client.config_get("append*")
        for script in scripts.values():
            await client.script_load(script.text)
    except Exception as exc:
        return f"Redis at {REDIS_URL} is not usable ({type(exc).__name__}: {exc})"
    env = {
        "redis_version": info.get("redis_version"),
        "redis_appendonly": _text(config.get(b"appendonly", config.get("appendonly"))),
        "redis_appendfsync": _text(config.get(b"appendfsync", config.get("appendfsync"))),
    }
    # Redis' own CPU (whatever else it serves meanwhile): its process, when it runs on this host
    redis_pids = _local_redis_pid(info.get("process_id"))

    async def pids() -> list[int]:
        return redis_pids

    variants: list[Variant] = []
    for b in batches:
        variants.append(
            Variant("redis", b, "ledger", concurrency, ledger_steps(ledger, b), server_pids=pids)
        )
        if scripts is not None:
            raw = redis_raw_steps(ledger, b, scripts)
            variants.append(Variant("redis", b, "raw", concurrency, raw, server_pids=pids))

    async def cleanup() -> None:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
        for i in range(0, len(keys), 1000):
            await client.delete(*keys[i : i + 1000])
        await ledger.close()

    return Backend("redis", variants, env, cleanup)


def _local_redis_pid(pid: Any) -> list[int]:
    """[Redis' pid] when the bench's Redis runs on this host (its /proc entry says redis)."""
    if urlsplit(REDIS_URL).hostname not in ("127.0.0.1", "localhost", "::1"):
        return []
    with contextlib.suppress(OSError, TypeError, ValueError):
        if "redis" in Path(f"/proc/{int(pid)}/comm").read_text():
            return [int(pid)]
    return []


def _swap_pairs(variants: list[Variant]) -> list[Variant]:
    """The same variants with each (ledger, raw) pair in the other order."""
    out: list[Variant] = []
    i = 0
    while i < len(variants):
        v = variants[i]
        nxt = variants[i + 1] if i + 1 < len(variants) else None
        if nxt is not None and (nxt.backend, nxt.batch) == (v.backend, v.batch):
            out += [nxt, v]
            i += 2
        else:
            out.append(v)
            i += 1
    return out


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


SETUPS = {
    "memory": setup_memory,
    "sqlite": setup_sqlite,
    "postgres": setup_postgres,
    "redis": setup_redis,
}


# ---------------------------------------------------------------------- main


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    environment: dict[str, Any] = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "rounds": args.rounds,
        "seconds_per_run": args.seconds,
        "concurrency": args.concurrency,
        "statistic": (
            "ops_per_s: median of rounds; ratio: median over rounds of ledger/raw run back to "
            "back; client_cpu_us_per_op: this process's CPU per operation (median)"
        ),
    }
    backends: list[Backend] = []
    for name in args.backends:
        setup = SETUPS[name]
        got = await (
            setup_postgres(args.batches, args.concurrency, analyze=True)
            if name == "postgres" and args.analyze
            else setup(args.batches, args.concurrency)
        )
        if isinstance(got, str):
            print(f"note: skipping {name}: {got}")
            environment[f"{name}_skipped"] = got
            continue
        backends.append(got)
        environment.update(got.environment)
    variants = [v for b in backends for v in b.variants]
    try:
        if args.profile:
            await profile(variants, args)
            return {}
        # a short warm-up per variant: connections, prepared statements, page cache
        for v in variants:
            await drive(
                v.make_step(f"warm-{v.kind}{v.label}-{v.batch}"), v.batch, v.concurrency, 0.2
            )
        for r in range(args.rounds):
            # ledger and raw of one backend and batch run back to back, in alternating order
            # (ABBA…), so slow drift of the machine's load hits both alike
            for v in variants if r % 2 == 0 else _swap_pairs(variants):
                await run_variant(v, f"{v.kind}{v.label}-{v.batch}-r{r}", args.seconds)
    finally:
        for b in backends:
            await b.cleanup()
    results = []
    cpu: dict[str, float] = {}
    server_cpu: dict[str, float] = {}
    for b in backends:
        for batch in args.batches:
            ledger = next(
                v for v in b.variants if v.batch == batch and v.kind == "ledger" and not v.label
            )
            raw = next(
                (v for v in b.variants if v.batch == batch and v.kind == "raw" and not v.label),
                None,
            )
            ops = statistics.median(ledger.rates)
            raw_ops = statistics.median(raw.rates) if raw is not None else None
            # the ratio of each round's pair, then the median: robust to load that changes
            # between rounds (a ratio of two medians would mix rounds)
            ratio = (
                None
                if raw is None
                else statistics.median(a / b for a, b in zip(ledger.rates, raw.rates, strict=True))
            )
            results.append(
                {
                    "backend": b.name,
                    "batch": batch,
                    "ops_per_s": round(ops, 1),
                    "raw_ops_per_s": None if raw_ops is None else round(raw_ops, 1),
                    "ratio": None if ratio is None else round(ratio, 3),
                }
            )
        for v in b.variants:
            name = f"{b.name}/{v.batch}/{v.kind}{v.label}"
            cpu[name] = round(statistics.median(v.cpu_us), 1)
            if v.server_cpu_us:
                server_cpu[name] = round(statistics.median(v.server_cpu_us), 1)
            if v.label:  # analysis-only variants: reported here, not in results
                environment.setdefault("analysis_ops_per_s", {})[name] = round(
                    statistics.median(v.rates), 1
                )
    environment["client_cpu_us_per_op"] = cpu
    if server_cpu:
        environment["server_cpu_us_per_op"] = server_cpu
    rounds = [
        f"  {v.backend:9} {v.batch:>4} {v.kind + v.label:6} "
        + " ".join(f"{r:>9,.0f}" for r in v.rates)
        + "   cpu us/op "
        + " ".join(f"{c:.0f}" for c in v.cpu_us)
        + ("   server cpu us/op " + " ".join(f"{c:.0f}" for c in v.server_cpu_us))
        for v in variants
    ]
    return {"environment": environment, "results": results, "_rounds": rounds}


async def profile(variants: list[Variant], args: argparse.Namespace) -> None:
    """Profile one variant (``--profile backend:batch:kind``) with cProfile."""
    backend, batch, kind = args.profile.split(":")
    v = next(v for v in variants if (v.backend, v.batch, v.kind) == (backend, int(batch), kind))
    await drive(v.make_step("prof-warm"), v.batch, v.concurrency, 0.3)
    prof = cProfile.Profile(time.process_time)  # CPU time: what this process spends
    prof.enable()
    rate, _ = await drive(v.make_step("prof"), v.batch, v.concurrency, args.seconds)
    prof.disable()
    print(f"{backend} batch {batch} {kind}: {rate:,.0f} ops/s under cProfile")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=0.8, help="duration of each run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 100])
    parser.add_argument(
        "--backends", nargs="+", default=list(SETUPS), choices=list(SETUPS), metavar="BACKEND"
    )
    parser.add_argument("--verbose", action="store_true", help="print every round's rate")
    parser.add_argument(
        "--analyze",
        action="store_true",
        help="add a PostgreSQL raw variant with synchronous_commit=off (commit cost); "
        "reported under environment.analysis_ops_per_s",
    )
    parser.add_argument("--profile", help="backend:batch:kind, e.g. postgres:1:ledger")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "ledger.json"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    report = asyncio.run(main_async(args))
    if args.profile:
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rounds = report.pop("_rounds")
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    report["_rounds"] = rounds
    print(f"{'backend':10} {'batch':>5} {'ledger ops/s':>14} {'raw ops/s':>14} {'ratio':>7}")
    for r in report["results"]:
        raw = "-" if r["raw_ops_per_s"] is None else f"{r['raw_ops_per_s']:,.0f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"{r['backend']:10} {r['batch']:>5} {r['ops_per_s']:>14,.0f} {raw:>14} {ratio:>7}")
    print(f"({time.perf_counter() - started:.0f} s; written to {args.out})")
    if args.verbose:
        for line in report.pop("_rounds", []):
            print(line)


if __name__ == "__main__":
    sys.exit(main())
