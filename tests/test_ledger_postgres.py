"""PostgresLedger passes the transactional ledger contract on a real PostgreSQL, and keeps its
promises under concurrency, killed connections, hostile identifiers and a skewed worker clock."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
import types
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql
from psycopg.conninfo import make_conninfo

from replaysafe import App, Context, Effect, Envelope, Guarantee, RetryPolicy, Worker
from replaysafe import observe as o
from replaysafe._redact import redact as redact_dsn
from replaysafe._redact import secrets_of
from replaysafe.brokers.base import RedeliveryKind
from replaysafe.brokers.memory import MemoryBroker
from replaysafe.cli import main as cli_main
from replaysafe.errors import (
    ConfigurationError,
    LeaseLost,
    LedgerDataError,
    LedgerError,
    LedgerUnavailable,
    MissingExtra,
)
from replaysafe.ledger.base import (
    Acquired,
    AlreadyDone,
    ClaimRequest,
    DurabilityLevel,
    InFlight,
    Ledger,
    OpKey,
    QuarantineRequest,
    State,
)
from replaysafe.ledger.postgres import (
    PostgresLedger,
    SyncPostgresLedger,
    assess_postgres,
)
from replaysafe.quarantine import QuarantineReason
from replaysafe.stores.postgres import schema as pg_module
from replaysafe.testing import EffectProbe, FakeClock
from replaysafe.testing.contracts import LedgerBackendContract, TransactionalLedgerContract
from replaysafe.testing.contracts.ledger import acquire, must_get
from replaysafe.testing.contracts.sync_ledger import through_sync_twin

from .waits import until

KEY = OpKey("orders", "op-1")
WAIT = 30.0  # upper bound for any wait on the shared, slow test machine


def scoped_dsn(dsn: str, schema: str, **extra: str) -> str:
    """``dsn`` whose connections resolve unqualified names in ``schema`` first (business tables
    of a test live in the test's own schema and are dropped with it)."""
    return make_conninfo(dsn, options=f"-c search_path={schema}", **extra)


async def make(dsn: str, schema: str, **kwargs: Any) -> PostgresLedger:
    ledger = PostgresLedger(scoped_dsn(dsn, schema), schema=schema, **kwargs)
    await ledger.migrate()
    return ledger


@contextlib.asynccontextmanager
async def admin(dsn: str) -> AsyncIterator[Any]:
    """A second, independent connection (autocommit) for locks, kills and inspection."""
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    try:
        yield conn
    finally:
        await conn.close()


async def scalar(conn: Any, query: Any, params: Any = None) -> Any:
    cur = await conn.execute(query, params)
    row = await cur.fetchone()
    return None if row is None else row[0]


class StatementCounter:
    """Counts statements sent by any psycopg async cursor (one execute = one round trip)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.statements: list[str] = []
        original = psycopg.AsyncCursor.execute
        counter = self

        async def execute(cur: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            text = query.decode() if isinstance(query, bytes) else str(query)
            counter.statements.append(text)
            return await original(cur, query, *args, **kwargs)

        monkeypatch.setattr(psycopg.AsyncCursor, "execute", execute)
        for name in ("executemany", "stream"):  # would be more than one round trip: must not run

            def refuse(*args: Any, _name: str = name, **kwargs: Any) -> Any:
                raise AssertionError(f"unexpected {_name}()")

            monkeypatch.setattr(psycopg.AsyncCursor, name, refuse)

    def reset(self) -> None:
        self.statements.clear()

    @property
    def count(self) -> int:
        return len(self.statements)


# ---------------------------------------------------------------------- the contract


class TestPostgresLedger(TransactionalLedgerContract):
    @pytest.fixture(autouse=True)
    def _database(self, pg_dsn: str, pg_schema: str) -> None:
        self.dsn = pg_dsn
        self.schema = pg_schema

    async def make_ledger(self, clock: FakeClock) -> Ledger:
        # leases are judged by the database clock: the FakeClock is not consulted
        return await make(self.dsn, self.schema, max_size=4)

    async def advance(self, clock: FakeClock, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def insert_sql(self) -> str:
        return "INSERT INTO rs_contract_effects (op, note) VALUES (%s, %s)"


class TestPostgresSyncTwin(LedgerBackendContract):
    """The whole ledger contract with the claim path on ``PostgresLedger.sync()``: the twin and
    the async ledger share one schema (issue 14). The transactional part stays with the async
    ledger (``through_sync_twin`` is no TransactionalLedger)."""

    @pytest.fixture(autouse=True)
    def _database(self, pg_dsn: str, pg_schema: str) -> None:
        self.dsn = pg_dsn
        self.schema = pg_schema

    async def make_ledger(self, clock: FakeClock) -> Ledger:
        return through_sync_twin(await make(self.dsn, self.schema, max_size=4))

    async def advance(self, clock: FakeClock, seconds: float) -> None:
        await asyncio.sleep(seconds)


# ---------------------------------------------------------------------- schema and migrations


async def test_migrate_creates_everything_once_then_has_nothing_to_do(
    pg_dsn: str, pg_schema: str
) -> None:
    ledger = PostgresLedger(pg_dsn, schema=pg_schema, table_prefix="led_")
    try:
        first = await ledger.migrate()
        assert (first.from_version, first.to_version) == (0, pg_module.SCHEMA_VERSION)
        assert f"schema {pg_schema}" in first.created
        for table in ("operations", "quarantine", "token_seq", "schema_version"):
            assert f"{pg_schema}.led_{table}" in first.created
        assert f"{pg_schema}.led_operations_purge" in first.created
        assert f"{pg_schema}.led_operations_hot" in first.created
        # columns of a table created by this run are part of the table, not listed apart
        assert not [name for name in first.created if name.startswith("column ")]
        assert "created" in first.describe()
        again = await ledger.migrate()
        assert (again.from_version, again.created, again.changed) == (
            pg_module.SCHEMA_VERSION,
            (),
            False,
        )
        assert "nothing to do" in again.describe()
        assert isinstance(await ledger.claim(KEY, "fp", "w1", 5.0), Acquired)  # usable
    finally:
        await ledger.close()
    async with admin(pg_dsn) as conn:
        version = await scalar(
            conn,
            sql.SQL("SELECT version FROM {}").format(
                sql.Identifier(pg_schema, "led_schema_version")
            ),
        )
        # the partial index that keeps purge cheap, with its predicate
        indexdef = await scalar(
            conn,
            "SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND indexname = %s",
            (pg_schema, "led_operations_purge"),
        )
        seq_cache = await scalar(
            conn,
            "SELECT cache_size FROM pg_sequences WHERE schemaname = %s AND sequencename = %s",
            (pg_schema, "led_token_seq"),
        )
    assert version == pg_module.SCHEMA_VERSION
    assert "(completed_at)" in indexdef and "WHERE (state = 'completed'::text)" in indexdef
    assert seq_cache == 1  # a cached range per session would issue tokens out of order


async def test_concurrent_migrations_take_turns(pg_dsn: str, pg_schema: str) -> None:
    ledgers = [PostgresLedger(pg_dsn, schema=pg_schema, max_size=1) for _ in range(4)]
    try:
        reports = await asyncio.wait_for(
            asyncio.gather(*(ledger.migrate() for ledger in ledgers)), WAIT
        )
    finally:
        for ledger in ledgers:
            await ledger.close()
    created = [r for r in reports if r.created]
    assert len(created) == 1, [r.describe() for r in reports]  # the others found it done
    assert all(r.to_version == pg_module.SCHEMA_VERSION for r in reports)


async def test_cli_migrate_from_two_processes_at_once(pg_dsn: str, pg_schema: str) -> None:
    from .conftest import subprocess_env

    args = [sys.executable, "-m", "replaysafe.cli", "ledger", "migrate", "--schema", pg_schema]
    procs = [
        await asyncio.create_subprocess_exec(
            *args,
            env=subprocess_env({"PATH": "/usr/bin:/bin"}, REPLAYSAFE_PG_DSN=pg_dsn),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outputs = [await asyncio.wait_for(p.communicate(), 60) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, (out, err)
    texts = [out.decode() for out, _ in outputs]
    assert sum(f"version 0 -> {pg_module.SCHEMA_VERSION}" in t for t in texts) == 1, texts
    assert sum("nothing to do" in t for t in texts) == 1, texts


def test_cli_migrate_prints_what_it_did_and_refuses_bad_names(pg_dsn: str, pg_schema: str) -> None:
    runner = CliRunner()
    first = runner.invoke(cli_main, ["ledger", "migrate", "--dsn", pg_dsn, "--schema", pg_schema])
    assert first.exit_code == 0, first.output
    assert f"created {pg_schema}.rs_operations" in first.output
    second = runner.invoke(cli_main, ["ledger", "migrate", "--dsn", pg_dsn, "--schema", pg_schema])
    assert second.exit_code == 0, second.output
    assert "nothing to do" in second.output
    bad = runner.invoke(cli_main, ["ledger", "migrate", "--dsn", pg_dsn, "--schema", "x; DROP"])
    assert bad.exit_code == 1
    assert "not a valid ledger schema name" in bad.output


async def test_an_unmigrated_schema_is_refused_with_the_command_to_run(
    pg_dsn: str, pg_schema: str
) -> None:
    ledger = PostgresLedger(pg_dsn, schema=pg_schema)
    try:
        with pytest.raises(ConfigurationError, match="replaysafe ledger migrate"):
            await ledger.claim(KEY, "fp", "w1", 5.0)
    finally:
        await ledger.close()
    async with PostgresLedger(pg_dsn, schema=pg_schema, auto_migrate=True) as ledger:
        assert isinstance(await ledger.claim(KEY, "fp", "w1", 5.0), Acquired)


async def test_a_newer_schema_is_refused(pg_dsn: str, pg_schema: str) -> None:
    ledger = await make(pg_dsn, pg_schema)
    await ledger.close()
    async with admin(pg_dsn) as conn:
        await conn.execute(
            sql.SQL("UPDATE {} SET version = 99").format(
                sql.Identifier(pg_schema, "rs_schema_version")
            )
        )
    ledger = PostgresLedger(pg_dsn, schema=pg_schema)
    try:
        with pytest.raises(ConfigurationError, match="newer"):
            await ledger.open()
        with pytest.raises(ConfigurationError, match="newer"):
            await ledger.migrate()
    finally:
        await ledger.close()


HOSTILE_SCHEMAS = [
    "x; DROP TABLE t",
    'x"; DROP TABLE t; --',
    "x'y",
    "a.b",
    "a b",
    "Orders",
    "",
    "1abc",
    "pg_catalog",
    "a" * 64,
    "café",
    "x\x00y",
]


@pytest.mark.parametrize("schema", HOSTILE_SCHEMAS)
def test_hostile_schema_names_are_refused_before_any_sql(schema: str) -> None:
    # an unreachable DSN: the refusal must come before any connection
    with pytest.raises(ConfigurationError, match="schema"):
        PostgresLedger("postgresql://nobody@127.0.0.1:1/none", schema=schema)


@pytest.mark.parametrize("prefix", ["rs-", 'p"', "p'", "p;", "a" * 41, "", "X_", "a.b"])
def test_hostile_table_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ConfigurationError, match="table_prefix"):
        PostgresLedger("postgresql://nobody@127.0.0.1:1/none", table_prefix=prefix)


async def test_longest_valid_names_work(pg_dsn: str, pg_schema: str) -> None:
    prefix = "p" * 40  # + "schema_version" = 54 characters, inside PostgreSQL's 63
    ledger = await make(pg_dsn, pg_schema, table_prefix=prefix)
    try:
        claim = await acquire(ledger, KEY, 5.0)
        assert (await ledger.complete(claim)).state is State.COMPLETED
    finally:
        await ledger.close()


async def test_keys_and_payloads_are_bound_not_interpolated(pg_dsn: str, pg_schema: str) -> None:
    ledger = await make(pg_dsn, pg_schema)
    nasty = "x'); DROP TABLE rs_operations; --\"{}%s%(op)s"
    try:
        key = OpKey(nasty, nasty)
        claim = await acquire(ledger, key, 5.0, owner=nasty, fingerprint=nasty)
        done = await ledger.complete(claim, nasty)
        assert (done.key, done.fingerprint, done.owner, done.result) == (key, nasty, nasty, nasty)
        assert await ledger.get(key) == done
    finally:
        await ledger.close()


# ---------------------------------------------------------------------- concurrency


async def test_fifty_concurrent_claims_of_one_operation_acquire_once(
    pg_dsn: str, pg_schema: str
) -> None:
    ledger = await make(pg_dsn, pg_schema, min_size=10, max_size=10)
    try:
        await ledger.open()
        for round_ in range(5):
            key = OpKey("race", f"op-{round_}")
            outcomes = await asyncio.wait_for(
                asyncio.gather(*(ledger.claim(key, "fp", f"w{i}", 30.0) for i in range(50))),
                WAIT,
            )
            won = [x for x in outcomes if isinstance(x, Acquired)]
            assert len(won) == 1, [type(x).__name__ for x in outcomes]
            assert all(isinstance(x, InFlight) for x in outcomes if x is not won[0])
            record = await must_get(ledger, key)
            assert (record.token, record.attempts, record.owner) == (
                won[0].claim.token,
                1,
                won[0].claim.owner,
            )
    finally:
        await ledger.close()


async def test_fifty_concurrent_takeovers_of_an_expired_lease_acquire_once(
    pg_dsn: str, pg_schema: str
) -> None:
    ledger = await make(pg_dsn, pg_schema, min_size=10, max_size=10)
    try:
        first = await acquire(ledger, KEY, 0.05, fingerprint="fp")
        await asyncio.sleep(0.3)
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(ledger.claim(KEY, "fp", f"w{i}", 30.0) for i in range(50))), WAIT
        )
        won = [x for x in outcomes if isinstance(x, Acquired)]
        assert len(won) == 1, [type(x).__name__ for x in outcomes]
        assert (won[0].claim.recovered, won[0].claim.attempt) == (True, 2)
        assert won[0].claim.token > first.token
        assert (await must_get(ledger, KEY)).attempts == 2
    finally:
        await ledger.close()


async def test_batches_are_one_statement_each(
    pg_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = await make(pg_dsn, pg_schema)
    try:
        await ledger.open()
        counter = StatementCounter(monkeypatch)
        requests = [ClaimRequest(OpKey("batch", f"op-{i}"), "fp", "w1", 30.0) for i in range(100)]
        outcomes = await ledger.claim_many(requests)
        assert counter.count == 1, counter.statements
        assert all(isinstance(x, Acquired) for x in outcomes)
        tokens = [x.claim.token for x in outcomes if isinstance(x, Acquired)]
        assert tokens == sorted(tokens) and len(set(tokens)) == 100

        counter.reset()
        again = await ledger.claim_many(requests)  # every one InFlight: still one statement
        assert counter.count == 1
        assert all(isinstance(x, InFlight) for x in again)

        counter.reset()
        claims = [x.claim for x in outcomes if isinstance(x, Acquired)]
        stale = claims[7]
        items = [(c, f"r{i}") for i, c in enumerate(claims)] + [(stale, "again")]
        done = await ledger.complete_many(items)
        assert counter.count == 1, counter.statements
        assert [type(x).__name__ for x in done] == ["Record"] * 100 + ["LeaseLost"]
        assert "record is completed" in str(done[-1])  # the LeaseLost says why

        counter.reset()
        assert isinstance(await ledger.claim(OpKey("batch", "op-1"), "fp", "w2", 5.0), AlreadyDone)
        claim = await acquire(ledger, OpKey("single", "x"), 5.0)
        await ledger.complete(claim)
        assert counter.count == 3  # claim, claim, complete: one round trip each
    finally:
        await ledger.close()


# The planner may pick any join order or scan; results must not depend on it. These force plans
# that return rows in an order where a missing ORDER BY / DISTINCT ON would show.
FORCE_HASH_JOIN = "-c enable_nestloop=off -c enable_mergejoin=off"
FORCE_SEQ_SCAN = "-c enable_indexscan=off -c enable_bitmapscan=off -c enable_indexonlyscan=off"


@pytest.mark.parametrize("planner", ["", FORCE_HASH_JOIN])
async def test_complete_many_first_copy_of_a_claim_wins_whatever_the_plan(
    pg_dsn: str, pg_schema: str, planner: str
) -> None:
    dsn = make_conninfo(pg_dsn, options=f"-c search_path={pg_schema} {planner}")
    ledger = PostgresLedger(dsn, schema=pg_schema, auto_migrate=True)
    try:
        outs = await ledger.claim_many(
            [ClaimRequest(OpKey("dup", f"op-{i}"), "fp", "w", 30.0) for i in range(3)]
        )
        claims = [o.claim for o in outs if isinstance(o, Acquired)]
        items = [(claims[0], "first"), (claims[1], "b"), (claims[2], "c"), (claims[0], "second")]
        done = await ledger.complete_many(items)
        assert [type(d).__name__ for d in done] == ["Record", "Record", "Record", "LeaseLost"]
        assert (await must_get(ledger, claims[0].key)).result == "first"
    finally:
        await ledger.close()


# ---------------------------------------------------------------------- killed connections


async def blocked_by(conn: Any) -> int:
    """The pid of the backend waiting on a lock held by ``conn`` (bounded wait)."""
    my_pid = await scalar(conn, "SELECT pg_backend_pid()")

    async def find() -> int | None:
        pid: int | None = await scalar(
            conn,
            "SELECT pid FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid)) LIMIT 1",
            (my_pid,),
        )
        return pid

    pid: int = await until(
        find, seconds=WAIT, what="a ledger statement to block on the admin's lock", interval=0.05
    )
    return pid


@pytest.mark.parametrize("call", ["claim", "complete", "complete_many", "complete_in"])
async def test_a_connection_killed_mid_statement_is_ledger_unavailable_and_a_retry_works(
    pg_dsn: str, pg_schema: str, call: str
) -> None:
    ledger = await make(pg_dsn, pg_schema, max_size=3)
    ops = sql.Identifier(pg_schema, "rs_operations")
    try:
        claim = await acquire(ledger, KEY, 30.0)
        if call == "claim":
            await ledger.release(claim, "give it back")
        async with ledger.transaction() as tx:
            await tx.execute("CREATE TABLE effects (op text NOT NULL)")
        async with admin(pg_dsn) as conn:
            # hold the row lock so the ledger's statement blocks inside the server
            await conn.execute("BEGIN")
            await conn.execute(
                sql.SQL(
                    "SELECT 1 FROM {} WHERE scope = %s AND operation_id = %s FOR UPDATE"
                ).format(ops),
                (KEY.scope, KEY.operation_id),
            )

            async def in_transaction() -> None:
                async with ledger.transaction() as tx:
                    await tx.execute("INSERT INTO effects (op) VALUES (%s)", (KEY.operation_id,))
                    await ledger.complete_in(tx, claim, "r")

            work = {
                "claim": lambda: ledger.claim(KEY, "fp-a", "w2", 30.0),
                "complete": lambda: ledger.complete(claim, "r"),
                "complete_many": lambda: ledger.complete_many([(claim, "r")]),
                "complete_in": in_transaction,
            }[call]
            task = asyncio.create_task(work())
            victim = await blocked_by(conn)
            assert await scalar(conn, "SELECT pg_terminate_backend(%s)", (victim,))
            with pytest.raises(LedgerUnavailable, match="connection") as raised:
                await asyncio.wait_for(task, WAIT)
            assert "retry" in str(raised.value)
            await conn.execute("ROLLBACK")
        # the killed statement never committed: the record is as it was
        record = await must_get(ledger, KEY)
        expected = State.RELEASED if call == "claim" else State.IN_FLIGHT
        assert record.state is expected
        async with ledger.transaction() as tx:
            assert await tx.fetchall("SELECT op FROM effects") == []
        # the pool replaced the dead connection: a retry succeeds
        if call == "claim":
            again = await ledger.claim(KEY, "fp-a", "w2", 30.0)
            assert isinstance(again, Acquired), again
            assert again.claim.attempt == 2
        else:
            assert (await ledger.complete(claim, "r")).state is State.COMPLETED
    finally:
        await ledger.close()


async def test_after_every_connection_died_one_failed_call_is_enough(
    pg_dsn: str, pg_schema: str
) -> None:
    app_name = f"rs-dead-{uuid.uuid4().hex[:8]}"
    ledger = PostgresLedger(
        scoped_dsn(pg_dsn, pg_schema, application_name=app_name),
        schema=pg_schema,
        min_size=4,
        max_size=4,
        auto_migrate=True,
    )
    try:
        await ledger.open()
        claim = await acquire(ledger, KEY, 30.0)
        async with admin(pg_dsn) as conn:  # a server restart, as the idle pool sees it
            cur = await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (app_name,),
            )
            assert sum(1 for (ok,) in await cur.fetchall() if ok) == 4
        with pytest.raises(LedgerUnavailable):
            await ledger.get(KEY)  # meets a dead connection: the pool is checked right away
        # … so the next calls get live connections, not one failure per dead connection
        assert (await must_get(ledger, KEY)).token == claim.token
        assert (await ledger.complete(claim, "r")).state is State.COMPLETED
    finally:
        await ledger.close()


@pytest.mark.parametrize("effect", ["transactional", "keyed"])
async def test_runtime_loses_and_duplicates_nothing_while_connections_are_killed(
    pg_dsn: str, pg_schema: str, effect: str
) -> None:
    n = 40
    app_name = f"rs-kill-{uuid.uuid4().hex[:8]}"
    ledger = PostgresLedger(
        scoped_dsn(pg_dsn, pg_schema, application_name=app_name),
        schema=pg_schema,
        max_size=6,
        auto_migrate=True,
    )
    broker = MemoryBroker()  # the system clock: leases are real, and short
    broker.declare("orders", mode=RedeliveryKind.NACK)
    app = App("t", broker=broker, ledger=ledger)
    probe = EffectProbe(honour_keys=True)
    retry = RetryPolicy(max_attempts=100, base_delay=0.05, max_delay=0.2)
    async with ledger.transaction() as tx:
        await tx.execute("CREATE TABLE effects (op text NOT NULL)")

    if effect == "transactional":

        @app.handler(
            "orders",
            guarantee=Guarantee.EFFECTIVELY_ONCE,
            effect=Effect.transactional(),
            lease=2.0,
            concurrency=4,
            retry=retry,
        )
        async def charge(ctx: Context) -> None:
            assert ctx.tx is not None
            await ctx.tx.execute("INSERT INTO effects (op) VALUES (%s)", (ctx.operation_id,))
            await asyncio.sleep(0.02)

    else:

        @app.handler(
            "orders",
            guarantee=Guarantee.EFFECTIVELY_ONCE,
            effect=Effect.keyed("payments"),
            lease=2.0,
            concurrency=4,
            retry=retry,
        )
        async def charge(ctx: Context) -> None:
            await probe.apply(ctx.payload["order"], ctx.payload["amount"], ctx.idempotency_key)
            await asyncio.sleep(0.02)

    now = time.time()
    await broker.publish(
        "orders",
        [
            Envelope.of(
                f"charge:order-{i}", {"order": f"order-{i}", "amount": 10}
            ).with_published_at(now)
            for i in range(n)
        ],
    )
    worker = Worker(app, owner="w")
    running = asyncio.create_task(worker.run(drain_timeout=5))
    kills = 0
    async with admin(pg_dsn) as conn:

        async def completed() -> int:
            count: int = await scalar(
                conn,
                sql.SQL("SELECT count(*) FROM {} WHERE state = 'completed'").format(
                    sql.Identifier(pg_schema, "rs_operations")
                ),
            )
            return count

        try:
            # kill every connection of the ledger's pool, repeatedly, while work remains
            for _ in range(20):
                if await completed() >= n:
                    break
                cur = await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s",
                    (app_name,),
                )
                kills += sum(1 for (ok,) in await cur.fetchall() if ok)
                await asyncio.sleep(0.05)
            group = next(iter(app.handlers.values())).group
            await until(
                lambda: broker.depth("orders", group) == 0, seconds=90, what="the broker to drain"
            )
            assert await completed() == n
            if effect == "transactional":
                cur = await conn.execute(
                    sql.SQL("SELECT op, count(*) FROM {} GROUP BY op").format(
                        sql.Identifier(pg_schema, "effects")
                    )
                )
                rows = dict(await cur.fetchall())
        finally:
            worker.stop()
            await asyncio.wait_for(running, WAIT)
            await ledger.close()
    assert kills > 0, "no connection was killed: the fault never hit"
    surfaced = worker.stats.total(o.LEDGER_UNAVAILABLE) + worker.stats.total(o.HANDLER_ERRORS)
    assert surfaced > 0, "the kills never reached a ledger call: the case proves nothing"
    subjects = {f"order-{i}" for i in range(n)}
    if effect == "transactional":
        assert rows == {f"charge:order-{i}": 1 for i in range(n)}  # none lost, none twice
    else:
        assert probe.missing(subjects) == set()
        assert probe.duplicates() == 0
        assert probe.per_subject() == dict.fromkeys(subjects, 1)


async def test_a_rolled_back_transactional_handler_leaves_the_operation_claimable(
    pg_dsn: str, pg_schema: str
) -> None:
    ledger = await make(pg_dsn, pg_schema, max_size=4)
    broker = MemoryBroker()
    broker.declare("orders", mode=RedeliveryKind.NACK)
    app = App("t", broker=broker, ledger=ledger)
    seen: list[tuple[int, int, State | None]] = []
    async with ledger.transaction() as tx:
        await tx.execute("CREATE TABLE effects (op text NOT NULL)")

    @app.handler(
        "orders",
        guarantee=Guarantee.EFFECTIVELY_ONCE,
        effect=Effect.transactional(),
        lease=30.0,  # a rolled-back attempt that did not release would block the retry for 30 s
        retry=RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05),
    )
    async def charge(ctx: Context) -> None:
        assert ctx.tx is not None
        rows = await ctx.tx.fetchall("SELECT count(*) FROM effects")
        record = await ledger.get(OpKey("charge", ctx.operation_id))
        seen.append((ctx.attempt, rows[0][0], None if record is None else record.state))
        await ctx.tx.execute("INSERT INTO effects (op) VALUES (%s)", (ctx.operation_id,))
        if ctx.attempt == 1:
            raise RuntimeError("payment gateway said no")

    await broker.publish("orders", [Envelope.of("charge:order-1", {"order": 1})])
    worker = Worker(app)
    running = asyncio.create_task(worker.run(drain_timeout=5))
    try:
        await until(
            lambda: len(seen) >= 2 and broker.depth("orders", "t.charge") == 0,
            seconds=WAIT,
            what="retry",
            interval=0.05,
        )
    finally:
        worker.stop()
        await asyncio.wait_for(running, WAIT)
    try:
        # the retry found no business row from the failed attempt, and claimed at once
        assert seen == [(1, 0, State.IN_FLIGHT), (2, 0, State.IN_FLIGHT)]
        record = await must_get(ledger, OpKey("charge", "charge:order-1"))
        assert (record.state, record.attempts) == (State.COMPLETED, 2)
        async with ledger.transaction() as tx:
            assert await tx.fetchall("SELECT op FROM effects") == [("charge:order-1",)]
    finally:
        await ledger.close()


# ---------------------------------------------------------------------- purge


async def test_purge_walks_the_partial_index_in_bounded_batches(
    pg_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = await make(pg_dsn, pg_schema)
    ops = sql.Identifier(pg_schema, "rs_operations")
    seq = sql.Literal(f'"{pg_schema}"."rs_token_seq"')
    t0 = time.time()
    try:
        async with admin(pg_dsn) as conn:
            # 20k rows: every even one completed g seconds before t0, every odd one in flight
            await conn.execute(
                sql.SQL(
                    """INSERT INTO {ops} (scope, operation_id, fingerprint, state, token, owner,
                        lease_until, attempts, created_at, updated_at, completed_at)
                    SELECT 'bulk', 'op-' || g, 'fp',
                           CASE WHEN g %% 2 = 0 THEN 'completed' ELSE 'in_flight' END,
                           nextval({seq}), 'w',
                           CASE WHEN g %% 2 = 0 THEN NULL ELSE now() + interval '1 hour' END,
                           1, now() - interval '1 day', now(),
                           CASE WHEN g %% 2 = 0
                                THEN to_timestamp(%(t0)s) - g * interval '1 second' END
                    FROM generate_series(1, 20000) AS g"""
                ).format(ops=ops, seq=seq),
                {"t0": t0},
            )
            await conn.execute(sql.SQL("ANALYZE {}").format(ops))
            # completed over 5000.5 s before t0: even g > 5000, however long the insert took
            cutoff = t0 - 5000.5
            cur = await conn.execute(
                b"EXPLAIN " + ledger._sql("purge"), {"before": cutoff, "n": 1000}
            )
            plan = "\n".join(r[0] for r in await cur.fetchall())
        assert "rs_operations_purge" in plan, plan
        assert "Seq Scan" not in plan, plan

        await ledger.open()
        counter = StatementCounter(monkeypatch)
        assert await ledger.purge(cutoff, limit=2500) == 2500
        assert counter.count == 3  # 1000 + 1000 + 500: bounded statements, never one huge one
        async with admin(pg_dsn) as conn:
            cur = await conn.execute(
                sql.SQL(
                    "SELECT state, count(*), max(substr(operation_id, 4)::int) FROM {} "
                    "GROUP BY state"
                ).format(ops)
            )
            by_state = {state: (count, top) for state, count, top in await cur.fetchall()}
        # oldest first: the 2500 oldest completed (g = 20000 … 15002) are gone
        assert by_state["completed"] == (7500, 15000)
        assert by_state["in_flight"][0] == 10000
        assert await ledger.purge(cutoff, limit=100_000) == 5000
        assert await ledger.purge(cutoff) == 0
    finally:
        await ledger.close()


async def test_purge_deletes_the_oldest_first_whatever_the_plan(
    pg_dsn: str, pg_schema: str
) -> None:
    dsn = make_conninfo(pg_dsn, options=FORCE_SEQ_SCAN)
    ledger = PostgresLedger(dsn, schema=pg_schema, auto_migrate=True)
    try:
        await ledger.open()
        async with admin(pg_dsn) as conn:  # physical order: newest first
            await conn.execute(
                sql.SQL(
                    """INSERT INTO {ops} (scope, operation_id, fingerprint, state, token, owner,
                        attempts, created_at, updated_at, completed_at)
                    SELECT 'old', 'op-' || g, 'fp', 'completed', g, 'w', 1, now(), now(),
                           now() - g * interval '1 minute'
                    FROM generate_series(1, 50) AS g"""
                ).format(ops=sql.Identifier(pg_schema, "rs_operations"))
            )
        assert await ledger.purge(time.time(), limit=10) == 10
        for g in range(41, 51):  # the ten oldest are gone
            assert await ledger.get(OpKey("old", f"op-{g}")) is None
        assert await ledger.get(OpKey("old", "op-40")) is not None
    finally:
        await ledger.close()


# ---------------------------------------------------------------------- upgrade, inspect, redrive

POISON = OpKey("orders", "poison")
V1_ENTRY_ID = "e" * 32


async def cli_migrate(pg_dsn: str, schema: str) -> str:
    """``replaysafe ledger migrate`` in a child process (the real command, the real exit code)."""
    from .conftest import subprocess_env

    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "replaysafe.cli", "ledger", "migrate", "--schema", schema],
        env=subprocess_env({"PATH": "/usr/bin:/bin"}, REPLAYSAFE_PG_DSN=pg_dsn),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, (out, err)
    return out.decode()


async def test_migrate_upgrades_a_version_1_schema_in_place_keeping_its_rows(
    pg_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The previous release: schema version 1 made by exactly its migration (migration 1 is
    # never edited; changes go into new steps), holding the rows version 1's calls wrote
    # (written here column for column: this release's statements need the newer columns).
    with monkeypatch.context() as pinned:
        pinned.setattr(pg_module, "SCHEMA_VERSION", 1)
        pinned.setattr(pg_module, "_MIGRATIONS", {1: pg_module._MIGRATIONS[1]})
        old = await make(pg_dsn, pg_schema)
        await old.close()
    ops = sql.Identifier(pg_schema, "rs_operations")
    q = sql.Identifier(pg_schema, "rs_quarantine")
    seq = sql.Literal(f'"{pg_schema}"."rs_token_seq"')
    async with admin(pg_dsn) as conn:
        # a completed operation; one claimed 3 times (2 releases); one whose holder died in
        # flight (its lease ran out): version 1 kept no record of whether its effect started
        await conn.execute(
            sql.SQL(
                """INSERT INTO {ops} (scope, operation_id, fingerprint, state, token, owner,
                    lease_until, attempts, recovered, result, last_error, created_at,
                    updated_at, completed_at)
                VALUES ('orders', 'done', 'fp-a', 'completed', nextval({seq}), 'w1', NULL, 1,
                        false, 'r1', NULL, now(), now(), now()),
                       ('orders', 'poison', 'fp-a', 'in_flight', nextval({seq}), 'w1',
                        now() + interval '30 seconds', 3, false, NULL, 'transient', now(),
                        now(), NULL),
                       ('orders', 'stuck', 'fp-a', 'in_flight', nextval({seq}), 'w1',
                        now() - interval '1 second', 1, false, NULL, NULL, now(), now(), NULL)"""
            ).format(ops=ops, seq=seq)
        )
        poisoned_token = await scalar(
            conn,
            sql.SQL("SELECT token FROM {} WHERE operation_id = 'poison'").format(ops),
        )
        columns = await conn.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = 'rs_quarantine'",
            (pg_schema,),
        )
        assert "published_at" not in {r[0] for r in await columns.fetchall()}
        assert (
            await scalar(conn, "SELECT to_regclass(%s)", (f"{pg_schema}.rs_operations_hot",))
            is None
        )
        # what version 1's quarantine(claim=...) wrote, column for column
        await conn.execute(
            sql.SQL(
                "UPDATE {} SET state = 'quarantined', lease_until = NULL, last_error = 'boom' "
                "WHERE scope = 'orders' AND operation_id = 'poison'"
            ).format(ops)
        )
        await conn.execute(
            sql.SQL(
                """INSERT INTO {} (id, scope, reason, operation_id, fingerprint, risk, attempts,
                    first_detail, last_detail, message, content_type, created_at, updated_at, seen)
                VALUES (%s, 'orders', 'max_attempts', 'poison', 'fp-a', 'released_cleanly', 3,
                        'boom', 'boom', %s, 'application/json', now(), now(), 1)"""
            ).format(q),
            (V1_ENTRY_ID, b"x" * 100),
        )

    # this release refuses the old schema and names the command that upgrades it
    ledger = PostgresLedger(scoped_dsn(pg_dsn, pg_schema), schema=pg_schema)
    try:
        with pytest.raises(
            ConfigurationError, match=r"version 1, older.*replaysafe ledger migrate"
        ):
            await ledger.open()
    finally:
        await ledger.close()

    text = await cli_migrate(pg_dsn, pg_schema)
    assert f"upgraded ledger schema '{pg_schema}'" in text, text
    assert f"version 1 -> {pg_module.SCHEMA_VERSION}" in text, text
    assert f"created {pg_schema}.rs_operations_hot" in text, text
    for column in ("published_at", "message_size", "redriven_at", "redrives"):
        assert f"created column {pg_schema}.rs_quarantine.{column}" in text, text
    for column in ("unstarted_attempt", "previous_started"):
        assert f"created column {pg_schema}.rs_operations.{column}" in text, text

    ledger = PostgresLedger(scoped_dsn(pg_dsn, pg_schema), schema=pg_schema)
    try:
        await ledger.open()
        done = await ledger.get(OpKey("orders", "done"))
        assert done is not None
        assert (done.state, done.result, done.attempts, done.unstarted_attempt) == (
            State.COMPLETED, "r1", 1, None
        )  # fmt: skip
        # a row from before version 4 cannot say its effect never started: conservative
        [stuck] = await ledger.claim_many(
            [ClaimRequest(OpKey("orders", "stuck"), "fp-a", "w2", 30.0, marks_start=True)]
        )
        assert isinstance(stuck, Acquired)
        assert (stuck.claim.recovered, stuck.claim.previous_started) == (True, True)
        await ledger.complete(stuck.claim)
        entry = await ledger.quarantine_entry(V1_ENTRY_ID)
        assert entry is not None
        assert (entry.reason, entry.operation_id, entry.attempts, entry.seen) == (
            QuarantineReason.MAX_ATTEMPTS,
            "poison",
            3,
            1,
        )
        # the original size of an old entry is unknown: the stored copy's length stands in
        assert (entry.message, entry.message_size, entry.truncated) == (b"x" * 100, 100, False)
        assert (entry.published_at, entry.redriven_at, entry.redrives) == (None, None, 0)
        summary = await ledger.summary()
        assert summary.by_state == {"completed": 2, "quarantined": 1}
        assert summary.hot_operations == [(POISON, 3), (OpKey("orders", "stuck"), 2)]
        assert (await ledger.redrive(V1_ENTRY_ID)).redrives == 1
        again = await acquire(ledger, POISON, 30.0)
        assert (again.attempt, again.recovered) == (1, False)
        assert again.token > poisoned_token
        fresh = await ledger.quarantine(
            QuarantineRequest("orders", QuarantineReason.MALFORMED_PAYLOAD, message=b"y" * 10,
                              published_at=1_789_999_000.25)
        )  # fmt: skip
        assert (fresh.message_size, fresh.published_at) == (10, 1_789_999_000.25)
    finally:
        await ledger.close()
    assert "nothing to do" in await cli_migrate(pg_dsn, pg_schema)


async def test_summary_is_one_statement_on_the_hot_index(
    pg_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = await make(pg_dsn, pg_schema)
    ops = sql.Identifier(pg_schema, "rs_operations")
    q = sql.Identifier(pg_schema, "rs_quarantine")
    seq = sql.Literal(f'"{pg_schema}"."rs_token_seq"')
    try:
        async with admin(pg_dsn) as conn:
            # 20k completed operations, one in 100 retried (3 to 11 attempts); 1000 of them
            # completed ten minutes ago, the rest two hours ago
            await conn.execute(
                sql.SQL(
                    """INSERT INTO {ops} (scope, operation_id, fingerprint, state, token, owner,
                        attempts, created_at, updated_at, completed_at)
                    SELECT 'bulk', 'op-' || g, 'fp', 'completed', nextval({seq}), 'w',
                           CASE WHEN g % 100 = 0 THEN 2 + (g / 100) % 10 ELSE 1 END,
                           now() - interval '3 hours', now(),
                           now() - CASE WHEN g <= 1000 THEN interval '10 minutes'
                                        ELSE interval '2 hours' END
                    FROM generate_series(1, 20000) AS g"""
                ).format(ops=ops, seq=seq)
            )
            for table in (ops, q):  # settles the visibility/free-space maps counted in the size
                await conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(table))
            cur = await conn.execute(b"EXPLAIN " + ledger._sql("summary"), {"top": 5})
            plan = "\n".join(r[0] for r in await cur.fetchall())
        assert "rs_operations_hot" in plan, plan

        await ledger.open()
        counter = StatementCounter(monkeypatch)
        summary = await ledger.summary(top=5)
        assert counter.count == 1, counter.statements  # one statement: one consistent snapshot
        retried = sorted(
            ((2 + (g // 100) % 10, f"op-{g}") for g in range(100, 20001, 100)),
            key=lambda item: (-item[0], item[1]),
        )
        assert summary.hot_operations == [(OpKey("bulk", op), n) for n, op in retried[:5]]
        assert summary.by_state == {"completed": 20000}
        assert summary.completed_last_hour == 1000  # by completed_at against the database clock
        assert (summary.expired_leases, summary.oldest_in_flight_at) == (0, None)
        async with admin(pg_dsn) as conn:
            size = await scalar(
                conn,
                "SELECT pg_total_relation_size(%s::regclass)"
                " + pg_total_relation_size(%s::regclass)",
                (f'"{pg_schema}"."rs_operations"', f'"{pg_schema}"."rs_quarantine"'),
            )
        assert summary.approx_bytes == size
    finally:
        await ledger.close()


@pytest.mark.parametrize("skew", [3600.0, -3600.0])
async def test_summary_judges_leases_by_the_database_clock(
    pg_dsn: str, pg_schema: str, skew: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = time.time
    ledger = await make(pg_dsn, pg_schema)
    try:
        await ledger.open()  # measures the offset to the database clock ...
        # ... and then the worker's clock steps by an hour (NTP, VM resume): ledger.now() is off
        monkeypatch.setattr(pg_module, "time", types.SimpleNamespace(time=lambda: real() + skew))
        assert abs(ledger.now() - real() - skew) < 5
        await acquire(ledger, OpKey("orders", "live"), 30.0)  # an hour-fast clock calls it dead
        await acquire(ledger, OpKey("orders", "dead"), 0.05)  # an hour-slow clock calls it live
        await asyncio.sleep(0.3)
        summary = await ledger.summary()
        assert summary.expired_leases == 1
        assert summary.by_state == {"in_flight": 2}
        assert abs(summary.now - real()) < 5
    finally:
        await ledger.close()


async def test_redrive_is_one_statement_and_ids_are_bound(
    pg_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = await make(pg_dsn, pg_schema)
    nasty = "x'); DROP TABLE rs_quarantine; --\"{}%s%(id)s"
    try:
        claim = await acquire(ledger, KEY, 30.0)
        request = QuarantineRequest(
            "orders", QuarantineReason.MAX_ATTEMPTS, KEY.operation_id, "fp-a", attempts=1
        )
        entry = await ledger.quarantine(request, claim)
        counter = StatementCounter(monkeypatch)
        redriven = await ledger.redrive(entry.id)
        # the entry's bookkeeping and the operation's release commit together, or neither
        assert counter.count == 1, counter.statements
        assert redriven.redrives == 1
        record = await must_get(ledger, KEY)
        assert (record.state, record.attempts) == (State.RELEASED, 0)
        counter.reset()
        with pytest.raises(LedgerError, match="no quarantine entry"):
            await ledger.redrive(nasty)
        assert counter.count == 1
        assert await ledger.quarantine_entry(nasty) is None
        assert await ledger.purge_quarantine([nasty], reason=QuarantineReason.MAX_ATTEMPTS) == 0
        assert await ledger.quarantine_entry(entry.id) == redriven  # the table is intact
    finally:
        await ledger.close()


async def test_purge_quarantine_walks_indexes_in_bounded_batches(
    pg_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = await make(pg_dsn, pg_schema)
    q = sql.Identifier(pg_schema, "rs_quarantine")
    try:
        async with admin(pg_dsn) as conn:
            # 20k entries, g = 1 the oldest; every fourth is malformed_payload
            await conn.execute(
                sql.SQL(
                    """INSERT INTO {q} (id, scope, reason, operation_id, fingerprint, risk,
                        attempts, first_detail, last_detail, created_at, updated_at, seen)
                    SELECT 'id-' || g, 'bulk',
                           CASE WHEN g % 4 = 0 THEN 'malformed_payload' ELSE 'max_attempts' END,
                           'op-' || g, 'fp', 'never_claimed', 1, '', '',
                           now() - (20001 - g) * interval '1 second', now(), 1
                    FROM generate_series(1, 20000) AS g"""
                ).format(q=q)
            )
            await conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(q))
            cutoff = time.time() - 15000
            variants: dict[str, dict[str, Any]] = {
                "purge_quarantine:": {},
                "purge_quarantine:reason": {"reason": "malformed_payload"},
                "purge_quarantine:before": {"before": cutoff},
                "purge_quarantine:ids": {"ids": ["id-1", "id-2"]},
                "purge_quarantine:ids,reason,before": {
                    "ids": ["id-4"],
                    "reason": "malformed_payload",
                    "before": cutoff,
                },
            }
            plans = {}
            for name, params in variants.items():
                cur = await conn.execute(b"EXPLAIN " + ledger._sql(name), {**params, "n": 1000})
                plans[name] = "\n".join(r[0] for r in await cur.fetchall())
        for name, plan in plans.items():
            assert "Seq Scan" not in plan, (name, plan)
        assert "rs_quarantine_by_reason" in plans["purge_quarantine:reason"]
        assert "rs_quarantine_by_time" in plans["purge_quarantine:"]

        await ledger.open()
        counter = StatementCounter(monkeypatch)
        purged = await ledger.purge_quarantine(
            reason=QuarantineReason.MALFORMED_PAYLOAD, limit=2500
        )
        assert purged == 2500
        assert counter.count == 3  # 1000 + 1000 + 500: bounded statements, never one huge one
        async with admin(pg_dsn) as conn:
            cur = await conn.execute(
                sql.SQL(
                    "SELECT reason, count(*), min(substr(id, 4)::int) FROM {} GROUP BY reason"
                ).format(q)
            )
            by_reason = {reason: (n, first) for reason, n, first in await cur.fetchall()}
        # oldest first: malformed g = 4, 8 … 10000 are gone, the others untouched
        assert by_reason == {"malformed_payload": (2500, 10004), "max_attempts": (15000, 1)}
    finally:
        await ledger.close()


# ---------------------------------------------------------------------- time


@pytest.mark.parametrize("skew", [3600.0, -3600.0])
async def test_leases_are_judged_by_the_database_clock_not_the_workers(
    pg_dsn: str, pg_schema: str, skew: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = time.time
    monkeypatch.setattr(pg_module, "time", types.SimpleNamespace(time=lambda: real() + skew))
    ledger = await make(pg_dsn, pg_schema)
    try:
        await ledger.open()
        assert abs(ledger.now() - real()) < 5  # the offset to the database clock was measured
        first = await acquire(ledger, KEY, 1.0)
        assert abs(first.lease_until - (real() + 1.0)) < 5
        # an hour-fast worker clock would call this lease expired; the database does not
        assert isinstance(await ledger.claim(KEY, "fp-a", "w2", 1.0), InFlight)
        await asyncio.sleep(1.25)
        # an hour-slow worker clock would call it live; the database says it expired
        again = await ledger.claim(KEY, "fp-a", "w2", 1.0)
        assert isinstance(again, Acquired) and again.claim.recovered
    finally:
        await ledger.close()


# ---------------------------------------------------------------------- secrets, lifecycle


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgresql://app:s3cret@db:5432/orders", "postgresql://app:***@db:5432/orders"),
        ("postgres://app@db/orders", "postgres://app@db/orders"),
        ("postgresql://db/orders?password=s3cret&sslmode=require",
         "postgresql://db/orders?password=***&sslmode=require"),
        ("postgresql://app:s3cret@h1:5432,h2:5433/orders",
         "postgresql://app:***@h1:5432,h2:5433/orders"),
        ("host=db user=app password=s3cret dbname=orders",
         "host=db user=app password=*** dbname=orders"),
        ("host=db password = 's3 cr\\'et' dbname=orders", "host=db password = *** dbname=orders"),
        ("host=db dbname=orders", "host=db dbname=orders"),
    ],
)  # fmt: skip
def test_redact_dsn(dsn: str, expected: str) -> None:
    assert redact_dsn(dsn) == expected


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgresql://app:s%40cret@db/orders", ["s%40cret", "s@cret"]),
        ("postgresql://db/orders?password=s3cret&sslmode=require", ["s3cret"]),
        ("host=db user=app password='s e c' dbname=orders", ["s e c"]),
        ("host=db password=s3cret dbname=orders", ["s3cret"]),
        ("host=db dbname=orders", []),
    ],
)
def test_every_spelling_of_the_dsn_password_is_known_for_scrubbing(
    dsn: str, expected: list[str]
) -> None:
    # the engine scrubs driver messages with these (libpq echoes a DSN's parts in its errors)
    assert sorted(secrets_of(dsn)) == sorted(expected)


def _chain(exc: BaseException | None) -> list[BaseException]:
    out = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://postgres:Sup3rSecretPw@127.0.0.1:1/test",
        "host=127.0.0.1 port=1 user=postgres password=Sup3rSecretPw dbname=test",
    ],
)
async def test_the_password_never_reaches_repr_errors_or_logs(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "Sup3rSecretPw"
    ledger = PostgresLedger(dsn, connect_timeout=2)
    assert secret not in repr(ledger) and secret not in ledger.dsn
    assert "***" in repr(ledger)
    with caplog.at_level("DEBUG"), pytest.raises(LedgerUnavailable) as raised:
        await ledger.claim(KEY, "fp", "w1", 5.0)
    message = str(raised.value)
    assert "***" in message and "refused" in message.lower()  # says what happened …
    assert "check that the server is up" in message  # … and what to do
    for exc in _chain(raised.value):
        assert secret not in str(exc) and secret not in repr(exc)
    assert secret not in caplog.text
    await ledger.close()


async def test_a_malformed_dsn_is_refused_without_echoing_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "Sup3r%zzSecretPw"  # libpq quotes an invalid percent-escape back verbatim
    ledger = PostgresLedger(f"postgresql://postgres:{secret}@127.0.0.1:5432/test")
    with caplog.at_level("DEBUG"), pytest.raises(ConfigurationError, match="malformed") as raised:
        await ledger.get(KEY)
    assert "percent-encoded" in str(raised.value)  # the driver's reason is kept, scrubbed
    for exc in _chain(raised.value):
        assert secret not in str(exc) and "zzSecret" not in str(exc)
    assert "zzSecret" not in caplog.text
    await ledger.close()


async def test_statement_errors_name_the_redacted_dsn(pg_dsn: str, pg_schema: str) -> None:
    secret = "An0therSecret"
    dsn = pg_dsn.replace("postgres@", f"postgres:{secret}@", 1)  # trust auth ignores it
    assert secret in dsn
    ledger = PostgresLedger(dsn, schema=pg_schema)
    try:
        with pytest.raises(ConfigurationError) as raised:  # not migrated
            await ledger.get(KEY)
        assert secret not in str(raised.value) and "***" in str(raised.value)
    finally:
        await ledger.close()


async def test_close_is_idempotent_and_later_calls_fail_clearly(
    pg_dsn: str, pg_schema: str
) -> None:
    ledger = await make(pg_dsn, pg_schema)
    await ledger.claim(KEY, "fp", "w1", 5.0)
    await ledger.close()
    await ledger.close()
    assert "closed" in repr(ledger)
    with pytest.raises(LedgerUnavailable, match="closed"):
        await ledger.get(KEY)
    with pytest.raises(LedgerUnavailable, match="closed"):
        await ledger.claim(KEY, "fp", "w1", 5.0)


async def test_write_calls_from_inside_the_ledgers_own_transaction_are_refused(
    pg_dsn: str, pg_schema: str
) -> None:
    ledger = await make(pg_dsn, pg_schema)
    try:
        claim = await acquire(ledger, KEY, 5.0)

        async def misuse() -> None:
            async with ledger.transaction() as tx:
                await ledger.complete_in(tx, claim, "r")
                # this would wait forever on the row lock complete_in just took
                with pytest.raises(ConfigurationError, match="complete_in"):
                    await ledger.complete(claim)
                assert (await must_get(ledger, KEY)).state is State.IN_FLIGHT  # reads are fine

        await asyncio.wait_for(misuse(), WAIT)
        assert (await must_get(ledger, KEY)).state is State.COMPLETED
    finally:
        await ledger.close()


async def test_a_dead_connection_inside_a_transaction_is_ledger_unavailable(
    pg_dsn: str, pg_schema: str
) -> None:
    """The caller's own SQL errors come back as psycopg's; a connection killed under a statement
    of the transaction is the ledger's LedgerUnavailable (one error tree at the driver edge)."""
    import psycopg

    ledger = await make(pg_dsn, pg_schema)
    try:
        with pytest.raises(psycopg.errors.UndefinedTable):
            async with ledger.transaction() as tx:
                await tx.execute("SELECT * FROM no_such_table_here")
        with pytest.raises(LedgerUnavailable, match="transaction statement") as raised:
            async with ledger.transaction() as tx:
                (pid,) = (await tx.fetchall("SELECT pg_backend_pid()"))[0]
                async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as k:
                    await k.execute("SELECT pg_terminate_backend(%s)", (pid,))
                await tx.execute("SELECT 1")
        assert "retry" in str(raised.value)
        async with ledger.transaction() as tx:  # the pool replaced the dead connection
            assert await tx.fetchall("SELECT 1") == [(1,)]
    finally:
        await ledger.close()


async def test_a_transaction_of_another_ledger_is_refused(pg_dsn: str, pg_schema: str) -> None:
    a = await make(pg_dsn, pg_schema)
    b = PostgresLedger(pg_dsn, schema=pg_schema, table_prefix="rs_")
    try:
        claim = await acquire(a, KEY, 5.0)
        with pytest.raises(ConfigurationError, match="this ledger"):
            async with b.transaction() as tx:
                await a.complete_in(tx, claim)
        assert (await must_get(a, KEY)).state is State.IN_FLIGHT
    finally:
        await a.close()
        await b.close()


# ---------------------------------------------------------------------- durability (explain)


async def _findings(ledger: PostgresLedger) -> dict[str, Any]:
    from replaysafe.explain import explain

    app = App("durability", broker=MemoryBroker(), ledger=ledger)

    async def charge(ctx: Context) -> None:
        return None

    app.handler("payments", guarantee=Guarantee.EFFECTIVELY_ONCE,
                effect=Effect.keyed("payments-api"))(charge)  # fmt: skip
    [handler] = (await explain(app)).handlers
    return {f.id: f for f in handler.findings if f.id in ("RS110", "RS111", "RS118")}


async def test_durability_reads_what_the_ledgers_own_connections_use(
    pg_dsn: str, pg_schema: str
) -> None:
    """The server default (synchronous_commit=on, fsync on) backs a claim; a ledger whose DSN
    turns synchronous_commit off for its sessions can lose the last commits in a crash, though
    every other session of the same server still runs with it on."""
    durable = PostgresLedger(pg_dsn, schema=pg_schema)  # no schema needed to read settings
    lossy = PostgresLedger(make_conninfo(pg_dsn, options="-c synchronous_commit=off"),
                           schema=pg_schema)  # fmt: skip
    try:
        d = await durable.durability()
        assert (d.level, d.durable) == (DurabilityLevel.DURABLE, True)
        assert "synchronous_commit=on" in d.setting and "fsync=on" in d.setting
        assert await _findings(durable) == {}
        l_ = await lossy.durability()
        assert (l_.level, l_.durable) == (DurabilityLevel.LOSES_RECENT, False)
        assert "synchronous_commit=off" in l_.setting
        async with admin(pg_dsn) as conn:  # the server's own default is untouched
            assert await scalar(conn, "SHOW synchronous_commit") == "on"
        findings = await _findings(lossy)
        assert list(findings) == ["RS118"]
        assert findings["RS118"].severity == "warning"
        assert "synchronous_commit=off" in findings["RS118"].message
    finally:
        await durable.close()
        await lossy.close()


async def test_durability_follows_the_ledger_roles_own_setting(pg_dsn: str) -> None:
    role = f"rs_dur_{uuid.uuid4().hex[:10]}"
    async with admin(pg_dsn) as conn:
        await conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        try:
            await conn.execute(
                sql.SQL("ALTER ROLE {} SET synchronous_commit = off").format(sql.Identifier(role))
            )
            ledger = PostgresLedger(make_conninfo(pg_dsn, user=role))
            try:
                assert (await ledger.durability()).level is DurabilityLevel.LOSES_RECENT
            finally:
                await ledger.close()
            await conn.execute(
                sql.SQL("ALTER ROLE {} SET synchronous_commit = local").format(sql.Identifier(role))
            )
            ledger = PostgresLedger(make_conninfo(pg_dsn, user=role))
            try:
                d = await ledger.durability()
                assert d.level is DurabilityLevel.DURABLE
                assert "synchronous_commit=local" in d.setting
            finally:
                await ledger.close()
        finally:
            await conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


_ON = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on",
       "synchronous_standby_names": "", "wal_writer_delay": "200ms"}  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "level", "words"),
    [
        ({}, DurabilityLevel.DURABLE, "flushed to the WAL on disk"),
        ({"synchronous_commit": "local"}, DurabilityLevel.DURABLE, "asynchronous"),
        ({"synchronous_standby_names": "FIRST 1 (replica_a)"}, DurabilityLevel.DURABLE,
         "flushed by a synchronous standby"),
        ({"synchronous_standby_names": "replica_a", "synchronous_commit": "remote_apply"},
         DurabilityLevel.DURABLE, "applied by a synchronous standby"),
        ({"synchronous_standby_names": "replica_a", "synchronous_commit": "local"},
         DurabilityLevel.DURABLE, "asynchronous"),
        ({"synchronous_commit": "off"}, DurabilityLevel.LOSES_RECENT, "3 x 200ms"),
        ({"fsync": "off"}, DurabilityLevel.NOT_DURABLE, "fsync=off"),
        ({"full_page_writes": "off"}, DurabilityLevel.NOT_DURABLE, "torn"),
        ({"fsync": "off", "synchronous_commit": "off"}, DurabilityLevel.NOT_DURABLE, "fsync"),
    ],
)  # fmt: skip
def test_assess_postgres(changes: dict[str, str], level: DurabilityLevel, words: str) -> None:
    """fsync and full_page_writes are server-wide (no session can change them): judged here."""
    d = assess_postgres("pg", {**_ON, **changes})
    assert (d.level, d.durable) == (level, level is DurabilityLevel.DURABLE)
    assert words in d.detail


# ---------------------------------------------------------------------- the sync twin


def twin_of(dsn: str, schema: str, **kwargs: Any) -> SyncPostgresLedger:
    """A sync twin on ``schema``, migrated by the twin itself (``auto_migrate``)."""
    return PostgresLedger(
        scoped_dsn(dsn, schema), schema=schema, auto_migrate=True, **kwargs
    ).sync()


def test_the_twin_migrates_with_auto_migrate_and_else_names_the_command(
    pg_dsn: str, pg_schema: str
) -> None:
    bare = PostgresLedger(pg_dsn, schema=pg_schema, table_prefix="tw_").sync()
    with pytest.raises(ConfigurationError, match="replaysafe ledger migrate") as raised:
        bare.get(KEY)
    assert "--table-prefix tw_" in str(raised.value)
    bare.close()
    twin = PostgresLedger(pg_dsn, schema=pg_schema, table_prefix="tw_", auto_migrate=True).sync()
    try:
        assert isinstance(twin.claim(KEY, "fp", "w1", 30.0), Acquired)
    finally:
        twin.close()
    with psycopg.connect(pg_dsn) as conn:
        version = conn.execute(
            sql.SQL("SELECT version FROM {}").format(sql.Identifier(pg_schema, "tw_schema_version"))
        ).fetchone()
    assert version == (pg_module.SCHEMA_VERSION,)


def test_the_twin_is_one_statement_per_call(
    pg_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    twin = twin_of(pg_dsn, pg_schema)
    try:
        twin.open()
        sent: list[str] = []
        original = psycopg.Cursor.execute

        def execute(cur: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            sent.append(query.decode() if isinstance(query, bytes) else str(query))
            return original(cur, query, *args, **kwargs)

        monkeypatch.setattr(psycopg.Cursor, "execute", execute)
        out = twin.claim(KEY, "fp", "w1", 30.0)
        assert isinstance(out, Acquired) and len(sent) == 1
        assert twin.complete(out.claim, "r").state is State.COMPLETED and len(sent) == 2
        keys = [OpKey("batch", f"op-{i}") for i in range(10)]
        outs = twin.claim_many([ClaimRequest(k, "fp", "w1", 30.0) for k in keys])
        assert all(isinstance(o, Acquired) for o in outs) and len(sent) == 3
        done = twin.complete_many([(o.claim, "r") for o in outs if isinstance(o, Acquired)])
        assert all(d.state is State.COMPLETED for d in done if not isinstance(d, Exception))
        assert len(done) == 10 and len(sent) == 4
    finally:
        twin.close()


def test_claims_of_one_key_from_many_threads_acquire_once(pg_dsn: str, pg_schema: str) -> None:
    twin = twin_of(pg_dsn, pg_schema, max_size=4)
    n = 16
    barrier = threading.Barrier(n)

    def claim(i: int) -> Any:
        barrier.wait(WAIT)
        return twin.claim(KEY, "fp", f"w{i}", 30.0)

    try:
        with ThreadPoolExecutor(n) as pool:
            outcomes = list(pool.map(claim, range(n)))
        won = [o for o in outcomes if isinstance(o, Acquired)]
        assert len(won) == 1
        assert all(isinstance(o, InFlight) for o in outcomes if o is not won[0])
        # a keeper thread extends while the caller's thread completes: both fenced by one token
        claim_ = won[0].claim
        with ThreadPoolExecutor(1) as keeper:
            extended = keeper.submit(twin.extend, claim_, 60.0).result(WAIT)
        assert extended.lease_until is not None and extended.token == claim_.token
        assert twin.complete(extended, "r").state is State.COMPLETED
        with pytest.raises(LeaseLost, match=r"(?i)completed"):
            twin.extend(claim_, 60.0)
    finally:
        twin.close()


def test_after_every_twin_connection_died_one_failed_call_is_enough(
    pg_dsn: str, pg_schema: str
) -> None:
    app_name = f"rs-twin-dead-{uuid.uuid4().hex[:8]}"
    twin = PostgresLedger(
        scoped_dsn(pg_dsn, pg_schema, application_name=app_name),
        schema=pg_schema,
        min_size=3,
        max_size=3,
        auto_migrate=True,
    ).sync()
    try:
        out = twin.claim(KEY, "fp", "w1", 30.0)
        assert isinstance(out, Acquired)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:  # a restart, as the pool sees it
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (app_name,),
            ).fetchall()
        assert sum(1 for (ok,) in rows if ok) == 3
        with pytest.raises(LedgerUnavailable, match="may or may not have committed"):
            twin.get(KEY)
        # the failed call checked the pool: the next calls get live connections
        current = twin.get(KEY)
        assert current is not None and current.token == out.claim.token
        assert twin.complete(out.claim, "r").state is State.COMPLETED
    finally:
        twin.close()


def test_the_twin_maps_errors_as_the_async_ledger_does(pg_dsn: str, pg_schema: str) -> None:
    twin = twin_of(pg_dsn, pg_schema)
    try:
        huge = QuarantineRequest("orders", QuarantineReason.MAX_ATTEMPTS, "op-1", attempts=2**31)
        with pytest.raises(LedgerDataError, match="refused this call's data"):
            twin.quarantine(huge)
        with pytest.raises(LedgerDataError, match="UnicodeEncodeError"):
            twin.get(OpKey("orders", "op-\udcff"))
        assert isinstance(twin.claim(KEY, "fp", "w1", 5.0), Acquired)  # still fine
    finally:
        twin.close()
    twin.close()  # idempotent
    assert "closed" in repr(twin)
    with pytest.raises(LedgerUnavailable, match="closed"):
        twin.claim(KEY, "fp", "w1", 5.0)
    with pytest.raises(LedgerUnavailable, match="closed"):
        twin.complete_many([])


def test_the_twin_never_shows_the_password(caplog: pytest.LogCaptureFixture) -> None:
    secret = "Sup3rSecretPw"
    twin = PostgresLedger(
        f"postgresql://postgres:{secret}@127.0.0.1:1/test", connect_timeout=2
    ).sync()
    assert secret not in repr(twin) and "***" in repr(twin)
    with caplog.at_level("DEBUG"), pytest.raises(LedgerUnavailable) as raised:
        twin.claim(KEY, "fp", "w1", 5.0)
    assert "check that the server is up" in str(raised.value)
    for exc in _chain(raised.value):
        assert secret not in str(exc) and secret not in repr(exc)
    assert secret not in caplog.text
    twin.close()


async def test_a_closed_ledger_has_no_twin(pg_dsn: str, pg_schema: str) -> None:
    ledger = await make(pg_dsn, pg_schema)
    await ledger.close()
    with pytest.raises(LedgerUnavailable, match="closed"):
        ledger.sync()


# ---------------------------------------------------------------------- the twin's transactions
#
# TransactionalLedgerContract's checks, written sync for SyncPostgresLedger.transaction() /
# complete_in (issue 14: a sync Guard's transactional effect), plus the threads a sync Guard has.


INSERT = "INSERT INTO effects (op, note) VALUES (%s, %s)"


@pytest.fixture
def ttwin(pg_dsn: str, pg_schema: str) -> Iterator[SyncPostgresLedger]:
    """A twin on the test's schema with a business table ``effects(op, note)`` in it."""
    twin = twin_of(pg_dsn, pg_schema, max_size=4)
    with twin.transaction() as tx:
        tx.execute("CREATE TABLE effects (op text NOT NULL, note text NOT NULL)")
    yield twin
    twin.close()


def effects(twin: SyncPostgresLedger) -> list[tuple[Any, ...]]:
    with twin.transaction() as tx:
        return sorted(tx.fetchall("SELECT op, note FROM effects"))


def twin_acquire(twin: SyncPostgresLedger, owner: str = "w1", lease: float = 30.0) -> Any:
    out = twin.claim(KEY, "fp", owner, lease)
    assert isinstance(out, Acquired), out
    return out.claim


def test_twin_business_row_and_complete_in_commit_together(ttwin: SyncPostgresLedger) -> None:
    assert ttwin.transactional is True
    claim = twin_acquire(ttwin)
    with ttwin.transaction() as tx:
        tx.execute(INSERT, (KEY.operation_id, "charged"))
        assert tx.fetchall("SELECT op, note FROM effects") == [(KEY.operation_id, "charged")]
        assert tx.execute("SELECT 1").rowcount == 1  # the driver's cursor
        ttwin.complete_in(tx, claim, "receipt-1")
    assert effects(ttwin) == [(KEY.operation_id, "charged")]
    record = ttwin.get(KEY)
    assert record is not None and (record.state, record.result) == (State.COMPLETED, "receipt-1")
    assert isinstance(ttwin.claim(KEY, "fp", "w2", 30.0), AlreadyDone)
    with pytest.raises(LedgerError, match="finished"):  # the block is over
        tx.execute("SELECT 1")


class HandlerFailed(Exception):
    pass


@pytest.mark.parametrize("failure", [HandlerFailed, KeyboardInterrupt])
@pytest.mark.parametrize("then", ["finish", "release"])
def test_twin_exception_rolls_back_business_row_and_completion(
    ttwin: SyncPostgresLedger, failure: type[BaseException], then: str
) -> None:
    claim = twin_acquire(ttwin)
    before = ttwin.get(KEY)
    with pytest.raises(failure), ttwin.transaction() as tx:
        tx.execute(INSERT, (KEY.operation_id, "charged"))
        ttwin.complete_in(tx, claim, "receipt-1")
        raise failure
    assert effects(ttwin) == []
    assert ttwin.get(KEY) == before
    if then == "finish":  # nothing happened, so the same claim can still finish the job
        with ttwin.transaction() as tx:
            tx.execute(INSERT, (KEY.operation_id, "charged"))
            ttwin.complete_in(tx, claim, "receipt-2")
        assert effects(ttwin) == [(KEY.operation_id, "charged")]
        record = ttwin.get(KEY)
        assert record is not None and record.result == "receipt-2"
    else:
        ttwin.release(claim, "HandlerFailed")
        again = twin_acquire(ttwin, owner="w2")
        assert (again.attempt, again.recovered) == (2, False)
        assert effects(ttwin) == []


async def test_twin_stale_complete_in_raises_lease_lost_and_nothing_commits(
    ttwin: SyncPostgresLedger,
) -> None:
    stale = twin_acquire(ttwin, lease=0.3)
    # the database clock expires the lease; then another worker takes the operation over

    def take_over() -> Any:
        out = ttwin.claim(KEY, "fp", "w2", 30.0)
        return out.claim if isinstance(out, Acquired) else None

    current = await until(
        take_over, seconds=WAIT, what="a takeover of the expired lease", interval=0.1
    )
    assert current.recovered and current.token > stale.token
    with pytest.raises(LeaseLost), ttwin.transaction() as tx:
        tx.execute(INSERT, (KEY.operation_id, "charged twice?"))
        ttwin.complete_in(tx, stale, "nope")
    assert effects(ttwin) == []
    record = ttwin.get(KEY)
    assert record is not None
    assert (record.state, record.token, record.owner) == (State.IN_FLIGHT, current.token, "w2")


def test_twin_callers_sql_error_propagates_unchanged_and_rolls_back(
    ttwin: SyncPostgresLedger,
) -> None:
    claim = twin_acquire(ttwin)
    with pytest.raises(psycopg.errors.UndefinedTable), ttwin.transaction() as tx:
        tx.execute(INSERT, (KEY.operation_id, "charged"))
        ttwin.complete_in(tx, claim)
        tx.execute("INSERT INTO no_such_table (x) VALUES (1)")
    assert effects(ttwin) == []
    record = ttwin.get(KEY)
    assert record is not None and record.state is State.IN_FLIGHT


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
async def test_twin_another_threads_claim_waits_for_the_transaction_then_sees_its_outcome(
    pg_dsn: str, ttwin: SyncPostgresLedger, outcome: str
) -> None:
    """complete_in holds the ledger row's lock until the transaction ends: a redelivery claimed
    meanwhile in another thread waits, then sees the outcome (done, or still ours)."""
    claim = twin_acquire(ttwin)
    locked, finish = threading.Event(), threading.Event()
    pids: list[int] = []

    def handler() -> None:
        with ttwin.transaction() as tx:
            pids.append(tx.fetchall("SELECT pg_backend_pid()")[0][0])
            tx.execute(INSERT, (KEY.operation_id, "charged"))
            ttwin.complete_in(tx, claim, "r")
            locked.set()
            assert finish.wait(WAIT)
            if outcome == "rollback":
                raise HandlerFailed

    with ThreadPoolExecutor(2) as pool:
        inside = pool.submit(handler)
        assert await asyncio.to_thread(locked.wait, WAIT)
        redelivery = pool.submit(ttwin.claim, KEY, "fp", "w2", 30.0)
        with psycopg.connect(pg_dsn, autocommit=True) as admin_conn:

            def blocked() -> bool:
                rows = admin_conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                    (pids[0],),
                ).fetchall()
                return bool(rows)

            await until(blocked, seconds=WAIT, what="the claim to wait on the row lock")
        assert not redelivery.done()
        finish.set()
        if outcome == "commit":
            inside.result(WAIT)
            # the claim statement reads the row it could not take with its own snapshot, taken
            # before the commit: InFlight (the redelivery is nacked) is as safe as AlreadyDone
            assert isinstance(redelivery.result(WAIT), InFlight | AlreadyDone)
            assert isinstance(ttwin.claim(KEY, "fp", "w2", 30.0), AlreadyDone)
            assert effects(ttwin) == [(KEY.operation_id, "charged")]
        else:
            with pytest.raises(HandlerFailed):
                inside.result(WAIT)
            assert isinstance(redelivery.result(WAIT), InFlight)
            assert effects(ttwin) == []


def test_twin_writes_from_inside_its_own_transaction_are_refused_not_other_threads(
    ttwin: SyncPostgresLedger,
) -> None:
    claim = twin_acquire(ttwin)
    with ttwin.transaction() as tx:
        # a keeper thread extends the lease while the function runs: allowed
        with ThreadPoolExecutor(1) as keeper:
            extended = keeper.submit(ttwin.extend, claim, 60.0).result(WAIT)
        ttwin.complete_in(tx, extended, "r")
        # from the transaction's own thread this would wait forever on complete_in's row lock
        with pytest.raises(ConfigurationError, match="complete_in"):
            ttwin.complete(claim)
        with pytest.raises(ConfigurationError, match="transaction"), ttwin.transaction():
            pass
        record = ttwin.get(KEY)  # reads are fine
        assert record is not None and record.state is State.IN_FLIGHT
    record = ttwin.get(KEY)
    assert record is not None and record.state is State.COMPLETED
    assert isinstance(ttwin.claim(OpKey("orders", "op-2"), "fp", "w1", 5.0), Acquired)


async def test_twin_complete_in_refuses_a_transaction_it_did_not_open(
    pg_dsn: str, pg_schema: str, ttwin: SyncPostgresLedger
) -> None:
    claim = twin_acquire(ttwin)
    other = twin_of(pg_dsn, pg_schema)
    ledger = await make(pg_dsn, pg_schema)
    try:
        with pytest.raises(ConfigurationError, match="this twin"), other.transaction() as tx:
            ttwin.complete_in(tx, claim)
        async with ledger.transaction() as atx:
            with pytest.raises(ConfigurationError, match="this twin"):
                ttwin.complete_in(atx, claim)
    finally:
        other.close()
        await ledger.close()
    record = ttwin.get(KEY)
    assert record is not None and record.state is State.IN_FLIGHT


def test_twin_a_dead_connection_inside_a_transaction_is_ledger_unavailable(
    pg_dsn: str, ttwin: SyncPostgresLedger
) -> None:
    claim = twin_acquire(ttwin)
    dead = pytest.raises(LedgerUnavailable, match="transaction statement")
    with dead as raised, ttwin.transaction() as tx:
        tx.execute(INSERT, (KEY.operation_id, "charged"))
        ttwin.complete_in(tx, claim, "r")
        ((pid,),) = tx.fetchall("SELECT pg_backend_pid()")
        with psycopg.connect(pg_dsn, autocommit=True) as k:
            k.execute("SELECT pg_terminate_backend(%s)", (pid,))
        tx.execute("SELECT 1")
    assert "retry" in str(raised.value)
    assert effects(ttwin) == []  # the pool replaced the dead connection
    with ttwin.transaction() as tx:
        tx.execute(INSERT, (KEY.operation_id, "charged"))
        ttwin.complete_in(tx, claim, "r")
    assert effects(ttwin) == [(KEY.operation_id, "charged")]


def test_twin_a_deferred_constraint_failing_at_commit_is_a_data_error(
    ttwin: SyncPostgresLedger,
) -> None:
    claim = twin_acquire(ttwin)
    with ttwin.transaction() as tx:
        tx.execute("CREATE TABLE uniq (op text UNIQUE DEFERRABLE INITIALLY DEFERRED)")
    with pytest.raises(LedgerDataError, match="commit"), ttwin.transaction() as tx:
        tx.execute("INSERT INTO uniq (op) VALUES ('a'), ('a')")
        ttwin.complete_in(tx, claim, "r")
    record = ttwin.get(KEY)
    assert record is not None and record.state is State.IN_FLIGHT


# ---------------------------------------------------------------------- data errors


async def test_data_the_server_refuses_is_a_data_error_not_an_outage(
    pg_dsn: str, pg_schema: str
) -> None:
    ledger = await make(pg_dsn, pg_schema)
    try:
        # a number beyond the column (integer): the server's DataError
        huge = QuarantineRequest("orders", QuarantineReason.MAX_ATTEMPTS, "op-1", attempts=2**31)
        with pytest.raises(LedgerDataError, match="refused this call's data"):
            await ledger.quarantine(huge)
        # a lone surrogate has no UTF-8 form: the driver refuses to send it (was a bare
        # UnicodeEncodeError, outside the error tree)
        with pytest.raises(LedgerDataError, match="UnicodeEncodeError"):
            await ledger.get(OpKey("orders", "op-\udcff"))
        assert await ledger.quarantined() == []
        # the ledger is fine: the next call works
        assert isinstance(await ledger.claim(KEY, "fp", "w1", 5.0), Acquired)
    finally:
        await ledger.close()


async def test_a_nul_in_the_content_type_is_quarantined_not_nacked_forever(
    pg_dsn: str, pg_schema: str
) -> None:
    """Issue 13 item 14 end to end: plain-client messages whose content type holds a NUL or a
    byte that is not UTF-8 are quarantined with the content type escaped and completed; the
    worker never reports the ledger down and the good message next to them is applied once."""
    from .runtime_harness import Harness

    ledger = await make(pg_dsn, pg_schema)
    h = Harness(ledger=ledger)

    @h.handler(Guarantee.EFFECTIVELY_ONCE, effect=Effect.keyed("payments"))
    async def charge(ctx: Context) -> None:
        await h.probe.apply(ctx.payload["order"], ctx.payload["amount"], ctx.idempotency_key)

    body = b'{"order": "o-1", "amount": 10}'
    try:
        for ctype in ("application/json\x00", "application/\udcffjson"):
            await h.publish_raw(body, {"rs-operation-id": "charge:o-1", "content-type": ctype})
        await h.publish(Envelope.of("charge:o-2", {"order": "o-2", "amount": 10}))
        h.start()
        await h.drain(seconds=60)
        await h.stop()
        assert h.probe.per_subject() == {"o-2": 1}
        assert h.total(o.LEDGER_UNAVAILABLE) == 0
        entries = await ledger.quarantined()
        assert sorted(e.content_type or "" for e in entries) == [
            "application/\\xffjson",
            "application/json\\x00",
        ]
        assert all(e.message == body for e in entries)
    finally:
        await ledger.close()


async def test_a_deferred_constraint_failing_at_commit_is_a_data_error(
    pg_dsn: str, pg_schema: str
) -> None:
    """The commit of a transactional handler's block fails on its own rows: that is data (it
    was rolled back), not "may or may not have committed"."""
    ledger = await make(pg_dsn, pg_schema)
    async with admin(scoped_dsn(pg_dsn, pg_schema)) as conn:
        await conn.execute(
            "CREATE TABLE deferred_effects (op text UNIQUE DEFERRABLE INITIALLY DEFERRED)"
        )
    try:
        claim = await acquire(ledger, KEY, 5.0)
        with pytest.raises(LedgerDataError, match="commit"):
            async with ledger.transaction() as tx:
                await tx.execute("INSERT INTO deferred_effects VALUES ('a'), ('a')")
                await ledger.complete_in(tx, claim, "done")
        record = await must_get(ledger, KEY)
        assert (record.state, record.token) == (State.IN_FLIGHT, claim.token)  # rolled back
    finally:
        await ledger.close()


@pytest.mark.parametrize("module", ["psycopg", "psycopg_pool"])
async def test_a_missing_driver_names_the_extra(
    module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = PostgresLedger("postgresql://nobody@127.0.0.1:1/none")  # constructing needs no driver
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingExtra, match=r"replaysafe\[postgres\]") as raised:
        await ledger.get(KEY)
    assert raised.value.module == module
