"""A chaos run's brokers and producer: the broker configuration per fault, the adapters for
real brokers, the run's envelopes, and publishing them (through the producer, or through the
outbox relay for ``relay_crash``) while recording the producer's history."""

from __future__ import annotations

import contextlib
import random
import time
import uuid
from pathlib import Path
from typing import Any

from replaysafe import failpoints as fp
from replaysafe.brokers.base import Broker, RedeliveryKind
from replaysafe.chaos.app import RunSpec, mark_once
from replaysafe.chaos.cells import BROKERS, ChaosConfig, op_id
from replaysafe.chaos.checker import Published
from replaysafe.envelope import Envelope
from replaysafe.errors import ConfigurationError, PublishAmbiguous, SimulatedCrash
from replaysafe.failpoints import Failpoints
from replaysafe.guarantees import Guarantee
from replaysafe.producer import Producer


def broker_conf(cfg: ChaosConfig, fault: str) -> dict[str, Any]:
    if cfg.broker == "memory":
        mode = RedeliveryKind.NACK
        if fault in ("visibility_overlap", "pause_beyond_lease"):
            mode = RedeliveryKind.VISIBILITY_TIMEOUT
        elif fault == "rebalance":
            mode = RedeliveryKind.OFFSET_REWIND
        return {"kind": "memory", "mode": mode.value}
    return {"kind": cfg.broker, "url": cfg.broker_url}


def normalise_broker_url(kind: str, url: str | None) -> str:
    """Accept what the test fixtures and operators naturally have (``host:port`` for Kafka, a
    plain ``http://`` endpoint for an SQS-compatible server) and give each adapter its URL."""
    if kind == "rabbitmq":
        return url or "amqp://guest:guest@127.0.0.1:5672/"
    if kind == "nats":
        return url or "nats://127.0.0.1:4222"
    if url is None:
        raise ConfigurationError(f"--broker {kind} needs --broker-url")
    if kind == "kafka" and "://" not in url:
        return f"kafka://{url}"
    if kind == "sqs" and url.startswith(("http://", "https://")):
        # a local SQS-compatible server (moto) takes any credentials
        scheme, _, rest = url.partition("://")
        return f"sqs+{scheme}://testing:testing@{rest.rstrip('/')}?region=us-east-1"
    return url


def broker_from_conf(conf: dict[str, Any], spec: RunSpec, failpoints: Failpoints) -> Broker:
    """A real broker adapter for a worker process or the producer (drivers import lazily)."""
    kind = conf["kind"]
    url = normalise_broker_url(kind, conf.get("url"))
    opts = dict(conf.get("options", {}))
    if kind == "rabbitmq":
        from replaysafe.brokers.rabbitmq import RabbitMQBroker

        return RabbitMQBroker.from_url(url, failpoints=failpoints, **opts)
    if kind == "sqs":
        from replaysafe.brokers.sqs import SQSBroker

        return SQSBroker.from_url(url, failpoints=failpoints, **opts)
    if kind == "kafka":
        from replaysafe.brokers.kafka import KafkaBroker

        return KafkaBroker.from_url(url, failpoints=failpoints, **opts)
    if kind == "nats":
        from replaysafe.brokers.nats import NATSBroker

        return NATSBroker.from_url(url, failpoints=failpoints, **opts)
    raise ConfigurationError(f"unknown broker {kind!r}; use one of {', '.join(BROKERS)}")


def envelopes_for(spec: RunSpec, ops: int, seed: int) -> list[Envelope]:
    rng = random.Random(seed)
    out = []
    stale = set(spec.targets) if spec.fault == "beyond_horizon" else set()
    now = time.time()
    for i in range(ops):
        op = op_id(i)
        env = Envelope.of(op, {"i": i, "amount": rng.randint(100, 50_000)}, key=f"k{i % 16}")
        if op in stale:
            # first published longer ago than the horizon: the ledger may have forgotten it
            env = env.with_published_at(now - spec.horizon - 600)
        out.append(env)
    return out


async def produce(
    spec: RunSpec,
    publisher: Broker,
    envelopes: list[Envelope],
    history: list[Published],
    failpoints: Failpoints,
    *,
    outbox_path: Path | None = None,
) -> None:
    """Publish ``envelopes`` under the run's guarantee, recording the producer's history.

    ``ambiguous_publish``: the publish of a target is accepted by the broker, then answered with
    ``PublishAmbiguous`` (failpoint ``publish_after_accept``); the producer retries with the same
    operation id (at-most-once gives up). ``relay_crash``: envelopes are staged in an outbox and
    published by a relay that is killed between publish and mark once per target.
    """
    guarantee = Guarantee(spec.guarantee)
    targets = set(spec.targets)
    if spec.fault == "ambiguous_publish":
        failpoints.enable(
            fp.PUBLISH_AFTER_ACCEPT,
            "raise",
            when=lambda ctx: (
                ctx.get("operation_id") in targets
                and mark_once(spec.state_dir, spec.fault, str(ctx.get("operation_id")))
            ),
            error=PublishAmbiguous("chaos: the confirm was lost after the broker accepted"),
        )
    if spec.fault == "relay_crash":
        assert outbox_path is not None
        await _produce_through_outbox(spec, publisher, envelopes, history, outbox_path)
        return
    producer = Producer(publisher, guarantee, backoff=0.01)
    for start in range(0, len(envelopes), 20):
        chunk = envelopes[start : start + 20]
        confirmed = False
        with contextlib.suppress(PublishAmbiguous):
            confirmed = (await producer.publish(spec.source, chunk)).confirmed
        history.extend(Published(e.operation_id, e.fingerprint, confirmed, time.time())
                       for e in chunk)  # fmt: skip
    failpoints.disable(fp.PUBLISH_AFTER_ACCEPT)


async def _produce_through_outbox(
    spec: RunSpec,
    publisher: Broker,
    envelopes: list[Envelope],
    history: list[Published],
    path: Path,
) -> None:
    from replaysafe.ledger.sqlite import SQLiteLedger
    from replaysafe.outbox.relay import Relay
    from replaysafe.outbox.sqlite import SQLiteOutboxStore

    db = SQLiteLedger(path)
    store = SQLiteOutboxStore(db)
    await store.migrate()
    targets = set(spec.targets)
    relay_fps = Failpoints()
    relay_fps.enable(
        fp.RELAY_AFTER_PUBLISH_BEFORE_MARK,
        "kill",
        when=lambda ctx: any(
            op in targets and mark_once(spec.state_dir, spec.fault, op)
            for op in ctx.get("operation_ids", [])
        ),
    )
    try:
        # staged in one business transaction each chunk: committed = acknowledged to the caller
        for start in range(0, len(envelopes), 20):
            chunk = [e.with_published_at(time.time()) for e in envelopes[start : start + 20]]
            async with db.transaction() as tx:
                await store.stage(tx, spec.source, chunk)
            history.extend(Published(e.operation_id, e.fingerprint, True, time.time())
                           for e in chunk)  # fmt: skip
        owner = f"chaos-relay-{uuid.uuid4().hex[:6]}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            # a killed relay is restarted with the same owner: it takes its own lease back
            relay = Relay(store, publisher, batch=10, failpoints=relay_fps, owner=owner)
            try:
                while await store.pending_count() > 0 and time.monotonic() < deadline:
                    await relay.run_once()
                break
            except SimulatedCrash:
                continue
    finally:
        await db.close()


# --------------------------------------------------------------------------- one run
