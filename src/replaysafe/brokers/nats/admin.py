"""Stream and consumer declaration, purge, drop and description for the NATS adapter.

A source is a subject bound to a stream: the stream that already captures the subject if there
is one, else ``<stream_prefix><source>`` created here with the config's storage, replicas,
duplicate window and age. A consumer group is a durable pull consumer of that stream filtered on
the subject (explicit acks, ``AckWait`` = ``ack_wait``, ``MaxDeliver`` = ``max_deliver + 1``: the
spare delivery is only ever dead-lettered). A source's dead-letter subject
``<source><dead_letter_suffix>`` has a stream of its own.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Final

from replaysafe.brokers.nats.config import NATSConfig
from replaysafe.brokers.nats.errors import Driver, map_error
from replaysafe.errors import ConfigurationError

#: characters a JetStream stream or consumer name may not hold (plus anything unusual)
_UNSAFE: Final = re.compile(r"[^A-Za-z0-9_-]")
_SUBJECT_TOKEN: Final = re.compile(r"^[^\s*>]+$")


def check_subject(what: str, subject: object) -> str:
    """A subject we publish to or consume: non-empty dot-separated tokens, no wildcards."""
    if (
        not isinstance(subject, str)
        or not subject
        or not all(_SUBJECT_TOKEN.match(t) for t in subject.split("."))
    ):
        raise ConfigurationError(
            f"NATS {what} {subject!r} is not a plain subject; use dot-separated tokens without "
            "spaces or wildcards ('*', '>'), e.g. 'orders.created'"
        )
    return subject


def safe_name(name: str) -> str:
    """``name`` as a stream/consumer name: unsafe characters become ``_`` and, when any did, a
    short hash of the original keeps two names that differ only there apart."""
    cleaned = _UNSAFE.sub("_", name)
    if cleaned == name:
        return name
    return f"{cleaned}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


@dataclass(frozen=True, slots=True)
class ConsumerLimits:
    """What a durable consumer really does (read back from the server: a consumer created
    elsewhere keeps its own settings). ``limit`` is how many deliveries a handler sees before
    a nack dead-letters (None: the consumer redelivers forever); ``spare`` says whether the
    server delivers once more after it (which the adapter dead-letters without a handler)."""

    ack_wait: float
    limit: int | None
    spare: bool


class Admin:
    """Declarations against one JetStream context (``js``), cached per source."""

    def __init__(self, drv: Driver, config: NATSConfig, where: str) -> None:
        self._drv = drv
        self._config = config
        self._where = where
        self._streams: dict[str, str] = {}

    # ------------------------------------------------------------------ names

    def stream_name(self, source: str) -> str:
        return f"{self._config.stream_prefix}{safe_name(source)}"

    def dead_letter_subject(self, source: str) -> str:
        return f"{source}{self._config.dead_letter_suffix}"

    def consumer_name(self, group: str) -> str:
        return safe_name(group)

    # ------------------------------------------------------------------ streams

    async def find_stream(self, js: Any, source: str) -> str | None:
        """The stream capturing ``source``, or None (cached once found)."""
        if source in self._streams:
            return self._streams[source]
        try:
            name = str(await js.find_stream_name_by_subject(source))
        except self._drv.js_errors.NotFoundError:
            return None
        except Exception as exc:
            raise map_error(
                self._drv, exc, f"looking up the stream of {source!r}", self._where
            ) from None
        self._streams[source] = name
        return name

    async def ensure_stream(self, js: Any, source: str) -> str:
        """The stream capturing ``source``, created (``<prefix><source>``) when none does."""
        check_subject("source", source)
        found = await self.find_stream(js, source)
        if found is not None:
            return found
        cfg = self._config
        name = self.stream_name(source)
        api = self._drv.api
        stream = api.StreamConfig(
            name=name,
            subjects=[source],
            storage=api.StorageType(cfg.storage),
            num_replicas=cfg.replicas,
            duplicate_window=cfg.duplicate_window,
            max_age=cfg.max_age,
            retention=api.RetentionPolicy.LIMITS,
        )
        try:
            await js.add_stream(stream)
        except Exception as exc:
            raise map_error(
                self._drv, exc, f"creating stream {name!r} for subject {source!r}", self._where
            ) from None
        self._streams[source] = name
        return name

    async def ensure_dead_letter(self, js: Any, source: str) -> str:
        """The dead-letter subject of ``source``, with a stream capturing it."""
        subject = self.dead_letter_subject(source)
        await self.ensure_stream(js, subject)
        return subject

    async def delete_stream(self, js: Any, source: str) -> None:
        """Delete the stream capturing ``source`` (messages included); absent is fine."""
        name = await self.find_stream(js, source)
        self._streams.pop(source, None)
        if name is None:
            return
        try:
            await js.delete_stream(name)
        except self._drv.js_errors.NotFoundError:
            pass
        except Exception as exc:
            raise map_error(self._drv, exc, f"deleting stream {name!r}", self._where) from None

    async def purge(self, js: Any, source: str) -> None:
        """Remove every message of ``source`` from its stream (consumers stay)."""
        name = await self.find_stream(js, source)
        if name is None:
            return
        try:
            await js.purge_stream(name, subject=source)
        except Exception as exc:
            raise map_error(self._drv, exc, f"purging stream {name!r}", self._where) from None

    # ------------------------------------------------------------------ consumers

    async def ensure_consumer(
        self, js: Any, source: str, group: str, *, ack_wait: float | None = None
    ) -> tuple[str, str, ConsumerLimits]:
        """(stream, durable name, limits) of ``group`` on ``source``, creating the durable pull
        consumer when it does not exist. An existing consumer is used as it is (its own
        ``AckWait`` and ``MaxDeliver``): changing them is an operator's act, not a side effect
        of subscribing."""
        stream = await self.ensure_stream(js, source)
        durable = self.consumer_name(group)
        info = await self.consumer_info(js, stream, durable)
        if info is None:
            api = self._drv.api
            config = api.ConsumerConfig(
                durable_name=durable,
                ack_policy=api.AckPolicy.EXPLICIT,
                deliver_policy=api.DeliverPolicy.ALL,
                ack_wait=ack_wait if ack_wait is not None else self._config.ack_wait,
                max_deliver=self._config.max_deliver + 1,
                filter_subject=source,
                description=f"replaysafe group {group!r} on {source!r}",
            )
            try:
                info = await js.add_consumer(stream, config)
            except Exception as exc:
                raise map_error(
                    self._drv,
                    exc,
                    f"creating consumer {durable!r} on stream {stream!r}",
                    self._where,
                ) from None
        return stream, durable, limits_of(info.config)

    async def consumer_info(self, js: Any, stream: str, durable: str) -> Any:
        """The server's ``ConsumerInfo``, or None when the consumer does not exist."""
        try:
            return await js.consumer_info(stream, durable)
        except self._drv.js_errors.NotFoundError:
            return None
        except Exception as exc:
            raise map_error(
                self._drv, exc, f"reading consumer {durable!r} of stream {stream!r}", self._where
            ) from None

    async def stream_info(self, js: Any, source: str) -> Any:
        """The server's ``StreamInfo`` of the stream capturing ``source``, or None."""
        name = await self.find_stream(js, source)
        if name is None:
            return None
        try:
            return await js.stream_info(name)
        except self._drv.js_errors.NotFoundError:
            self._streams.pop(source, None)
            return None
        except Exception as exc:
            raise map_error(self._drv, exc, f"reading stream {name!r}", self._where) from None

    async def consumers(self, js: Any, source: str) -> list[Any]:
        """Every consumer's ``ConsumerInfo`` of the stream capturing ``source``."""
        name = await self.find_stream(js, source)
        if name is None:
            return []
        try:
            return list(await js.consumers_info(name))
        except Exception as exc:
            raise map_error(self._drv, exc, f"listing consumers of {name!r}", self._where) from None


def limits_of(config: Any) -> ConsumerLimits:
    """A consumer's real ack wait and delivery limit (see :class:`ConsumerLimits`)."""
    ack_wait = float(config.ack_wait) if config.ack_wait else 30.0
    server = int(config.max_deliver or -1)
    if server <= 0:
        return ConsumerLimits(ack_wait, None, False)
    if server == 1:
        return ConsumerLimits(ack_wait, 1, False)
    return ConsumerLimits(ack_wait, server - 1, True)


__all__ = ["Admin", "ConsumerLimits", "check_subject", "limits_of", "safe_name"]
