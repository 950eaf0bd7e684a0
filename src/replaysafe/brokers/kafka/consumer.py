"""The Kafka adapter (confluent-kafka): consumer groups, offset commits, partition rewinds.

Kafka's semantics are kept visible rather than dressed up as a queue's (DESIGN §3):

Completion (``ack``) marks one *offset* done. Kafka only stores one committed offset per partition
and group, so the adapter commits, per partition, the highest **contiguous** completed offset + 1
(:class:`OffsetTracker`): a record acked out of order stays uncommitted until every earlier record
of its partition is done, and concurrent handlers never commit past unfinished work. Commits are
coalesced: at most one commit request is in flight per consumer and every ack that arrives
meanwhile rides on the next one (``commit_interval`` adds a minimum spacing). A crash loses the
acks not yet committed: those records -- and every later record of the partition -- are delivered
again from the committed offset (the ledger deduplicates them).

Redelivery is an **offset rewind** (``RedeliveryKind.OFFSET_REWIND``): ``nack(delay)`` pauses the
partition, and after ``delay`` seeks it back to the nacked offset and resumes it. Everything after
the nacked record in that partition is delivered again, including records that were already
acked (their acks are dropped); other partitions keep flowing. ``reject`` skips the record (it
counts as done for the commit); Kafka has no dead-letter queue -- the runtime's quarantine is one.
``extend`` raises :class:`~replaysafe.errors.CapabilityError`: Kafka has no per-record timer, the
runtime relies on the ledger lease.

Kafka keeps no delivery count, so ``Delivery.attempt`` is ``1 +`` how many times this
``KafkaBroker`` object handed the same (group, partition, offset) out before
(``Capabilities.delivery_count=False``): a lower bound, and 1 in a fresh process.

Rebalance: on revoke the consumer stops handing out records of the revoked partitions, waits (up
to ``drain_timeout`` seconds) for the ones in flight to settle, commits what is done and only then
lets the revoke complete; settles that come later are ignored (the new owner re-reads from the
committed offset). On assign it starts from the committed offset (``auto_offset_reset`` when the
group has none). ``close()`` commits what is done and leaves the group; ``close(abandon=True)``
leaves without any commit, as a crash would (except that commit requests issued before it still
complete).

Wire format (see :mod:`replaysafe.envelope`): the record value is the payload, the record key the
envelope's ordering key (UTF-8), the metadata travels in record headers (``rs-*`` and
``content-type``). Deliveries carry the raw value, headers (bytes decoded as UTF-8 with
``surrogateescape``, so a bad byte becomes an invalid operation id instead of an exception, null
values as ``""``, a repeated header name keeps its last value), key and the record timestamp.

Threading: librdkafka's consumer is driven from ONE dedicated thread per subscription (every call
is serialized on it, so rebalance callbacks can commit synchronously from inside ``consume``);
records are fetched by a background task into a buffer, so a cancelled ``__anext__`` never loses
one. Work is per batch where Kafka allows it: one ``consume(num_messages=...)`` fills the buffer,
a fetched batch is tracked and handed out under one lock, and the acks of a batch ride on one
commit (at most one commit request is queued at a time). ``confluent_kafka.aio`` is not used:
its ``AIOConsumer`` drops the records of a cancelled ``consume`` await and its ``AIOProducer``
refuses headers in batch mode.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import threading
import time
import urllib.parse
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from replaysafe._redact import redact as _redact_url
from replaysafe.brokers.base import (
    Broker,
    Capabilities,
    Delivery,
    GroupState,
    RedeliveryKind,
    SettleGranularity,
    SourceFacts,
    Subscription,
)
from replaysafe.clock import SYSTEM_CLOCK, Clock
from replaysafe.envelope import Envelope
from replaysafe.errors import (
    BrokerError,
    BrokerUnavailable,
    CapabilityError,
    ConfigurationError,
    MissingExtra,
    PublishAmbiguous,
)
from replaysafe.failpoints import (
    FAILPOINTS,
    PUBLISH_AFTER_ACCEPT,
    PUBLISH_BEFORE_ACCEPT,
    Failpoints,
)

if TYPE_CHECKING:
    from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

__all__ = ["KAFKA_CAPABILITIES", "KafkaBroker", "OffsetTracker"]

log = logging.getLogger("replaysafe.brokers.kafka")

T = TypeVar("T")
#: (topic, partition)
TP = tuple[str, int]

KAFKA_CAPABILITIES = Capabilities(
    redelivery=RedeliveryKind.OFFSET_REWIND,
    settle_granularity=SettleGranularity.CUMULATIVE_OFFSET,
    extend_visibility=False,
    # per partition; the key picks the partition (murmur2, as the Java client), so one key's
    # records keep their publish order as long as the partition count does not change
    ordered_within_key=True,
    # Kafka stores no delivery count: attempt is what this process has seen (a lower bound)
    delivery_count=False,
    native_dedup_window=None,
    delayed_nack=True,
    independent_groups=True,
)

#: producer delivery errors that prove the record was NOT written (everything else is ambiguous)
_REFUSED_CODES = (
    "MSG_SIZE_TOO_LARGE",
    "_MSG_SIZE_TOO_LARGE",
    "INVALID_MSG_SIZE",
    "RECORD_LIST_TOO_LARGE",
    "INVALID_RECORD",
    "INVALID_MSG",
    "TOPIC_AUTHORIZATION_FAILED",
    "CLUSTER_AUTHORIZATION_FAILED",
    "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
    "UNKNOWN_TOPIC_OR_PART",
    "_UNKNOWN_TOPIC",
    "_UNKNOWN_PARTITION",
    "TOPIC_EXCEPTION",
    "INVALID_REQUIRED_ACKS",
    "_INVALID_ARG",
    "_PURGE_QUEUE",  # purged before it was ever sent
)
#: consumer config that would break the commit rules; refused when passed in
_LOCKED_CONSUMER_KEYS = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
}
_SCHEMES = {"kafka": "PLAINTEXT", "kafka+ssl": "SSL"}
_MAX_FETCH = 500


#: seconds before a seek refused for the partition's state is tried again
_SEEK_RETRY = 0.2
#: seconds a refused seek is retried before the consumer is failed (as before the retry existed:
#: the worker subscribes again from the committed offset) when no revoke arrives to drop it
_SEEK_PATIENCE = 15.0


def _driver() -> ModuleType:
    try:
        import confluent_kafka
        import confluent_kafka.admin  # a subpackage: not loaded by the package itself
    except ImportError as exc:
        raise MissingExtra("kafka", "confluent_kafka") from exc
    return confluent_kafka


def _decode(raw: bytes | str | None) -> str:
    if raw is None:
        return ""
    if isinstance(raw, str):
        return raw
    # a bad byte survives as a lone surrogate: the runtime's validation then refuses the message
    # (quarantine) instead of this adapter raising or two different byte strings colliding
    return raw.decode("utf-8", "surrogateescape")


def _check_name(what: str, name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"{what} name must be a non-empty string, got {name!r}")
    return name


def _error_name(err: object) -> str:
    name = getattr(err, "name", None)
    return str(name()) if callable(name) else type(err).__name__


def _kafka_error(exc: BaseException) -> KafkaError | None:
    """The ``KafkaError`` inside a ``KafkaException`` (or None)."""
    arg = exc.args[0] if exc.args else None
    return arg if arg is not None and hasattr(arg, "code") and hasattr(arg, "fatal") else None


# --------------------------------------------------------------------------- offset tracking


@dataclass(slots=True)
class _Rec:
    token: int
    done: bool = False


class _Progress:
    """One partition's tracked records, in offset order."""

    __slots__ = ("committed", "frozen", "generation", "next_offset", "records", "start")

    def __init__(self, generation: int) -> None:
        #: the first offset tracked in this generation: where the group already stood
        self.start: int | None = None
        #: fetched records (buffered or handed out) from the lowest unfinished one on
        self.records: OrderedDict[int, _Rec] = OrderedDict()
        #: one past the last tracked record, or the rewind target; None before the first record
        self.next_offset: int | None = None
        self.committed: int | None = None
        self.generation = generation
        #: rewinding: new records are refused until the seek back has happened
        self.frozen = False

    def position(self) -> int | None:
        for offset in self.records:  # done heads are popped eagerly: the first is unfinished
            return offset
        return self.next_offset

    def pop_done(self) -> None:
        records = self.records
        while records:
            offset = next(iter(records))
            if not records[offset].done:
                return
            records.popitem(last=False)

    def truncate(self, offset: int) -> None:
        records = self.records
        while records:
            last = next(reversed(records))
            if last < offset:
                break
            records.popitem(last=True)
        self.next_offset = offset


class OffsetTracker:
    """Which offsets of each assigned partition are done, and so what may be committed.

    Pure bookkeeping (no I/O, not thread-safe: the subscription serializes calls). Each tracked
    record gets a token; a settle only counts when its token is still current, so a copy that a
    rewind or a revoke made stale can never move the commit position.

    The commit position of a partition is its lowest unfinished tracked offset, or one past the
    last tracked record when everything is done. Offsets need not be contiguous (compaction and
    transaction markers leave gaps): the *tracked* sequence is what counts.
    """

    def __init__(self) -> None:
        self._parts: dict[TP, _Progress] = {}
        self._tokens = itertools.count(1)
        self._generations = itertools.count(1)

    def assign(self, tp: TP) -> None:
        """Start ``tp`` afresh (a new generation: older tokens of it are stale)."""
        self._parts[tp] = _Progress(next(self._generations))

    def revoke(self, tp: TP) -> None:
        self._parts.pop(tp, None)

    def generation(self, tp: TP) -> int | None:
        part = self._parts.get(tp)
        return None if part is None else part.generation

    def commit_covers(self, tp: TP, offset: int, generation: int | None) -> bool | None:
        """True once a commit of ``generation`` covers ``offset``; False while it may still
        come; None when it never will here (revoked, or a newer generation)."""
        part = self._parts.get(tp)
        if part is None or generation is None or part.generation != generation:
            return None
        return part.committed is not None and part.committed > offset

    def assigned(self) -> list[TP]:
        return list(self._parts)

    def track(self, tp: TP, offset: int) -> int | None:
        """Register a fetched record (unfinished from now on, even before it is handed out);
        returns its token, or None when the record must be dropped (partition not assigned,
        rewinding, or an offset already tracked)."""
        part = self._parts.get(tp)
        if part is None or part.frozen:
            return None
        if part.next_offset is not None and offset < part.next_offset:
            return None
        token = next(self._tokens)
        if part.start is None:
            part.start = offset
        part.records[offset] = _Rec(token)
        part.next_offset = offset + 1
        return token

    def valid(self, tp: TP, offset: int, token: int) -> bool:
        part = self._parts.get(tp)
        rec = part.records.get(offset) if part is not None else None
        return rec is not None and rec.token == token and not rec.done

    def done(self, tp: TP, offset: int, token: int) -> bool:
        """Mark a record done (ack, or reject after the runtime quarantined it). Returns True when
        it counted (the commit position may have moved); False for a stale copy."""
        part = self._parts.get(tp)
        rec = part.records.get(offset) if part is not None else None
        if part is None or rec is None or rec.token != token:
            return False
        rec.done = True
        part.pop_done()
        return True

    def rewind(self, tp: TP, offset: int, token: int) -> bool:
        """Drop the record at ``offset`` and every later one of ``tp`` (they will be fetched again
        after the seek back) and refuse new records until :meth:`unfreeze`. False when stale."""
        part = self._parts.get(tp)
        rec = part.records.get(offset) if part is not None else None
        if part is None or rec is None or rec.token != token or rec.done:
            return False
        part.truncate(offset)
        part.frozen = True
        return True

    def unfreeze(self, tp: TP) -> None:
        part = self._parts.get(tp)
        if part is not None:
            part.frozen = False

    def position(self, tp: TP) -> int | None:
        """The offset to commit for ``tp`` (the next one a new owner reads), or None."""
        part = self._parts.get(tp)
        return part.position() if part is not None else None

    def to_commit(self, tps: Iterable[TP] | None = None) -> list[tuple[TP, int, int]]:
        """``(tp, position, generation)`` for every partition whose position moved since its last
        commit."""
        out = []
        for tp in self._parts if tps is None else tps:
            part = self._parts.get(tp)
            if part is None:
                continue
            pos = part.position()
            # nothing done yet (pos == start): the group already stands there
            if pos is not None and pos != part.committed and pos != part.start:
                out.append((tp, pos, part.generation))
        return out

    def committed(self, tp: TP, position: int, generation: int) -> None:
        part = self._parts.get(tp)
        # answers may come out of order (an asynchronous commit answered after a later
        # synchronous one): a committed position only moves forward
        if (
            part is not None
            and part.generation == generation
            and (part.committed is None or position > part.committed)
        ):
            part.committed = position


# --------------------------------------------------------------------------- deliveries


class _KafkaDelivery(Delivery):
    __slots__ = (
        "_settled",
        "_sub",
        "attempt",
        "body",
        "broker_timestamp",
        "content_type",
        "delivery_id",
        "headers",
        "key",
        "offset",
        "received_at",
        "redelivered",
        "settle_deadline",
        "token",
        "tp",
    )

    def __init__(
        self,
        sub: _KafkaSubscription,
        msg: Message,
        tp: TP,
        offset: int,
        token: int,
        attempt: int,
        received_at: float,
    ) -> None:
        raw = msg.headers() or []
        headers: dict[str, str] = {}
        content_type = None
        for name, value in raw.items() if isinstance(raw, dict) else raw:
            # a repeated name: the last value wins (Java's habit)
            text = headers[name] = (
                value.decode("utf-8", "surrogateescape") if type(value) is bytes else _decode(value)
            )
            if content_type is None and name.lower() == "content-type":
                content_type = text
        ts_type, ts_ms = msg.timestamp()
        self.body = msg.value() or b""
        self.headers = headers
        # the first name (in arrival order) that spells content-type, with its last value
        self.content_type = (
            None
            if content_type is None
            else next(v for k, v in headers.items() if k.lower() == "content-type")
        )
        key = msg.key()
        self.key = None if key is None else _decode(key)
        self.broker_timestamp = None if ts_type == sub.timestamp_na else ts_ms / 1000.0
        self.delivery_id = f"{tp[0]}/{tp[1]}@{offset}"
        self.attempt = attempt
        self.redelivered = attempt > 1
        self.received_at = received_at
        self.settle_deadline = None  # no timer: the record waits for us until the group moves
        self.tp = tp
        self.offset = offset
        self.token = token
        self._sub = sub
        self._settled = False

    @property
    def settled(self) -> bool:
        return self._settled

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        return True

    async def ack(self) -> None:
        """Mark the offset done (COMPLETED once a commit covers it -- see the module docstring)."""
        if self._settle():
            self._sub._settled_done(self)

    async def ack_confirmed(self) -> None:
        """``ack()``, then wait until a commit that covers this record is answered (at most the
        broker's ``request_timeout``). Raises ``BrokerUnavailable`` when the partition was
        revoked first, the subscription closed, or no commit was answered in time: the record
        may then be read again by the group, so the caller must not run an effect it has to
        run at most once. Also raised when the delivery was already settled."""
        sub = self._sub
        if self._settled:
            raise BrokerUnavailable(
                f"KafkaBroker: {self.delivery_id} was already settled, so this ack cannot be "
                "confirmed; do not run an at-most-once effect for it"
            )
        with sub._lock:
            generation = sub._tracker.generation(self.tp)
        await self.ack()
        await sub._wait_committed(self, generation)

    async def nack(self, delay: float | None = None) -> None:
        """Rewind the partition to this offset after ``delay`` seconds (paused meanwhile): this
        record and every later record of the partition are delivered again."""
        if self._settle():
            self._sub._settled_rewind(self, max(0.0, delay or 0.0))

    async def reject(self, reason: str) -> None:
        """Skip the record: it counts as done for the commit. Kafka has no dead-letter queue; the
        runtime records the quarantine durably before it rejects."""
        if self._settle():
            log.info("rejected %s: %s", self.delivery_id, reason)
            self._sub._settled_done(self)

    async def extend(self, seconds: float) -> None:
        raise CapabilityError(
            "KafkaBroker: Kafka has no per-record timer to extend (a record waits for its "
            "consumer until the group rebalances); the runtime keeps the ledger lease instead. "
            "Keep handlers within max.poll.interval.ms, or use SQS for visibility timeouts"
        )

    def __repr__(self) -> str:
        return f"<KafkaDelivery {self.delivery_id} attempt={self.attempt} settled={self._settled}>"


@dataclass(slots=True)
class _Fetched:
    msg: Message
    tp: TP
    offset: int
    token: int


@dataclass(frozen=True, slots=True)
class _Rewind:
    offset: int
    resume_at: float
    #: when a seek of this rewind was first refused for the partition's state (None: never)
    refused_since: float | None = None


# --------------------------------------------------------------------------- subscription


class _KafkaSubscription(Subscription):
    """One group member on one topic. See the module docstring for the semantics."""

    def __init__(self, broker: KafkaBroker, topic: str, group: str, prefetch: int) -> None:
        self.broker = broker
        self.topic = topic
        self.group = group
        self.clock = broker.clock
        self.timestamp_na: int = broker._ck.TIMESTAMP_NOT_AVAILABLE
        self._prefetch = prefetch
        self._loop = asyncio.get_running_loop()
        # every consumer call runs on this one thread (librdkafka's consumer is not thread-safe)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"replaysafe-kafka-{group}"
        )
        self._consumer: Consumer | None = None
        # the tracker and _commit_queued are shared with that thread: guarded by _lock
        self._lock = threading.Lock()
        self._tracker = OffsetTracker()
        self._commit_queued = False
        #: asynchronous commits sent and not yet answered: (tp, position) -> generation
        self._commits_out: dict[tuple[TP, int], int] = {}
        #: set (and replaced) on the loop whenever commits were answered or partitions left
        self._commit_progress = asyncio.Event()
        # the rest is touched on the event loop only
        self._buffer: deque[_Fetched] = deque()
        self._out: dict[TP, set[_KafkaDelivery]] = {}
        self._unsettled = 0
        self._rewinds: dict[TP, _Rewind] = {}
        #: paused for a rewind / paused because the application is saturated
        self._paused: set[TP] = set()
        self._held: set[TP] = set()
        self._saturated_since: float | None = None
        self._changed = asyncio.Event()
        self._notify_queued = False
        self._assigned = asyncio.Event()
        self._fetcher: asyncio.Task[None] | None = None
        self._commit_timer: asyncio.TimerHandle | None = None
        self._last_commit = time.monotonic()
        self._failure: BrokerError | None = None
        self._closed = False
        self._abandoned = False
        self._logged: dict[str, float] = {}

    # ------------------------------------------------------------------ plumbing

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _notify_soon(self) -> None:
        """``_notify`` once at the end of this loop tick, however many settles asked for it."""
        if not self._notify_queued:
            self._notify_queued = True
            self._loop.call_soon(self._notify_queued_now)

    def _notify_queued_now(self) -> None:
        self._notify_queued = False
        self._notify()

    async def _wait(self, within: float | None = None) -> None:
        changed = self._changed  # captured before the caller looks again (no lost wake-up)
        if within is None:
            await changed.wait()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await changed.wait()

    def _on_loop(self, fn: Callable[[], Coroutine[Any, Any, T]], timeout: float) -> T | None:
        """From the consumer thread: run a coroutine on the event loop and wait for it. None when
        the loop is gone or too slow (the caller then goes on without it)."""
        coro = fn()
        try:
            fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        except RuntimeError:  # the loop is closed: nobody is left to drain
            coro.close()
            return None
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            log.warning("%s: the event loop did not answer within %.1fs", self, timeout)
        except Exception:
            log.exception("%s: rebalance handling failed on the event loop", self)
        return None

    def _soon(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self._loop.call_soon_threadsafe(fn, *args)

    def _log_once(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._logged.get(key, -1e9) >= 30.0:
            self._logged[key] = now
            log.warning(msg, *args)

    # ------------------------------------------------------------------ start

    async def _start(self) -> None:
        b = self.broker
        try:
            conf = {**b._consumer_conf(self.group), "on_commit": self._on_commit_cb}
            consumer: Consumer = await self._call(b._ck.Consumer, conf)
        except b._ck.KafkaException as exc:
            await self._shutdown()
            raise ConfigurationError(
                f"KafkaBroker: librdkafka refused the consumer configuration: {exc}; fix config "
                "or consumer_config"
            ) from exc
        self._consumer = consumer
        try:
            md = await self._call(consumer.list_topics, self.topic, b.request_timeout)
        except Exception as exc:
            await self._shutdown()
            raise BrokerUnavailable(
                f"KafkaBroker: cannot reach {b.bootstrap} to subscribe to {self.topic!r}: {exc}; "
                "check that the brokers run and bootstrap_servers is right"
            ) from exc
        meta = md.topics.get(self.topic)
        if meta is None or meta.error is not None:
            await self._shutdown()
            why = meta.error if meta is not None else "not in the metadata"
            raise ConfigurationError(
                f"KafkaBroker: topic {self.topic!r} is not available on {b.bootstrap} ({why}); "
                "create it first (KafkaBroker.create_topic or your topic tooling)"
            )
        await self._call(
            lambda: consumer.subscribe(
                [self.topic],
                on_assign=self._on_assign_cb,
                on_revoke=self._on_revoke_cb,
                on_lost=self._on_lost_cb,
            )
        )
        self._fetcher = asyncio.create_task(self._fetch_loop(), name=f"kafka-fetch:{self}")
        # joining takes a rebalance; returning before it would make the first publish race it
        deadline = self._loop.time() + b.join_timeout
        while not self._assigned.is_set() and self._failure is None:
            left = deadline - self._loop.time()
            if left <= 0:
                break
            await self._wait(left)
        if self._failure is not None:
            raise self._failure
        if not self._assigned.is_set():
            log.warning(
                "%s: no partition assignment within %.0fs; still trying in the background "
                "(is the group rebalancing slowly, or are all partitions taken?)",
                self,
                b.join_timeout,
            )

    # ------------------------------------------------------------------ fetching

    async def _fetch_loop(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        poll = self.broker.poll_interval
        try:
            while not self._closed and self._failure is None:
                await self._apply_rewinds()
                room = self._prefetch - len(self._buffer)
                if room > 0:
                    self._saturated_since = None
                    if self._held:
                        await self._call(consumer.resume, self._parts(self._held - self._paused))
                        self._held.clear()
                    msgs = await self._call(consumer.consume, min(room, _MAX_FETCH), poll)
                elif self._saturated(poll):
                    # the application holds every slot for a while: keep serving the group
                    # (rebalance callbacks, max.poll.interval.ms) with its partitions paused
                    hold = set(self._tracker_assigned()) - self._held - self._paused
                    if hold:
                        await self._call(consumer.pause, self._parts(hold))
                        self._held |= hold
                    msgs = await self._call(consumer.consume, 1, poll)
                else:
                    await self._wait(poll)
                    continue
                if msgs:
                    self._accept(msgs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(exc)

    def _saturated(self, poll: float) -> bool:
        now = self._loop.time()
        if self._saturated_since is None:
            self._saturated_since = now
        return now - self._saturated_since >= max(1.0, poll)

    def _tracker_assigned(self) -> list[TP]:
        with self._lock:
            return self._tracker.assigned()

    def _parts(self, tps: Iterable[TP]) -> list[TopicPartition]:
        return [self.broker._ck.TopicPartition(*tp) for tp in sorted(tps)]

    def _accept(self, msgs: list[Message]) -> None:
        """Track and buffer one fetched batch (one lock for all of it)."""
        good: list[tuple[Message, TP, int]] = []
        for m in msgs:
            err = m.error()
            if err is not None:
                self._consumer_error(err)
                continue
            topic, partition, offset = m.topic(), m.partition(), m.offset()
            if topic is None or partition is None or offset is None:
                continue
            good.append((m, (topic, partition), offset))
        if not good:
            return
        added = False
        buffer = self._buffer
        with self._lock:
            track = self._tracker.track
            for m, tp, offset in good:
                token = track(tp, offset)
                if token is None:
                    continue  # revoked or rewinding: it comes back after the seek / from the owner
                buffer.append(_Fetched(m, tp, offset, token))
                added = True
        if added:
            self._notify()

    def _consumer_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fail(self.broker._ck.KafkaException(err))
            return
        self._log_once(err.name(), "%s: consumer error %s (librdkafka retries)", self, err)

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            log.error("%s: consumer failed: %r", self, exc)
            self._failure = BrokerUnavailable(
                f"KafkaBroker: the consumer of {self.topic!r} in group {self.group!r} failed: "
                f"{exc}; close this subscription and subscribe again (uncommitted records are "
                "delivered again from the committed offset)"
            )
        self._notify()

    async def _apply_rewinds(self) -> None:
        """Pause partitions with a pending rewind; seek back and resume the due ones."""
        if not self._rewinds:
            return
        assert self._consumer is not None
        now = self.clock.now()
        for tp, rw in list(self._rewinds.items()):
            if rw.resume_at > now:
                if tp not in self._paused:
                    await self._call(self._consumer.pause, self._parts([tp]))
                    self._paused.add(tp)
                continue
            try:
                await self._call(self._seek_resume, tp, rw.offset, tp in self._paused)
            except Exception as exc:
                err = _kafka_error(exc)
                since = rw.refused_since if rw.refused_since is not None else now
                if (
                    err is not None
                    and err.code() == self.broker._ck.KafkaError._STATE
                    and now - since < _SEEK_PATIENCE
                ):
                    # librdkafka already dropped the partition (a session timeout, say, after
                    # a SIGSTOP) and the revoke callback has not run yet: keep the rewind
                    # pending (the partition stays frozen, nothing past rw.offset is
                    # committed); the revoke drops it, or a later seek succeeds
                    self._log_once(
                        "seek-state", "%s: cannot seek %s yet (%s); retrying", self, tp, err
                    )
                    self._rewinds[tp] = _Rewind(rw.offset, now + _SEEK_RETRY, since)
                    continue
                # never guess a position: without the seek the records after rw.offset would
                # look like a gap and the commit could pass them
                self._fail(exc)
                return
            self._paused.discard(tp)
            self._held.discard(tp)  # resumed: held again on the next saturated round if needed
            if self._rewinds.get(tp) is rw:
                del self._rewinds[tp]
                with self._lock:
                    self._tracker.unfreeze(tp)

    def _seek_resume(self, tp: TP, offset: int, paused: bool) -> None:  # consumer thread
        assert self._consumer is not None
        self._consumer.seek(self.broker._ck.TopicPartition(tp[0], tp[1], offset))
        if paused:
            self._consumer.resume(self._parts([tp]))

    # ------------------------------------------------------------------ handing out

    def _take(self, limit: int) -> list[_KafkaDelivery]:
        """Up to ``limit`` deliveries from the buffer, skipping records a rewind or a revoke made
        stale: one lock and one wake-up of the fetcher for the whole batch."""
        buffer = self._buffer
        if limit <= 0 or not buffer:
            return []
        picked: list[_Fetched] = []
        with self._lock:
            valid = self._tracker.valid
            while buffer and len(picked) < limit:
                f = buffer.popleft()
                if valid(f.tp, f.offset, f.token):
                    picked.append(f)
        if not picked:
            return []
        now = self.clock.now()
        seen = self.broker._seen
        group = self.group
        outs = self._out
        out: list[_KafkaDelivery] = []
        for f in picked:
            d = _KafkaDelivery(
                self, f.msg, f.tp, f.offset, f.token, seen(group, f.tp, f.offset), now
            )
            handed = outs.get(f.tp)
            if handed is None:
                handed = outs[f.tp] = set()
            handed.add(d)
            out.append(d)
        self._unsettled += len(out)
        self._notify()  # the fetcher may have room again
        return out

    async def __anext__(self) -> Delivery:
        """The next record. Waits for a fetch, and while ``prefetch`` deliveries are unsettled.
        Cancelling it loses nothing (records wait in the buffer). ``StopAsyncIteration`` once
        closed; ``BrokerUnavailable`` when the consumer failed."""
        return (await self._next(1))[0]

    async def _next(self, max_items: int) -> list[_KafkaDelivery]:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._failure is not None:
                raise self._failure
            room = min(max_items, self._prefetch - self._unsettled)
            if room > 0 and (got := self._take(room)):
                return got
            await self._wait()

    async def next_batch(self, max_items: int) -> list[Delivery]:
        """One record (waiting for it), plus every other buffered one, within ``prefetch``."""
        return list(await self._next(max(1, max_items)))

    # ------------------------------------------------------------------ settling

    def _release(self, d: _KafkaDelivery) -> None:
        self._unsettled -= 1
        out = self._out.get(d.tp)
        if out is not None:
            out.discard(d)

    def _settled_done(self, d: _KafkaDelivery) -> None:
        self._release(d)
        with self._lock:
            counted = self._tracker.done(d.tp, d.offset, d.token)
            # the acks of one batch ride on one commit: only the first queues it
            commit = counted and not self._closed and not self._commit_queued
            if commit:
                self._commit_queued = True
        if commit:
            self._schedule_commit()
        self._notify_soon()

    def _settled_rewind(self, d: _KafkaDelivery, delay: float) -> None:
        self._release(d)
        with self._lock:
            counted = self._tracker.rewind(d.tp, d.offset, d.token)
        if counted:
            self._buffer = deque(f for f in self._buffer if f.tp != d.tp)
            # every later copy of the partition that is out is now stale: it will come again
            prev = self._rewinds.get(d.tp)
            resume_at = self.clock.now() + delay
            if prev is not None:
                resume_at = max(resume_at, prev.resume_at)
            self._rewinds[d.tp] = _Rewind(d.offset, resume_at)
        self._notify()

    # ------------------------------------------------------------------ commits

    def _request_commit(self) -> None:
        """Coalesce commits: at most one queued request; acks meanwhile ride on it."""
        with self._lock:
            if self._commit_queued:
                return
            self._commit_queued = True
        self._schedule_commit()

    def _schedule_commit(self) -> None:
        wait = self._last_commit + self.broker.commit_interval - time.monotonic()
        if wait > 0:
            self._commit_timer = self._loop.call_later(wait, self._submit_commit)
        else:
            self._submit_commit()

    def _submit_commit(self) -> None:
        self._commit_timer = None
        if self._abandoned:
            return
        self._last_commit = time.monotonic()
        # submitted to the consumer thread NOW (not from a task that runs later), so a close that
        # follows an ack always finds the commit ahead of it in the queue
        fut = self._loop.run_in_executor(self._executor, self._commit_job)
        fut.add_done_callback(self._commit_done)

    def _commit_job(self) -> bool:  # consumer thread
        """Send the done positions as an asynchronous commit: the consumer thread does not wait
        for the coordinator's answer (a synchronous commit held it for a round trip, during
        which no record was fetched). ``_on_commit_cb`` takes the answer; a refusal is retried.
        A position already sent and not yet answered is not sent again."""
        with self._lock:
            self._commit_queued = False
            batch = [b for b in self._tracker.to_commit() if (b[0], b[1]) not in self._commits_out]
            for tp, pos, gen in batch:
                self._commits_out[(tp, pos)] = gen
        if not batch:
            return True
        consumer = self._consumer
        ck = self.broker._ck
        try:
            if consumer is None:
                raise RuntimeError("the consumer is closed")
            # no abandon check: a commit requested before a crash may still land, as on a crash
            consumer.commit(
                offsets=[ck.TopicPartition(tp[0], tp[1], pos) for tp, pos, _ in batch],
                asynchronous=True,
            )
        except Exception as exc:
            with self._lock:
                for tp, pos, _ in batch:
                    self._commits_out.pop((tp, pos), None)
            log.warning("%s: commit of %s failed: %s (retried)", self, batch, exc)
            return False
        return True

    def _on_commit_cb(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """librdkafka's answer to a commit (consumer thread, served from ``consume``). Only
        answers to ``_commit_job``'s asynchronous commits move the tracker here; the synchronous
        ones (revoke, close) are handled where they are made."""
        try:
            committed: list[tuple[TP, int]] = []
            refused: dict[TP, Any] = {}
            with self._lock:
                for p in partitions:
                    tp = (p.topic, p.partition)
                    gen = self._commits_out.pop((tp, p.offset), None)
                    if gen is None:
                        continue
                    if err is None and p.error is None:
                        self._tracker.committed(tp, p.offset, gen)
                        committed.append((tp, p.offset))
                    else:
                        refused[tp] = p.error or err
            if committed:
                self._soon(self.broker._forget, self.group, committed)
            self._soon(self._commits_moved)
            if refused:
                # a rebalance in progress or a lost coordinator: try again shortly (a revoke in
                # the meantime drops the partition and its pending commit with it)
                log.warning("%s: commit refused for %s (retried)", self, refused)
                self._soon(self._retry_commit_later)
        except Exception:  # an exception here would surface from consume(): log it instead
            log.exception("%s: on_commit failed", self)

    def _commits_moved(self) -> None:
        """Wake every ``_wait_committed`` (on the loop)."""
        moved, self._commit_progress = self._commit_progress, asyncio.Event()
        moved.set()

    async def _wait_committed(self, d: _KafkaDelivery, generation: int | None) -> None:
        deadline = self._loop.time() + self.broker.request_timeout
        while True:
            moved = self._commit_progress
            with self._lock:
                covered = self._tracker.commit_covers(d.tp, d.offset, generation)
            if covered:
                return
            left = deadline - self._loop.time()
            if covered is None or self._closed or left <= 0:
                why = (
                    "the partition was revoked first" if covered is None
                    else "the subscription closed" if self._closed
                    else f"no commit answered within {self.broker.request_timeout:.0f}s"
                )  # fmt: skip
                raise BrokerUnavailable(
                    f"KafkaBroker: the completion of {d.delivery_id} is not confirmed ({why}); "
                    "the group may read the record again, so do not run an at-most-once effect "
                    "for it"
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await moved.wait()

    def _retry_commit_later(self) -> None:
        if not self._closed:
            self._loop.call_later(0.5, self._retry_commit)

    def _commit_done(self, fut: asyncio.Future[bool]) -> None:
        if not fut.cancelled() and (exc := fut.exception()) is not None:
            log.error("%s: commit job failed: %r", self, exc)
        ok = not fut.cancelled() and fut.exception() is None and fut.result()
        if not ok and not self._closed:
            # a rebalance in progress or a lost coordinator: try again shortly (a revoke in the
            # meantime drops the partition and its pending commit with it)
            self._loop.call_later(0.5, self._retry_commit)

    def _retry_commit(self) -> None:
        if not self._closed:
            self._request_commit()

    def _commit(self, batch: list[tuple[TP, int, int]]) -> bool:  # consumer thread
        consumer = self._consumer
        if consumer is None:
            return False
        ck = self.broker._ck
        offsets = [ck.TopicPartition(tp[0], tp[1], pos) for tp, pos, _ in batch]
        try:
            result = consumer.commit(offsets=offsets, asynchronous=False)
        except Exception as exc:
            log.warning("%s: commit of %s failed: %s (retried)", self, offsets, exc)
            return False
        errors = {(r.topic, r.partition): r.error for r in result or () if r.error is not None}
        committed = []
        with self._lock:
            for tp, pos, gen in batch:
                if tp not in errors:
                    self._tracker.committed(tp, pos, gen)
                    committed.append((tp, pos))
        if committed:
            self._soon(self.broker._forget, self.group, committed)
        self._soon(self._commits_moved)
        if errors:
            log.warning("%s: commit refused for %s (retried)", self, errors)
        return not errors

    # ------------------------------------------------------------------ rebalance (thread)

    def _tps(self, partitions: list[TopicPartition]) -> list[TP]:
        return [(p.topic, p.partition) for p in partitions]

    def _on_assign_cb(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            tps = self._tps(partitions)
            with self._lock:
                for tp in tps:
                    self._tracker.assign(tp)
            log.info("%s: assigned %s", self, [p for _, p in tps])
            self._soon(self._assigned_on_loop)
        except Exception:  # an exception here would surface from consume(): log it instead
            log.exception("%s: on_assign failed", self)

    def _assigned_on_loop(self) -> None:
        self._assigned.set()
        self._notify()

    def _on_revoke_cb(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._revoke(consumer, self._tps(partitions), lost=False)

    def _on_lost_cb(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # someone else may own them already: no drain, and a commit would be refused anyway
        self._revoke(consumer, self._tps(partitions), lost=True)

    def _revoke(self, consumer: Consumer, tps: list[TP], *, lost: bool) -> None:
        try:
            timeout = self.broker.drain_timeout + 5.0
            paused = self._on_loop(lambda: self._revoking(tps, drain=not lost), timeout) or []
            if not lost and not self._abandoned:
                with self._lock:
                    batch = self._tracker.to_commit(tps)
                if batch:
                    self._commit(batch)
            if paused:
                # librdkafka may keep the pause flag across an unassign: clear it while we can
                with contextlib.suppress(Exception):
                    consumer.resume(self._parts(paused))
            with self._lock:
                for tp in tps:
                    self._tracker.revoke(tp)
            log.info("%s: %s %s", self, "lost" if lost else "revoked", [p for _, p in tps])
            self._soon(self._notify)
            self._soon(self._commits_moved)
        except Exception:
            log.exception("%s: on_revoke failed", self)

    async def _revoking(self, tps: list[TP], *, drain: bool) -> list[TP]:
        """On the loop: stop handing out records of ``tps``, then wait (bounded) for the ones in
        flight. Returns the partitions that were paused for a rewind."""
        gone = set(tps)
        # buffered records are tracked as unfinished: dropping them keeps the commit before them
        self._buffer = deque(f for f in self._buffer if f.tp not in gone)
        for tp in tps:
            self._rewinds.pop(tp, None)
        if drain and not self._closed:
            deadline = self._loop.time() + self.broker.drain_timeout
            while not self._closed and any(self._out.get(tp) for tp in tps):
                left = deadline - self._loop.time()
                if left <= 0:
                    n = sum(len(self._out.get(tp, ())) for tp in tps)
                    log.warning(
                        "%s: revoke: %d deliveries still unsettled after drain_timeout=%.1fs; "
                        "committing only what is done (they will be delivered again)",
                        self,
                        n,
                        self.broker.drain_timeout,
                    )
                    break
                await self._wait(left)
        for tp in tps:
            self._out.pop(tp, None)  # late settles of these copies are stale now
        paused = [tp for tp in tps if tp in self._paused or tp in self._held]
        self._paused.difference_update(tps)
        self._held.difference_update(tps)
        return paused

    # ------------------------------------------------------------------ close

    async def close(self, *, abandon: bool = False) -> None:
        """Stop consuming and wake a pending ``__anext__``. Graceful: commit what is done, then
        leave the group (deliveries still unsettled come again to the next owner). ``abandon``:
        leave without any further commit, as a crash would. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._abandoned = abandon
        self._notify()
        self._commits_moved()
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None
            if not abandon:
                with self._lock:
                    self._commit_queued = False
        if self._fetcher is not None:
            self._fetcher.cancel()
            await asyncio.wait({self._fetcher})
        self._buffer.clear()  # tracked as unfinished: no commit passes them
        if not abandon and self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._call(self._final_commit)
        await self._shutdown()
        self.broker._subs.discard(self)

    def _final_commit(self) -> None:  # consumer thread
        with self._lock:
            batch = self._tracker.to_commit()
        if batch:
            self._commit(batch)

    async def _shutdown(self) -> None:
        consumer = self._consumer
        if consumer is not None:
            try:
                # queued behind any commit requested before (they still land); leaves the group
                # (on_revoke runs: it commits unless abandoned)
                await self._loop.run_in_executor(self._executor, consumer.close)
            except Exception as exc:
                log.warning("%s: consumer close failed: %s", self, exc)
            self._consumer = None
        with self._lock:
            for tp in self._tracker.assigned():
                self._tracker.revoke(tp)
        self._executor.shutdown(wait=False)

    def __repr__(self) -> str:
        return (
            f"<KafkaSubscription {self.topic}/{self.group} unsettled={self._unsettled} "
            f"closed={self._closed}>"
        )


# --------------------------------------------------------------------------- the broker


class KafkaBroker(Broker):
    """Kafka through confluent-kafka. See the module docstring for what each call means here.

    ``bootstrap_servers`` is librdkafka's ``host:port[,host:port]``. ``config`` is extra
    librdkafka configuration for every client (security settings, ``client.id``);
    ``consumer_config`` / ``producer_config`` for one kind only. Refused: auto-commit and
    auto offset store (the adapter commits itself).

    Timers: ``session_timeout`` (group membership; Tansu also waits about half of it per join),
    ``heartbeat_interval`` (default a tenth of it), ``poll_interval`` (longest a consumer call
    blocks: bounds commit, close and nack-resume latency), ``drain_timeout`` (how long a revoke
    waits for in-flight records), ``join_timeout`` (how long ``subscribe`` waits for the first
    assignment), ``publish_timeout`` (delivery timeout of a produce; past it the outcome is
    ambiguous), ``request_timeout`` (metadata and admin calls), ``commit_interval`` (minimum
    spacing of commits; 0 commits as soon as the previous commit returned).

    ``idempotence`` turns on the idempotent producer (no broker-side duplicates from librdkafka's
    own retries; checked against Tansu 0.6). ``auto_offset_reset`` is where a group without a
    committed offset starts ("earliest": every record is processed).
    """

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        clock: Clock = SYSTEM_CLOCK,
        failpoints: Failpoints | None = None,
        config: Mapping[str, Any] | None = None,
        consumer_config: Mapping[str, Any] | None = None,
        producer_config: Mapping[str, Any] | None = None,
        session_timeout: float = 10.0,
        heartbeat_interval: float | None = None,
        poll_interval: float = 0.1,
        drain_timeout: float = 10.0,
        join_timeout: float = 60.0,
        publish_timeout: float = 30.0,
        request_timeout: float = 10.0,
        commit_interval: float = 0.0,
        idempotence: bool = True,
        auto_offset_reset: str = "earliest",
        _display: str | None = None,
    ) -> None:
        self._ck = _driver()
        _check_name("bootstrap_servers", bootstrap_servers)
        for name, value in (
            ("session_timeout", session_timeout),
            ("poll_interval", poll_interval),
            ("publish_timeout", publish_timeout),
            ("request_timeout", request_timeout),
        ):
            if value <= 0:
                raise ConfigurationError(f"KafkaBroker: {name} must be > 0 seconds, got {value}")
        for name, value in (
            ("drain_timeout", drain_timeout),
            ("join_timeout", join_timeout),
            ("commit_interval", commit_interval),
        ):
            if value < 0:
                raise ConfigurationError(f"KafkaBroker: {name} must be >= 0 seconds, got {value}")
        heartbeat = session_timeout / 10 if heartbeat_interval is None else heartbeat_interval
        if not 0 < heartbeat < session_timeout:
            raise ConfigurationError(
                f"KafkaBroker: heartbeat_interval must be > 0 and shorter than session_timeout "
                f"({session_timeout}s), got {heartbeat}"
            )
        if auto_offset_reset not in ("earliest", "latest", "error"):
            raise ConfigurationError(
                f"KafkaBroker: auto_offset_reset must be 'earliest', 'latest' or 'error', got "
                f"{auto_offset_reset!r}"
            )
        cons = dict(consumer_config or {})
        for key, required in _LOCKED_CONSUMER_KEYS.items():
            if key in cons and str(cons[key]).lower() != str(required).lower():
                raise ConfigurationError(
                    f"KafkaBroker: consumer_config {key}={cons[key]!r} is refused: the adapter "
                    "commits only contiguous completed offsets itself; remove the setting"
                )
        self.bootstrap = bootstrap_servers
        self.clock = clock
        self.failpoints = FAILPOINTS if failpoints is None else failpoints
        self.poll_interval = float(poll_interval)
        self.drain_timeout = float(drain_timeout)
        self.join_timeout = float(join_timeout)
        self.publish_timeout = float(publish_timeout)
        self.request_timeout = float(request_timeout)
        self.commit_interval = float(commit_interval)
        self.idempotence = idempotence
        self._display = _display or bootstrap_servers
        self._common: dict[str, Any] = {
            "bootstrap.servers": bootstrap_servers,
            "client.id": "replaysafe",
            "logger": log,
            "error_cb": self._client_error,
            **dict(config or {}),
        }
        self._consumer_base: dict[str, Any] = {
            **self._common,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": False,
            "auto.offset.reset": auto_offset_reset,
            "session.timeout.ms": int(session_timeout * 1000),
            "heartbeat.interval.ms": max(1, int(heartbeat * 1000)),
            **cons,
        }
        self._producer_conf: dict[str, Any] = {
            **self._common,
            "enable.idempotence": idempotence,
            "acks": "all",
            # murmur2, as the Java client: one key maps to one partition across languages
            "partitioner": "murmur2_random",
            "delivery.timeout.ms": int(publish_timeout * 1000),
            **dict(producer_config or {}),
        }
        self._producer: Producer | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="replaysafe-kafka"
        )
        self._subs: set[_KafkaSubscription] = set()
        # attempts as far as this object knows: (group, topic, partition) -> offset -> copies
        self._attempts: dict[tuple[str, str, int], dict[int, int]] = {}
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **opts: Any) -> KafkaBroker:
        """``kafka://[user:password@]host:port[,host:port][?librdkafka.key=value&...]``.

        ``kafka+ssl://`` selects TLS. Credentials select SASL (mechanism PLAIN unless the query
        sets ``sasl.mechanism``). Query parameters become librdkafka configuration for every
        client; ``opts`` are the constructor's keyword arguments. The password never appears in
        ``repr`` or errors."""
        shown = _redact_url(url)
        scheme, sep, rest = url.partition("://")
        if not sep or scheme.lower() not in _SCHEMES:
            raise ConfigurationError(
                f"KafkaBroker.from_url: {shown!r} is not a Kafka URL; use "
                "kafka://host:port[,host:port] or kafka+ssl://..."
            )
        netloc, _, query = rest.partition("?")
        netloc = netloc.rstrip("/")
        userinfo, at, hosts = netloc.rpartition("@")
        if not hosts or any(not h.strip() for h in hosts.split(",")):
            raise ConfigurationError(
                f"KafkaBroker.from_url: {shown!r} names no broker; use kafka://host:port"
            )
        config: dict[str, Any] = {"security.protocol": _SCHEMES[scheme.lower()]}
        if at:
            user, _, password = userinfo.partition(":")
            config["security.protocol"] = "SASL_" + _SCHEMES[scheme.lower()]
            config["sasl.mechanism"] = "PLAIN"
            config["sasl.username"] = urllib.parse.unquote(user)
            config["sasl.password"] = urllib.parse.unquote(password)
        for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
            config[key] = value
        config.update(opts.pop("config", None) or {})
        return cls(hosts, config=config, _display=shown, **opts)

    # ---------------------------------------------------------------- configuration

    def _consumer_conf(self, group: str) -> dict[str, Any]:
        return {**self._consumer_base, "group.id": group}

    def _client_error(self, err: KafkaError) -> None:
        # librdkafka's global errors (all brokers down, auth): it keeps retrying by itself
        log.warning("KafkaBroker %s: %s", self._display, err)

    def capabilities(self, source: str) -> Capabilities:
        return KAFKA_CAPABILITIES

    # ---------------------------------------------------------------- attempts

    def _seen(self, group: str, tp: TP, offset: int) -> int:
        seen = self._attempts.setdefault((group, tp[0], tp[1]), {})
        n = seen.get(offset, 0) + 1
        seen[offset] = n
        return n

    def _forget(self, group: str, committed: list[tuple[TP, int]]) -> None:
        """Committed offsets are never read again by the group: drop their counts."""
        for tp, position in committed:
            seen = self._attempts.get((group, tp[0], tp[1]))
            if seen:
                for offset in [o for o in seen if o < position]:
                    del seen[offset]

    # ---------------------------------------------------------------- publish

    def _get_producer(self) -> Producer:
        if self._producer is None:
            try:
                self._producer = self._ck.Producer(self._producer_conf)
            except self._ck.KafkaException as exc:
                raise ConfigurationError(
                    f"KafkaBroker: librdkafka refused the producer configuration: {exc}; fix "
                    "config or producer_config"
                ) from exc
        return self._producer

    async def publish(self, destination: str, envelopes: Sequence[Envelope]) -> None:
        """Produce each envelope (value = payload, key = ordering key, headers = wire headers) and
        wait for every delivery report (boundary PUBLISHED when this returns).

        Raises ``PublishAmbiguous`` when a record may have been written (timeout, lost connection,
        a fatal producer error): retry with the SAME envelopes. Raises ``BrokerError`` when Kafka
        refused a record for good (too large, unknown topic, not authorized): it was not written.
        Records produced before an exception are still sent by librdkafka.
        """
        if self._closed:
            raise BrokerUnavailable("KafkaBroker is closed; create a new one to publish")
        _check_name("destination", destination)
        if not envelopes:
            return
        loop = asyncio.get_running_loop()
        producer = self._get_producer()
        sent: list[tuple[Envelope, asyncio.Future[KafkaError | None]]] = []
        try:
            for env in envelopes:
                ctx: dict[str, Any] = {
                    "operation_id": env.operation_id,
                    "destination": destination,
                    "sleep": self.clock.sleep,
                }
                await self.failpoints.hit(PUBLISH_BEFORE_ACCEPT, ctx)
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
                await self.failpoints.hit(
                    PUBLISH_AFTER_ACCEPT,
                    {
                        "operation_id": env.operation_id,
                        "destination": destination,
                        "sleep": self.clock.sleep,
                    },
                )
            elif isinstance(err, str) or _error_name(err) not in _REFUSED_CODES:
                ambiguous.append(f"{env.operation_id} ({err})")
            else:
                refused.append(f"{env.operation_id} ({err})")
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
                        f"{env.operation_id} to {topic!r}: the brokers at {self._display} do "
                        "not keep up or cannot be reached; retry later"
                    ) from None
                # make room: serve delivery reports until the queue drains a little
                await loop.run_in_executor(self._pool, producer.poll, 1.0)
            except self._ck.KafkaException as exc:
                err = _kafka_error(exc)
                if err is not None and err.fatal():
                    self._reset_producer()
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
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, producer.flush, self.publish_timeout + 5.0)
        futs = [f for _, f in sent]
        pending = [f for f in futs if not f.done()]
        if pending:  # reports served by another thread's flush arrive through the loop
            await asyncio.wait(pending, timeout=1.0)
        out: list[tuple[Envelope, KafkaError | str | None]] = []
        fatal = False
        for env, fut in sent:
            if not fut.done():
                out.append((env, f"no delivery report within {self.publish_timeout + 5.0:.0f}s"))
                continue
            err = fut.result()
            fatal = fatal or (err is not None and err.fatal())
            out.append((env, err))
        if fatal:
            self._reset_producer()
        return out

    def _reset_producer(self) -> None:
        """A fatal producer error (e.g. the idempotence state was fenced): start a new one."""
        log.error("KafkaBroker %s: producer hit a fatal error; creating a new one", self._display)
        self._producer = None

    # ---------------------------------------------------------------- subscribe

    async def subscribe(self, source: str, group: str, *, prefetch: int = 16) -> Subscription:
        """Join consumer ``group`` on topic ``source`` and return once the group assigned this
        member its partitions (or after ``join_timeout``, with a warning). At most ``prefetch``
        deliveries are unsettled at a time, and at most ``prefetch`` more wait in the buffer.
        Raises ``ConfigurationError`` when the topic does not exist, ``BrokerUnavailable`` when
        the brokers cannot be reached."""
        if self._closed:
            raise BrokerUnavailable("KafkaBroker is closed; create a new one to subscribe")
        _check_name("topic", source)
        _check_name("group", group)
        if prefetch < 1:
            raise ConfigurationError(f"prefetch must be >= 1, got {prefetch}")
        sub = _KafkaSubscription(self, source, group, prefetch)
        self._subs.add(sub)
        try:
            await sub._start()
        except BaseException:
            self._subs.discard(sub)
            with contextlib.suppress(Exception):
                await sub.close(abandon=True)
            raise
        return sub

    # ---------------------------------------------------------------- admin (tests and ops)

    async def _admin(self, fn: Callable[[Any], T]) -> T:
        def run() -> T:
            # log_level 4: a short-lived admin client logs its teardown ("purging unserved
            # events") at level 6, once per probe
            conf = {k: v for k, v in self._common.items() if k not in ("logger",)}
            admin = self._ck.admin.AdminClient({**conf, "log_level": 4})
            return fn(admin)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, run)
        except (ConfigurationError, BrokerError):
            raise
        except self._ck.KafkaException as exc:
            err = _kafka_error(exc)
            # a broker's considered "no" (bad partition count, policy, replication factor, ACL)
            # is not an outage: only local and retriable errors are
            if err is not None and not err.retriable() and not err.name().startswith("_"):
                raise ConfigurationError(
                    f"KafkaBroker: {self._display} refused the admin request: {exc}; fix the "
                    "request (topic settings, permissions)"
                ) from exc
            raise BrokerUnavailable(
                f"KafkaBroker: admin request to {self._display} failed: {exc}; check that the "
                "brokers run and this client may administer topics"
            ) from exc
        except Exception as exc:
            raise BrokerUnavailable(
                f"KafkaBroker: admin request to {self._display} failed: {exc}; check that the "
                "brokers run and this client may administer topics"
            ) from exc

    async def drop_source(self, source: str, groups: Sequence[str] = ()) -> None:
        """Delete the source and what was declared for it, messages included."""
        await self.delete_topic(source)

    async def prepare_source(
        self,
        source: str,
        groups: Sequence[str] = (),
        *,
        visibility_timeout: float | None = None,
        partitions: int | None = None,
    ) -> None:
        """Create the topic (groups start from the earliest offset when they first join).
        Without ``partitions`` an existing topic is kept whatever its partition count (a new one
        gets 1); with it, an existing topic must have that count."""
        await self.create_topic(source, partitions or 1, keep_partitions=partitions is None)

    async def declared_names(self, source: str, group: str) -> dict[str, str]:
        """The topic (publish there) and the consumer group id the subscription joins."""
        return {"topic": source, "group id": self._consumer_conf(group)["group.id"]}

    async def create_topic(
        self,
        name: str,
        partitions: int = 1,
        *,
        replication_factor: int = 1,
        config: Mapping[str, str] | None = None,
        keep_partitions: bool = False,
    ) -> None:
        """Create topic ``name``. Creating an existing topic with the same partition count (or
        any count, with ``keep_partitions``) is a no-op; with a different one it raises
        ``ConfigurationError``."""
        _check_name("topic", name)
        if partitions < 1:
            raise ConfigurationError(f"partitions must be >= 1, got {partitions}")
        ck = self._ck
        timeout = self.request_timeout

        def create(admin: Any) -> None:
            topic = ck.admin.NewTopic(
                name,
                num_partitions=partitions,
                replication_factor=replication_factor,
                config=dict(config or {}),
            )
            try:
                admin.create_topics([topic], request_timeout=timeout)[name].result(timeout)
            except ck.KafkaException as exc:
                err = _kafka_error(exc)
                if err is None or err.code() != ck.KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
                meta = admin.list_topics(name, timeout=timeout).topics[name]
                if not keep_partitions and len(meta.partitions) != partitions:
                    raise ConfigurationError(
                        f"KafkaBroker: topic {name!r} already exists with "
                        f"{len(meta.partitions)} partitions, not {partitions}; use another name "
                        "or the existing count"
                    ) from None

        await self._admin(create)

    async def describe(self, source: str) -> SourceFacts:
        """Retention of topic ``source`` (``retention.ms``; None when unbounded or compacted) and
        the consumer facts ``explain`` checks. Unreadable configuration gives unknowns."""
        ck = self._ck
        timeout = self.request_timeout
        notes = [
            "a nack rewinds the partition: every later record of it is delivered again",
            "attempt counts what this process saw (Kafka keeps no delivery count)",
            "a crash redelivers every record after the lowest unfinished one of each partition",
        ]

        def read(admin: Any) -> dict[str, str | None]:
            res = ck.admin.ConfigResource(ck.admin.ResourceType.TOPIC, source)
            entries = admin.describe_configs([res], request_timeout=timeout)[res].result(timeout)
            return {k: v.value for k, v in entries.items()}

        retention: float | None = None
        try:
            config = await self._admin(read)
        except (BrokerError, ConfigurationError) as exc:
            notes.append(f"topic configuration unreadable: {exc}")
        else:
            ms = config.get("retention.ms")
            if ms is not None and int(ms) >= 0:
                retention = int(ms) / 1000.0
            if "compact" in (config.get("cleanup.policy") or ""):
                retention = None
                notes.append("compacted topic: the latest record per key is kept without limit")
            size = config.get("retention.bytes")
            if size is not None and int(size) >= 0:
                notes.append(f"retention.bytes={size} may delete records before retention.ms")
        return SourceFacts(
            broker="kafka",
            retention=retention,
            auto_commit=False,  # refused at construction: the adapter commits after the effect
            broker_timestamps=True,
            notes=tuple(notes),
        )

    async def delete_topic(self, name: str) -> None:
        """Delete topic ``name`` (missing topics are ignored)."""
        ck = self._ck
        timeout = self.request_timeout

        def delete(admin: Any) -> None:
            try:
                admin.delete_topics([name], operation_timeout=timeout)[name].result(timeout)
            except ck.KafkaException as exc:
                err = _kafka_error(exc)
                if err is None or err.code() != ck.KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise

        await self._admin(delete)

    async def committed(self, topic: str, group: str) -> dict[int, int | None]:
        """The group's committed offset per partition (None where it committed nothing).

        Read with the admin API (OffsetFetch), not with a consumer that carries the group's id:
        such a consumer is a group member as far as some brokers are concerned (against Tansu it
        stalled the group's assignment), so this probe is safe while the group is consuming."""
        ck = self._ck
        timeout = self.request_timeout

        def fetch(admin: Any) -> dict[int, int | None]:
            meta = admin.list_topics(topic, timeout=timeout).topics[topic]
            if meta.error is not None:
                raise ck.KafkaException(meta.error)
            tps = [ck.TopicPartition(topic, p) for p in sorted(meta.partitions)]
            request = ck.ConsumerGroupTopicPartitions(group, tps)
            [future] = admin.list_consumer_group_offsets([request]).values()
            got = future.result(timeout)
            out: dict[int, int | None] = {p: None for p in sorted(meta.partitions)}
            for tp in got.topic_partitions:
                out[tp.partition] = tp.offset if tp.offset >= 0 else None
            return out

        return await self._admin(fetch)

    async def lag(
        self, topic: str, group: str, *, committed: Mapping[int, int | None] | None = None
    ) -> dict[int, int]:
        """Records per partition the group has not committed yet (end offset - committed);
        ``committed``: the group's offsets when the caller has just read them (:meth:`committed`).

        A read-only probe: offsets through the admin API, the end of each partition read with a
        group-less ``assign`` of every partition at once (it never joins the group). The end is
        found by *reading* from the reported high watermark - 1 to the last record: some brokers
        (Tansu, seen with confluent-kafka 2.16) report the base offset of the last record batch
        + 1 as the high watermark, which undercounts by the size of that batch."""
        ck = self._ck
        timeout = self.request_timeout
        if committed is None:
            committed = await self.committed(topic, group)

        def ends() -> dict[int, int]:
            c = ck.Consumer(
                {
                    **self._consumer_base,
                    "group.id": f"rs-lag-{uuid.uuid4().hex}",
                    "enable.auto.commit": False,
                }
            )
            try:
                low, end = {}, {}
                for p in committed:
                    low[p], end[p] = c.get_watermark_offsets(
                        ck.TopicPartition(topic, p), timeout=timeout
                    )
                # every partition at once: the last, empty poll is paid once, not per partition
                # (one each made the start-up check of an 8-partition topic take 7 s on Tansu)
                reading = [ck.TopicPartition(topic, p, end[p] - 1) for p in end if end[p] > low[p]]
                if reading:
                    c.assign(reading)
                    deadline = time.monotonic() + timeout
                    while time.monotonic() < deadline:
                        got = [m for m in c.consume(500, 0.3) if m.error() is None]
                        if not got:
                            break
                        for m in got:
                            end[m.partition()] = max(end[m.partition()], m.offset() + 1)
                    c.unassign()
                return {
                    p: max(0, end[p] - (low[p] if start is None else start))
                    for p, start in committed.items()
                }
            finally:
                c.close()

        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, ends)
        except Exception as exc:
            raise BrokerUnavailable(
                f"KafkaBroker: cannot read the end offsets of {topic!r} from {self._display}: {exc}"
            ) from exc

    # ---------------------------------------------------------------- groups (start-up check)

    def group_name(self, source: str, group: str) -> str:
        """Topic and consumer group id: a group reads the whole topic from its own offsets."""
        return f"topic {source!r}, group id {group!r}"

    async def group_state(self, source: str, group: str) -> GroupState:
        """The group's lag on ``source`` (:meth:`lag`, summed over partitions) and its members
        (``DescribeConsumerGroups``). ``exists`` is False while the group has neither committed
        offsets nor members (its first member starts at ``auto_offset_reset``)."""
        members = (await self._members([group])).get(group, 0)
        return await self._group_state(source, group, await self.committed(source, group), members)

    async def stray_groups(self, source: str, prefix: str) -> list[GroupState]:
        """Consumer groups whose id starts with ``prefix`` that committed offsets on ``source``
        (``ListConsumerGroups``, then each one's offsets, members and lag)."""
        timeout = self.request_timeout

        def listed(admin: Any) -> list[str]:
            result = admin.list_consumer_groups(request_timeout=timeout).result(timeout)
            return sorted(g.group_id for g in result.valid if g.group_id.startswith(prefix))

        offsets = {
            group: await self.committed(source, group) for group in await self._admin(listed)
        }
        # a group that never read this topic is no stray of it
        read = [g for g, c in offsets.items() if any(v is not None for v in c.values())]
        members = await self._members(read) if read else {}
        return [await self._group_state(source, g, offsets[g], members.get(g, 0)) for g in read]

    async def _group_state(
        self, source: str, group: str, committed: Mapping[int, int | None], members: int | None
    ) -> GroupState:
        """The group's state from its offsets and members, read by the caller (one OffsetFetch
        and one DescribeConsumerGroups per group, not one more inside :meth:`lag`)."""
        lag = sum((await self.lag(source, group, committed=committed)).values())
        known = members != 0 or any(v is not None for v in committed.values())
        return GroupState(source, group, self.group_name(source, group), lag, members, known)

    async def _members(self, groups: list[str]) -> dict[str, int | None]:
        """Live members per group (``DescribeConsumerGroups``): 0 for an empty or unknown group,
        None where a group in another state lists no member (some brokers, Tansu among them,
        report a consuming group as STABLE without its members: unknown, not zero)."""
        ck = self._ck
        timeout = self.request_timeout
        idle = {ck.ConsumerGroupState.EMPTY, ck.ConsumerGroupState.DEAD}

        def describe(admin: Any) -> dict[str, int | None]:
            futures = admin.describe_consumer_groups(groups, request_timeout=timeout)
            out: dict[str, int | None] = {}
            for group, future in futures.items():
                desc = future.result(timeout)
                n = len(desc.members or [])
                out[group] = n if n or desc.state in idle else None
            return out

        return await self._admin(describe)

    async def check(self) -> None:
        """The cluster answers a metadata request (``BrokerUnavailable`` otherwise)."""
        timeout = self.request_timeout
        await self._admin(lambda admin: admin.list_topics(timeout=timeout))

    # ---------------------------------------------------------------- close

    async def close(self) -> None:
        """Close every subscription (gracefully), flush the producer (up to ``publish_timeout``)
        and refuse further publishes. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subs):
            await sub.close()
        producer, self._producer = self._producer, None
        if producer is not None:
            left = await asyncio.get_running_loop().run_in_executor(
                self._pool, producer.flush, self.publish_timeout
            )
            if left:
                log.warning("KafkaBroker %s: %d records still unsent at close", self._display, left)
        self._pool.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"KafkaBroker({self._display!r}, subscriptions={len(self._subs)})"
