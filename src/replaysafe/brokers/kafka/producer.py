"""Publishing to Kafka: one lazily created idempotent producer per broker, and what its delivery
reports mean for the publish boundary."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from replaysafe.brokers.kafka.errors import _kafka_error, _not_written
from replaysafe.envelope import Envelope
from replaysafe.errors import BrokerError, BrokerUnavailable, ConfigurationError, PublishAmbiguous
from replaysafe.failpoints import PUBLISH_AFTER_ACCEPT, PUBLISH_BEFORE_ACCEPT

if TYPE_CHECKING:
    from confluent_kafka import KafkaError, Message, Producer

    from replaysafe.brokers.kafka.broker import KafkaBroker

log = logging.getLogger("replaysafe.brokers.kafka")


class _Publisher:
    """The broker's producer and its publishes (see :meth:`KafkaBroker.publish`).

    Owns the one librdkafka producer (created on the first publish, replaced after a fatal
    error, flushed on close): each envelope is produced with its ordering key as the record key
    (murmur2 picks the partition) and the PUBLISHED boundary is reached once every delivery
    report came back. A report that proves the record was not written is a refusal
    (``BrokerError``); any other failure is ambiguous (``PublishAmbiguous``: retry the same
    envelopes)."""

    __slots__ = ("_broker", "_producer")

    def __init__(self, broker: KafkaBroker) -> None:
        self._broker = broker
        self._producer: Producer | None = None

    def _get(self) -> Producer:
        b = self._broker
        if self._producer is None:
            try:
                self._producer = b._ck.Producer(b._producer_conf)
            except b._ck.KafkaException as exc:
                raise ConfigurationError(
                    f"KafkaBroker: librdkafka refused the producer configuration: {exc}; fix "
                    "config or producer_config"
                ) from exc
        return self._producer

    async def publish(self, destination: str, envelopes: Sequence[Envelope]) -> None:
        """:meth:`KafkaBroker.publish` once the broker checked it is open and the name."""
        b = self._broker
        if not envelopes:
            return
        loop = asyncio.get_running_loop()
        producer = self._get()
        sent: list[tuple[Envelope, asyncio.Future[KafkaError | None]]] = []
        try:
            for env in envelopes:
                ctx: dict[str, Any] = {
                    "operation_id": env.operation_id,
                    "destination": destination,
                    "sleep": b.clock.sleep,
                }
                await b.failpoints.hit(PUBLISH_BEFORE_ACCEPT, ctx)
                sent.append((env, await self._produce(producer, destination, env, loop)))
        except Exception:
            if sent:  # already handed to librdkafka: they go out anyway, wait for their reports
                with contextlib.suppress(Exception):
                    await self._reports(producer, sent)
            raise
        reports = await self._reports(producer, sent)
        ambiguous: list[str] = []
        refused: list[str] = []
        for env, err in reports:
            if err is None:
                await b.failpoints.hit(
                    PUBLISH_AFTER_ACCEPT,
                    {
                        "operation_id": env.operation_id,
                        "destination": destination,
                        "sleep": b.clock.sleep,
                    },
                )
            elif _not_written(err):
                refused.append(f"{env.operation_id} ({err})")
            else:
                ambiguous.append(f"{env.operation_id} ({err})")
        if ambiguous:
            raise PublishAmbiguous(
                f"KafkaBroker: publish to {destination!r} has an unknown outcome for "
                f"{len(ambiguous)} of {len(envelopes)} records: {'; '.join(ambiguous[:5])}; the "
                "broker may have written them: retry with the SAME envelopes (consumers "
                "deduplicate on the operation id)"
            )
        if refused:
            raise BrokerError(
                f"KafkaBroker: {destination!r} refused {len(refused)} of {len(envelopes)} "
                f"records, which were not written: {'; '.join(refused[:5])}; fix the record or "
                "the topic (size limits, existence, ACLs) before publishing again"
            )

    async def _produce(
        self,
        producer: Producer,
        topic: str,
        env: Envelope,
        loop: asyncio.AbstractEventLoop,
    ) -> asyncio.Future[KafkaError | None]:
        b = self._broker
        fut: asyncio.Future[KafkaError | None] = loop.create_future()

        def resolve(err: KafkaError | None) -> None:
            if not fut.done():
                fut.set_result(err)

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:  # librdkafka's thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(resolve, err)

        headers = env.wire_headers()
        headers["content-type"] = env.content_type
        wire: list[tuple[str, str | bytes | None]] = [
            (k, v.encode("utf-8", "surrogateescape")) for k, v in headers.items()
        ]
        key = None if env.key is None else env.key.encode("utf-8", "surrogateescape")
        for retry in (True, False):
            try:
                producer.produce(
                    topic, value=env.payload, key=key, headers=wire, on_delivery=on_delivery
                )
                return fut
            except BufferError:
                if not retry:
                    raise BrokerUnavailable(
                        f"KafkaBroker: the local produce queue is full while publishing "
                        f"{env.operation_id} to {topic!r}: the brokers at {b._display} do "
                        "not keep up or cannot be reached; retry later"
                    ) from None
                # make room: serve delivery reports until the queue drains a little
                await loop.run_in_executor(b._pool, producer.poll, 1.0)
            except b._ck.KafkaException as exc:
                err = _kafka_error(exc)
                if err is not None and err.fatal():
                    self._reset()
                raise BrokerError(
                    f"KafkaBroker: producing {env.operation_id} to {topic!r} was refused before "
                    f"sending: {exc}; fix the record or configuration"
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _reports(
        self,
        producer: Producer,
        sent: list[tuple[Envelope, asyncio.Future[KafkaError | None]]],
    ) -> list[tuple[Envelope, KafkaError | str | None]]:
        """Flush (in a thread) and collect each record's delivery report."""
        b = self._broker
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(b._pool, producer.flush, b.publish_timeout + 5.0)
        futs = [f for _, f in sent]
        pending = [f for f in futs if not f.done()]
        if pending:  # reports served by another thread's flush arrive through the loop
            await asyncio.wait(pending, timeout=1.0)
        out: list[tuple[Envelope, KafkaError | str | None]] = []
        fatal = False
        for env, fut in sent:
            if not fut.done():
                out.append((env, f"no delivery report within {b.publish_timeout + 5.0:.0f}s"))
                continue
            err = fut.result()
            fatal = fatal or (err is not None and err.fatal())
            out.append((env, err))
        if fatal:
            self._reset()
        return out

    def _reset(self) -> None:
        """A fatal producer error (e.g. the idempotence state was fenced): start a new one."""
        b = self._broker
        log.error("KafkaBroker %s: producer hit a fatal error; creating a new one", b._display)
        self._producer = None

    async def close(self) -> None:
        """Flush the producer (up to ``publish_timeout``); the next publish would start a new
        one (the broker refuses it once closed)."""
        b = self._broker
        producer, self._producer = self._producer, None
        if producer is not None:
            left = await asyncio.get_running_loop().run_in_executor(
                b._pool, producer.flush, b.publish_timeout
            )
            if left:
                log.warning("KafkaBroker %s: %d records still unsent at close", b._display, left)
