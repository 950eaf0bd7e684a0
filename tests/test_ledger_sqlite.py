"""SQLiteLedger passes the transactional ledger contract, and keeps its promises across processes,
restarts and failures of the file it lives in."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from replaysafe.errors import ConfigurationError, LedgerDataError, LedgerError, LedgerUnavailable
from replaysafe.ledger.base import (
    Acquired,
    ClaimRequest,
    DurabilityLevel,
    InFlight,
    Ledger,
    OpKey,
    QuarantineRequest,
    State,
)
from replaysafe.ledger.sqlite import PURGE_QUARANTINE_SQL, PURGE_SQL, SCHEMA_VERSION, SQLiteLedger
from replaysafe.quarantine import QuarantineReason
from replaysafe.stores.sqlite import sql as sqlite_sql
from replaysafe.testing import FakeClock
from replaysafe.testing.contracts import LedgerBackendContract, TransactionalLedgerContract
from replaysafe.testing.contracts.ledger import acquire, must_get
from replaysafe.testing.contracts.sync_ledger import through_sync_twin

KEY = OpKey("orders", "op-1")


class TestSQLiteLedger(TransactionalLedgerContract):
    @pytest.fixture(autouse=True)
    def _directory(self, tmp_path: Path) -> None:
        self.directory = tmp_path
        self.made = 0

    async def make_ledger(self, clock: FakeClock) -> Ledger:
        self.made += 1
        return SQLiteLedger(self.directory / f"ledger-{self.made}.db", clock=clock)

    def insert_sql(self) -> str:
        return "INSERT INTO rs_contract_effects (op, note) VALUES (?, ?)"


class TestSQLiteSyncTwin(LedgerBackendContract):
    """The whole contract with the claim path on ``SQLiteLedger.sync()`` (issue 14): the twin's
    own connection and the async ledger's share the file."""

    @pytest.fixture(autouse=True)
    def _directory(self, tmp_path: Path) -> None:
        self.directory = tmp_path
        self.made = 0

    async def make_ledger(self, clock: FakeClock) -> Ledger:
        self.made += 1
        return through_sync_twin(SQLiteLedger(self.directory / f"twin-{self.made}.db", clock=clock))


# ---------------------------------------------------------------------- several processes

N_OPS = 200


def _claim_everything(path: str, owner: str, seed: int, batch: int, start: Any, out: Any) -> None:
    """Child process: claim all N_OPS operations in a shuffled order, report what it acquired."""

    async def run() -> tuple[list[int], list[int]]:
        order = list(range(N_OPS))
        random.Random(seed).shuffle(order)
        ledger = SQLiteLedger(path)  # the real clock: leases of 60 s never expire here
        won: list[int] = []
        tokens: list[int] = []
        try:
            start.wait()  # both processes open the fresh file (schema, WAL switch) at once ...
            assert await ledger.get(OpKey("race", "none")) is None
            start.wait()  # ... and then start claiming together, so the claims really interleave
            for i in range(0, N_OPS, batch):
                chunk = order[i : i + batch]
                requests = [
                    ClaimRequest(OpKey("race", f"op-{n}"), "fp", owner, 60.0) for n in chunk
                ]
                if batch == 1:
                    r = requests[0]
                    outcomes = [await ledger.claim(r.key, r.fingerprint, r.owner, r.lease)]
                else:
                    outcomes = await ledger.claim_many(requests)
                # SQLite's lock is not fair: a process that re-takes it at once can starve the
                # other one, and then nothing interleaves. A short pause keeps both in the race.
                await asyncio.sleep(0.002)
                for n, outcome in zip(chunk, outcomes, strict=True):
                    if isinstance(outcome, Acquired):
                        won.append(n)
                        tokens.append(outcome.claim.token)
                    else:
                        assert isinstance(outcome, InFlight), outcome
        finally:
            await ledger.close()
        return won, tokens

    out.put((owner, *asyncio.run(run())))


def test_two_processes_never_both_acquire_an_operation(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    path = str(tmp_path / "shared.db")
    start = ctx.Barrier(2)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_claim_everything, args=(path, "p1", 1, 1, start, out)),
        ctx.Process(target=_claim_everything, args=(path, "p2", 2, 5, start, out)),
    ]
    for p in procs:
        p.start()
    results: dict[str, tuple[list[int], list[int]]] = {}
    deadline = time.monotonic() + 90
    while len(results) < len(procs):
        try:
            owner, won, tokens = out.get(timeout=0.2)
        except queue.Empty:
            # a child that died (its traceback is on stderr) must fail the test now, not at 90 s
            died = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not died, f"a claiming process died with exit code {died}"
            assert time.monotonic() < deadline, "the claiming processes did not finish"
            continue
        results[owner] = (won, tokens)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    won1, tokens1 = results["p1"]
    won2, tokens2 = results["p2"]
    assert sorted(won1 + won2) == list(range(N_OPS)), "every operation acquired exactly once"
    assert won1 and won2, "both processes must have won some: otherwise they never raced"
    all_tokens = tokens1 + tokens2
    assert len(set(all_tokens)) == N_OPS  # one token space across processes
    assert tokens1 == sorted(tokens1) and tokens2 == sorted(tokens2)
    with sqlite3.connect(path) as conn:
        owners = dict(conn.execute("SELECT operation_id, owner FROM replaysafe_operations"))
        (last,) = conn.execute("SELECT last_token FROM replaysafe_meta").fetchone()
    assert owners == {f"op-{n}": "p1" for n in won1} | {f"op-{n}": "p2" for n in won2}
    assert last == max(all_tokens)


async def test_two_ledgers_on_one_file_share_tokens_and_fencing(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "shared.db"
    async with SQLiteLedger(path, clock=clock) as a, SQLiteLedger(path, clock=clock) as b:
        first = await acquire(a, KEY, 1.0, owner="a")
        assert isinstance(await b.claim(KEY, "fp-a", "b", 1.0), InFlight)
        clock.advance(1.5)
        second = await acquire(b, KEY, 1.0, owner="b")
        assert second.token > first.token
        with pytest.raises(LedgerError):  # LeaseLost: a's claim was taken over through b
            await a.complete(first)
        assert (await a.complete(second)).state is State.COMPLETED


async def test_idle_waits_out_open_transactions_and_leaves_the_file_unlocked(
    tmp_path: Path,
) -> None:
    """Inside ``idle()`` this process holds no SQLite lock (another process can write) and its own
    calls wait: the chaos harness stops a process there so it stalls only itself."""
    path = tmp_path / "shared.db"
    # busy_timeout 0: a write that meets the lock fails at once instead of waiting for it
    async with (
        SQLiteLedger(path, busy_timeout=0) as mine,
        SQLiteLedger(path, busy_timeout=0) as other,
    ):
        in_tx, end_tx, in_idle, end_idle = (asyncio.Event() for _ in range(4))

        async def transaction() -> None:
            async with mine.transaction():
                in_tx.set()
                await end_tx.wait()

        async def idle() -> None:
            async with mine.idle():
                in_idle.set()
                await end_idle.wait()

        tx_task = asyncio.create_task(transaction())
        await in_tx.wait()
        with pytest.raises(LedgerUnavailable):  # the open transaction holds the write lock
            await other.claim(KEY, "fp", "other", 5.0)
        idle_task = asyncio.create_task(idle())
        await asyncio.sleep(0.05)
        assert not in_idle.is_set()  # waits for the transaction to end
        end_tx.set()
        await asyncio.wait_for(in_idle.wait(), 5)
        await acquire(other, OpKey("orders", "other"), 5.0, owner="other")  # the file is free
        mine_claim = asyncio.create_task(mine.claim(KEY, "fp", "mine", 5.0))
        await asyncio.sleep(0.05)
        assert not mine_claim.done()  # this ledger's own calls wait for the block to end
        end_idle.set()
        assert isinstance(await asyncio.wait_for(mine_claim, 5), Acquired)
        await asyncio.gather(tx_task, idle_task)


async def test_many_coroutines_on_one_loop_acquire_each_operation_once(tmp_path: Path) -> None:
    keys = [OpKey("race", f"op-{i}") for i in range(20)]
    async with SQLiteLedger(tmp_path / "ledger.db", synchronous="NORMAL") as ledger:

        async def worker(name: str) -> list[OpKey]:
            won = []
            for k in random.Random(name).sample(keys, len(keys)):
                outcome = await ledger.claim(k, "fp", name, 60.0)
                if isinstance(outcome, Acquired):
                    won.append(k)
                    if len(won) % 2:  # half through a transaction, half directly
                        async with ledger.transaction() as tx:
                            await ledger.complete_in(tx, outcome.claim)
                    else:
                        await ledger.complete(outcome.claim)
            return won

        results = await asyncio.gather(*(worker(f"w{i}") for i in range(10)))
        won = [k for r in results for k in r]
        assert sorted(won) == sorted(keys)  # each acquired exactly once
        assert sum(1 for r in results if r) > 1  # and the coroutines really interleaved
        for k in keys:
            assert (await must_get(ledger, k)).state is State.COMPLETED


async def test_cancellation_at_any_point_leaves_the_ledger_consistent(tmp_path: Path) -> None:
    async with SQLiteLedger(tmp_path / "ledger.db", synchronous="NORMAL") as ledger:
        async with ledger.transaction() as tx:
            await tx.execute("CREATE TABLE effects (op TEXT NOT NULL)")

        async def handler(i: int) -> None:
            key = OpKey("cancel", f"op-{i}")
            outcome = await ledger.claim(key, "fp", "w", 60.0)
            assert isinstance(outcome, Acquired)
            async with ledger.transaction() as tx:
                await tx.execute("INSERT INTO effects (op) VALUES (?)", (key.operation_id,))
                await ledger.complete_in(tx, outcome.claim)

        cancelled = 0
        for i in range(40):
            task = asyncio.create_task(handler(i))
            for _ in range(i % 8):  # cancel after a varying number of loop turns
                await asyncio.sleep(0)
            await asyncio.sleep(0.0005 * (i % 5))
            cancelled += task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert cancelled > 0
        # whatever was cut short: the business row exists exactly when the operation completed
        async with ledger.transaction() as tx:
            effects = {op for (op,) in await tx.fetchall("SELECT op FROM effects")}
        seen = set()
        for i in range(40):
            record = await ledger.get(OpKey("cancel", f"op-{i}"))
            completed = record is not None and record.state is State.COMPLETED
            assert completed == (f"op-{i}" in effects), (i, record)
            seen.add(None if record is None else record.state)
        # the cancellations must have landed inside transactions too, or this proved little
        assert {State.IN_FLIGHT, State.COMPLETED} <= seen, seen
        # and nothing was left open on the connection
        assert isinstance(await ledger.claim(OpKey("cancel", "after"), "fp", "w", 1.0), Acquired)


# ---------------------------------------------------------------------- durability, config


async def test_reopened_ledger_keeps_records_and_tokens_keep_increasing(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "ledger.db"
    ledger = SQLiteLedger(path, clock=clock)
    done = await ledger.complete(await acquire(ledger, KEY, 5.0), "receipt")
    held = await acquire(ledger, OpKey("orders", "op-2"), 5.0)
    entry = await ledger.quarantine(
        QuarantineRequest("orders", QuarantineReason.MALFORMED_PAYLOAD, message=b"\xff")
    )
    await ledger.close()

    reopened = SQLiteLedger(path, clock=clock)
    try:
        assert await reopened.get(KEY) == done
        assert (await must_get(reopened, OpKey("orders", "op-2"))).token == held.token
        assert await reopened.quarantined() == [entry]
        fresh = await acquire(reopened, OpKey("orders", "op-3"), 5.0)
        assert fresh.token > held.token > done.token
        await reopened.complete(held)  # the claim made before the restart is still current
    finally:
        await reopened.close()
    with sqlite3.connect(path) as conn:  # times are REAL POSIX seconds from the injected clock
        (created,) = conn.execute(
            "SELECT created_at FROM replaysafe_operations WHERE operation_id = 'op-1'"
        ).fetchone()
    assert created == done.created_at == clock.now()


@pytest.mark.parametrize(
    ("synchronous", "level"), [(None, 2), ("full", 2), ("NORMAL", 1), ("EXTRA", 3), ("OFF", 0)]
)
async def test_pragmas_are_wal_and_the_chosen_synchronous(
    tmp_path: Path, synchronous: str | None, level: int
) -> None:
    path = tmp_path / "ledger.db"
    ledger = (
        SQLiteLedger(path) if synchronous is None else SQLiteLedger(path, synchronous=synchronous)
    )
    # the ledger's own connection: synchronous is a per-connection setting
    async with ledger, ledger.transaction() as tx:
        assert await tx.fetchall("PRAGMA synchronous") == [(level,)]
        assert await tx.fetchall("PRAGMA journal_mode") == [("wal",)]
    with sqlite3.connect(path) as conn:  # WAL is a property of the file: it stays
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


@pytest.mark.parametrize(
    ("synchronous", "level", "finding"),
    [
        ("FULL", DurabilityLevel.DURABLE, None),
        ("EXTRA", DurabilityLevel.DURABLE, None),
        ("NORMAL", DurabilityLevel.LOSES_RECENT, "RS118"),
        ("OFF", DurabilityLevel.NOT_DURABLE, "RS110"),
    ],
)
async def test_durability_is_read_from_the_ledgers_connection(
    tmp_path: Path, synchronous: str, level: DurabilityLevel, finding: str | None
) -> None:
    ledger = SQLiteLedger(tmp_path / "ledger.db", synchronous=synchronous)
    try:
        d = await ledger.durability()
        assert (d.level, d.durable) == (level, level is DurabilityLevel.DURABLE)
        assert d.setting == f"journal_mode=wal, synchronous={synchronous}"
        assert {f.id for f in await _durability_findings(ledger)} == ({finding} - {None})
        # what the connection uses, not what the constructor was told: change it underneath
        await ledger.run_job(lambda conn: conn.execute("PRAGMA synchronous=NORMAL"), write=False)
        assert (await ledger.durability()).level is DurabilityLevel.LOSES_RECENT
    finally:
        await ledger.close()


async def test_an_in_memory_database_cannot_back_a_claim() -> None:
    async with SQLiteLedger(":memory:") as ledger:
        d = await ledger.durability()
        assert (d.level, d.setting) == (
            DurabilityLevel.NOT_DURABLE,
            "journal_mode=memory, synchronous=FULL",
        )
        [rs110] = await _durability_findings(ledger)
        assert (rs110.id, rs110.severity) == ("RS110", "error")


async def _durability_findings(ledger: SQLiteLedger) -> list[Any]:
    from replaysafe import App, Context, Effect, Guarantee
    from replaysafe.brokers import MemoryBroker
    from replaysafe.explain import explain

    async def charge(ctx: Context) -> None:
        return None

    app = App("durability", broker=MemoryBroker(), ledger=ledger)
    app.handler("payments", guarantee=Guarantee.EFFECTIVELY_ONCE,
                effect=Effect.keyed("payments-api"))(charge)  # fmt: skip
    [handler] = (await explain(app)).handlers
    return [f for f in handler.findings if f.id in ("RS110", "RS111", "RS118")]


@pytest.mark.parametrize("synchronous", ["ALWAYS", "", "FULL; DROP TABLE x", "2"])
def test_invalid_synchronous_is_a_configuration_error(tmp_path: Path, synchronous: str) -> None:
    with pytest.raises(ConfigurationError, match="synchronous"):
        SQLiteLedger(tmp_path / "ledger.db", synchronous=synchronous)
    assert not (tmp_path / "ledger.db").exists()


def test_negative_busy_timeout_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="busy_timeout"):
        SQLiteLedger(tmp_path / "ledger.db", busy_timeout=-1)


async def test_purge_is_one_bounded_statement_on_the_index(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    async with SQLiteLedger(path) as ledger:
        await ledger.get(KEY)  # creates the schema
    with sqlite3.connect(path) as conn:
        plan = " | ".join(
            row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + PURGE_SQL, ("completed", 0, 1))
        )
    assert "INDEX replaysafe_operations_purge" in plan, plan
    assert "SCAN" not in plan, plan


# ---------------------------------------------------------------------- failures map to our errors


@pytest.mark.parametrize(
    "call",
    [
        # an int beyond 64 bits: the driver cannot bind it (OverflowError)
        lambda led: led.quarantine(
            QuarantineRequest("orders", QuarantineReason.MAX_ATTEMPTS, "op-1", attempts=2**64)
        ),
        # a lone surrogate has no UTF-8 form (a bare UnicodeEncodeError before)
        lambda led: led.claim(OpKey("orders", "op-\udcff"), "fp", "w", 5.0),
        # a violated constraint (IntegrityError): the one-row meta table gets a second row
        lambda led: led.run_job(
            lambda conn: conn.execute("INSERT INTO replaysafe_meta VALUES (2, 0, 0)"), write=True
        ),
    ],
    ids=["int-overflow", "lone-surrogate", "constraint"],
)
async def test_data_sqlite_refuses_is_a_data_error_not_an_outage(tmp_path: Path, call: Any) -> None:
    path = tmp_path / "ledger.db"

    def dump() -> list[str]:
        """Every table's schema and rows, as SQL (read on a connection of its own)."""
        conn = sqlite3.connect(path)
        try:
            return list(conn.iterdump())
        finally:
            conn.close()

    async with SQLiteLedger(path) as ledger:
        await ledger.get(KEY)  # creates the schema, so that the dumps compare rows
        before = dump()
        with pytest.raises(LedgerDataError, match="refused this call's data") as raised:
            await call(ledger)
        assert not isinstance(raised.value, LedgerUnavailable)
        # nothing written: no operation, no quarantine entry, no row of any table
        assert (await ledger.summary()).by_state == {}
        assert await ledger.quarantined() == []
        assert dump() == before
        assert isinstance(await ledger.claim(KEY, "fp", "w", 5.0), Acquired)


async def test_a_locked_database_is_ledger_unavailable_not_a_sqlite_error(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = SQLiteLedger(path, busy_timeout=0.2)
    try:
        await ledger.get(KEY)
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        with pytest.raises(LedgerUnavailable, match="busy_timeout") as raised:
            await ledger.claim(KEY, "fp", "w1", 5.0)
        assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
        assert await ledger.get(KEY) is None  # reads still work in WAL while a writer waits
        blocker.execute("COMMIT")
        blocker.close()
        assert isinstance(await ledger.claim(KEY, "fp", "w1", 5.0), Acquired)
    finally:
        await ledger.close()


async def test_an_unopenable_path_is_ledger_unavailable(tmp_path: Path) -> None:
    async with SQLiteLedger(tmp_path / "missing-dir" / "ledger.db") as ledger:
        with pytest.raises(LedgerUnavailable, match="writable"):
            await ledger.claim(KEY, "fp", "w1", 5.0)


async def test_a_file_that_is_not_a_database_is_ledger_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    path.write_bytes(b"this is not a sqlite database, just bytes" * 100)
    async with SQLiteLedger(path) as ledger:
        with pytest.raises(LedgerUnavailable):
            await ledger.get(KEY)


# ---------------------------------------------------------------------- lifecycle, transactions


async def test_close_is_idempotent_and_later_calls_fail_clearly(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "ledger.db")
    assert str(tmp_path / "ledger.db") in repr(ledger)
    await ledger.claim(KEY, "fp", "w1", 5.0)
    await ledger.close()
    await ledger.close()
    assert "closed" in repr(ledger)
    with pytest.raises(LedgerUnavailable, match="closed"):
        await ledger.get(KEY)


async def test_calling_the_ledger_inside_its_own_transaction_raises_instead_of_deadlocking(
    tmp_path: Path,
) -> None:
    async with SQLiteLedger(tmp_path / "ledger.db") as ledger:
        claim = await acquire(ledger, KEY, 5.0)

        async def misuse() -> None:
            async with ledger.transaction():
                with pytest.raises(ConfigurationError, match="complete_in"):
                    await ledger.complete(claim)
                with pytest.raises(ConfigurationError):
                    async with ledger.transaction():
                        pass

        await asyncio.wait_for(misuse(), 10)
        assert (await ledger.complete(claim)).state is State.COMPLETED


async def test_other_calls_wait_for_an_open_transaction(tmp_path: Path) -> None:
    async with SQLiteLedger(tmp_path / "ledger.db") as ledger:
        claim = await acquire(ledger, KEY, 5.0)
        async with ledger.transaction() as tx:
            reader = asyncio.create_task(ledger.get(KEY))
            await asyncio.sleep(0.05)
            assert not reader.done()  # documented: the connection belongs to the transaction
            await ledger.complete_in(tx, claim, "r")
        record = await asyncio.wait_for(reader, 10)
        assert record is not None
        assert record.state is State.COMPLETED  # it ran after the commit


async def test_complete_in_refuses_a_transaction_of_another_ledger(tmp_path: Path) -> None:
    async with (
        SQLiteLedger(tmp_path / "a.db") as a,
        SQLiteLedger(tmp_path / "b.db") as b,
    ):
        claim = await acquire(a, KEY, 5.0)
        with pytest.raises(ConfigurationError, match="this ledger"):
            async with b.transaction() as tx:
                await a.complete_in(tx, claim)
        assert (await must_get(a, KEY)).state is State.IN_FLIGHT


async def test_a_finished_transaction_cannot_be_used(tmp_path: Path) -> None:
    async with SQLiteLedger(tmp_path / "ledger.db") as ledger:
        async with ledger.transaction() as tx:
            await tx.execute("CREATE TABLE t (x INTEGER)")
        with pytest.raises(LedgerError, match="finished"):
            await tx.execute("INSERT INTO t VALUES (1)")
        claim = await acquire(ledger, KEY, 5.0)
        with pytest.raises(LedgerError, match="finished"):
            await ledger.complete_in(tx, claim)


async def test_ending_the_transaction_from_inside_is_refused(tmp_path: Path) -> None:
    async with SQLiteLedger(tmp_path / "ledger.db") as ledger:
        with pytest.raises(ConfigurationError, match="COMMIT"):
            async with ledger.transaction() as tx:
                await tx.execute("COMMIT")
        assert isinstance(await ledger.claim(KEY, "fp", "w1", 5.0), Acquired)  # still usable


async def test_execute_reports_rowcount_and_rows(tmp_path: Path) -> None:
    async with SQLiteLedger(tmp_path / "ledger.db") as ledger, ledger.transaction() as tx:
        await tx.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
        result = await tx.execute("INSERT INTO t (x) VALUES (?), (?)", (1, 2))
        assert result.rowcount == 2
        assert await tx.fetchall("SELECT x FROM t WHERE x > :m", {"m": 1}) == [(2,)]


# ---------------------------------------------------------------------- schema upgrade

#: The version-1 schema, as the previous release created it (copied, not imported: the point is
#: that a file written by the old code opens with the new one).
V1_SCHEMA = """
CREATE TABLE replaysafe_operations (
    scope TEXT NOT NULL, operation_id TEXT NOT NULL, fingerprint TEXT NOT NULL,
    state TEXT NOT NULL, token INTEGER NOT NULL, owner TEXT, lease_until REAL,
    attempts INTEGER NOT NULL, result TEXT, last_error TEXT, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, completed_at REAL, PRIMARY KEY (scope, operation_id)
) WITHOUT ROWID;
CREATE INDEX replaysafe_operations_purge ON replaysafe_operations (state, completed_at);
CREATE TABLE replaysafe_quarantine (
    id TEXT PRIMARY KEY, scope TEXT NOT NULL, reason TEXT NOT NULL, operation_id TEXT,
    fingerprint TEXT, risk TEXT NOT NULL, attempts INTEGER NOT NULL, first_detail TEXT NOT NULL,
    last_detail TEXT NOT NULL, message BLOB, content_type TEXT, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, seen INTEGER NOT NULL
);
CREATE INDEX replaysafe_quarantine_by_reason ON replaysafe_quarantine (reason, created_at);
CREATE TABLE replaysafe_meta (
    id INTEGER PRIMARY KEY CHECK (id = 1), last_token INTEGER NOT NULL,
    schema_version INTEGER NOT NULL
);
INSERT INTO replaysafe_meta VALUES (1, 7, 1);
"""
V1_ENTRY_ID = "e" * 32


def write_v1_file(path: Path, clock: FakeClock) -> None:
    """A ledger file as version 1 left it: one completed operation, one quarantined operation
    (token 7, three attempts) and its quarantine entry."""
    now = clock.now()
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.executescript(V1_SCHEMA)
        conn.execute(
            "INSERT INTO replaysafe_operations VALUES "
            "('orders', 'done', 'fp-a', 'completed', 3, 'w1', NULL, 1, 'receipt', NULL, ?, ?, ?)",
            (now - 50, now - 50, now - 50),
        )
        conn.execute(
            "INSERT INTO replaysafe_operations VALUES "
            "('orders', 'poison', 'fp-a', 'quarantined', 7, 'w1', NULL, 3, NULL, 'boom', ?, ?, "
            "NULL)",
            (now - 40, now - 40),
        )
        conn.execute(
            "INSERT INTO replaysafe_quarantine VALUES (?, 'orders', 'max_attempts', 'poison', "
            "'fp-a', 'released_cleanly', 3, 'boom', 'boom', ?, 'application/json', ?, ?, 1)",
            (V1_ENTRY_ID, b"x" * 100, now - 40, now - 40),
        )


def quarantine_columns(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return {row[1] for row in conn.execute("PRAGMA table_info(replaysafe_quarantine)")}


def schema_version(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        (version,) = conn.execute("SELECT schema_version FROM replaysafe_meta").fetchone()
    return int(version)


async def test_a_version_1_file_is_upgraded_in_place_keeping_its_rows(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "ledger.db"
    write_v1_file(path, clock)
    assert "published_at" not in quarantine_columns(path)
    # two ledgers opening the old file at once: one upgrades, the other finds it done
    a, b = SQLiteLedger(path, clock=clock), SQLiteLedger(path, clock=clock)
    try:
        done_a, done_b = await asyncio.gather(
            a.get(OpKey("orders", "done")), b.get(OpKey("orders", "done"))
        )
        assert done_a == done_b
        assert done_a is not None and (done_a.state, done_a.result) == (State.COMPLETED, "receipt")
        assert {"published_at", "message_size", "redriven_at", "redrives"} <= quarantine_columns(
            path
        )
        assert schema_version(path) == SCHEMA_VERSION
        entry = await a.quarantine_entry(V1_ENTRY_ID)
        assert entry is not None
        assert (entry.reason, entry.operation_id, entry.seen) == (
            QuarantineReason.MAX_ATTEMPTS,
            "poison",
            1,
        )
        # the original size of an old entry is unknown: the stored copy's length stands in
        assert (entry.message_size, entry.truncated, entry.published_at) == (100, False, None)
        assert (entry.redrives, entry.redriven_at) == (0, None)
        # the old rows work with the new calls
        assert (await a.summary()).hot_operations == [(OpKey("orders", "poison"), 3)]
        await b.redrive(V1_ENTRY_ID)
        again = await acquire(a, OpKey("orders", "poison"), 5.0, fingerprint="fp-a")
        assert (again.attempt, again.token) == (1, 8)  # the token sequence carried over
    finally:
        await a.close()
        await b.close()
    # reopening an upgraded file changes nothing
    async with SQLiteLedger(path, clock=clock) as reopened:
        stored = await reopened.quarantine_entry(V1_ENTRY_ID)
        assert stored is not None and stored.redrives == 1
    assert schema_version(path) == SCHEMA_VERSION


async def test_an_in_flight_row_from_before_version_4_reads_as_maybe_started(
    tmp_path: Path,
) -> None:
    """Version 4 records whether an unkeyed effect started (``mark_started``). A row written
    before it cannot say: a claim taking it over must read it as "may have started"."""
    clock = FakeClock()
    path = tmp_path / "ledger.db"
    write_v1_file(path, clock)
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "INSERT INTO replaysafe_operations VALUES "
            "('orders', 'stuck', 'fp-a', 'in_flight', 5, 'w1', ?, 1, NULL, NULL, ?, ?, NULL)",
            (clock.now() - 1, clock.now() - 10, clock.now() - 10),
        )
    async with SQLiteLedger(path, clock=clock) as ledger:
        [outcome] = await ledger.claim_many(
            [ClaimRequest(OpKey("orders", "stuck"), "fp-a", "w2", 5.0, marks_start=True)]
        )
        assert isinstance(outcome, Acquired)
        assert (outcome.claim.recovered, outcome.claim.previous_started) == (True, True)
        # and it stays so for the next takeover, whatever this attempt does
        assert (await must_get(ledger, OpKey("orders", "stuck"))).unstarted_attempt is None
    assert schema_version(path) == SCHEMA_VERSION == 4


async def test_a_newer_file_is_refused_before_anything_is_changed(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    write_v1_file(path, FakeClock())
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE replaysafe_meta SET schema_version = ?", (SCHEMA_VERSION + 1,))
    async with SQLiteLedger(path) as ledger:
        with pytest.raises(ConfigurationError, match="newer"):
            await ledger.get(KEY)
    assert "published_at" not in quarantine_columns(path)  # not "upgraded" into a mix


# ---------------------------------------------------------------------- inspect, purge, redrive


async def test_summary_queries_are_answered_from_indexes(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    async with SQLiteLedger(path) as ledger:
        await ledger.get(KEY)  # creates the schema
    statements = [
        (sqlite_sql.SUMMARY_BY_STATE, ()),
        (sqlite_sql.SUMMARY_IN_FLIGHT, (0.0,)),
        (sqlite_sql.SUMMARY_RECENT, (0.0,)),
        (sqlite_sql.SUMMARY_HOT, (10,)),
        (sqlite_sql.SUMMARY_REASONS, ()),
        (PURGE_QUARANTINE_SQL, (None, "max_attempts", 1.0, 10)),
        (PURGE_QUARANTINE_SQL, ('["a", "b"]', None, float("inf"), 10)),
    ]
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for statement, params in statements:
            plan = " | ".join(
                row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + statement, params)
            )
            assert "INDEX" in plan, (statement, plan)
            assert "TEMP B-TREE" not in plan, (statement, plan)  # no sort of a whole table
            # a SCAN is allowed only over a covering index (the counts) or json_each
            for step in plan.split(" | "):
                if step.startswith("SCAN"):
                    assert "COVERING INDEX" in step or "json_each" in step, (statement, plan)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        hot_plan = " | ".join(
            row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sqlite_sql.SUMMARY_HOT, (10,))
        )
    assert "replaysafe_operations_hot" in hot_plan, hot_plan


async def test_summary_hour_window_and_size_follow_the_clock_and_the_file(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "ledger.db"
    async with SQLiteLedger(path, clock=clock) as ledger:
        await ledger.complete(await acquire(ledger, OpKey("orders", "early"), 5.0))
        clock.advance(1800)
        await ledger.complete(await acquire(ledger, OpKey("orders", "late"), 5.0))
        assert (await ledger.summary()).completed_last_hour == 2
        clock.advance(1801)  # "early" is now more than an hour old
        assert (await ledger.summary()).completed_last_hour == 1
        clock.advance(1800)
        summary = await ledger.summary()
        assert summary.completed_last_hour == 0
        assert summary.by_state == {"completed": 2}
        assert summary.now == clock.now()
        with contextlib.closing(sqlite3.connect(path)) as conn:
            (pages,) = conn.execute("PRAGMA page_count").fetchone()
            (size,) = conn.execute("PRAGMA page_size").fetchone()
        assert summary.approx_bytes == pages * size > 0


async def test_purge_quarantine_takes_more_ids_than_sqlite_has_parameters(tmp_path: Path) -> None:
    async with SQLiteLedger(tmp_path / "ledger.db") as ledger:
        real = [
            (
                await ledger.quarantine(
                    QuarantineRequest("orders", QuarantineReason.MAX_ATTEMPTS, f"op-{i}", "fp")
                )
            ).id
            for i in range(3)
        ]
        ids = [f"missing-{i}" for i in range(40_000)] + real + ["x'); DROP TABLE t; --"]
        assert await ledger.purge_quarantine(ids) == 3
        assert await ledger.quarantined() == []
