"""The one place a URL becomes a backend: :func:`open_broker`, :func:`open_ledger` and
:func:`open_outbox` (re-exported by ``replaysafe``, ``replaysafe.brokers``, ``replaysafe.ledger``
and ``replaysafe.outbox``).

Each backend owns its URL grammar (its ``from_url``, which reads the URL into the backend's
validated options); this table only says which backend a URL's scheme names, which extra installs
its driver, and what its URLs look like, so every tool, CLI command and the chaos harness reads a
URL the same way. Backends are imported only when opened: a driver that is not installed fails
with ``MissingExtra`` naming the extra, never at ``import replaysafe``. docs/urls.md has the
whole grammar.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from replaysafe._redact import redact
from replaysafe.errors import ConfigurationError

if TYPE_CHECKING:
    from replaysafe.brokers.base import Broker
    from replaysafe.ledger.base import LedgerBackend
    from replaysafe.outbox.base import OutboxStore

Kind = Literal["broker", "ledger", "outbox"]


@dataclass(frozen=True, slots=True)
class Backend:
    """One backend as the registry knows it."""

    kind: Kind
    #: URL schemes it answers (``amqp`` for ``amqp://…``; ``sqlite`` for ``sqlite:PATH``; the
    #: bare word ``memory``)
    schemes: tuple[str, ...]
    #: ``module:callable`` taking ``(url, **options)``: the backend's own URL parser
    opener: str
    #: what its URLs look like (error messages, docs)
    shape: str
    #: the pip extra that installs its driver (None: no extra needed)
    extra: str | None = None

    def open(self, url: str, **options: Any) -> Any:
        module, _, path = self.opener.partition(":")
        target: Any = importlib.import_module(module)
        for name in path.split("."):
            target = getattr(target, name)
        return target(url, **options)


_MYSQL, _MYSQL_URL = "replaysafe.stores.mysql:", "mysql://user:pass@host:3306/db (or mariadb://)"

#: every backend, in the order error messages list them
BACKENDS: tuple[Backend, ...] = (
    Backend("broker", ("memory",), "replaysafe.brokers.memory:MemoryBroker.from_url", "memory"),
    Backend(
        "broker",
        ("amqp", "amqps"),
        "replaysafe.brokers.rabbitmq:RabbitMQBroker.from_url",
        "amqp://user:pass@host:5672/vhost",
        "rabbitmq",
    ),
    Backend(
        "broker",
        ("sqs", "sqs+http", "sqs+https"),
        "replaysafe.brokers.sqs:SQSBroker.from_url",
        "sqs://[region] or sqs+http(s)://host:port[/region]",
        "sqs",
    ),
    Backend(
        "broker",
        ("kafka", "kafka+ssl"),
        "replaysafe.brokers.kafka:KafkaBroker.from_url",
        "kafka://host:port[,host:port] or kafka+ssl://…",
        "kafka",
    ),
    Backend(
        "broker",
        ("nats", "nats+tls"),
        "replaysafe.brokers.nats:NATSBroker.from_url",
        "nats://host:port[,host:port] or nats+tls://…",
        "nats",
    ),
    Backend("ledger", ("memory",), "replaysafe.ledger.memory:MemoryLedger.from_url", "memory"),
    Backend("ledger", ("sqlite",), "replaysafe.ledger.sqlite:SQLiteLedger.from_url", "sqlite:PATH"),
    Backend(
        "ledger",
        ("postgresql", "postgres"),
        "replaysafe.ledger.postgres:PostgresLedger.from_url",
        "postgresql://user@host:5432/db (or a libpq key=value DSN)",
        "postgres",
    ),
    Backend(
        "ledger",
        ("redis", "rediss", "unix"),
        "replaysafe.ledger.redis:RedisLedger.from_url",
        "redis://host:6379/0",
        "redis",
    ),
    Backend("ledger", ("mysql", "mariadb"), _MYSQL + "MySQLLedger.from_url", _MYSQL_URL, "mysql"),
    Backend(
        "outbox", ("sqlite",), "replaysafe.outbox.sqlite:SQLiteOutboxStore.from_url", "sqlite:PATH"
    ),
    Backend(
        "outbox",
        ("postgresql", "postgres"),
        "replaysafe.outbox.postgres:PostgresOutboxStore.from_url",
        "postgresql://user@host:5432/db (or a libpq key=value DSN)",
        "postgres",
    ),
    Backend(
        "outbox", ("mysql", "mariadb"), _MYSQL + "MySQLOutboxStore.from_url", _MYSQL_URL, "mysql"
    ),
)

#: ``sqlite:PATH`` style: a scheme, a colon, then no ``//`` (a Windows drive letter is not one)
_OPAQUE = re.compile(r"^([a-z][a-z0-9+.-]+):(?!//)")
#: the schemes whose whole URL is the word itself
_BARE = frozenset({"memory"})
#: a libpq ``key=value`` connection string names PostgreSQL
_LIBPQ = re.compile(r"(?:^|\s)(?:dbname|host|user|port|hostaddr|service)\s*=")


def scheme_of(url: str) -> str:
    """The scheme a URL names: ``amqp`` for ``amqp://…``, ``sqlite`` for ``sqlite:PATH``, the
    word itself for ``memory``, ``postgresql`` for a libpq ``key=value`` string; "" for none."""
    head, sep, _ = url.partition("://")
    if sep:
        return head.lower()
    m = _OPAQUE.match(url)
    if m:
        return m.group(1).lower()
    if _LIBPQ.search(url):
        return "postgresql"
    # only a scheme some backend answers as a bare word: "sqlite" alone is not a path
    word = url.strip().lower()
    return word if word in _BARE else ""


def backend_for(kind: Kind, url: str) -> Backend:
    """The backend of ``kind`` that ``url`` names; ``ConfigurationError`` listing the ones there
    are (the URL's password redacted) when none does."""
    scheme = scheme_of(url)
    for backend in BACKENDS:
        if backend.kind == kind and scheme in backend.schemes:
            return backend
    shapes = "; ".join(b.shape for b in BACKENDS if b.kind == kind)
    raise ConfigurationError(f"unknown {kind} URL {redact(url)!r}; use one of: {shapes}")


def schemes(kind: Kind) -> str:
    """The URL shapes of ``kind``, for help texts."""
    return ", ".join(b.shape for b in BACKENDS if b.kind == kind)


def open_broker(url: str, **options: Any) -> Broker:
    """The broker ``url`` names, built by its adapter's ``from_url``; ``options`` (``clock``,
    ``failpoints``, adapter settings) win over the URL's query. ``ConfigurationError`` for an
    unknown scheme or a bad option, ``MissingExtra`` when the driver is not installed."""
    broker: Broker = backend_for("broker", url).open(url, **options)
    return broker


def open_ledger(url: str, **options: Any) -> LedgerBackend:
    """The ledger ``url`` names (``memory``, ``sqlite:PATH``, ``postgresql://…``,
    ``redis://…``), built by its backend's ``from_url``; ``options`` win over the URL's query.
    Errors as :func:`open_broker`."""
    ledger: LedgerBackend = backend_for("ledger", url).open(url, **options)
    return ledger


def open_outbox(url: str, **options: Any) -> OutboxStore:
    """The outbox store ``url`` names (``sqlite:PATH``: the outbox tables in that SQLite file;
    ``postgresql://…?schema=…&table_prefix=…``), built by its store's ``from_url``. Close it
    when done. Errors as :func:`open_broker`."""
    store: OutboxStore = backend_for("outbox", url).open(url, **options)
    return store
