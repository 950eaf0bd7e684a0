"""The PostgreSQL driver (psycopg 3 and psycopg_pool, the ``postgres`` extra), imported on first
use so that importing replaysafe never needs it."""

from __future__ import annotations

import logging
from typing import Any

from replaysafe.errors import MissingExtra

#: one logger for the engine (the name it always had, so logging configuration keeps working)
log = logging.getLogger("replaysafe.ledger.postgres")


def psycopg_module() -> Any:
    """``psycopg``, imported on first use; ``MissingExtra`` names the extra."""
    try:
        import psycopg
    except ImportError:
        raise MissingExtra("postgres", "psycopg") from None
    return psycopg


def driver() -> tuple[Any, Any]:
    """``(psycopg, psycopg_pool)``, imported on first use; ``MissingExtra`` names the extra."""
    psycopg = psycopg_module()
    try:
        import psycopg_pool
    except ImportError:
        raise MissingExtra("postgres", "psycopg_pool") from None
    return psycopg, psycopg_pool


def pool_timeout() -> type[BaseException]:
    _, pool_mod = driver()
    timeout: type[BaseException] = pool_mod.PoolTimeout
    return timeout
