"""The relay: publishes committed outbox rows and marks them published.

One pass (:meth:`Relay.run_once`):

1. claim up to ``batch`` pending rows in sequence order (PostgreSQL: ``FOR UPDATE SKIP LOCKED`` in
   the claim's own transaction; SQLite: the file's relay lease);
2. rebuild each row's envelope through the wire codec (same operation id, same first publish time
   every time the row is read);
3. publish in *waves*, one publish call per destination per wave: wave ``n`` holds the ``n``-th row
   of every key, so a later row of a key is only sent after the call carrying the earlier one
   returned (boundary PUBLISHED). Keyless rows all go in the first wave;
4. an ambiguous publish (``PublishAmbiguous`` or the ``publish_timeout``) is retried with the SAME
   envelopes up to ``max_publish_attempts`` calls; a destination whose call still fails is left
   alone for the rest of the pass (its keys stop, they are never skipped) and backs off;
5. failpoint ``relay_after_publish_before_mark``, then one statement marks every confirmed row.

What it may lose or duplicate: nothing is lost (a row stays pending until its mark commits). A
relay that dies between publishing and marking, or whose mark fails, publishes those rows again
after restart: same operation ids, so consumers deduplicate. On SQLite a relay stalled past its
lease may overlap with the relay that took over (more duplicates, never a loss).

A row that no longer decodes (edited by hand, limits tightened after staging) blocks its key, or
just itself when keyless; it is counted (``replaysafe_outbox_blocked_total``), logged, retried with
backoff, and never skipped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

from replaysafe import observe as o
from replaysafe.brokers.base import Publisher
from replaysafe.clock import SYSTEM_CLOCK, Clock
from replaysafe.envelope import Envelope, Limits
from replaysafe.errors import (
    BadInput,
    BrokerError,
    ConfigurationError,
    LedgerError,
    PublishAmbiguous,
)
from replaysafe.failpoints import FAILPOINTS, RELAY_AFTER_PUBLISH_BEFORE_MARK, Failpoints
from replaysafe.outbox.base import DEFAULT_RELAY_LEASE, OutboxRow, OutboxStore, Skip, check_limit

log = logging.getLogger("replaysafe.outbox")

#: published rows are kept this long by default before cleanup deletes them (seconds)
DEFAULT_RETENTION = 86_400.0


@dataclass(slots=True)
class _Backoff:
    failures: int
    retry_at: float


def default_owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Relay:
    """Publishes an :class:`~replaysafe.outbox.base.OutboxStore`'s pending rows to ``publisher``.

    ``batch``: rows per pass. ``poll_interval``: wait when there was nothing (or not a full batch)
    to publish; also the base of the exponential backoff of failing destinations (capped at
    ``max_backoff``). ``retention``: published rows older than this are deleted by :meth:`cleanup`
    (every ``cleanup_interval`` seconds in :meth:`run`, at most ``cleanup_batches`` statements of
    ``cleanup_batch`` rows each time). ``lease``: the store's relay lease (SQLite); keep
    ``publish_timeout * max_publish_attempts`` well below half of it. ``clock`` drives waits and
    backoff; the store's clock stamps rows. ``failpoints`` defaults to the process-wide registry.
    """

    def __init__(
        self,
        store: OutboxStore,
        publisher: Publisher,
        *,
        batch: int = 100,
        poll_interval: float = 0.5,
        retention: float = DEFAULT_RETENTION,
        clock: Clock = SYSTEM_CLOCK,
        failpoints: Failpoints | None = None,
        stats: o.Stats | None = None,
        owner: str | None = None,
        lease: float = DEFAULT_RELAY_LEASE,
        max_publish_attempts: int = 3,
        publish_timeout: float = 10.0,
        retry_delay: float = 0.05,
        max_backoff: float = 30.0,
        cleanup_interval: float = 60.0,
        cleanup_batch: int = 1000,
        cleanup_batches: int = 10,
        metrics_interval: float = 5.0,
        limits: Limits | None = None,
    ) -> None:
        check_limit("batch", batch)
        check_limit("max_publish_attempts", max_publish_attempts)
        check_limit("cleanup_batch", cleanup_batch)
        check_limit("cleanup_batches", cleanup_batches)
        for name, value in (
            ("poll_interval", poll_interval),
            ("retention", retention),
            ("lease", lease),
            ("publish_timeout", publish_timeout),
            ("max_backoff", max_backoff),
            ("cleanup_interval", cleanup_interval),
            ("metrics_interval", metrics_interval),
        ):
            if not value > 0:
                raise ConfigurationError(f"Relay {name} must be positive seconds, got {value!r}")
        if retry_delay < 0:
            raise ConfigurationError(f"Relay retry_delay must be >= 0, got {retry_delay!r}")
        self.store = store
        self.publisher = publisher
        self.batch = batch
        self.poll_interval = poll_interval
        self.retention = retention
        self.clock = clock
        self.failpoints = FAILPOINTS if failpoints is None else failpoints
        self.stats = stats if stats is not None else o.Stats()
        self.owner = owner or default_owner()
        self.lease = lease
        self.max_publish_attempts = max_publish_attempts
        self.publish_timeout = publish_timeout
        self.retry_delay = retry_delay
        self.max_backoff = max_backoff
        self.cleanup_interval = cleanup_interval
        self.cleanup_batch = cleanup_batch
        self.cleanup_batches = cleanup_batches
        self.metrics_interval = metrics_interval
        self.limits = store.limits if limits is None else limits
        #: True while another relay holds the store's relay lease (SQLite)
        self.standby = False
        self._destinations: dict[str, _Backoff] = {}
        self._keys: dict[tuple[str, str], _Backoff] = {}
        self._rows: dict[int, _Backoff] = {}

    def __repr__(self) -> str:
        return f"Relay({self.store!r}, owner={self.owner!r}, batch={self.batch})"

    # ------------------------------------------------------------------ one pass

    async def run_once(self) -> int:
        """One pass (see the module docstring). Returns how many rows were published and marked.

        Broker failures are handled per destination (retry, then back off); store failures
        (``LedgerUnavailable``) propagate: rows published before such a failure stay pending and
        are published again (duplicates, never a loss).
        """
        async with self.store.claim(
            self.batch, owner=self.owner, lease=self.lease, skip=self._skip()
        ) as claimed:
            if not claimed.active:
                if not self.standby:
                    log.info("outbox relay %s: another relay holds the lease; standing by", self)
                self.standby = True
                return 0
            self.standby = False
            confirmed = await self._publish_rows(claimed.rows)
            if not confirmed:
                return 0
            await self.failpoints.hit(
                RELAY_AFTER_PUBLISH_BEFORE_MARK,
                {
                    "operation_id": confirmed[0].operation_id,
                    "operation_ids": [r.operation_id for r in confirmed],
                    "rows": len(confirmed),
                    "sleep": self.clock.sleep,
                },
            )
            await claimed.mark_published([r.id for r in confirmed])
        for row in confirmed:
            self.stats.inc(o.OUTBOX_PUBLISHED, destination=row.destination)
        return len(confirmed)

    async def _publish_rows(self, rows: list[OutboxRow]) -> list[OutboxRow]:
        plan: dict[str, list[list[tuple[OutboxRow, Envelope]]]] = {}
        depth: dict[tuple[str, str], int] = {}
        stopped: set[tuple[str, str]] = set()
        for row in rows:
            kid = None if row.key is None else (row.destination, row.key)
            if kid is not None and kid in stopped:
                continue
            try:
                env = row.envelope(self.limits)
            except BadInput as exc:
                self._block_row(row, exc)
                if kid is not None:
                    stopped.add(kid)
                continue
            level = 0
            if kid is not None:
                level = depth.get(kid, 0)
                depth[kid] = level + 1
            if kid is None:
                self._rows.pop(row.id, None)
            else:
                self._keys.pop(kid, None)  # it decodes again: forget its backoff
            waves = plan.setdefault(row.destination, [])
            while len(waves) <= level:
                waves.append([])
            waves[level].append((row, env))
        confirmed: list[OutboxRow] = []
        failed: set[str] = set()
        level = 0
        while True:
            work = [
                (dest, waves[level])
                for dest, waves in plan.items()
                if dest not in failed and level < len(waves)
            ]
            if not work:
                break
            for dest, items in work:
                if await self._publish(dest, [env for _, env in items]):
                    confirmed.extend(row for row, _ in items)
                else:
                    failed.add(dest)
            level += 1
        for dest in plan:
            if dest not in failed:
                self._destinations.pop(dest, None)
        return confirmed

    async def _publish(self, destination: str, envelopes: list[Envelope]) -> bool:
        """One wave for one destination: True when the broker confirmed every envelope."""
        for attempt in range(1, self.max_publish_attempts + 1):
            try:
                await asyncio.wait_for(
                    self.publisher.publish(destination, envelopes), self.publish_timeout
                )
                return True
            except (PublishAmbiguous, TimeoutError) as exc:
                # the broker may hold some of them: the SAME envelopes again, never new ids
                self.stats.inc(o.PUBLISH_AMBIGUOUS, destination=destination)
                why = "timed out" if isinstance(exc, TimeoutError) else f"was ambiguous ({exc})"
                log.warning(
                    "outbox relay: publish of %d row(s) to %s %s (attempt %d of %d)",
                    len(envelopes),
                    destination,
                    why,
                    attempt,
                    self.max_publish_attempts,
                )
                if attempt < self.max_publish_attempts:
                    await self.clock.sleep(self.retry_delay * attempt)
            except BrokerError as exc:
                log.warning("outbox relay: publish to %s failed: %s", destination, exc)
                break
            except Exception:  # an adapter bug must stop this destination, not the relay
                log.exception("outbox relay: publish to %s raised unexpectedly", destination)
                break
        self.stats.inc(o.OUTBOX_PUBLISH_FAILED, destination=destination)
        self._back_off(self._destinations, destination)
        return False

    # ------------------------------------------------------------------ backoff and blocks

    def _back_off(self, table: dict[Any, _Backoff], item: Any) -> float:
        prev = table.get(item)
        failures = 1 if prev is None else prev.failures + 1
        delay = min(self.max_backoff, self.poll_interval * 2.0 ** (failures - 1))
        table[item] = _Backoff(failures, self.clock.now() + delay)
        return delay

    def _block_row(self, row: OutboxRow, exc: BadInput) -> None:
        self.stats.inc(o.OUTBOX_BLOCKED, destination=row.destination)
        if row.key is None:
            delay = self._back_off(self._rows, row.id)
            what = f"row {row.id}"
        else:
            delay = self._back_off(self._keys, (row.destination, row.key))
            what = f"row {row.id} and every later row of key {row.key!r}"
        log.error(
            "outbox relay: row %d (%s, operation %s) no longer decodes: %s; %s to %s stay "
            "pending (retried in %.1fs): fix or delete the row",
            row.id,
            row.destination,
            row.operation_id,
            exc,
            what,
            row.destination,
            delay,
        )

    def _skip(self) -> Skip:
        now = self.clock.now()

        def live(table: dict[Any, _Backoff]) -> frozenset[Any]:
            return frozenset(k for k, b in table.items() if b.retry_at > now)

        return Skip(live(self._destinations), live(self._keys), live(self._rows))

    # ------------------------------------------------------------------ housekeeping

    async def cleanup(self) -> int:
        """Delete published rows older than ``retention``, in bounded statements. Returns how many
        were deleted."""
        before = self.store.now() - self.retention
        total = 0
        for _ in range(self.cleanup_batches):
            n = await self.store.cleanup(before, self.cleanup_batch)
            total += n
            if n < self.cleanup_batch:
                break
        return total

    async def refresh_metrics(self) -> tuple[int, float | None]:
        """Read pending count and publish lag from the store into ``stats`` (gauges
        ``replaysafe_outbox_pending`` and ``replaysafe_outbox_publish_lag_seconds``)."""
        pending = await self.store.pending_count()
        lag = await self.store.oldest_pending_age()
        self.stats.set(o.OUTBOX_PENDING, float(pending))
        self.stats.set(o.OUTBOX_PUBLISH_LAG, 0.0 if lag is None else lag)
        return pending, lag

    # ------------------------------------------------------------------ the loop

    async def run(self, stop: asyncio.Event) -> None:
        """Pass after pass until ``stop`` is set; a pass in progress finishes first (graceful), then
        the relay lease is released so a standby takes over at once.

        Store and broker outages are logged and retried with backoff; configuration errors and
        bugs propagate. A :class:`~replaysafe.errors.SimulatedCrash` propagates at once without
        releasing anything, as a killed process would.
        """
        next_cleanup = self.clock.now()
        next_metrics = self.clock.now()
        errors = 0
        while not stop.is_set():
            try:
                published = await self.run_once()
                errors = 0
            except (LedgerError, BrokerError) as exc:
                errors += 1
                published = 0
                log.warning("outbox relay %s: pass failed: %s", self, exc)
            now = self.clock.now()
            if now >= next_metrics or published < self.batch:
                next_metrics = now + self.metrics_interval
                await self._quietly(self.refresh_metrics(), "reading the pending count")
            if now >= next_cleanup:
                next_cleanup = now + self.cleanup_interval
                await self._quietly(self.cleanup(), "cleanup")
            if errors:
                await self._pause(stop, min(self.max_backoff, self.poll_interval * 2.0**errors))
            elif published < self.batch:
                await self._pause(stop, self.poll_interval)
        await self._quietly(self.store.release(self.owner), "releasing the relay lease")

    async def _quietly(self, work: Any, what: str) -> None:
        try:
            await work
        except (LedgerError, BrokerError) as exc:
            log.warning("outbox relay %s: %s failed: %s", self, what, exc)

    async def _pause(self, stop: asyncio.Event, seconds: float) -> None:
        """Wait ``seconds`` on the relay's clock, or less if ``stop`` is set."""
        waiter = asyncio.ensure_future(stop.wait())
        sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
        try:
            await asyncio.wait((waiter, sleeper), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            sleeper.cancel()


__all__ = ["DEFAULT_RETENTION", "Relay", "default_owner"]
