"""A chaos run's ledger: opened fresh per run (its own file, schema or key prefix), the
``ledger_restart`` nemesis that cuts exactly the run's connections, the harness's own reads of
effect rows and quarantine flags (riding out that nemesis), and the cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from replaysafe.chaos.app import RunSpec, effects_table, mark_once
from replaysafe.chaos.cells import LEDGERS, ChaosConfig
from replaysafe.chaos.checker import Flag
from replaysafe.chaos.sink import APPLIED, Attempt
from replaysafe.errors import ConfigurationError, LedgerUnavailable
from replaysafe.ledger import ledger_from_url
from replaysafe.ledger.base import LedgerBackend, QuarantineEntry


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


async def retrying(call: Callable[[], Awaitable[Any]]) -> Any:
    """The harness's own ledger reads ride out ``ledger_restart`` (bounded: 10 tries)."""
    for attempt in range(10):
        try:
            return await call()
        except LedgerUnavailable:
            if attempt == 9:
                raise
            await asyncio.sleep(0.3)


async def effect_rows(
    ledger: LedgerBackend, run: str, kind: str, schema: str | None = None
) -> list[Attempt]:
    rows: list[Attempt] = await retrying(lambda: _read_effect_rows(ledger, run, kind, schema))
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


async def quarantine_flags(ledger: LedgerBackend) -> list[Flag]:
    entries: list[QuarantineEntry] = await retrying(lambda: ledger.quarantined(limit=100_000))
    return [Flag(e.operation_id, e.reason.value, e.risk.value, e.created_at) for e in entries]


# --------------------------------------------------------------------------- brokers
