"""An app for tests/test_poison_process.py, run by `replaysafe run` as a real OS process.

Environment: ``POISON_BROKER`` (``rabbitmq`` or ``sqs``), ``POISON_URL`` (the AMQP URL or the SQS
endpoint), ``POISON_SOURCE`` (exchange or queue), ``POISON_DIR`` (where the SQLite ledger and the
run log live), ``POISON_GROUP`` (the consumer group), ``POISON_MAX_ATTEMPTS`` (the retry budget)
and ``POISON_OP`` (the operation whose every run is followed by SIGKILL of this process:
failpoint ``after_effect_before_ledger``, action ``sigkill``). Optional: ``POISON_CONCURRENCY``
(default 1) and ``POISON_SLOW`` (seconds the other operations wait before they run, so that they
are in flight, claimed, when the poison kills the process; default 0).

Each handler run appends ``<operation id> <attempt>`` to ``runs.txt`` before the failpoint, so the
test counts the runs that the kills interrupted.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from replaysafe import App, Context, Effect, Guarantee, RetryPolicy
from replaysafe import failpoints as fp
from replaysafe.brokers.base import Broker
from replaysafe.failpoints import Failpoints
from replaysafe.ledger import SQLiteLedger

LEASE = 2.0
MAX_ATTEMPTS = int(os.environ["POISON_MAX_ATTEMPTS"])
GROUP = os.environ["POISON_GROUP"]
DIR = Path(os.environ["POISON_DIR"])
SOURCE = os.environ["POISON_SOURCE"]
POISON = os.environ["POISON_OP"]
CONCURRENCY = int(os.environ.get("POISON_CONCURRENCY", "1"))
SLOW = float(os.environ.get("POISON_SLOW", "0"))


def _broker() -> Broker:
    kind, url = os.environ["POISON_BROKER"], os.environ["POISON_URL"]
    if kind == "rabbitmq":
        from replaysafe.brokers.rabbitmq import RabbitMQBroker

        return RabbitMQBroker(url)
    from replaysafe.brokers.sqs import SQSBroker

    return SQSBroker(region="us-east-1", endpoint_url=url, wait_time=1, delete_window=0.02,
                     aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip


failpoints = Failpoints()
failpoints.enable(
    fp.AFTER_EFFECT_BEFORE_LEDGER, "sigkill", when=lambda ctx: ctx.get("operation_id") == POISON
)
app = App("poison", broker=_broker(), ledger=SQLiteLedger(DIR / "ledger.db"),
          failpoints=failpoints)  # fmt: skip


RETRY = RetryPolicy(max_attempts=MAX_ATTEMPTS, base_delay=0.2, max_delay=0.5)


@app.handler(SOURCE, guarantee=Guarantee.EFFECTIVELY_ONCE, effect=Effect.keyed("runs file"),
             group=GROUP, lease=LEASE, concurrency=CONCURRENCY, retry=RETRY)  # fmt: skip
async def work(ctx: Context) -> None:
    if SLOW and ctx.operation_id != POISON:
        await asyncio.sleep(SLOW)
    with (DIR / "runs.txt").open("a") as f:
        f.write(f"{ctx.operation_id} {ctx.attempt}\n")
