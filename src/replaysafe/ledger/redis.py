"""The Redis ledger's historical import path: the store lives in :mod:`replaysafe.stores.redis`
(one package per engine); its public names are re-exported here."""

from replaysafe.stores.redis import (
    BATCH_BYTES,
    BATCH_CHUNK,
    CLIENT_NAME,
    MEMORY_SAMPLE,
    PURGE_CHUNK,
    SUMMARY_CHUNK,
    RedisLedger,
    RedisPersistence,
    SyncRedisLedger,
    assess_persistence,
)

__all__ = [
    "BATCH_BYTES",
    "BATCH_CHUNK",
    "CLIENT_NAME",
    "MEMORY_SAMPLE",
    "PURGE_CHUNK",
    "SUMMARY_CHUNK",
    "RedisLedger",
    "RedisPersistence",
    "SyncRedisLedger",
    "assess_persistence",
]
