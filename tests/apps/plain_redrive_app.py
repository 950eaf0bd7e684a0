"""An app for tests/test_redrive_plain_clients.py: one effectively-once handler fed by a plain
broker client (no content type, no rs-* headers: the key extractor derives the operation id).

``build()`` makes it for a test's own broker. ``replaysafe quarantine redrive`` in a subprocess
imports ``app``, made from the environment: ``REDRIVE_BROKER`` (a URL for ``broker_from_url``),
``REDRIVE_SOURCE``, ``REDRIVE_GROUP`` and ``REDRIVE_DIR`` (the SQLite ledger lives there).

While the file ``REDRIVE_DIR/broken`` exists the handler raises a non-retryable error (the
message is quarantined on its first attempt); otherwise it appends the operation id to
``REDRIVE_DIR/effects.txt``: that is the effect the test counts.
"""

from __future__ import annotations

import os
from pathlib import Path

from replaysafe import App, Context, Effect, Guarantee, RetryPolicy
from replaysafe.brokers import broker_from_url
from replaysafe.brokers.base import Broker
from replaysafe.ledger import SQLiteLedger
from replaysafe.ledger.base import Ledger


class MailerDown(Exception):
    """Not retried: the message goes to quarantine at once, to be redriven after the fix."""


def build(
    broker: Broker, source: str, group: str, directory: Path, *, ledger: Ledger | None = None
) -> App:
    """The app on ``broker``; its ledger is ``ledger``, else a SQLite file in ``directory``."""
    app = App(
        "plain-redrive", broker=broker, ledger=ledger or SQLiteLedger(directory / "ledger.db")
    )

    @app.handler(source, guarantee=Guarantee.EFFECTIVELY_ONCE, effect=Effect.keyed("mailer"),
                 group=group, key=lambda p: ("welcome", p["id"]), lease=10,
                 retry=RetryPolicy(give_up_on=(MailerDown,)))  # fmt: skip
    async def welcome(ctx: Context) -> None:
        if (directory / "broken").exists():
            raise MailerDown("the mailer is down")
        with (directory / "effects.txt").open("a") as f:
            f.write(f"{ctx.operation_id}\n")

    return app


if "REDRIVE_BROKER" in os.environ:
    app = build(
        broker_from_url(os.environ["REDRIVE_BROKER"]),
        os.environ["REDRIVE_SOURCE"],
        os.environ["REDRIVE_GROUP"],
        Path(os.environ["REDRIVE_DIR"]),
    )
