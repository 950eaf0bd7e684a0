"""How much a crash can take from a MySQL / MariaDB ledger: :func:`assess_mysql` judges the
server settings :meth:`MySQLLedger.durability` reads, with the levels every backend uses
(:class:`~replaysafe.ledger.durability.DurabilityLevel`; ``explain``: RS110 not durable, RS118
loses recent, RS111 unknown)."""

from __future__ import annotations

from collections.abc import Mapping

from replaysafe.ledger.durability import Durability, DurabilityLevel

#: the server variables read (``SHOW VARIABLES``; a variable the server lacks is simply absent)
VARIABLES = (
    "innodb_flush_log_at_trx_commit",
    "sync_binlog",
    "log_bin",
    "innodb_doublewrite",
    "wsrep_on",
    "read_only",
)


def _on(value: str | None) -> bool:
    return (value or "").strip().upper() in ("ON", "1", "YES", "TRUE", "FAST")


def assess_mysql(store: str, settings: Mapping[str, str]) -> Durability:
    """Judge the server's settings (variable name -> value, as ``SHOW VARIABLES`` prints them).

    - ``innodb_flush_log_at_trx_commit`` 1 (or MariaDB's 3) writes and flushes the redo log at
      every commit: durable on commit. 2 writes at commit and flushes about once a second (a
      server crash loses nothing, an OS crash or power loss up to ~1 s); 0 writes and flushes
      about once a second (even a server crash can lose ~1 s): both lose recent commits.
    - With the binary log on, a commit is a two-phase commit between InnoDB and the binlog; with
      ``sync_binlog`` other than 1 an OS crash can lose binlog events whose transactions crash
      recovery then rolls back: loses recent.
    - ``innodb_doublewrite`` off: a page torn by power loss cannot be repaired, so a machine
      crash can corrupt ledger rows: not durable.
    - Galera (``wsrep_on``) and read-only replicas are stated in the detail.
    """
    flush = settings.get("innodb_flush_log_at_trx_commit")
    if flush is None:
        return Durability.of(
            DurabilityLevel.UNKNOWN, store, "innodb_flush_log_at_trx_commit unreadable",
            "the server did not show innodb_flush_log_at_trx_commit (InnoDB missing, or SHOW "
            "VARIABLES not permitted); ask its operator whether a commit is flushed to disk",
        )  # fmt: skip
    binlog = _on(settings.get("log_bin"))
    sync_binlog = settings.get("sync_binlog", "0").strip()
    doublewrite = settings.get("innodb_doublewrite")
    setting = f"innodb_flush_log_at_trx_commit={flush}"
    setting += f", log_bin={'ON' if binlog else 'OFF'}"
    if binlog:
        setting += f", sync_binlog={sync_binlog}"
    if doublewrite is not None:
        setting += f", innodb_doublewrite={doublewrite}"
    notes = ""
    if _on(settings.get("wsrep_on")):
        notes += (
            " Galera is on: a commit is also certified on the cluster's other nodes, so a crash "
            "of this node alone loses nothing the cluster acknowledged."
        )
    if _on(settings.get("read_only")):
        notes += " The server is read-only (a replica?): ledger writes will fail; point the URL "
        notes += "at the primary."
    if doublewrite is not None and not _on(doublewrite):
        return Durability.of(
            DurabilityLevel.NOT_DURABLE, store, setting,
            "innodb_doublewrite is off: a page torn by power loss cannot be repaired, so a "
            "machine crash can corrupt ledger rows; turn innodb_doublewrite on" + notes,
        )  # fmt: skip
    if flush.strip() == "0":
        return Durability.of(
            DurabilityLevel.LOSES_RECENT, store, setting,
            "the redo log is written and flushed about once a second, not at commit "
            "(innodb_flush_log_at_trx_commit=0): a crash of the server or its machine can lose "
            "about the last second of claims and completions; set it to 1" + notes,
        )  # fmt: skip
    if flush.strip() == "2":
        return Durability.of(
            DurabilityLevel.LOSES_RECENT, store, setting,
            "the redo log is written at commit but flushed only about once a second "
            "(innodb_flush_log_at_trx_commit=2): a server crash loses nothing, an OS crash or "
            "power loss can lose about the last second of claims and completions; set it to 1"
            + notes,
        )  # fmt: skip
    if binlog and sync_binlog != "1":
        return Durability.of(
            DurabilityLevel.LOSES_RECENT, store, setting,
            f"the binary log is on but not flushed at every commit (sync_binlog={sync_binlog}): "
            "after an OS crash or power loss, crash recovery rolls back transactions whose "
            "binlog events were lost, so the latest claims and completions can vanish; set "
            "sync_binlog=1" + notes,
        )  # fmt: skip
    detail = (
        "every commit is flushed to the redo log on disk before it returns "
        f"(innodb_flush_log_at_trx_commit={flush.strip()}"
    )
    detail += (
        ", sync_binlog=1)" if binlog else "; the binary log is off, so sync_binlog does not matter)"
    )
    detail += (
        ": a claim or completion that returned survives a crash of the server or its machine; "
        "asynchronous replicas (if any) can miss the latest commits after a failover"
    )
    return Durability.of(DurabilityLevel.DURABLE, store, setting, detail + notes)


__all__ = ["VARIABLES", "assess_mysql"]
