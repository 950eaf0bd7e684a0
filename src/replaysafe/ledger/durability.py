"""How much a crash can take from a ledger's store: the value every ``Ledger.durability()``
returns (:class:`Durability`, :class:`DurabilityLevel`) and the rules that judge each store's
settings. The rules are pure functions of settings already read: each backend reads its live
settings (PostgreSQL ``current_setting``, SQLite ``PRAGMA``, Redis ``CONFIG GET``) and judges them
here; ``explain`` turns the level into RS110 (not durable), RS118 (loses recent) or RS111
(unknown). The backend modules re-export their rule (``replaysafe.ledger.postgres.assess_postgres``
…), and ``replaysafe.ledger.base`` re-exports the value types.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class DurabilityLevel(StrEnum):
    """How much a crash can take from a ledger's store (what ``explain`` judges a ledger by)."""

    #: a claim or completion that returned survives a crash or power loss of the ledger's machine
    DURABLE = "durable"
    #: a crash (of the machine; for some stores of the server process) can lose the most recent
    #: claims and completions, from about the last second up to the OS's write-back delay
    #: (typically 30 s), but nothing older and without corrupting the store
    LOSES_RECENT = "loses_recent"
    #: a crash or restart can lose claims wholesale (everything, or everything since the last
    #: snapshot) or corrupt the store
    NOT_DURABLE = "not_durable"
    #: the ledger cannot tell (the server does not let it read its settings)
    UNKNOWN = "unknown"


#: ``Durability.durable`` for each level (True only when a machine crash loses nothing)
_DURABLE_FLAG: dict[DurabilityLevel, bool | None] = {
    DurabilityLevel.DURABLE: True,
    DurabilityLevel.LOSES_RECENT: False,
    DurabilityLevel.NOT_DURABLE: False,
    DurabilityLevel.UNKNOWN: None,
}


@dataclass(frozen=True, slots=True)
class Durability:
    """Whether a ledger's storage can back a claim: once ``claim`` returned, does the claim
    survive a crash of the ledger's process or machine? For ``explain``.

    Backends read it from the live server or connection (:meth:`Ledger.durability`). ``level``
    is the verdict; ``durable`` is kept for readers of the first version (True only for
    ``DURABLE``; a value built with ``durable`` alone gets the level it implies: True ->
    ``DURABLE``, False -> ``NOT_DURABLE``, None -> ``UNKNOWN``)."""

    store: str
    #: True: survives a machine crash; False: it may not; None: unknown
    durable: bool | None
    #: the setting that decides it (``synchronous=FULL``, ``appendfsync=always`` …)
    setting: str
    detail: str
    level: DurabilityLevel | None = None

    def __post_init__(self) -> None:
        if self.level is None:
            level = (
                DurabilityLevel.UNKNOWN
                if self.durable is None
                else DurabilityLevel.DURABLE
                if self.durable
                else DurabilityLevel.NOT_DURABLE
            )
            object.__setattr__(self, "level", level)  # frozen: set once, while being built
        elif _DURABLE_FLAG[self.level] is not self.durable:
            raise ValueError(
                f"Durability level {self.level.value} means durable={_DURABLE_FLAG[self.level]}, "
                f"not {self.durable}; build it with Durability.of(level, ...)"
            )

    @classmethod
    def of(cls, level: DurabilityLevel, store: str, setting: str, detail: str) -> Durability:
        """The value for ``level`` (``durable`` set to match)."""
        return cls(store, _DURABLE_FLAG[level], setting, detail, level)


# --------------------------------------------------------------------------- PostgreSQL


def assess_postgres(store: str, settings: dict[str, str]) -> Durability:
    """Judge the settings :meth:`PostgresLedger.durability` reads (``current_setting`` values by
    name) for the ledger's claims and completions."""
    fsync, commit = settings["fsync"], settings["synchronous_commit"]
    pages, standbys = settings["full_page_writes"], settings["synchronous_standby_names"].strip()
    setting = (
        f"fsync={fsync}, synchronous_commit={commit}, full_page_writes={pages}, "
        f"synchronous_standby_names={standbys!r}"
    )
    if fsync != "on":
        return Durability.of(
            DurabilityLevel.NOT_DURABLE, store, setting,
            "PostgreSQL does not fsync (fsync=off): an OS crash or power loss can lose any commit "
            "and corrupt the cluster beyond recovery; turn fsync on",
        )  # fmt: skip
    if pages != "on":
        return Durability.of(
            DurabilityLevel.NOT_DURABLE, store, setting,
            "full_page_writes=off: a page torn by power loss cannot be repaired from the WAL, so "
            "a machine crash can corrupt ledger rows (safe only on a filesystem that writes "
            "pages atomically); turn full_page_writes on",
        )  # fmt: skip
    if commit == "off":
        delay = settings.get("wal_writer_delay", "200ms")
        return Durability.of(
            DurabilityLevel.LOSES_RECENT, store, setting,
            "a commit returns before its WAL is flushed (synchronous_commit=off): a crash of the "
            f"server or its machine can lose the last claims and completions (up to 3 x "
            f"wal_writer_delay = 3 x {delay}); set synchronous_commit to on (or local) for the "
            "ledger's role or DSN",
        )  # fmt: skip
    if standbys and commit in ("on", "remote_write", "remote_apply"):
        waits = {"on": "flushed", "remote_write": "written", "remote_apply": "applied"}[commit]
        return Durability.of(
            DurabilityLevel.DURABLE, store, setting,
            "every commit is flushed to the primary's WAL and "
            f"{waits} by a synchronous standby before it returns: it survives a crash of the "
            "ledger's machine and a failover to that standby",
        )  # fmt: skip
    return Durability.of(
        DurabilityLevel.DURABLE, store, setting,
        "every commit is flushed to the WAL on disk before it returns: it survives a crash of "
        "the server or its machine; standbys (if any) are asynchronous, so a failover can lose "
        "the latest commits",
    )  # fmt: skip


# --------------------------------------------------------------------------- SQLite


def assess_sqlite(store: str, journal_mode: str, synchronous: str) -> Durability:
    """Judge a connection's ``journal_mode`` (lower case) and ``synchronous`` (OFF, NORMAL, FULL,
    EXTRA) for :meth:`SQLiteLedger.durability`."""
    setting = f"journal_mode={journal_mode}, synchronous={synchronous}"
    if journal_mode in ("memory", "off"):  # ":memory:" databases report "memory"
        return Durability.of(
            DurabilityLevel.NOT_DURABLE, store, setting,
            "the database lives in memory, or writes without a journal: a crash of the process "
            "loses (or corrupts) every claim and completion; use a file on a local disk in WAL "
            "mode with synchronous='FULL'",
        )  # fmt: skip
    if synchronous == "OFF":
        return Durability.of(
            DurabilityLevel.NOT_DURABLE, store, setting,
            "SQLite never fsyncs: a crash of the machine can lose any commit or corrupt the file; "
            "use synchronous='FULL'",
        )  # fmt: skip
    if synchronous in ("FULL", "EXTRA"):
        return Durability.of(
            DurabilityLevel.DURABLE, store, setting,
            "every commit is fsynced before claim/complete return",
        )  # fmt: skip
    if journal_mode == "wal":  # NORMAL
        return Durability.of(
            DurabilityLevel.LOSES_RECENT, store, setting,
            "the WAL is fsynced only at checkpoints: a process crash loses nothing, but power "
            "loss or an OS crash can roll back the latest commits (those the OS had not written "
            "back yet); use synchronous='FULL'",
        )  # fmt: skip
    return Durability.of(
        DurabilityLevel.NOT_DURABLE, store, setting,
        "a rollback journal with synchronous=NORMAL can be corrupted by power loss at the wrong "
        "moment; use WAL with synchronous='FULL'",
    )  # fmt: skip


# --------------------------------------------------------------------------- Redis


@dataclass(frozen=True, slots=True)
class RedisPersistence:
    """What the Redis server's persistence settings mean for the ledger (read by ``explain``).

    ``None`` fields are unknown (``CONFIG GET`` disabled or not permitted). ``can_back_claims`` is
    True only when a returned claim or completion is known to survive a crash of the Redis host
    (``level`` is ``DURABLE``).
    """

    appendonly: str | None
    appendfsync: str | None
    save: str | None
    maxmemory_policy: str | None
    can_back_claims: bool
    sentence: str
    #: the verdict as :meth:`RedisLedger.durability` reports it (``explain``: RS110/RS118/RS111)
    level: DurabilityLevel = DurabilityLevel.UNKNOWN

    @property
    def setting(self) -> str:
        """The settings read, as ``name=value`` pairs (or why none could be read)."""
        if not self.known:
            return "CONFIG GET not permitted"
        return (
            f"appendonly={self.appendonly}, appendfsync={self.appendfsync}, save={self.save!r}, "
            f"maxmemory-policy={self.maxmemory_policy}"
        )

    @property
    def known(self) -> bool:
        return self.appendonly is not None


def assess_persistence(config: Mapping[str, str] | None) -> RedisPersistence:
    """Judge Redis persistence settings (``CONFIG GET`` values by name; ``None`` when unknown).

    Only ``appendonly yes`` with ``appendfsync always`` writes every claim to disk before Redis
    replies (``DURABLE``); ``everysec`` may lose about the last second on power loss, ``no``
    about the last 30 s (``LOSES_RECENT``); without AOF everything since the last RDB snapshot
    (or everything, with no snapshots) is lost on restart (``NOT_DURABLE``). Any
    ``maxmemory-policy`` other than ``noeviction`` may evict records under memory pressure
    (``NOT_DURABLE``).
    """
    if config is None or "appendonly" not in config:
        return RedisPersistence(
            None,
            None,
            None,
            None,
            False,
            "Redis persistence is unknown: CONFIG GET is disabled or not permitted on this "
            "server, so replaysafe cannot tell whether a claim survives a Redis restart; ask the "
            "server's operator (only appendonly yes with appendfsync always can back a claim).",
        )
    aof = config.get("appendonly", "").lower()
    fsync = config.get("appendfsync", "").lower()
    save = config.get("save")
    policy = config.get("maxmemory-policy")
    level = DurabilityLevel.NOT_DURABLE
    if aof == "yes" and fsync == "always":
        level = DurabilityLevel.DURABLE
        sentence = (
            "Redis appends every write to its AOF and fsyncs it before replying (appendonly yes, "
            "appendfsync always): a claim or completion that returned survives a crash or power "
            "loss of the Redis host (a failover to an asynchronous replica can still lose the "
            "latest writes)."
        )
    elif aof == "yes":
        level = DurabilityLevel.LOSES_RECENT
        how, window = {
            "everysec": ("once a second", "about the last second"),
            "no": ("when the OS flushes it", "the last ~30 seconds"),
        }.get(fsync, ("on an unknown schedule", "an unknown amount"))
        sentence = (
            f"Redis fsyncs its AOF {how} (appendonly yes, appendfsync {fsync or 'unknown'}): a "
            "crash of the Redis process loses nothing, but power loss or a kernel crash can lose "
            f"{window} of claims and completions (a lost completion makes its operation new "
            "again, a lost claim lets a second worker run it); set appendfsync always to back "
            "claims."
        )
    elif save:
        sentence = (
            f"Redis has no AOF (appendonly {aof or 'unknown'}) and only RDB snapshots (save "
            f"{save!r}): a restart loses every claim and completion since the last snapshot, and "
            "those operations become new again; set appendonly yes and appendfsync always."
        )
    else:
        sentence = (
            f"Redis keeps the ledger in memory only (appendonly {aof or 'unknown'}, no RDB "
            "snapshots): a restart forgets every claim and completion and every operation becomes "
            "new again; set appendonly yes and appendfsync always."
        )
    if policy is not None and policy.lower() != "noeviction":
        level = DurabilityLevel.NOT_DURABLE
        sentence += (
            f" maxmemory-policy {policy} may evict ledger records under memory pressure (an "
            "evicted completion makes its operation new again); set it to noeviction."
        )
    return RedisPersistence(
        config.get("appendonly"),
        config.get("appendfsync"),
        save,
        policy,
        level is DurabilityLevel.DURABLE,
        sentence,
        level,
    )


__all__ = [
    "Durability",
    "DurabilityLevel",
    "RedisPersistence",
    "assess_persistence",
    "assess_postgres",
    "assess_sqlite",
]
