"""Stores grouped by engine: each package holds one database's connection handling, error
mapping, migrations, and the ledger and outbox built on them."""
