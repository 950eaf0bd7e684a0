"""PostgreSQL (psycopg 3, the ``postgres`` extra): the ledger, the outbox, what they stand on.

- :mod:`.driver`: the lazily imported driver; :mod:`.connection`: a ledger's options, pool
  arguments and rendered statements (:class:`~.connection.Shared`); :mod:`.errors`: driver errors
  to replaysafe errors; :mod:`.schema`: versions, migration, the open check; :mod:`.sql`: the
  statements; :mod:`.codec`: parameters and row decoding; :mod:`.steps`: the sans-IO logic of
  more than one statement, shared by both flavours.
- The ledger by role: :mod:`.claims` (``Ledger``), :mod:`.quarantine` (``QuarantineStore``),
  :mod:`.controls` (``HandlerControls``), :mod:`.admin` (``LedgerAdmin``) and
  :mod:`.transaction`, on one base (:mod:`.core`), composed in :mod:`.ledger`
  (:class:`~.ledger.PostgresLedger`); its sync twin in :mod:`.sync`.
- The outbox: :mod:`.outbox` (:class:`~.outbox.PostgresOutboxStore`, implemented in
  :mod:`._outbox`, which :mod:`replaysafe.outbox` imports), its statements in :mod:`.outbox_sql`.

The submodules load the driver only when used; ``replaysafe.ledger.postgres`` and
``replaysafe.outbox.postgres`` are the public import paths.
"""
