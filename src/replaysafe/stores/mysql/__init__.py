"""MySQL / MariaDB: the ledger and the outbox on one InnoDB database (extra ``mysql``; the
``asyncmy`` driver is imported lazily). See ``docs/ledger-mysql.md``.

::

    ledger = MySQLLedger.from_url("mysql://app:secret@db:3306/orders?table_prefix=rs_")
    await ledger.migrate()
    outbox = MySQLOutboxStore(ledger)
    await outbox.migrate()
"""

from replaysafe.stores.mysql.connection import MySQLConfig
from replaysafe.stores.mysql.durability import assess_mysql
from replaysafe.stores.mysql.ledger import MySQLLedger, MySQLTransaction
from replaysafe.stores.mysql.outbox import MySQLOutboxStore
from replaysafe.stores.mysql.schema import SCHEMA_VERSION, MigrationReport

__all__ = [
    "SCHEMA_VERSION",
    "MigrationReport",
    "MySQLConfig",
    "MySQLLedger",
    "MySQLOutboxStore",
    "MySQLTransaction",
    "assess_mysql",
]
