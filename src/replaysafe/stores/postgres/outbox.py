"""The outbox in the PostgreSQL ledger's database: :class:`PostgresOutboxStore` (implemented in
:mod:`replaysafe.stores.postgres._outbox`; also exported by :mod:`replaysafe.outbox`).

Import it from here or from :mod:`replaysafe.outbox`, not from ``_outbox``: the store is built on
:mod:`replaysafe.outbox.base`, and the :mod:`replaysafe.outbox` package imports the store when it
initialises, so that package has to start first. This module starts it; the package's own import
of ``_outbox`` then completes before this module asks for the store.
"""

import replaysafe.outbox  # noqa: F401  (first: see the module docstring)
from replaysafe.stores.postgres._outbox import PostgresOutboxStore

__all__ = ["PostgresOutboxStore"]
